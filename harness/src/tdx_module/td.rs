//! TD life cycle and measurement leaves: TDH.MNG.{CREATE, KEY.CONFIG, ADDCX, INIT, VPFLUSHDONE,
//! KEY.FREEID} and TDH.MR.{EXTEND, FINALIZE}.

use crate::addr::{Gpa, Pfn, PgLevel};
use crate::ids::{Hkid, TdId};
use crate::sched::Ctx;

use super::locks::LockKey;
use super::{
    private_gpa_ok, Code, KotState, Leaf, Lp, Operand, PageType, SeamErr, SeamResult, Sept, Td,
    TdxModule,
};

/// TDR.lifecycle_state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lifecycle {
    HkidAssigned,
    KeysConfigured,
    Blocked,
    Teardown,
}

/// TDCS.op_state (the values a TD without migration reaches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpState {
    Uninitialized = 0,
    Initialized = 1,
    Runnable = 2,
}

/// The TD_PARAMS fields the model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdParams {
    pub max_vcpus: u32,
    /// TD_PARAMS.ATTRIBUTES (the model reads SEPT_VE_DISABLE only).
    pub attributes: u64,
}

/// ATTRIBUTES.SEPT_VE_DISABLE (bit 28): an access to a PENDING page is an EPT-violation TD exit
/// instead of #VE (TDH.MNG.INIT copies it into TD_CTLS.PENDING_VE_DISABLE).
pub const ATTR_SEPT_VE_DISABLE: u64 = 1 << 28;

/// TD_PARAMS operand id of MAX_VCPUS.
const OPERAND_MAX_VCPUS: u32 = 68;

/// MAX_VMS - 1: L2 VMs a TD may have, each needing one more TDCS page beyond the minimum.
const MAX_L2_VMS: usize = 3;

fn mix(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(17)
}

impl TdxModule {
    /// TDH.MNG.CREATE (leaf 9; tdh_mng_create.c): assign `hkid` to a new TD whose TDR is `tdr`.
    pub async fn tdh_mng_create(&self, cx: &Ctx, tdr: Pfn, hkid: Hkid) -> SeamResult<TdId> {
        self.seamcall(
            cx,
            Leaf::MngCreate,
            |st, g| {
                if hkid.0 < st.config.hkid_min || hkid.0 > st.config.hkid_max {
                    return Err(SeamErr::with(Code::OperandInvalid, Operand::Rdx));
                }
                st.explicit_page(g, tdr, Operand::Rcx, PageType::Nda)?;
                g.take(&mut st.locks, LockKey::Kot)?;
                if st.kot[&hkid].state != KotState::Free {
                    return Err(SeamErr::code(Code::HkidNotFree));
                }
                if st.injected.rnd_no_entropy > 0 {
                    st.injected.rnd_no_entropy -= 1;
                    return Err(SeamErr::code(Code::RndNoEntropy));
                }
                Ok(())
            },
            |st, host, (), step| {
                let id = TdId(st.next_td);
                st.next_td += 1;
                st.kot.get_mut(&hkid).expect("hkid in range").state = KotState::Assigned;
                st.tds.insert(
                    tdr,
                    Td {
                        id,
                        tdr,
                        hkid,
                        lifecycle: Lifecycle::HkidAssigned,
                        fatal: false,
                        pkg_configured: 0,
                        tdcs: Vec::new(),
                        chldcnt: 0,
                        op_state: OpState::Uninitialized,
                        max_vcpus: 0,
                        num_vcpus: 0,
                        num_assoc_vcpus: 0,
                        td_epoch: 0,
                        refcount: [0; 2],
                        pending_ve_disable: false,
                        sept: Sept::default(),
                        mrtd: 0,
                    },
                );
                st.assign_page(host, step, tdr, PageType::Tdr, tdr);
                host.write(tdr, 0);
                Ok(id)
            },
        )
        .await
    }

    /// TDH.MNG.KEY.CONFIG (leaf 8; tdh_mng_key_config.c): program the HKID's key on the
    /// package of `lp`.
    pub async fn tdh_mng_key_config(&self, cx: &Ctx, lp: Lp, tdr: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MngKeyConfig,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rcx, PageType::Tdr)?;
                let pkg = st.pkg(lp);
                let td = st.td(tdr);
                if td.fatal {
                    return Err(SeamErr::code(Code::TdFatal));
                }
                if td.lifecycle != Lifecycle::HkidAssigned {
                    return Err(SeamErr::code(Code::LifecycleStateIncorrect));
                }
                if td.pkg_configured & (1 << pkg) != 0 {
                    return Err(SeamErr::code(Code::KeyConfigured));
                }
                Ok(pkg)
            },
            |st, _, pkg, _| {
                let all = st.all_packages();
                let td = st.td_mut(tdr);
                td.pkg_configured |= 1 << pkg;
                if td.pkg_configured == all {
                    td.lifecycle = Lifecycle::KeysConfigured;
                }
                Ok(())
            },
        )
        .await
    }

    /// TDH.MNG.ADDCX (leaf 1; tdh_mng_add_cx.c): donate one TDCS page.
    pub async fn tdh_mng_addcx(&self, cx: &Ctx, tdr: Pfn, page: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MngAddcx,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rdx, PageType::Tdr)?;
                let min = st.config.tdcs_pages;
                let td = st.td(tdr);
                if td.fatal {
                    return Err(SeamErr::code(Code::TdFatal));
                }
                if td.lifecycle != Lifecycle::KeysConfigured {
                    return Err(SeamErr::code(Code::TdKeysNotConfigured));
                }
                // tdh_mng_add_cx.c: `num_tdcx > MAX_NUM_TDCS_PAGES-1` fails; MAX_NUM_TDCS_PAGES
                // is MIN plus one page per possible L2 VM (3), whether or not the TD will have
                // L2 VMs.
                if td.tdcs.len() >= min + MAX_L2_VMS {
                    return Err(SeamErr::code(Code::TdcxNumIncorrect));
                }
                st.explicit_page(g, page, Operand::Rcx, PageType::Nda)?;
                let td = st.td(tdr);
                let new_count = td.tdcs.len() + 1;
                if new_count == min && st.injected.rnd_no_entropy > 0 {
                    // The migration key is generated when the last required page arrives.
                    st.injected.rnd_no_entropy -= 1;
                    return Err(SeamErr::code(Code::RndNoEntropy));
                }
                // tdh_mng_add_cx.c: beyond MIN, OP_STATE (in TDCS page 0) is readable and must
                // allow ADDCX (UNINITIALIZED only); the status carries no operand.
                if new_count > min && !super::op_state_allows(Leaf::MngAddcx, td.op_state) {
                    return Err(SeamErr::code(Code::OpStateIncorrect));
                }
                Ok(())
            },
            |st, host, (), step| {
                let td = st.td_mut(tdr);
                td.tdcs.push(page);
                td.chldcnt += 1;
                st.assign_page(host, step, page, PageType::Tdcx, tdr);
                host.write(page, 0);
                Ok(())
            },
        )
        .await
    }

    /// TDH.MNG.INIT (leaf 21; tdh_mng_init.c): configure the TD from TD_PARAMS.
    pub async fn tdh_mng_init(&self, cx: &Ctx, tdr: Pfn, params: TdParams) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MngInit,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rcx, PageType::Tdr)?;
                st.gate(g, tdr, Leaf::MngInit, false)?;
                if params.max_vcpus == 0 {
                    return Err(SeamErr::with(
                        Code::OperandInvalid,
                        Operand::Detail(OPERAND_MAX_VCPUS),
                    ));
                }
                Ok(())
            },
            |st, _, (), _| {
                let td = st.td_mut(tdr);
                td.max_vcpus = params.max_vcpus;
                td.pending_ve_disable = params.attributes & ATTR_SEPT_VE_DISABLE != 0;
                td.num_vcpus = 0;
                td.num_assoc_vcpus = 0;
                td.td_epoch = 1;
                td.refcount = [0; 2];
                td.op_state = OpState::Initialized;
                Ok(())
            },
        )
        .await
    }

    /// TDH.MNG.VPFLUSHDONE (leaf 19; tdh_mng_vpflushdone.c): every vCPU is flushed; the TD
    /// becomes BLOCKED and its HKID FLUSHED, awaiting CACHE.WB on every package.
    pub async fn tdh_mng_vpflushdone(&self, cx: &Ctx, tdr: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MngVpflushdone,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rcx, PageType::Tdr)?;
                g.take(&mut st.locks, LockKey::Kot)?;
                let min = st.config.tdcs_pages;
                let td = st.td(tdr);
                if !matches!(
                    td.lifecycle,
                    Lifecycle::KeysConfigured | Lifecycle::HkidAssigned
                ) {
                    return Err(SeamErr::code(Code::LifecycleStateIncorrect));
                }
                if td.tdcs.len() >= min
                    && td.op_state != OpState::Uninitialized
                    && td.num_assoc_vcpus != 0
                {
                    return Err(SeamErr::code(Code::FlushvpNotDone));
                }
                Ok(())
            },
            |st, _, (), _| {
                let all = st.all_packages();
                let td = st.td_mut(tdr);
                td.lifecycle = Lifecycle::Blocked;
                let hkid = td.hkid;
                let k = st.kot.get_mut(&hkid).expect("assigned hkid");
                k.state = KotState::Flushed;
                k.wbinvd_bitmap = all;
                Ok(())
            },
        )
        .await
    }

    /// TDH.MNG.KEY.FREEID (leaf 20; tdh_mng_key_freeid.c): release the HKID once every
    /// package has written back its caches; the TD enters TEARDOWN.
    pub async fn tdh_mng_key_freeid(&self, cx: &Ctx, tdr: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MngKeyFreeid,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rcx, PageType::Tdr)?;
                if st.td(tdr).lifecycle != Lifecycle::Blocked {
                    return Err(SeamErr::code(Code::LifecycleStateIncorrect));
                }
                g.take(&mut st.locks, LockKey::Kot)?;
                let hkid = st.td(tdr).hkid;
                if st.kot[&hkid].wbinvd_bitmap != 0 {
                    return Err(SeamErr::code(Code::WbcacheNotComplete));
                }
                Ok(hkid)
            },
            |st, _, hkid, _| {
                st.kot.get_mut(&hkid).expect("hkid").state = KotState::Free;
                st.td_mut(tdr).lifecycle = Lifecycle::Teardown;
                Ok(())
            },
        )
        .await
    }

    /// TDH.MR.EXTEND (leaf 16; tdh_mr_extend.c): measure a 256-byte chunk of a MAPPED page.
    pub async fn tdh_mr_extend(&self, cx: &Ctx, tdr: Pfn, gpa: Gpa) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MrExtend,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rdx, PageType::Tdr)?;
                st.gate(g, tdr, Leaf::MrExtend, false)?;
                if !gpa.raw().is_multiple_of(256) || !private_gpa_ok(gpa) {
                    return Err(SeamErr::with(Code::OperandInvalid, Operand::Rcx));
                }
                // Walk to whatever leaf exists (`check_and_walk_private_gpa_to_leaf`).
                let w = st.td(tdr).sept.walk(gpa.gfn(), PgLevel::L4K);
                if !w.state.is_leaf() || !w.state.is_present() {
                    return Err(
                        SeamErr::with(Code::EptEntryNotPresent, Operand::Rcx).details(w.details())
                    );
                }
                // A present leaf that is not MAPPED (BLOCKEDW, exported states) reports no operand.
                if w.state != super::SeptState::Mapped {
                    return Err(SeamErr::code(Code::EptEntryNotPresent));
                }
                Ok(w.entry.expect("mapped leaf").pfn)
            },
            |st, host, pfn, _| {
                let v = host.read(pfn);
                let td = st.td_mut(tdr);
                td.mrtd = mix(mix(td.mrtd, gpa.raw()), v);
                Ok(())
            },
        )
        .await
    }

    /// TDH.MR.FINALIZE (leaf 17; tdh_mr_finalize.c): seal MRTD; the TD becomes RUNNABLE.
    pub async fn tdh_mr_finalize(&self, cx: &Ctx, tdr: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MrFinalize,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rcx, PageType::Tdr)?;
                st.gate(g, tdr, Leaf::MrFinalize, false)?;
                if st.td(tdr).num_vcpus == 0 {
                    return Err(SeamErr::code(Code::NoVcpus));
                }
                Ok(())
            },
            |st, _, (), _| {
                st.td_mut(tdr).op_state = OpState::Runnable;
                Ok(())
            },
        )
        .await
    }
}
