//! Bytes -> scenario. Every byte string decodes to a valid, bounded scenario: ops refer to a
//! handful of gfns by index (so short inputs already collide on the same pages and tables),
//! vCPUs by index, and the bytes left over become the schedule. The fields come in the order a
//! short input should spend its bytes on: vCPU count, the VMM's ops, the guests' programs,
//! then build-time pages and a second VMM thread.

use arbitrary::{Arbitrary, Unstructured};

use super::{
    Expect, GuestStep, Scenario, Schedule, Task, TaskName, TaskOps, TdConfig, VmmConfig, VmmOp,
    FAULT_CONVERT_BLOCKS, HIGH_GFN, MAX_SLOT_ID, MAX_TASK_OPS, MAX_VCPUS, MAX_VMM_TASKS,
};
use crate::addr::Gfn;

/// The gfns ops choose from: three pages sharing a 4K table, two in the next 2M region, one in
/// a third, and two past 1 GiB (reachable once a memslot covers them: `REGIONS`).
pub(crate) const GFNS: [u64; 8] = [
    0x10,
    0x11,
    0x12,
    0x200,
    0x201,
    0x400,
    HIGH_GFN,
    HIGH_GFN + 1,
];

fn gfn(i: u8) -> Gfn {
    Gfn::new(GFNS[usize::from(i) % GFNS.len()])
}

#[derive(Arbitrary, Debug)]
enum RawGuest {
    Accept(u8),
    /// (gfn index, which odd form: 2M at the gfn, 2M at its region, unaligned, shared
    /// alias, beyond the GPA width)
    AcceptOdd(u8, u8),
    Read(u8, bool),
    Write(u8, bool, u8),
    MapGpa(u8, bool),
}

#[derive(Arbitrary, Debug)]
enum RawVmm {
    /// (gfn index, to private, length byte)
    Convert(u8, bool, u8),
    /// The slot covering a gfn.
    DeleteSlot(u8),
    PunchHole(u8, u8),
    Prefault(u8, u8, u8),
    Signal(u8),
    Interrupt(u8),
    ZapAllFast,
    ZeroStep(u8, u8),
    CreateSlot,
    AllocFail(u8),
    CloseGmem,
    /// (slot id, region and offset choice)
    CreateSlotAt(u8, u8),
    /// (leaf choice, operand choice)
    InjectBusy(u8, u8),
    /// leaf choice
    InjectError(u8),
    /// fallocate allocate: (gfn index, length byte)
    Allocate(u8, u8),
    /// madvise(MADV_DONTNEED) of the VMM's memory: (gfn index, length byte)
    DontNeed(u8, u8),
}

/// Regions a VMM splits guest memory into: (first gfn, pages). Each holds some of `GFNS`; the
/// last is the start of the second 1 GiB region.
const REGIONS: [(u64, u64); 4] = [(0, 0x200), (0x200, 0x200), (0x400, 0x400), (HIGH_GFN, 0x10)];

/// 1 to 4 pages: ranges that cover a neighbour's page or cross into the next table.
fn npages(len: u8) -> u64 {
    1 + u64::from(len % 4)
}

#[derive(Arbitrary, Debug)]
struct Raw {
    vcpus: u8,
    vmm: Vec<RawVmm>,
    guest: [Vec<RawGuest>; MAX_VCPUS as usize],
    destroy: bool,
    /// KVM_TDX_INIT_MEM_REGION pages (gfn index, content).
    init: Vec<(u8, u8)>,
    /// A second VMM thread racing the first.
    vmm1: Vec<RawVmm>,
    /// The TD build as ops (`build ops`) instead of before the run.
    build: Option<RawBuild>,
    /// `vmm fault_convert`: which block a fault converts.
    fault_convert: u8,
}

/// How the VMM builds the TD when the build is part of the run.
#[derive(Arbitrary, Debug)]
struct RawBuild {
    /// Low 2 bits: in order on vmm0; the vCPU steps on vmm1, racing the VM-wide ones; one step
    /// moved to the end (the wrong time); one step issued twice.
    mode: u8,
    /// Which step the last two modes move or repeat.
    pick: u8,
    /// KVM_CAP_MAX_VCPUS: bit 2 set leaves the default; else 1 + the low 2 bits.
    max_vcpus: u8,
}

/// The upstream VMM's build order (QEMU): INIT_VM, each vCPU created and initialised, the
/// memslot and its private attributes, INIT_MEM_REGION of each build-time page, FINALIZE.
/// Returns the VM-wide steps and the vCPU steps.
fn build_steps(vcpus: u8, init: &[(Gfn, u64)]) -> (Vec<VmmOp>, Vec<VmmOp>) {
    let mut vm = vec![VmmOp::InitVm];
    let mut cpu = Vec::new();
    for v in 0..vcpus {
        cpu.push(VmmOp::CreateVcpu);
        cpu.push(VmmOp::InitVcpu { vcpu: v });
    }
    vm.push(VmmOp::CreateSlot);
    vm.push(VmmOp::Convert {
        gfn: Gfn::new(0),
        npages: crate::stack::GUEST_PAGES,
        private: true,
    });
    for &(gfn, value) in init {
        vm.push(VmmOp::InitMemRegion {
            vcpu: 0,
            gfn,
            value,
        });
    }
    vm.push(VmmOp::Finalize);
    (vm, cpu)
}

/// The two VMM threads' build prefixes for `b`.
fn build_plan(b: &RawBuild, vcpus: u8, init: &[(Gfn, u64)]) -> (Vec<VmmOp>, Vec<VmmOp>) {
    let (vm, cpu) = build_steps(vcpus, init);
    if b.mode % 4 == 1 {
        return (vm, cpu);
    }
    // In order: INIT_VM, the vCPUs, then the rest.
    let mut all = vec![vm[0]];
    all.extend(cpu);
    all.extend(&vm[1..]);
    let i = usize::from(b.pick) % all.len();
    match b.mode % 4 {
        2 => {
            let op = all.remove(i);
            all.push(op);
        }
        3 => all.insert(i, all[i]),
        _ => {}
    }
    (all, Vec::new())
}

/// A vCPU's program from raw ops, as a well-behaved guest writes it: vCPU `v` of `vcpus` only
/// touches its own pages (they share 4K tables and 2M regions with the other vCPU's, so the
/// MMU races stay), and it converts a page with MapGPA before using it the other way (a guest
/// that uses one page as private and shared at once makes the VMM convert it back and forth
/// forever; that livelock is the guest's, not KVM's).
fn guest_program(raw: &[RawGuest], v: u8, vcpus: u8) -> Vec<GuestStep> {
    let own = |i: u8| {
        let n = GFNS.len() as u8 / vcpus;
        gfn(v + vcpus * (i % n))
    };
    let mut private: std::collections::BTreeMap<Gfn, bool> = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    let mut want = |out: &mut Vec<GuestStep>, g: Gfn, p: bool| {
        let cur = private.entry(g).or_insert(true);
        if *cur != p {
            *cur = p;
            out.push(GuestStep::MapGpa {
                gfn: g,
                npages: 1,
                private: p,
            });
        }
    };
    for r in raw {
        if out.len() >= MAX_TASK_OPS - 1 {
            break;
        }
        match *r {
            // A polite guest accepts its own pages at 4K only.
            RawGuest::Accept(g) | RawGuest::AcceptOdd(g, _) => {
                let g = own(g);
                want(&mut out, g, true);
                out.push(GuestStep::Accept { gfn: g });
            }
            RawGuest::Read(g, shared) => {
                let g = own(g);
                want(&mut out, g, !shared);
                out.push(GuestStep::Read { gfn: g, shared });
            }
            RawGuest::Write(g, shared, val) => {
                let g = own(g);
                want(&mut out, g, !shared);
                out.push(GuestStep::Write {
                    gfn: g,
                    shared,
                    value: u64::from(val) + 1,
                });
            }
            RawGuest::MapGpa(g, p) => want(&mut out, own(g), p),
        }
    }
    out.truncate(MAX_TASK_OPS);
    out
}

/// A TDCALL a Linux guest never makes: ACCEPT at 2M (aligned or not), or at 4K of a GPA the
/// module must refuse.
fn odd_accept(g: Gfn, kind: u8) -> GuestStep {
    use crate::addr::Gpa;
    match kind % 5 {
        0 => GuestStep::AcceptHuge { gfn: g },
        1 => GuestStep::AcceptHuge {
            gfn: Gfn::new(g.raw() & !511),
        },
        2 => GuestStep::AcceptGpa {
            gpa: Gpa::new(g.gpa().raw() + 0x123),
        },
        3 => GuestStep::AcceptGpa {
            gpa: g.gpa().to_shared(),
        },
        _ => GuestStep::AcceptGpa {
            gpa: Gpa::new(g.gpa().raw() | 1 << 48),
        },
    }
}

/// A hostile guest's program: the raw ops as they come. Any vCPU touches any of the gfns, as
/// private or shared, without converting first (the VMM converts on the fault), accesses pages
/// it never accepted or another vCPU owns, accepts twice, and converts ranges of one to four
/// pages either way with MapGPA.
fn hostile_program(raw: &[RawGuest]) -> Vec<GuestStep> {
    raw.iter()
        .take(MAX_TASK_OPS)
        .map(|r| match *r {
            RawGuest::Accept(g) => GuestStep::Accept { gfn: gfn(g) },
            RawGuest::AcceptOdd(g, kind) => odd_accept(gfn(g), kind),
            RawGuest::Read(g, shared) => GuestStep::Read {
                gfn: gfn(g),
                shared,
            },
            RawGuest::Write(g, shared, val) => GuestStep::Write {
                gfn: gfn(g),
                shared,
                value: u64::from(val) + 1,
            },
            RawGuest::MapGpa(g, private) => GuestStep::MapGpa {
                gfn: gfn(g),
                npages: npages(g >> 3),
                private,
            },
        })
        .collect()
}

fn vmm(r: &RawVmm, vcpus: u8) -> VmmOp {
    match *r {
        RawVmm::Convert(g, private, len) => VmmOp::Convert {
            gfn: gfn(g),
            npages: npages(len),
            private,
        },
        RawVmm::DeleteSlot(g) => VmmOp::DeleteSlot { gfn: gfn(g) },
        RawVmm::PunchHole(g, len) => VmmOp::PunchHole {
            gfn: gfn(g),
            npages: npages(len),
        },
        RawVmm::Prefault(v, g, len) => VmmOp::Prefault {
            vcpu: v % vcpus,
            gfn: gfn(g),
            npages: npages(len),
            // Now and then the shared alias (-EINVAL for a TD).
            shared: len & 0x70 == 0x70,
        },
        RawVmm::Signal(v) => VmmOp::Signal { vcpu: v % vcpus },
        RawVmm::Interrupt(v) => VmmOp::Interrupt { vcpu: v % vcpus },
        RawVmm::ZapAllFast => VmmOp::ZapAllFast,
        RawVmm::ZeroStep(v, g) => VmmOp::ZeroStep {
            vcpu: v % vcpus,
            gfn: gfn(g),
        },
        RawVmm::CreateSlot => VmmOp::CreateSlot,
        // A few failures: enough to hit a topup or a guest_memfd allocation, not the whole run.
        RawVmm::AllocFail(n) => VmmOp::AllocFail {
            n: 1 + n % 4,
            // Usually at once; sometimes part way into a multi-page allocation.
            after: if n & 0x80 != 0 { (n >> 2) % 8 } else { 0 },
        },
        RawVmm::DontNeed(g, len) => VmmOp::DontNeed {
            gfn: gfn(g),
            npages: npages(len),
        },
        RawVmm::Allocate(g, len) => VmmOp::Allocate {
            gfn: gfn(g),
            npages: npages(len),
        },
        RawVmm::InjectBusy(l, o) => {
            use crate::tdx_module::{busy_operands, BUSY_INJECTABLE};
            let leaf = BUSY_INJECTABLE[usize::from(l) % BUSY_INJECTABLE.len()];
            let ops = busy_operands(leaf);
            VmmOp::InjectBusy {
                leaf,
                operand: ops[usize::from(o) % ops.len()],
            }
        }
        RawVmm::InjectError(l) => {
            use crate::tdx_module::ERROR_INJECTABLE;
            VmmOp::InjectError {
                leaf: ERROR_INJECTABLE[usize::from(l) % ERROR_INJECTABLE.len()].0,
            }
        }
        RawVmm::CloseGmem => VmmOp::CloseGmem,
        RawVmm::CreateSlotAt(s, r) => {
            let (g, n) = REGIONS[usize::from(r) % REGIONS.len()];
            // Usually bound where the gfn is (the high region at the file's end); sometimes
            // to another part of the file.
            let home = if g >= HIGH_GFN { 0x800 - n } else { g };
            let off = if r & 0x10 != 0 {
                (home + 0x400) % 0x800
            } else {
                home
            };
            VmmOp::CreateSlotAt {
                slot: 1 + s % MAX_SLOT_ID,
                gfn: Gfn::new(g),
                npages: n,
                off,
                dirty_log: r & 0x20 != 0 && s & 0x80 != 0,
            }
        }
    }
}

fn vmm_ops(raw: &[RawVmm], vcpus: u8) -> Vec<VmmOp> {
    raw.iter()
        .take(MAX_TASK_OPS - 1)
        .map(|r| vmm(r, vcpus))
        .collect()
}

/// Decodes fuzz input: an input starting with `wire::MAGIC` is in the exact form
/// (`wire.rs`); any other is compact: the first byte is the length of the op part, the rest is
/// the schedule.
pub fn decode(data: &[u8]) -> Scenario {
    if let Some(rest) = data.strip_prefix(&super::wire::MAGIC) {
        return super::wire::decode(rest);
    }
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b))
        .min(data.len().saturating_sub(1));
    let (ops, sched) = data.get(1..).unwrap_or(&[]).split_at(split);
    let mut u = Unstructured::new(ops);
    let raw = Raw::arbitrary(&mut u).unwrap_or(Raw {
        vcpus: 0,
        vmm: Vec::new(),
        guest: Default::default(),
        destroy: false,
        init: Vec::new(),
        vmm1: Vec::new(),
        build: None,
        fault_convert: 0,
    });
    // Mostly one or two vCPUs (the MMU races need two), sometimes up to MAX_VCPUS; bit 6
    // makes the guests polite (hostile by default), bit 7 is the TD's SEPT_VE_DISABLE.
    let vcpus = match raw.vcpus % 8 {
        0..=3 => 1,
        4..=6 => 2,
        _ => 2 + ((raw.vcpus & 0x3f) / 8) % (MAX_VCPUS - 1),
    };
    let polite = raw.vcpus & 0x40 != 0;
    // A careless VMM converts more than the fault asked for (with hostile guests only).
    let vmm = VmmConfig {
        fault_convert_pages: if polite {
            1
        } else {
            FAULT_CONVERT_BLOCKS[usize::from(raw.fault_convert) % FAULT_CONVERT_BLOCKS.len()]
        },
    };
    let mut td = TdConfig {
        sept_ve_disable: raw.vcpus & 0x80 != 0,
        ..TdConfig::default()
    };
    let mut tasks = Vec::new();
    for (i, g) in raw.guest.iter().enumerate().take(usize::from(vcpus)) {
        tasks.push(Task {
            name: TaskName::Vcpu(i as u8),
            ops: TaskOps::Guest(if polite {
                guest_program(g, i as u8, vcpus)
            } else {
                hostile_program(g)
            }),
        });
    }
    let mut init_pages: Vec<(Gfn, u64)> = Vec::new();
    for &(g, value) in raw.init.iter().take(MAX_TASK_OPS) {
        // Build-time pages live in the stack's memslot (below 1 GiB).
        let g = Gfn::new(gfn(g).raw() % crate::stack::GUEST_PAGES);
        if !init_pages.iter().any(|(p, _)| *p == g) {
            init_pages.push((g, u64::from(value) + 1));
        }
    }
    let mut v = vmm_ops(&raw.vmm, vcpus);
    if raw.destroy {
        v.push(VmmOp::Destroy);
    }
    let mut v1 = vmm_ops(&raw.vmm1, vcpus);
    if let Some(b) = &raw.build {
        // The build is part of the run: its pages become INIT_MEM_REGION ops.
        let (b0, b1) = build_plan(b, vcpus, &init_pages);
        init_pages.clear();
        td.build_ops = true;
        if b.max_vcpus & 4 == 0 {
            td.max_vcpus = Some(1 + b.max_vcpus % MAX_VCPUS);
        }
        v = b0.into_iter().chain(v).take(MAX_TASK_OPS).collect();
        v1 = b1.into_iter().chain(v1).take(MAX_TASK_OPS).collect();
    }
    for (i, ops) in [v, v1]
        .into_iter()
        .enumerate()
        .take(usize::from(MAX_VMM_TASKS))
    {
        if !ops.is_empty() {
            tasks.push(Task {
                name: TaskName::Vmm(i as u8),
                ops: TaskOps::Vmm(ops),
            });
        }
    }
    Scenario {
        vcpus,
        td,
        vmm,
        init_pages,
        tasks,
        schedule: Schedule::Bytes(sched.iter().take(4096).copied().collect()),
        expect: Expect::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::text::{parse, print};

    #[test]
    fn any_bytes_decode_and_round_trip() {
        let mut rng = crate::sched::choice::SplitMix64::new(3);
        for n in 0..2000usize {
            let data: Vec<u8> = (0..n % 300).map(|_| rng.next_u64() as u8).collect();
            let s = decode(&data);
            assert!((1..=MAX_VCPUS).contains(&s.vcpus));
            let t = print(&s);
            assert_eq!(parse(&t).unwrap(), s, "{t}");
        }
    }

    /// The gfns each vCPU's program touches.
    fn touched(s: &Scenario) -> Vec<std::collections::BTreeSet<Gfn>> {
        s.tasks
            .iter()
            .filter_map(|t| match &t.ops {
                TaskOps::Guest(ops) => Some(
                    ops.iter()
                        .map(|o| match *o {
                            GuestStep::Accept { gfn }
                            | GuestStep::AcceptHuge { gfn }
                            | GuestStep::Read { gfn, .. }
                            | GuestStep::Write { gfn, .. }
                            | GuestStep::MapGpa { gfn, .. } => gfn,
                            GuestStep::AcceptGpa { gpa } => gpa.gfn(),
                        })
                        .collect(),
                ),
                TaskOps::Vmm(_) => None,
            })
            .collect()
    }

    /// Bit 6 of the vCPU byte picks the guest: polite guests keep to their own pages, hostile
    /// ones (the default) share them; the rest of the input is read the same either way.
    #[test]
    fn hostile_guests_share_pages_polite_ones_never_do() {
        let mut rng = crate::sched::choice::SplitMix64::new(11);
        let mut shared_when_hostile = 0;
        for _ in 0..2000 {
            let mut data: Vec<u8> = (0..120).map(|_| rng.next_u64() as u8).collect();
            data[0] = 100;
            data[1] = 0x04; // two vCPUs, hostile, no SEPT_VE_DISABLE
            let hostile = decode(&data);
            data[1] |= 0x40;
            let polite = decode(&data);
            assert_eq!(hostile.vcpus, 2);
            assert_eq!(polite.vcpus, 2);
            let overlap = |s: &Scenario| {
                let t = touched(s);
                t.len() == 2 && t[0].intersection(&t[1]).next().is_some()
            };
            assert!(!overlap(&polite), "{}", print(&polite));
            if overlap(&hostile) {
                shared_when_hostile += 1;
            }
        }
        assert!(shared_when_hostile > 100, "{shared_when_hostile}");
    }
}
