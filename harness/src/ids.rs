//! Small identifiers of model objects (not addresses: those are in `addr`).

use std::fmt;

macro_rules! id {
    ($(#[$m:meta])* $name:ident($ty:ty), $fmt:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $ty);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

id!(
    /// A trust domain (one per run today; the id keeps owners explicit).
    TdId(u32),
    "td{}"
);
id!(
    /// A host key id assigned to a TD (`kvm_tdx->hkid`).
    Hkid(u16),
    "hkid{}"
);
id!(
    /// A vCPU index within its VM.
    VcpuIdx(u32),
    "vcpu{}"
);
id!(
    /// A guest_memfd file.
    GmemId(u32),
    "gmem{}"
);
id!(
    /// A page offset within a guest_memfd file (`pgoff_t`).
    PgOff(u64),
    "pgoff:{:#x}"
);
id!(
    /// A memslot id (`kvm_memory_slot::id`).
    SlotId(u16),
    "slot{}"
);
