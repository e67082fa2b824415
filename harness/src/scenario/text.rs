//! The scenario text form: one op per line, tasks as blocks, an optional schedule block and an
//! optional expect line. `print` and `parse` round-trip exactly; parse errors name the line
//! and column and say what was expected.
//!
//! ```text
//! vcpus 2
//! init 0x10 0x1234
//! task vcpu0
//!   accept 0x20
//!   write 0x20 0x5
//! task vmm0
//!   convert 0x20 1 shared
//! schedule
//!   vcpu0 until TDG.MEM.PAGE.ACCEPT:locked
//!   vmm0 until blocked
//! expect violation must_not_fail
//! ```

use std::fmt::Write;

use thiserror::Error;

use super::{
    Dir, DirUntil, Expect, GuestStep, Scenario, Schedule, Task, TaskName, TaskOps, TdConfig,
    VmmConfig, VmmOp, FAULT_CONVERT_BLOCKS, MAX_GFN, MAX_NPAGES, MAX_SLOT_ID, MAX_TASK_OPS,
    MAX_VCPUS, MAX_VMM_TASKS,
};
use crate::addr::Gfn;

/// A parse error with its position (1-based).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("line {line}, column {col}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub msg: String,
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Prints a scenario in its canonical text form.
pub fn print(s: &Scenario) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "vcpus {}", s.vcpus);
    if s.td.sept_ve_disable {
        let _ = writeln!(o, "attributes sept_ve_disable");
    }
    if let Some(n) = s.td.max_vcpus {
        let _ = writeln!(o, "max_vcpus {n}");
    }
    if s.td.build_ops {
        let _ = writeln!(o, "build ops");
    }
    if s.vmm != VmmConfig::default() {
        let _ = writeln!(o, "vmm fault_convert {}", s.vmm.fault_convert_pages);
    }
    for (g, v) in &s.init_pages {
        let _ = writeln!(o, "init {} {}", hex(g.raw()), hex(*v));
    }
    for t in &s.tasks {
        let _ = writeln!(o, "task {}", t.name.label());
        match &t.ops {
            TaskOps::Vmm(ops) => {
                for op in ops {
                    let _ = writeln!(o, "  {}", vmm_op(op));
                }
            }
            TaskOps::Guest(ops) => {
                for op in ops {
                    let _ = writeln!(o, "  {}", guest_op(op));
                }
            }
        }
    }
    match &s.schedule {
        Schedule::Fair => {}
        Schedule::Bytes(b) => {
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            let _ = writeln!(
                o,
                "schedule bytes {}",
                if h.is_empty() { "-".into() } else { h }
            );
        }
        Schedule::Script(dirs) => {
            let _ = writeln!(o, "schedule");
            for d in dirs {
                let until = match &d.until {
                    DirUntil::Steps(n) => format!("steps {n}"),
                    DirUntil::Point(p) => format!("until {p}"),
                    DirUntil::Blocked => "until blocked".to_string(),
                };
                let _ = writeln!(o, "  {} {until}", d.task.label());
            }
        }
    }
    match &s.expect {
        Expect::None => {}
        Expect::Clean => {
            let _ = writeln!(o, "expect clean");
        }
        Expect::Violation(k) => {
            let _ = writeln!(o, "expect violation {k}");
        }
    }
    o
}

fn kind(private: bool) -> &'static str {
    if private {
        "private"
    } else {
        "shared"
    }
}

fn vmm_op(op: &VmmOp) -> String {
    match *op {
        VmmOp::Convert {
            gfn,
            npages,
            private,
        } => {
            format!("convert {} {npages} {}", hex(gfn.raw()), kind(private))
        }
        VmmOp::DeleteSlot { gfn } => format!("delete_slot {}", hex(gfn.raw())),
        VmmOp::CreateSlot => "create_slot".into(),
        VmmOp::CreateSlotAt {
            slot,
            gfn,
            npages,
            off,
            dirty_log,
        } => format!(
            "create_slot {slot} {} {npages} {}{}",
            hex(gfn.raw()),
            hex(off),
            if dirty_log { " dirty_log" } else { "" }
        ),
        VmmOp::PunchHole { gfn, npages } => format!("punch_hole {} {npages}", hex(gfn.raw())),
        VmmOp::Allocate { gfn, npages } => format!("allocate {} {npages}", hex(gfn.raw())),
        VmmOp::DontNeed { gfn, npages } => format!("dontneed {} {npages}", hex(gfn.raw())),
        VmmOp::Prefault {
            vcpu,
            gfn,
            npages,
            shared,
        } => format!(
            "prefault vcpu{vcpu} {} {npages}{}",
            hex(gfn.raw()),
            if shared { " shared" } else { "" }
        ),
        VmmOp::Signal { vcpu } => format!("signal vcpu{vcpu}"),
        VmmOp::Interrupt { vcpu } => format!("interrupt vcpu{vcpu}"),
        VmmOp::ZapAllFast => "zap_all_fast".into(),
        VmmOp::CloseGmem => "close_gmem".into(),
        VmmOp::InitVm => "init_vm".into(),
        VmmOp::CreateVcpu => "create_vcpu".into(),
        VmmOp::InitVcpu { vcpu } => format!("init_vcpu vcpu{vcpu}"),
        VmmOp::InitMemRegion { vcpu, gfn, value } => format!(
            "init_mem_region vcpu{vcpu} {} {}",
            hex(gfn.raw()),
            hex(value)
        ),
        VmmOp::Finalize => "finalize".into(),
        VmmOp::ZeroStep { vcpu, gfn } => format!("zero_step vcpu{vcpu} {}", hex(gfn.raw())),
        VmmOp::AllocFail { n, after: 0 } => format!("alloc_fail {n}"),
        VmmOp::AllocFail { n, after } => format!("alloc_fail {n} after {after}"),
        VmmOp::InjectBusy { leaf, operand } => format!("inject_busy {leaf} {}", operand.name()),
        VmmOp::InjectError { leaf } => format!("inject_error {leaf}"),
        VmmOp::InjectSkipConvertZap => "inject_skip_convert_zap".into(),
        VmmOp::InjectSkipInGuestMode => "inject_skip_in_guest_mode".into(),
        VmmOp::InjectTruncateWithoutFree => "inject_truncate_without_free".into(),
        VmmOp::InjectNotifierWithoutZap => "inject_notifier_without_zap".into(),
        VmmOp::Destroy => "destroy".into(),
    }
}

fn guest_op(op: &GuestStep) -> String {
    let sh = |s: bool| if s { " shared" } else { "" };
    match *op {
        GuestStep::Accept { gfn } => format!("accept {}", hex(gfn.raw())),
        GuestStep::AcceptHuge { gfn } => format!("accept {} 2m", hex(gfn.raw())),
        GuestStep::AcceptGpa { gpa } => format!("accept_gpa {}", hex(gpa.raw())),
        GuestStep::Read { gfn, shared } => format!("read {}{}", hex(gfn.raw()), sh(shared)),
        GuestStep::Write { gfn, shared, value } => {
            format!("write {} {}{}", hex(gfn.raw()), hex(value), sh(shared))
        }
        GuestStep::MapGpa {
            gfn,
            npages,
            private,
        } => {
            format!("map_gpa {} {npages} {}", hex(gfn.raw()), kind(private))
        }
    }
}

/// Tokens of one line with their 1-based columns.
struct Line<'a> {
    no: usize,
    toks: Vec<(usize, &'a str)>,
    indented: bool,
    end_col: usize,
}

impl<'a> Line<'a> {
    fn new(no: usize, raw: &'a str) -> Option<Line<'a>> {
        let text = raw.split('#').next().unwrap_or("");
        let mut toks = Vec::new();
        let mut col = 0;
        for part in text.split(' ') {
            if !part.is_empty() {
                toks.push((col + 1, part.trim_end_matches('\t')));
            }
            col += part.len() + 1;
        }
        if toks.is_empty() {
            return None;
        }
        Some(Line {
            no,
            indented: raw.starts_with(' ') || raw.starts_with('\t'),
            toks,
            end_col: text.trim_end().len() + 1,
        })
    }

    fn err(&self, col: usize, msg: impl Into<String>) -> ParseError {
        ParseError {
            line: self.no,
            col,
            msg: msg.into(),
        }
    }

    /// Token `i` or an error saying what was expected there.
    fn tok(&self, i: usize, what: &str) -> Result<(usize, &'a str), ParseError> {
        self.toks
            .get(i)
            .copied()
            .ok_or_else(|| self.err(self.end_col, format!("expected {what}")))
    }

    fn done(&self, n: usize) -> Result<(), ParseError> {
        match self.toks.get(n) {
            Some((c, t)) => Err(self.err(*c, format!("unexpected `{t}` at the end of the line"))),
            None => Ok(()),
        }
    }

    fn num(&self, i: usize, what: &str, max: u64) -> Result<u64, ParseError> {
        let (c, t) = self.tok(i, what)?;
        let v = if let Some(h) = t.strip_prefix("0x") {
            u64::from_str_radix(h, 16)
        } else {
            t.parse::<u64>()
        }
        .map_err(|_| self.err(c, format!("expected {what} (a number), found `{t}`")))?;
        if v > max {
            return Err(self.err(c, format!("{what} {t} is above the limit {max:#x}")));
        }
        Ok(v)
    }

    fn gfn(&self, i: usize) -> Result<Gfn, ParseError> {
        Ok(Gfn::new(self.num(i, "a gfn", MAX_GFN)?))
    }

    fn npages(&self, i: usize, gfn: Gfn) -> Result<u64, ParseError> {
        let n = self.num(i, "a page count", MAX_NPAGES)?;
        if n == 0 || gfn.raw() + n > MAX_GFN + 1 {
            let (c, _) = self.tok(i, "a page count")?;
            return Err(self.err(
                c,
                "the page count must be at least 1 and stay below the gfn limit",
            ));
        }
        Ok(n)
    }

    fn kind(&self, i: usize) -> Result<bool, ParseError> {
        match self.tok(i, "`private` or `shared`")? {
            (_, "private") => Ok(true),
            (_, "shared") => Ok(false),
            (c, t) => Err(self.err(c, format!("expected `private` or `shared`, found `{t}`"))),
        }
    }

    fn vcpu(&self, i: usize, vcpus: u8) -> Result<u8, ParseError> {
        let (c, t) = self.tok(i, "a vCPU (vcpuN)")?;
        match t.strip_prefix("vcpu").and_then(|n| n.parse::<u8>().ok()) {
            Some(n) if n < vcpus => Ok(n),
            _ => Err(self.err(
                c,
                format!(
                    "expected vcpu0..vcpu{}, found `{t}`",
                    vcpus.saturating_sub(1)
                ),
            )),
        }
    }

    fn task_name(&self, i: usize, vcpus: u8) -> Result<TaskName, ParseError> {
        let (c, t) = self.tok(i, "a task name (vmmN or vcpuN)")?;
        if let Some(n) = t.strip_prefix("vmm").and_then(|n| n.parse::<u8>().ok()) {
            if n < MAX_VMM_TASKS {
                return Ok(TaskName::Vmm(n));
            }
        }
        if let Some(n) = t.strip_prefix("vcpu").and_then(|n| n.parse::<u8>().ok()) {
            if n < vcpus {
                return Ok(TaskName::Vcpu(n));
            }
        }
        Err(self.err(
            c,
            format!(
                "expected a task name (vmm0..vmm{}, vcpu0..vcpu{}), found `{t}`",
                MAX_VMM_TASKS - 1,
                vcpus.saturating_sub(1)
            ),
        ))
    }
}

fn parse_vmm_op(l: &Line<'_>, vcpus: u8) -> Result<VmmOp, ParseError> {
    let (c, op) = l.tok(0, "an op")?;
    let (op, n) = match op {
        "convert" => {
            let gfn = l.gfn(1)?;
            (VmmOp::Convert { gfn, npages: l.npages(2, gfn)?, private: l.kind(3)? }, 4)
        }
        "delete_slot" => (VmmOp::DeleteSlot { gfn: l.gfn(1)? }, 2),
        "create_slot" if l.toks.len() == 1 => (VmmOp::CreateSlot, 1),
        "create_slot" => {
            let slot = l.num(1, "a slot id", u64::from(MAX_SLOT_ID))? as u8;
            let gfn = l.gfn(2)?;
            let npages = l.num(3, "a page count", MAX_NPAGES)?;
            if npages == 0 || gfn.raw() + npages > MAX_GFN + 1 {
                let (c, _) = l.tok(3, "a page count")?;
                return Err(l.err(
                    c,
                    "the page count must be at least 1 and stay below the gfn limit",
                ));
            }
            let off = l.num(4, "a guest_memfd page offset", MAX_NPAGES - 1)?;
            let dirty_log = match l.toks.get(5) {
                None => false,
                Some((_, "dirty_log")) => true,
                Some((c, t)) => {
                    return Err(l.err(
                        *c,
                        format!("expected `dirty_log` or the end of the line, found `{t}`"),
                    ))
                }
            };
            (
                VmmOp::CreateSlotAt {
                    slot,
                    gfn,
                    npages,
                    off,
                    dirty_log,
                },
                5 + usize::from(dirty_log),
            )
        }
        "punch_hole" => {
            let gfn = l.gfn(1)?;
            (VmmOp::PunchHole { gfn, npages: l.npages(2, gfn)? }, 3)
        }
        "dontneed" => {
            let gfn = l.gfn(1)?;
            (VmmOp::DontNeed { gfn, npages: l.npages(2, gfn)? }, 3)
        }
        "allocate" => {
            let gfn = l.gfn(1)?;
            (VmmOp::Allocate { gfn, npages: l.npages(2, gfn)? }, 3)
        }
        "prefault" => {
            let vcpu = l.vcpu(1, vcpus)?;
            let gfn = l.gfn(2)?;
            let npages = l.npages(3, gfn)?;
            let (shared, n) = shared_flag(l, 4)?;
            (
                VmmOp::Prefault {
                    vcpu,
                    gfn,
                    npages,
                    shared,
                },
                n,
            )
        }
        "signal" => (VmmOp::Signal { vcpu: l.vcpu(1, vcpus)? }, 2),
        "interrupt" => (VmmOp::Interrupt { vcpu: l.vcpu(1, vcpus)? }, 2),
        "zap_all_fast" => (VmmOp::ZapAllFast, 1),
        "close_gmem" => (VmmOp::CloseGmem, 1),
        "init_vm" => (VmmOp::InitVm, 1),
        "create_vcpu" => (VmmOp::CreateVcpu, 1),
        "init_vcpu" => (VmmOp::InitVcpu { vcpu: l.vcpu(1, vcpus)? }, 2),
        "init_mem_region" => (
            VmmOp::InitMemRegion {
                vcpu: l.vcpu(1, vcpus)?,
                gfn: l.gfn(2)?,
                value: l.num(3, "a value", u64::MAX)?,
            },
            4,
        ),
        "finalize" => (VmmOp::Finalize, 1),
        "zero_step" => (VmmOp::ZeroStep { vcpu: l.vcpu(1, vcpus)?, gfn: l.gfn(2)? }, 3),
        "alloc_fail" => {
            let n = l.num(1, "a count", 16)? as u8;
            match l.toks.get(2) {
                None => (VmmOp::AllocFail { n, after: 0 }, 2),
                Some((_, "after")) => {
                    let after = l.num(3, "a count of allocations that succeed first", 64)? as u8;
                    (VmmOp::AllocFail { n, after }, 4)
                }
                Some((c, t)) => {
                    return Err(l.err(
                        *c,
                        format!("expected `after` or the end of the line, found `{t}`"),
                    ))
                }
            }
        }
        "inject_busy" => {
            let (c, name) = l.tok(1, "a SEAMCALL leaf")?;
            let leaf = crate::tdx_module::Leaf::from_name(name)
                .filter(|leaf| crate::tdx_module::BUSY_INJECTABLE.contains(leaf))
                .ok_or_else(|| {
                    l.err(
                        c,
                        format!(
                            "`{name}` is not a leaf BUSY can be injected into (expected one of {})",
                            names(crate::tdx_module::BUSY_INJECTABLE.iter())
                        ),
                    )
                })?;
            let allowed = crate::tdx_module::busy_operands(leaf);
            let (c, name) = l.tok(2, "an operand")?;
            let operand = crate::tdx_module::Operand::from_name(name)
                .filter(|o| allowed.contains(o))
                .ok_or_else(|| {
                    l.err(
                        c,
                        format!(
                            "{leaf} does not lock `{name}` (expected one of {})",
                            names(allowed.iter().map(|o| o.name()))
                        ),
                    )
                })?;
            (VmmOp::InjectBusy { leaf, operand }, 3)
        }
        "inject_error" => {
            let (c, name) = l.tok(1, "a SEAMCALL leaf")?;
            let leaf = crate::tdx_module::Leaf::from_name(name)
                .filter(|&leaf| crate::tdx_module::injected_error(leaf).is_some())
                .ok_or_else(|| {
                    l.err(
                        c,
                        format!(
                            "`{name}` is not a leaf an error can be injected into (expected one of {})",
                            names(crate::tdx_module::ERROR_INJECTABLE.iter().map(|(l, _)| l))
                        ),
                    )
                })?;
            (VmmOp::InjectError { leaf }, 2)
        }
        "inject_skip_convert_zap" => (VmmOp::InjectSkipConvertZap, 1),
        "inject_skip_in_guest_mode" => (VmmOp::InjectSkipInGuestMode, 1),
        "inject_truncate_without_free" => (VmmOp::InjectTruncateWithoutFree, 1),
        "inject_notifier_without_zap" => (VmmOp::InjectNotifierWithoutZap, 1),
        "destroy" => (VmmOp::Destroy, 1),
        other => {
            return Err(l.err(
                c,
                format!(
                    "unknown VMM op `{other}` (expected convert, delete_slot, create_slot, punch_hole, allocate, dontneed, prefault, \
                     init_vm, create_vcpu, init_vcpu, init_mem_region, finalize, signal, interrupt, zap_all_fast, close_gmem, zero_step, alloc_fail, inject_busy, inject_error, inject_skip_convert_zap, inject_skip_in_guest_mode, \
                     inject_truncate_without_free, inject_notifier_without_zap or destroy)"
                ),
            ))
        }
    };
    l.done(n)?;
    Ok(op)
}

/// `a, b or c`.
fn names<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let v: Vec<String> = items.map(|i| i.to_string()).collect();
    match v.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => v.join(""),
    }
}

/// A header knob (`attributes`, `max_vcpus`, `build`, `vmm`) comes once, before `init` lines and
/// tasks.
fn header_once(l: &Line<'_>, s: &Scenario, seen: bool) -> Result<(), ParseError> {
    let (c, head) = l.toks[0];
    if seen || !s.init_pages.is_empty() || !s.tasks.is_empty() {
        return Err(l.err(
            c,
            format!("`{head}` comes once, after `vcpus` and before `init` lines and tasks"),
        ));
    }
    Ok(())
}

fn shared_flag(l: &Line<'_>, i: usize) -> Result<(bool, usize), ParseError> {
    match l.toks.get(i) {
        None => Ok((false, i)),
        Some((_, "shared")) => Ok((true, i + 1)),
        Some((c, t)) => Err(l.err(
            *c,
            format!("expected `shared` or the end of the line, found `{t}`"),
        )),
    }
}

fn parse_guest_op(l: &Line<'_>) -> Result<GuestStep, ParseError> {
    let (c, op) = l.tok(0, "a guest op")?;
    let (op, n) = match op {
        "accept" => match l.toks.get(2) {
            Some((_, "2m")) => (GuestStep::AcceptHuge { gfn: l.gfn(1)? }, 3),
            _ => (GuestStep::Accept { gfn: l.gfn(1)? }, 2),
        },
        "accept_gpa" => (
            GuestStep::AcceptGpa {
                gpa: crate::addr::Gpa::new(l.num(1, "a GPA", u64::MAX)?),
            },
            2,
        ),
        "read" => {
            let gfn = l.gfn(1)?;
            let (shared, n) = shared_flag(l, 2)?;
            (GuestStep::Read { gfn, shared }, n)
        }
        "write" => {
            let gfn = l.gfn(1)?;
            let value = l.num(2, "a value", u64::MAX)?;
            let (shared, n) = shared_flag(l, 3)?;
            (GuestStep::Write { gfn, shared, value }, n)
        }
        "map_gpa" => {
            let gfn = l.gfn(1)?;
            (
                GuestStep::MapGpa {
                    gfn,
                    npages: l.npages(2, gfn)?,
                    private: l.kind(3)?,
                },
                4,
            )
        }
        other => {
            return Err(l.err(
                c,
                format!("unknown guest op `{other}` (expected accept, read, write or map_gpa)"),
            ))
        }
    };
    l.done(n)?;
    Ok(op)
}

/// Parses the text form.
pub fn parse(src: &str) -> Result<Scenario, ParseError> {
    let lines: Vec<Line<'_>> = src
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| Line::new(i + 1, raw))
        .collect();
    let mut it = lines.iter().peekable();
    let first = it.next().ok_or(ParseError {
        line: 1,
        col: 1,
        msg: "expected `vcpus N`, found an empty scenario".into(),
    })?;
    if first.tok(0, "`vcpus`")?.1 != "vcpus" {
        return Err(first.err(first.toks[0].0, "expected `vcpus N` as the first line"));
    }
    let vcpus = first.num(1, "the vCPU count", u64::from(MAX_VCPUS))? as u8;
    if vcpus == 0 {
        return Err(first.err(first.toks[1].0, "at least one vCPU is needed"));
    }
    first.done(2)?;
    let mut s = Scenario {
        vcpus,
        td: TdConfig::default(),
        vmm: VmmConfig::default(),
        init_pages: Vec::new(),
        tasks: Vec::new(),
        schedule: Schedule::Fair,
        expect: Expect::None,
    };
    let mut max_at = None;
    while let Some(l) = it.next() {
        let (c, head) = l.toks[0];
        if l.indented {
            return Err(l.err(c, "an indented line outside a task or schedule block"));
        }
        match head {
            "attributes" => {
                header_once(l, &s, s.td.sept_ve_disable)?;
                let (ac, a) = l.tok(1, "a TD attribute")?;
                if a != "sept_ve_disable" {
                    return Err(l.err(
                        ac,
                        format!("unknown TD attribute `{a}` (expected sept_ve_disable)"),
                    ));
                }
                s.td.sept_ve_disable = true;
                l.done(2)?;
            }
            "max_vcpus" => {
                header_once(l, &s, s.td.max_vcpus.is_some())?;
                let n = l.num(1, "a vCPU limit", u64::from(MAX_VCPUS))? as u8;
                if n == 0 {
                    return Err(l.err(l.toks[1].0, "the vCPU limit must be at least 1"));
                }
                s.td.max_vcpus = Some(n);
                l.done(2)?;
                max_at = Some((l.no, l.toks[1].0));
            }
            "vmm" => {
                header_once(l, &s, s.vmm != VmmConfig::default())?;
                let (kc, k) = l.tok(1, "`fault_convert`")?;
                if k != "fault_convert" {
                    return Err(l.err(kc, format!("expected `vmm fault_convert N`, found `{k}`")));
                }
                let (nc, _) = l.tok(2, "a block size")?;
                let n = l.num(2, "a block size", 512)?;
                if !FAULT_CONVERT_BLOCKS.contains(&n) {
                    return Err(l.err(nc, "the block is 1, 4 or 512 pages"));
                }
                s.vmm.fault_convert_pages = n;
                l.done(3)?;
            }
            "build" => {
                header_once(l, &s, s.td.build_ops)?;
                let (bc, b) = l.tok(1, "`ops`")?;
                if b != "ops" {
                    return Err(l.err(bc, format!("expected `build ops`, found `{b}`")));
                }
                s.td.build_ops = true;
                l.done(2)?;
            }
            "init" => {
                if !s.tasks.is_empty() {
                    return Err(l.err(c, "`init` lines come before the tasks"));
                }
                if s.td.build_ops {
                    return Err(l.err(
                        c,
                        "`init` pages belong to the setup build; with `build ops` use init_mem_region",
                    ));
                }
                let g = l.gfn(1)?;
                if g.raw() >= crate::stack::GUEST_PAGES {
                    return Err(l.err(
                        l.toks[1].0,
                        "build-time pages must be in the stack's memslot (below 0x800)",
                    ));
                }
                if s.init_pages.iter().any(|(p, _)| *p == g) {
                    return Err(l.err(l.toks[1].0, "a build-time page added twice"));
                }
                s.init_pages.push((g, l.num(2, "a value", u64::MAX)?));
                l.done(3)?;
            }
            "task" => {
                let name = l.task_name(1, vcpus)?;
                l.done(2)?;
                if s.tasks.iter().any(|t| t.name == name) {
                    return Err(l.err(
                        l.toks[1].0,
                        format!("task `{}` defined twice", name.label()),
                    ));
                }
                let mut vmm = Vec::new();
                let mut guest = Vec::new();
                while let Some(op) = it.peek().filter(|x| x.indented) {
                    if vmm.len() + guest.len() == MAX_TASK_OPS {
                        return Err(op.err(
                            op.toks[0].0,
                            format!("more than {MAX_TASK_OPS} ops in a task"),
                        ));
                    }
                    match name {
                        TaskName::Vmm(_) => vmm.push(parse_vmm_op(op, vcpus)?),
                        TaskName::Vcpu(_) => guest.push(parse_guest_op(op)?),
                    }
                    it.next();
                }
                let ops = match name {
                    TaskName::Vmm(_) => TaskOps::Vmm(vmm),
                    TaskName::Vcpu(_) => TaskOps::Guest(guest),
                };
                s.tasks.push(Task { name, ops });
            }
            "schedule" => {
                if s.schedule != Schedule::Fair {
                    return Err(l.err(c, "a second schedule"));
                }
                if let Some((bc, b)) = l.toks.get(1) {
                    if *b != "bytes" {
                        return Err(l.err(
                            *bc,
                            format!("expected `bytes` or the end of the line, found `{b}`"),
                        ));
                    }
                    let (hc, h) = l.tok(2, "hex bytes or `-`")?;
                    l.done(3)?;
                    let bytes = if h == "-" {
                        Vec::new()
                    } else {
                        if h.len() % 2 != 0 || h.len() > 8192 {
                            return Err(l.err(
                                hc,
                                "expected an even number of hex digits (at most 4096 bytes)",
                            ));
                        }
                        (0..h.len() / 2)
                            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16))
                            .collect::<Result<Vec<u8>, _>>()
                            .map_err(|_| l.err(hc, format!("expected hex bytes, found `{h}`")))?
                    };
                    s.schedule = Schedule::Bytes(bytes);
                } else {
                    let mut dirs = Vec::new();
                    while let Some(d) = it.peek().filter(|x| x.indented) {
                        let task = d.task_name(0, vcpus)?;
                        let until = match d.tok(1, "`until` or `steps`")? {
                            (_, "steps") => {
                                DirUntil::Steps(d.num(2, "a step count", 1_000_000)? as u32)
                            }
                            (_, "until") => match d.tok(2, "a yield point name or `blocked`")?.1 {
                                "blocked" => DirUntil::Blocked,
                                p => DirUntil::Point(p.to_string()),
                            },
                            (uc, t) => {
                                return Err(
                                    d.err(uc, format!("expected `until` or `steps`, found `{t}`"))
                                )
                            }
                        };
                        d.done(3)?;
                        dirs.push(Dir { task, until });
                        it.next();
                    }
                    s.schedule = Schedule::Script(dirs);
                }
            }
            "expect" => {
                s.expect = match l.tok(1, "`clean` or `violation KIND`")? {
                    (_, "clean") => {
                        l.done(2)?;
                        Expect::Clean
                    }
                    (_, "violation") => {
                        let (kc, k) = l.tok(2, "a violation kind")?;
                        if !super::VIOLATION_KINDS.contains(&k) {
                            return Err(l.err(
                                kc,
                                format!(
                                    "unknown violation kind `{k}` (expected one of {})",
                                    super::VIOLATION_KINDS.join(", ")
                                ),
                            ));
                        }
                        l.done(3)?;
                        Expect::Violation(k.to_string())
                    }
                    (ec, t) => {
                        return Err(
                            l.err(ec, format!("expected `clean` or `violation`, found `{t}`"))
                        )
                    }
                };
            }
            other => {
                return Err(l.err(
                    c,
                    format!(
                        "unknown line `{other}` (expected attributes, max_vcpus, build, vmm, init, \
                         task, schedule or expect)"
                    ),
                ))
            }
        }
    }
    if let (Some((line, col)), Some(n)) = (max_at, s.td.max_vcpus) {
        if n < s.vcpus && !s.td.build_ops {
            return Err(ParseError {
                line,
                col,
                msg: format!(
                    "the setup build creates all {} vCPUs: a limit of {n} needs `build ops`",
                    s.vcpus
                ),
            });
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "vcpus 2
init 0x10 0x1234
task vcpu0
  accept 0x20
  write 0x20 0x5
  read 0x20
  read 0x30 shared
  map_gpa 0x20 1 shared
task vmm0
  convert 0x20 1 shared
  prefault vcpu1 0x40 2
  destroy
schedule
  vcpu0 until TDG.MEM.PAGE.ACCEPT:locked
  vmm0 until blocked
  vcpu1 steps 10
expect violation must_not_fail
";

    #[test]
    fn round_trip() {
        let s = parse(EXAMPLE).unwrap();
        assert_eq!(print(&s), EXAMPLE);
        assert_eq!(parse(&print(&s)).unwrap(), s);
        let b = Scenario {
            td: TdConfig {
                sept_ve_disable: true,
                max_vcpus: Some(3),
                build_ops: false,
            },
            schedule: Schedule::Bytes(vec![0, 0xff, 0x10]),
            expect: Expect::Clean,
            ..s
        };
        assert_eq!(parse(&print(&b)).unwrap(), b);
        let c = Scenario {
            td: TdConfig {
                max_vcpus: Some(1),
                build_ops: true,
                ..b.td
            },
            init_pages: Vec::new(),
            vmm: VmmConfig {
                fault_convert_pages: 512,
            },
            ..b
        };
        assert_eq!(parse(&print(&c)).unwrap(), c);
    }

    #[test]
    fn errors_name_line_and_column() {
        // (input, line, column, part of the message)
        const CASES: [(&str, usize, usize, &str); 8] = [
            (
                "vcpus 2\ntask vcpu0\n  accept zz\n",
                3,
                10,
                "expected a gfn",
            ),
            ("vcpus 1\ntask vcpu3\n", 2, 6, "expected a task name"),
            ("vcpus 1\ntask vmm0\n  frobnicate\n", 3, 3, "unknown VMM op"),
            (
                "vcpus 1\nexpect violation nope\n",
                2,
                18,
                "unknown violation kind",
            ),
            ("", 1, 1, "empty scenario"),
            (
                "vcpus 1\ntask vcpu0\n  accept 0x10 extra\n",
                3,
                15,
                "unexpected `extra`",
            ),
            (
                "vcpus 1\ntask vcpu0\n  write 0x10\n",
                3,
                13,
                "expected a value",
            ),
            ("vcpus 1\ninit 0x10 1\ninit 0x10 2\n", 3, 6, "added twice"),
        ];
        for (src, line, col, msg) in CASES {
            let e = parse(src).unwrap_err();
            assert_eq!((e.line, e.col), (line, col), "{src:?}: {e}");
            assert!(e.msg.contains(msg), "{src:?}: {e}");
        }
    }
}
