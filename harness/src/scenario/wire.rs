//! The exact binary form of a scenario: `encode` writes any scenario the text form accepts and
//! `decode` gives it back unchanged, so structure-aware mutators (`mutate.rs`) can edit the
//! scenario and hand the engine bytes again, and byte havoc over these bytes still changes
//! whole fields (an op's kind, a gfn, a vCPU). Like the compact decoder, it reads any byte
//! string as a valid, bounded scenario: out-of-range values wrap into range, a duplicate task is
//! read and dropped, and a short input ends with defaults.
//!
//! An input in this form starts with `MAGIC`; `decode::decode` routes on it. Layout: vCPU count,
//! TD flags, the fault-convert block, init pages, tasks (name, ops), the expect line, then the
//! schedule, whose bytes run to the end of the input (so growing an input grows its schedule).
//! Numbers are LEB128 varints. There is no tag for the ops that inject a kernel bug.

use super::{
    Dir, DirUntil, Expect, GuestStep, Scenario, Schedule, Task, TaskName, TaskOps, TdConfig,
    VmmConfig, VmmOp, FAULT_CONVERT_BLOCKS, MAX_GFN, MAX_NPAGES, MAX_SLOT_ID, MAX_TASK_OPS,
    MAX_VCPUS, MAX_VMM_TASKS, VIOLATION_KINDS,
};
use crate::addr::{Gfn, Gpa};
use crate::tdx_module::{busy_operands, BUSY_INJECTABLE, ERROR_INJECTABLE};

/// The first two bytes of an input in this form (a compact input whose op part is 255 bytes
/// long and starts with 0xa5 is read as this form instead).
pub const MAGIC: [u8; 2] = [0xff, 0xa5];

/// The most build-time pages and schedule bytes one input may carry.
const MAX_INIT_PAGES: u64 = 64;
const MAX_SCHEDULE_BYTES: usize = 4096;
const MAX_DIRECTIVES: u64 = 256;
const MAX_DIRECTIVE_STEPS: u64 = 1_000_000;

/// Reads fields; past the end every field reads as 0.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn varint(&mut self) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte();
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        v
    }

    /// A varint wrapped into `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.varint() % n
    }

    fn rest(&self) -> &[u8] {
        self.data.get(self.at..).unwrap_or(&[])
    }
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn byte(&mut self, b: u8) {
        self.0.push(b);
    }

    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
}

/// The largest page count an op at `gfn` may cover.
fn max_npages(gfn: Gfn) -> u64 {
    MAX_NPAGES.min(MAX_GFN + 1 - gfn.raw())
}

fn read_gfn(r: &mut Reader<'_>) -> Gfn {
    Gfn::new(r.below(MAX_GFN + 1))
}

fn read_npages(r: &mut Reader<'_>, gfn: Gfn) -> u64 {
    1 + r.below(max_npages(gfn))
}

fn read_vcpu(r: &mut Reader<'_>, vcpus: u8) -> u8 {
    r.byte() % vcpus
}

/// A task name: bit 7 set for a VMM thread, the index in the low bits.
fn read_task_name(r: &mut Reader<'_>, vcpus: u8) -> TaskName {
    let b = r.byte();
    if b & 0x80 != 0 {
        TaskName::Vmm((b & 0x7f) % MAX_VMM_TASKS)
    } else {
        TaskName::Vcpu(b % vcpus)
    }
}

fn write_task_name(w: &mut Writer, name: TaskName) {
    match name {
        TaskName::Vmm(i) => w.byte(0x80 | i),
        TaskName::Vcpu(i) => w.byte(i),
    }
}

/// The number of VMM op kinds (the tag is read modulo this).
const VMM_OPS: u8 = 22;

fn read_vmm_op(r: &mut Reader<'_>, vcpus: u8) -> VmmOp {
    match r.byte() % VMM_OPS {
        0 => {
            let gfn = read_gfn(r);
            let npages = read_npages(r, gfn);
            VmmOp::Convert {
                gfn,
                npages,
                private: r.byte() & 1 != 0,
            }
        }
        1 => VmmOp::DeleteSlot { gfn: read_gfn(r) },
        2 => VmmOp::CreateSlot,
        3 => {
            let slot = r.byte() % (MAX_SLOT_ID + 1);
            let gfn = read_gfn(r);
            let npages = read_npages(r, gfn);
            VmmOp::CreateSlotAt {
                slot,
                gfn,
                npages,
                off: r.below(MAX_NPAGES),
                dirty_log: r.byte() & 1 != 0,
            }
        }
        4 => {
            let gfn = read_gfn(r);
            VmmOp::PunchHole {
                gfn,
                npages: read_npages(r, gfn),
            }
        }
        5 => {
            let gfn = read_gfn(r);
            VmmOp::Allocate {
                gfn,
                npages: read_npages(r, gfn),
            }
        }
        6 => {
            let gfn = read_gfn(r);
            VmmOp::DontNeed {
                gfn,
                npages: read_npages(r, gfn),
            }
        }
        7 => {
            let vcpu = read_vcpu(r, vcpus);
            let gfn = read_gfn(r);
            let npages = read_npages(r, gfn);
            VmmOp::Prefault {
                vcpu,
                gfn,
                npages,
                shared: r.byte() & 1 != 0,
            }
        }
        8 => VmmOp::Signal {
            vcpu: read_vcpu(r, vcpus),
        },
        9 => VmmOp::Interrupt {
            vcpu: read_vcpu(r, vcpus),
        },
        10 => VmmOp::ZapAllFast,
        11 => VmmOp::CloseGmem,
        12 => VmmOp::InitVm,
        13 => VmmOp::CreateVcpu,
        14 => VmmOp::InitVcpu {
            vcpu: read_vcpu(r, vcpus),
        },
        15 => VmmOp::InitMemRegion {
            vcpu: read_vcpu(r, vcpus),
            gfn: read_gfn(r),
            value: r.varint(),
        },
        16 => VmmOp::Finalize,
        17 => VmmOp::ZeroStep {
            vcpu: read_vcpu(r, vcpus),
            gfn: read_gfn(r),
        },
        18 => {
            let leaf = BUSY_INJECTABLE[usize::from(r.byte()) % BUSY_INJECTABLE.len()];
            let ops = busy_operands(leaf);
            VmmOp::InjectBusy {
                leaf,
                operand: ops[usize::from(r.byte()) % ops.len()],
            }
        }
        19 => VmmOp::InjectError {
            leaf: ERROR_INJECTABLE[usize::from(r.byte()) % ERROR_INJECTABLE.len()].0,
        },
        20 => VmmOp::AllocFail {
            n: r.byte() % 17,
            after: r.byte() % 65,
        },
        _ => VmmOp::Destroy,
    }
}

fn write_range(w: &mut Writer, gfn: Gfn, npages: u64) {
    w.varint(gfn.raw());
    w.varint(npages - 1);
}

fn write_vmm_op(w: &mut Writer, op: &VmmOp) {
    match *op {
        VmmOp::Convert {
            gfn,
            npages,
            private,
        } => {
            w.byte(0);
            write_range(w, gfn, npages);
            w.byte(u8::from(private));
        }
        VmmOp::DeleteSlot { gfn } => {
            w.byte(1);
            w.varint(gfn.raw());
        }
        VmmOp::CreateSlot => w.byte(2),
        VmmOp::CreateSlotAt {
            slot,
            gfn,
            npages,
            off,
            dirty_log,
        } => {
            w.byte(3);
            w.byte(slot);
            write_range(w, gfn, npages);
            w.varint(off);
            w.byte(u8::from(dirty_log));
        }
        VmmOp::PunchHole { gfn, npages } => {
            w.byte(4);
            write_range(w, gfn, npages);
        }
        VmmOp::Allocate { gfn, npages } => {
            w.byte(5);
            write_range(w, gfn, npages);
        }
        VmmOp::DontNeed { gfn, npages } => {
            w.byte(6);
            write_range(w, gfn, npages);
        }
        VmmOp::Prefault {
            vcpu,
            gfn,
            npages,
            shared,
        } => {
            w.byte(7);
            w.byte(vcpu);
            write_range(w, gfn, npages);
            w.byte(u8::from(shared));
        }
        VmmOp::Signal { vcpu } => {
            w.byte(8);
            w.byte(vcpu);
        }
        VmmOp::Interrupt { vcpu } => {
            w.byte(9);
            w.byte(vcpu);
        }
        VmmOp::ZapAllFast => w.byte(10),
        VmmOp::CloseGmem => w.byte(11),
        VmmOp::InitVm => w.byte(12),
        VmmOp::CreateVcpu => w.byte(13),
        VmmOp::InitVcpu { vcpu } => {
            w.byte(14);
            w.byte(vcpu);
        }
        VmmOp::InitMemRegion { vcpu, gfn, value } => {
            w.byte(15);
            w.byte(vcpu);
            w.varint(gfn.raw());
            w.varint(value);
        }
        VmmOp::Finalize => w.byte(16),
        VmmOp::ZeroStep { vcpu, gfn } => {
            w.byte(17);
            w.byte(vcpu);
            w.varint(gfn.raw());
        }
        VmmOp::InjectBusy { leaf, operand } => {
            w.byte(18);
            let li = BUSY_INJECTABLE.iter().position(|l| *l == leaf);
            let oi = busy_operands(leaf).iter().position(|o| *o == operand);
            // Scenarios only carry injectable pairs (the parser and both decoders check).
            w.byte(li.unwrap_or(0) as u8);
            w.byte(oi.unwrap_or(0) as u8);
        }
        VmmOp::InjectError { leaf } => {
            w.byte(19);
            let li = ERROR_INJECTABLE.iter().position(|(l, _)| *l == leaf);
            w.byte(li.unwrap_or(0) as u8);
        }
        VmmOp::AllocFail { n, after } => {
            w.byte(20);
            w.byte(n);
            w.byte(after);
        }
        VmmOp::Destroy => w.byte(21),
        VmmOp::InjectSkipConvertZap
        | VmmOp::InjectSkipInGuestMode
        | VmmOp::InjectTruncateWithoutFree
        | VmmOp::InjectNotifierWithoutZap => unreachable!("encode drops injected kernel bugs"),
    }
}

/// The number of guest op kinds.
const GUEST_OPS: u8 = 6;

fn read_guest_op(r: &mut Reader<'_>) -> GuestStep {
    match r.byte() % GUEST_OPS {
        0 => GuestStep::Accept { gfn: read_gfn(r) },
        1 => GuestStep::AcceptHuge { gfn: read_gfn(r) },
        2 => GuestStep::AcceptGpa {
            gpa: Gpa::new(r.varint()),
        },
        3 => GuestStep::Read {
            gfn: read_gfn(r),
            shared: r.byte() & 1 != 0,
        },
        4 => GuestStep::Write {
            gfn: read_gfn(r),
            shared: r.byte() & 1 != 0,
            value: r.varint(),
        },
        _ => {
            let gfn = read_gfn(r);
            let npages = read_npages(r, gfn);
            GuestStep::MapGpa {
                gfn,
                npages,
                private: r.byte() & 1 != 0,
            }
        }
    }
}

fn write_guest_op(w: &mut Writer, op: &GuestStep) {
    match *op {
        GuestStep::Accept { gfn } => {
            w.byte(0);
            w.varint(gfn.raw());
        }
        GuestStep::AcceptHuge { gfn } => {
            w.byte(1);
            w.varint(gfn.raw());
        }
        GuestStep::AcceptGpa { gpa } => {
            w.byte(2);
            w.varint(gpa.raw());
        }
        GuestStep::Read { gfn, shared } => {
            w.byte(3);
            w.varint(gfn.raw());
            w.byte(u8::from(shared));
        }
        GuestStep::Write { gfn, shared, value } => {
            w.byte(4);
            w.varint(gfn.raw());
            w.byte(u8::from(shared));
            w.varint(value);
        }
        GuestStep::MapGpa {
            gfn,
            npages,
            private,
        } => {
            w.byte(5);
            write_range(w, gfn, npages);
            w.byte(u8::from(private));
        }
    }
}

/// A yield-point name as the text form can carry it (one token), or None.
fn point_name(bytes: &[u8]) -> Option<String> {
    let ok = |b: &u8| b.is_ascii_graphic() && *b != b'#';
    if bytes.is_empty() || !bytes.iter().all(ok) || bytes == b"blocked" {
        return None;
    }
    String::from_utf8(bytes.to_vec()).ok()
}

fn read_schedule(r: &mut Reader<'_>, vcpus: u8) -> Schedule {
    match r.byte() % 3 {
        0 => Schedule::Fair,
        1 => {
            let mut dirs = Vec::new();
            for _ in 0..r.below(MAX_DIRECTIVES + 1) {
                let task = read_task_name(r, vcpus);
                let until = match r.byte() % 3 {
                    0 => DirUntil::Steps(r.below(MAX_DIRECTIVE_STEPS + 1) as u32),
                    1 => {
                        let n = usize::from(r.byte());
                        let name: Vec<u8> = (0..n).map(|_| r.byte()).collect();
                        point_name(&name).map_or(DirUntil::Blocked, DirUntil::Point)
                    }
                    _ => DirUntil::Blocked,
                };
                dirs.push(Dir { task, until });
            }
            Schedule::Script(dirs)
        }
        _ => Schedule::Bytes(r.rest().iter().take(MAX_SCHEDULE_BYTES).copied().collect()),
    }
}

fn write_schedule(w: &mut Writer, s: &Schedule) {
    match s {
        Schedule::Fair => w.byte(0),
        Schedule::Script(dirs) => {
            w.byte(1);
            w.varint(dirs.len() as u64);
            for d in dirs {
                write_task_name(w, d.task);
                match &d.until {
                    DirUntil::Steps(n) => {
                        w.byte(0);
                        w.varint(u64::from(*n));
                    }
                    DirUntil::Point(p) => {
                        w.byte(1);
                        w.byte(p.len() as u8);
                        w.0.extend_from_slice(p.as_bytes());
                    }
                    DirUntil::Blocked => w.byte(2),
                }
            }
        }
        Schedule::Bytes(b) => {
            w.byte(2);
            w.0.extend_from_slice(b);
        }
    }
}

/// Reads a scenario from the bytes after `MAGIC`.
pub fn decode(data: &[u8]) -> Scenario {
    let mut r = Reader { data, at: 0 };
    let vcpus = 1 + r.byte() % MAX_VCPUS;
    let flags = r.byte();
    let build_ops = flags & 2 != 0;
    let max = 1 + r.byte() % MAX_VCPUS;
    // Without `build ops` the setup build creates every vCPU, so a lower limit cannot hold.
    let max_vcpus = (flags & 4 != 0 && (build_ops || max >= vcpus)).then_some(max);
    let td = TdConfig {
        sept_ve_disable: flags & 1 != 0,
        max_vcpus,
        build_ops,
    };
    let vmm = VmmConfig {
        fault_convert_pages: FAULT_CONVERT_BLOCKS
            [usize::from(r.byte()) % FAULT_CONVERT_BLOCKS.len()],
    };
    let mut init_pages = Vec::new();
    for _ in 0..r.below(MAX_INIT_PAGES + 1) {
        let gfn = Gfn::new(r.below(crate::stack::GUEST_PAGES));
        let value = r.varint();
        // `init` lines belong to the setup build only, one per page.
        if !build_ops && !init_pages.iter().any(|(p, _)| *p == gfn) {
            init_pages.push((gfn, value));
        }
    }
    let mut tasks: Vec<Task> = Vec::new();
    let ntasks = r.byte() % (MAX_VMM_TASKS + vcpus + 1);
    for _ in 0..ntasks {
        let name = read_task_name(&mut r, vcpus);
        let nops = usize::from(r.byte()) % (MAX_TASK_OPS + 1);
        let ops = match name {
            TaskName::Vmm(_) => {
                TaskOps::Vmm((0..nops).map(|_| read_vmm_op(&mut r, vcpus)).collect())
            }
            TaskName::Vcpu(_) => TaskOps::Guest((0..nops).map(|_| read_guest_op(&mut r)).collect()),
        };
        if !tasks.iter().any(|t| t.name == name) {
            tasks.push(Task { name, ops });
        }
    }
    let expect = match usize::from(r.byte()) % (VIOLATION_KINDS.len() + 2) {
        0 => Expect::None,
        1 => Expect::Clean,
        k => Expect::Violation(VIOLATION_KINDS[k - 2].to_string()),
    };
    let schedule = read_schedule(&mut r, vcpus);
    Scenario {
        vcpus,
        td,
        vmm,
        init_pages,
        tasks,
        schedule,
        expect,
    }
}

/// Writes `s` in this form, `MAGIC` first: `decode::decode` of the result is `s` for every
/// scenario `text::parse` accepts, except that ops injecting a kernel bug are left out (a
/// campaign chooses those with `--kernel-bug`; an input that carried them would be a finding
/// on every policy).
pub fn encode(s: &Scenario) -> Vec<u8> {
    let mut w = Writer(MAGIC.to_vec());
    w.byte(s.vcpus.saturating_sub(1));
    let flags = u8::from(s.td.sept_ve_disable)
        | u8::from(s.td.build_ops) << 1
        | u8::from(s.td.max_vcpus.is_some()) << 2;
    w.byte(flags);
    w.byte(s.td.max_vcpus.unwrap_or(1).saturating_sub(1));
    let block = FAULT_CONVERT_BLOCKS
        .iter()
        .position(|b| *b == s.vmm.fault_convert_pages);
    w.byte(block.unwrap_or(0) as u8);
    w.varint(s.init_pages.len() as u64);
    for &(gfn, value) in &s.init_pages {
        w.varint(gfn.raw());
        w.varint(value);
    }
    w.byte(s.tasks.len() as u8);
    for t in &s.tasks {
        write_task_name(&mut w, t.name);
        match &t.ops {
            TaskOps::Vmm(ops) => {
                let ops: Vec<&VmmOp> = ops.iter().filter(|o| !o.is_injected_kernel_bug()).collect();
                w.byte(ops.len() as u8);
                ops.into_iter().for_each(|op| write_vmm_op(&mut w, op));
            }
            TaskOps::Guest(ops) => {
                w.byte(ops.len() as u8);
                ops.iter().for_each(|op| write_guest_op(&mut w, op));
            }
        }
    }
    let expect = match &s.expect {
        Expect::None => 0,
        Expect::Clean => 1,
        Expect::Violation(k) => 2 + VIOLATION_KINDS.iter().position(|x| x == k).unwrap_or(0),
    };
    w.byte(expect as u8);
    write_schedule(&mut w, &s.schedule);
    w.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::text::{parse, print};

    /// Every byte string after the magic reads as a scenario the text form accepts, and
    /// encoding it gives back one that reads the same.
    #[test]
    fn any_bytes_read_as_a_valid_scenario_that_round_trips() {
        let mut rng = crate::sched::choice::SplitMix64::new(5);
        for n in 0..3000usize {
            let data: Vec<u8> = (0..n % 400).map(|_| rng.next_u64() as u8).collect();
            let s = decode(&data);
            let t = print(&s);
            assert_eq!(parse(&t).as_ref(), Ok(&s), "{t}");
            assert_eq!(crate::scenario::decode::decode(&encode(&s)), s, "{t}");
        }
    }

    /// Every regression scenario round-trips, less its injected kernel bugs.
    #[test]
    fn regressions_round_trip_less_injected_kernel_bugs() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../corpus/regressions");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let Ok(src) = std::fs::read_to_string(&path) else {
                continue;
            };
            let mut s = parse(&src).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for t in &mut s.tasks {
                if let TaskOps::Vmm(ops) = &mut t.ops {
                    ops.retain(|o| !o.is_injected_kernel_bug());
                }
            }
            assert_eq!(
                crate::scenario::decode::decode(&encode(&s)),
                s,
                "{}",
                path.display()
            );
            n += 1;
        }
        assert!(n >= 40, "{n} regressions");
    }

    /// Compact inputs re-encoded in this form read back exactly.
    #[test]
    fn compact_inputs_round_trip_through_this_form() {
        let mut rng = crate::sched::choice::SplitMix64::new(9);
        for n in 0..3000usize {
            let data: Vec<u8> = (0..n % 300).map(|_| rng.next_u64() as u8).collect();
            let s = crate::scenario::decode::decode(&data);
            assert_eq!(crate::scenario::decode::decode(&encode(&s)), s);
        }
    }
}
