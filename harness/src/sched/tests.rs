use super::*;

/// Two tasks taking two mutexes in the given orders, with a yield inside each critical section.
fn two_lock_run(
    order0: [usize; 2],
    order1: [usize; 2],
    chooser: &mut dyn Chooser,
) -> (Outcome, Executor) {
    let mut ex = Executor::new(TraceMode::Full);
    let cx = ex.ctx();
    let locks = [Mutex::new(&cx, "A"), Mutex::new(&cx, "B")];
    for (name, order) in [("t0", order0), ("t1", order1)] {
        let cx = cx.clone();
        ex.spawn(name, async move {
            let (first, second) = (locks[order[0]], locks[order[1]]);
            first.lock(&cx).await;
            cx.yield_at("between").await;
            second.lock(&cx).await;
            cx.yield_at("critical").await;
            second.unlock(&cx).await;
            first.unlock(&cx).await;
        });
    }
    let out = ex.run(chooser, 10_000, &mut |_| true);
    (out, ex)
}

#[test]
fn same_bytes_same_trace() {
    for bytes in [
        &[][..],
        &[0x80, 0x81, 0x00, 0xff, 0x93][..],
        &[0xff; 40][..],
    ] {
        let (o1, e1) = two_lock_run([0, 1], [0, 1], &mut InputChooser::new(bytes));
        let (o2, e2) = two_lock_run([0, 1], [0, 1], &mut InputChooser::new(bytes));
        assert_eq!(o1, o2);
        assert_eq!(e1.render_trace(), e2.render_trace());
        assert_eq!(e1.trace().hash(), e2.trace().hash());
        assert!(!e1.render_trace().is_empty());
    }
}

#[test]
fn different_bytes_reach_different_interleavings() {
    // Which task enters the A-critical section first, over many inputs.
    let mut first_owner = std::collections::BTreeSet::new();
    let mut hashes = std::collections::BTreeSet::new();
    for seed in 0u64..64 {
        let mut rng = choice::SplitMix64::new(seed);
        let bytes: Vec<u8> = (0..16).map(|_| rng.next_u64() as u8).collect();
        let (out, ex) = two_lock_run([0, 1], [0, 1], &mut InputChooser::new(&bytes));
        assert_eq!(out, Outcome::AllDone, "same lock order never deadlocks");
        hashes.insert(ex.trace().hash());
        let first = ex
            .trace()
            .events()
            .find(|e| e.point == Point::Yield("between"))
            .map(|e| e.task)
            .unwrap();
        first_owner.insert(first);
    }
    assert_eq!(
        first_owner.len(),
        2,
        "both tasks win the race for some input"
    );
    assert!(
        hashes.len() > 4,
        "many distinct interleavings, got {}",
        hashes.len()
    );
}

#[test]
fn ab_ba_deadlock_reports_cycle() {
    let mut script = Script::new(vec![
        Directive {
            task: TaskId(0),
            until: Until::Point("between".into()),
        },
        Directive {
            task: TaskId(1),
            until: Until::Point("between".into()),
        },
    ]);
    let (out, ex) = two_lock_run([0, 1], [1, 0], &mut script);
    let Outcome::Deadlock(rep) = out else {
        panic!("expected deadlock, got {out:?}")
    };
    let names = ex.obj_names();
    let mut cycle: Vec<(u32, &str)> = rep
        .cycle
        .iter()
        .map(|(t, w)| (t.0, names[w.obj().0 as usize]))
        .collect();
    cycle.sort();
    // t0 holds A and waits for B; t1 holds B and waits for A.
    assert_eq!(cycle, vec![(0, "B"), (1, "A")]);
    assert_eq!(rep.blocked.len(), 2);
    // The same orders under a schedule that lets t0 finish first complete fine.
    let mut serial = Script::new(vec![Directive {
        task: TaskId(0),
        until: Until::Blocked,
    }]);
    assert_eq!(
        two_lock_run([0, 1], [1, 0], &mut serial).0,
        Outcome::AllDone
    );
}

#[test]
fn ab_ba_random_inputs_deadlock_or_finish() {
    let mut deadlocks = 0;
    for seed in 0u64..200 {
        let mut rng = choice::SplitMix64::new(seed);
        let bytes: Vec<u8> = (0..12).map(|_| rng.next_u64() as u8).collect();
        match two_lock_run([0, 1], [1, 0], &mut InputChooser::new(&bytes)).0 {
            Outcome::AllDone => {}
            Outcome::Deadlock(r) => {
                assert_eq!(r.cycle.len(), 2);
                deadlocks += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(deadlocks > 0);
}

#[test]
fn spinning_task_hits_budget() {
    let mut ex = Executor::new(TraceMode::Ring(16));
    let cx = ex.ctx();
    let flag = std::rc::Rc::new(std::cell::Cell::new(false));
    {
        let cx = cx.clone();
        let flag = flag.clone();
        ex.spawn("spinner", async move {
            // Waits for a flag nobody sets, yielding each time (like a retry loop).
            while !flag.get() {
                cx.yield_at("retry").await;
            }
        });
    }
    {
        let cx = cx.clone();
        ex.spawn("worker", async move {
            cx.yield_at("work").await;
        });
    }
    let out = ex.run(&mut RoundRobin::new(), 500, &mut |_| true);
    let Outcome::BudgetExhausted(rep) = out else {
        panic!("expected budget, got {out:?}")
    };
    assert_eq!(rep.steps, 500);
    assert_eq!(rep.pending, vec![(TaskId(0), Point::Yield("retry"), None)]);
    assert_eq!(ex.trace().events().len(), 16);
}

#[test]
fn srcu_synchronize_waits_only_for_earlier_readers() {
    let mut ex = Executor::new(TraceMode::Full);
    let cx = ex.ctx();
    let srcu = Srcu::new(&cx, "kvm->srcu");
    let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::<&'static str>::new()));
    let early_go = WaitQueue::new(&cx, "early_go");
    let go = std::rc::Rc::new(std::cell::Cell::new(false));
    // early: enters before the synchronizer, leaves only when told.
    {
        let (cx, log, go) = (cx.clone(), log.clone(), go.clone());
        ex.spawn("early", async move {
            let idx = srcu.read_lock(&cx).await;
            log.borrow_mut().push("early in");
            early_go.wait_until(&cx, || go.get()).await;
            log.borrow_mut().push("early out");
            srcu.read_unlock(&cx, idx).await;
        });
    }
    // sync: starts after early is inside.
    {
        let (cx, log) = (cx.clone(), log.clone());
        ex.spawn("sync", async move {
            srcu.synchronize(&cx).await;
            log.borrow_mut().push("sync done");
        });
    }
    // late: enters after sync began and stays inside until sync is done; must not hold it up.
    {
        let (cx, log, go) = (cx.clone(), log.clone(), go.clone());
        ex.spawn("late", async move {
            let idx = srcu.read_lock(&cx).await;
            log.borrow_mut().push("late in");
            go.set(true);
            early_go.wake_all(&cx);
            for _ in 0..20 {
                cx.yield_at("late busy").await;
            }
            log.borrow_mut().push("late out");
            srcu.read_unlock(&cx, idx).await;
        });
    }
    // early enters and sleeps; sync starts and sleeps on early; late enters and wakes early.
    let mut script = Script::new(vec![
        Directive {
            task: TaskId(0),
            until: Until::Blocked,
        },
        Directive {
            task: TaskId(1),
            until: Until::Blocked,
        },
        Directive {
            task: TaskId(2),
            until: Until::Steps(3),
        },
    ]);
    let out = ex.run(&mut script, 1000, &mut |_| true);
    assert_eq!(out, Outcome::AllDone);
    let log = log.borrow();
    let pos = |s| log.iter().position(|x| *x == s).unwrap();
    assert!(pos("early out") < pos("sync done"), "{log:?}");
    assert!(pos("late in") < pos("sync done"), "{log:?}");
    assert!(
        pos("sync done") < pos("late out"),
        "late reader delayed sync: {log:?}"
    );
    let sync_slept = ex
        .trace()
        .events()
        .any(|e| e.task == TaskId(1) && e.point == Point::Blocked { obj: srcu.id() });
    assert!(sync_slept, "synchronize must wait for the early reader");
}

#[test]
fn synchronize_inside_read_section_self_deadlocks() {
    let mut ex = Executor::new(TraceMode::Full);
    let cx = ex.ctx();
    let srcu = Srcu::new(&cx, "srcu");
    {
        let cx = cx.clone();
        ex.spawn("t", async move {
            let idx = srcu.read_lock(&cx).await;
            srcu.synchronize(&cx).await;
            srcu.read_unlock(&cx, idx).await;
        });
    }
    let Outcome::Deadlock(rep) = ex.run(&mut RoundRobin::new(), 100, &mut |_| true) else {
        panic!()
    };
    assert_eq!(rep.cycle.len(), 1);
    assert_eq!(rep.cycle[0].0, TaskId(0));
}

#[test]
fn rwlock_waiting_writer_blocks_new_readers() {
    let mut ex = Executor::new(TraceMode::Full);
    let cx = ex.ctx();
    let l = RwLock::new(&cx, "mmu_lock");
    let order = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    for (name, write) in [("r1", false), ("w", true), ("r2", false)] {
        let (cx, order) = (cx.clone(), order.clone());
        ex.spawn(name, async move {
            if write {
                l.write(&cx).await;
                order.borrow_mut().push(name);
                l.write_unlock(&cx).await;
            } else {
                l.read(&cx).await;
                order.borrow_mut().push(name);
                for _ in 0..3 {
                    cx.yield_at("reading").await;
                }
                l.read_unlock(&cx).await;
            }
        });
    }
    // r1 takes the lock, w queues, then r2 arrives and must wait behind w.
    let mut script = Script::new(vec![
        Directive {
            task: TaskId(0),
            until: Until::Steps(2),
        },
        Directive {
            task: TaskId(1),
            until: Until::Steps(2),
        },
        Directive {
            task: TaskId(2),
            until: Until::Steps(2),
        },
    ]);
    assert_eq!(ex.run(&mut script, 1000, &mut |_| true), Outcome::AllDone);
    assert_eq!(*order.borrow(), vec!["r1", "w", "r2"]);
}

#[test]
fn completion_and_spawn() {
    let mut ex = Executor::new(TraceMode::Full);
    let cx = ex.ctx();
    let done = Completion::new(&cx, "done");
    {
        let cx2 = cx.clone();
        ex.spawn("parent", async move {
            let cx3 = cx2.clone();
            cx2.spawn("child", async move {
                cx3.yield_at("child work").await;
                done.complete(&cx3).await;
            });
            done.wait(&cx2).await;
        });
    }
    assert_eq!(
        ex.run(&mut RoundRobin::new(), 100, &mut |_| true),
        Outcome::AllDone
    );
    // Waiting for a completion nobody signals: all blocked, no cycle.
    let mut ex = Executor::new(TraceMode::Full);
    let cx = ex.ctx();
    let never = Completion::new(&cx, "never");
    {
        let cx = cx.clone();
        ex.spawn("w", async move { never.wait(&cx).await });
    }
    let Outcome::Deadlock(rep) = ex.run(&mut RoundRobin::new(), 100, &mut |_| true) else {
        panic!()
    };
    assert!(rep.cycle.is_empty());
    assert_eq!(
        rep.blocked,
        vec![(TaskId(0), WaitOn::Completion(never.id()))]
    );
}
