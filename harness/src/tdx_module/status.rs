//! SEAMCALL/TDCALL completion status, as the TDX module encodes it.
//!
//! Models `include/auto_gen_2_0/tdx_error_codes_defs.h` (intel/tdx-module): a status is a class
//! and code in bits 63:32 plus a 32-bit detail, usually an operand id, added with
//! `api_error_with_operand_id`. Bit 63 clear means success or a success-class warning.

use std::fmt;

/// The status codes the model produces (raw values are the module's, bits 63:32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Code {
    Success,
    InterruptedResumable,
    OperandInvalid,
    OperandAddrRangeError,
    OperandBusy,
    PreviousTlbEpochBusy,
    RndNoEntropy,
    OperandBusyHostPriority,
    HostPriorityBusyTimeout,
    PageMetadataIncorrect,
    TdAssociatedPagesExist,
    TdFatal,
    TdcsNotAllocated,
    LifecycleStateIncorrect,
    OpStateIncorrect,
    NoVcpus,
    TdcxNumIncorrect,
    VcpuStateIncorrect,
    VcpuAssociated,
    VcpuNotAssociated,
    MaxVcpusExceeded,
    TdKeysNotConfigured,
    KeyConfigured,
    WbcacheNotComplete,
    HkidNotFree,
    NoHkidReadyToWbcache,
    WbcacheResumeError,
    FlushvpNotDone,
    EptWalkFailed,
    EptEntryNotPresent,
    GpaRangeNotBlocked,
    GpaRangeAlreadyBlocked,
    TlbTrackingNotDone,
    PageAlreadyAccepted,
    PageSizeMismatch,
    EptEntryStateIncorrect,
    EptPageNotFree,
}

impl Code {
    /// The module's raw value (operand bits zero).
    pub const fn raw(self) -> u64 {
        match self {
            Code::Success => 0,
            Code::InterruptedResumable => 0x8000_0003_0000_0000,
            Code::OperandInvalid => 0xC000_0100_0000_0000,
            Code::OperandAddrRangeError => 0xC000_0101_0000_0000,
            Code::OperandBusy => 0x8000_0200_0000_0000,
            Code::PreviousTlbEpochBusy => 0x8000_0201_0000_0000,
            Code::RndNoEntropy => 0x8000_0203_0000_0000,
            Code::OperandBusyHostPriority => 0x8000_0204_0000_0000,
            Code::HostPriorityBusyTimeout => 0x9000_0205_0000_0000,
            Code::PageMetadataIncorrect => 0xC000_0300_0000_0000,
            Code::TdAssociatedPagesExist => 0xC000_0400_0000_0000,
            Code::TdFatal => 0xE000_0604_0000_0000,
            Code::TdcsNotAllocated => 0xC000_0606_0000_0000,
            Code::LifecycleStateIncorrect => 0xC000_0607_0000_0000,
            Code::OpStateIncorrect => 0xC000_0608_0000_0000,
            Code::NoVcpus => 0xC000_0609_0000_0000,
            Code::TdcxNumIncorrect => 0xC000_0610_0000_0000,
            Code::VcpuStateIncorrect => 0xC000_0700_0000_0000,
            Code::VcpuAssociated => 0x8000_0701_0000_0000,
            Code::VcpuNotAssociated => 0x8000_0702_0000_0000,
            Code::MaxVcpusExceeded => 0xC000_0705_0000_0000,
            Code::TdKeysNotConfigured => 0x8000_0810_0000_0000,
            Code::KeyConfigured => 0x0000_0815_0000_0000,
            Code::WbcacheNotComplete => 0x8000_0817_0000_0000,
            Code::HkidNotFree => 0xC000_0820_0000_0000,
            Code::NoHkidReadyToWbcache => 0x0000_0821_0000_0000,
            Code::WbcacheResumeError => 0xC000_0823_0000_0000,
            Code::FlushvpNotDone => 0x8000_0824_0000_0000,
            Code::EptWalkFailed => 0xC000_0B00_0000_0000,
            Code::EptEntryNotPresent => 0xC000_0B03_0000_0000,
            Code::GpaRangeNotBlocked => 0xC000_0B06_0000_0000,
            Code::GpaRangeAlreadyBlocked => 0x0000_0B07_0000_0000,
            Code::TlbTrackingNotDone => 0xC000_0B08_0000_0000,
            Code::PageAlreadyAccepted => 0x0000_0B0A_0000_0000,
            Code::PageSizeMismatch => 0xC000_0B0B_0000_0000,
            Code::EptEntryStateIncorrect => 0xC000_0B0D_0000_0000,
            Code::EptPageNotFree => 0xC000_0B0E_0000_0000,
        }
    }

    /// The module's name for the code.
    pub const fn name(self) -> &'static str {
        match self {
            Code::Success => "TDX_SUCCESS",
            Code::InterruptedResumable => "TDX_INTERRUPTED_RESUMABLE",
            Code::OperandInvalid => "TDX_OPERAND_INVALID",
            Code::OperandAddrRangeError => "TDX_OPERAND_ADDR_RANGE_ERROR",
            Code::OperandBusy => "TDX_OPERAND_BUSY",
            Code::PreviousTlbEpochBusy => "TDX_PREVIOUS_TLB_EPOCH_BUSY",
            Code::RndNoEntropy => "TDX_RND_NO_ENTROPY",
            Code::OperandBusyHostPriority => "TDX_OPERAND_BUSY_HOST_PRIORITY",
            Code::HostPriorityBusyTimeout => "TDX_HOST_PRIORITY_BUSY_TIMEOUT",
            Code::PageMetadataIncorrect => "TDX_PAGE_METADATA_INCORRECT",
            Code::TdAssociatedPagesExist => "TDX_TD_ASSOCIATED_PAGES_EXIST",
            Code::TdFatal => "TDX_TD_FATAL",
            Code::TdcsNotAllocated => "TDX_TDCS_NOT_ALLOCATED",
            Code::LifecycleStateIncorrect => "TDX_LIFECYCLE_STATE_INCORRECT",
            Code::OpStateIncorrect => "TDX_OP_STATE_INCORRECT",
            Code::NoVcpus => "TDX_NO_VCPUS",
            Code::TdcxNumIncorrect => "TDX_TDCX_NUM_INCORRECT",
            Code::VcpuStateIncorrect => "TDX_VCPU_STATE_INCORRECT",
            Code::VcpuAssociated => "TDX_VCPU_ASSOCIATED",
            Code::VcpuNotAssociated => "TDX_VCPU_NOT_ASSOCIATED",
            Code::MaxVcpusExceeded => "TDX_MAX_VCPUS_EXCEEDED",
            Code::TdKeysNotConfigured => "TDX_TD_KEYS_NOT_CONFIGURED",
            Code::KeyConfigured => "TDX_KEY_CONFIGURED",
            Code::WbcacheNotComplete => "TDX_WBCACHE_NOT_COMPLETE",
            Code::HkidNotFree => "TDX_HKID_NOT_FREE",
            Code::NoHkidReadyToWbcache => "TDX_NO_HKID_READY_TO_WBCACHE",
            Code::WbcacheResumeError => "TDX_WBCACHE_RESUME_ERROR",
            Code::FlushvpNotDone => "TDX_FLUSHVP_NOT_DONE",
            Code::EptWalkFailed => "TDX_EPT_WALK_FAILED",
            Code::EptEntryNotPresent => "TDX_EPT_ENTRY_NOT_PRESENT",
            Code::GpaRangeNotBlocked => "TDX_GPA_RANGE_NOT_BLOCKED",
            Code::GpaRangeAlreadyBlocked => "TDX_GPA_RANGE_ALREADY_BLOCKED",
            Code::TlbTrackingNotDone => "TDX_TLB_TRACKING_NOT_DONE",
            Code::PageAlreadyAccepted => "TDX_PAGE_ALREADY_ACCEPTED",
            Code::PageSizeMismatch => "TDX_PAGE_SIZE_MISMATCH",
            Code::EptEntryStateIncorrect => "TDX_EPT_ENTRY_STATE_INCORRECT",
            Code::EptPageNotFree => "TDX_EPT_PAGE_NOT_FREE",
        }
    }
}

/// The low 32 bits of a status: which operand was at fault, or a detail value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operand {
    Rax,
    Rcx,
    Rdx,
    R8,
    R9,
    Tdr,
    Tdcx,
    Tdvpr,
    Tdcs,
    SeptTree,
    TdEpoch,
    OpState,
    Kot,
    Wbcache,
    /// A non-operand detail, e.g. the current op state or the level found.
    Detail(u32),
}

impl Operand {
    /// The module's operand id (`OPERAND_ID_*`).
    pub const fn id(self) -> u32 {
        match self {
            Operand::Rax => 0,
            Operand::Rcx => 1,
            Operand::Rdx => 2,
            Operand::R8 => 8,
            Operand::R9 => 9,
            Operand::Tdr => 0x80,
            Operand::Tdcx => 0x81,
            Operand::Tdvpr => 0x82,
            Operand::Tdcs => 0x90,
            Operand::SeptTree => 0x92,
            Operand::TdEpoch => 0xA9,
            Operand::OpState => 0xAC,
            Operand::Kot => 0xBA,
            Operand::Wbcache => 0xBC,
            Operand::Detail(d) => d,
        }
    }

    /// The module's name for a named operand (empty for a detail value).
    pub const fn name(self) -> &'static str {
        match self {
            Operand::Rax => "RAX",
            Operand::Rcx => "RCX",
            Operand::Rdx => "RDX",
            Operand::R8 => "R8",
            Operand::R9 => "R9",
            Operand::Tdr => "TDR",
            Operand::Tdcx => "TDCX",
            Operand::Tdvpr => "TDVPR",
            Operand::Tdcs => "TDCS",
            Operand::SeptTree => "SEPT_TREE",
            Operand::TdEpoch => "TD_EPOCH",
            Operand::OpState => "OP_STATE",
            Operand::Kot => "KOT",
            Operand::Wbcache => "WBCACHE",
            Operand::Detail(_) => "",
        }
    }
}

impl Operand {
    /// Named operands (every one but a detail value).
    pub const NAMED: [Operand; 14] = [
        Operand::Rax,
        Operand::Rcx,
        Operand::Rdx,
        Operand::R8,
        Operand::R9,
        Operand::Tdr,
        Operand::Tdcx,
        Operand::Tdvpr,
        Operand::Tdcs,
        Operand::SeptTree,
        Operand::TdEpoch,
        Operand::OpState,
        Operand::Kot,
        Operand::Wbcache,
    ];

    /// The named operand called `s`.
    pub fn from_name(s: &str) -> Option<Operand> {
        Operand::NAMED.into_iter().find(|o| o.name() == s)
    }
}

/// A completion status: code plus optional operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Status {
    pub code: Code,
    pub operand: Option<Operand>,
}

impl Status {
    pub const SUCCESS: Status = Status {
        code: Code::Success,
        operand: None,
    };

    pub const fn new(code: Code) -> Self {
        Status {
            code,
            operand: None,
        }
    }

    /// `api_error_with_operand_id(code, operand)`.
    pub const fn with(code: Code, operand: Operand) -> Self {
        Status {
            code,
            operand: Some(operand),
        }
    }

    /// The raw 64-bit value RAX would hold.
    pub const fn raw(self) -> u64 {
        match self.operand {
            Some(op) => self.code.raw() | op.id() as u64,
            None => self.code.raw(),
        }
    }

    /// Bit 63 set: an error (success-class warnings have it clear).
    pub const fn is_error(self) -> bool {
        self.raw() & (1 << 63) != 0
    }

    /// `tdx_operand_busy()`: the class is TDX_OPERAND_BUSY whatever the operand.
    pub fn is_operand_busy(self) -> bool {
        self.code == Code::OperandBusy
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code.name())?;
        match self.operand {
            Some(Operand::Detail(d)) => write!(f, "|{d:#x}")?,
            Some(op) => write!(f, "|{}", op.name())?,
            None => {}
        }
        write!(f, " ({:#018x})", self.raw())
    }
}

/// The S-EPT details some leaves report in RCX/RDX on failure (`set_arch_septe_details_in_vmm_regs`):
/// the entry reached and its level and state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeptDetails {
    pub level: crate::addr::PgLevel,
    pub state: super::sept::SeptState,
}

/// A SEAMCALL or TDCALL that did not complete with TDX_SUCCESS (errors and success-class
/// warnings alike: KVM treats any non-zero status as "not done").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeamErr {
    pub status: Status,
    pub sept: Option<SeptDetails>,
    /// Model-only diagnosis of why (not part of the status KVM sees).
    pub note: Option<&'static str>,
}

impl SeamErr {
    pub const fn new(status: Status) -> Self {
        SeamErr {
            status,
            sept: None,
            note: None,
        }
    }
    pub const fn code(code: Code) -> Self {
        SeamErr::new(Status::new(code))
    }
    pub const fn with(code: Code, operand: Operand) -> Self {
        SeamErr::new(Status::with(code, operand))
    }
    pub const fn busy(operand: Operand) -> Self {
        SeamErr::with(Code::OperandBusy, operand)
    }
    /// Adds a diagnosis.
    pub const fn note(mut self, why: &'static str) -> Self {
        self.note = Some(why);
        self
    }
    /// Adds the S-EPT details of the entry reached.
    pub const fn details(mut self, d: SeptDetails) -> Self {
        self.sept = Some(d);
        self
    }
}

impl fmt::Display for SeamErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status)?;
        if let Some(d) = self.sept {
            write!(f, " [entry {:?} at {}]", d.state, d.level)?;
        }
        if let Some(why) = self.note {
            write!(f, " [{why}]")?;
        }
        Ok(())
    }
}

/// What a leaf returns.
pub type SeamResult<T> = Result<T, SeamErr>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_match_the_module() {
        assert_eq!(
            Status::with(Code::OperandBusy, Operand::Rcx).raw(),
            0x8000_0200_0000_0001
        );
        assert_eq!(
            Status::with(Code::OperandBusy, Operand::SeptTree).raw(),
            0x8000_0200_0000_0092
        );
        assert_eq!(
            Status::with(Code::OperandBusy, Operand::TdEpoch).raw(),
            0x8000_0200_0000_00A9
        );
        assert_eq!(
            Status::with(Code::TlbTrackingNotDone, Operand::Rcx).raw(),
            0xC000_0B08_0000_0001
        );
        assert_eq!(
            Status::with(Code::GpaRangeAlreadyBlocked, Operand::Rcx).raw(),
            0x0000_0B07_0000_0001
        );
        assert!(!Status::with(Code::GpaRangeAlreadyBlocked, Operand::Rcx).is_error());
        assert!(!Status::new(Code::NoHkidReadyToWbcache).is_error());
        assert!(Status::new(Code::FlushvpNotDone).is_error());
        assert!(Status::with(Code::OperandBusy, Operand::Tdr).is_operand_busy());
        assert_eq!(
            Status::with(Code::OperandBusy, Operand::SeptTree).to_string(),
            "TDX_OPERAND_BUSY|SEPT_TREE (0x8000020000000092)"
        );
    }
}
