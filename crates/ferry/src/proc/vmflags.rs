//! The `VmFlags:` line of /proc/PID/smaps.
//!
//! The kernel prints one two-letter mnemonic per set `vm_flags` bit
//! (fs/proc/task_mmu.c `show_smap_vma_flags`), but the kernel's bit numbers
//! are not ABI and depend on the config, so only the mnemonics are stable.
//! We therefore store our own bit per known mnemonic.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Flags of one VMA, parsed from its smaps `VmFlags:` line.
///
/// Known mnemonics are kept as bits (see [`VmFlags::contains`]); mnemonics this
/// code does not know (newer kernels) are kept verbatim in `unknown` so that
/// nothing is silently lost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFlags {
    bits: u64,
    unknown: Vec<String>,
}

macro_rules! vm_flags {
    ($($(#[$doc:meta])* $name:ident = $code:literal,)*) => {
        /// Known mnemonics. The index is our bit number, which ends up in
        /// serialized images: only ever append to this list.
        const CODES: &[&str] = &[$($code),*];

        impl VmFlags {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> bool {
                    self.contains($code)
                }
            )*
        }
    };
}

vm_flags! {
    /// `rd`: readable.
    readable = "rd",
    /// `wr`: writeable.
    writable = "wr",
    /// `ex`: executable.
    executable = "ex",
    /// `sh`: shared.
    shared = "sh",
    /// `mr`: may read.
    may_read = "mr",
    /// `mw`: may write.
    may_write = "mw",
    /// `me`: may execute.
    may_exec = "me",
    /// `ms`: may share (set for every MAP_SHARED mapping, even read-only).
    may_share = "ms",
    /// `gd`: stack segment that grows down.
    growsdown = "gd",
    /// `pf`: pure PFN range (no struct page behind it, e.g. `[vvar]`).
    pfnmap = "pf",
    /// `lo`: pages are locked in memory (mlock).
    locked = "lo",
    /// `io`: memory-mapped I/O area.
    io = "io",
    /// `sr`: sequential read advise (MADV_SEQUENTIAL).
    seq_read = "sr",
    /// `rr`: random read advise (MADV_RANDOM).
    rand_read = "rr",
    /// `dc`: do not copy the area on fork (MADV_DONTFORK).
    dontfork = "dc",
    /// `de`: do not expand the area on remapping.
    dontexpand = "de",
    /// `ac`: area is accountable (counted against overcommit).
    account = "ac",
    /// `nr`: swap space is not reserved (MAP_NORESERVE).
    noreserve = "nr",
    /// `ht`: area uses huge tlb pages (hugetlbfs).
    hugetlb = "ht",
    /// `sf`: synchronous page fault (MAP_SYNC).
    sync_fault = "sf",
    /// `ar`: architecture specific flag (VM_PAT on x86).
    arch_1 = "ar",
    /// `wf`: wipe on fork (MADV_WIPEONFORK).
    wipeonfork = "wf",
    /// `dd`: do not include the area in a core dump (MADV_DONTDUMP).
    dontdump = "dd",
    /// `sd`: soft-dirty flag (only with CONFIG_MEM_SOFT_DIRTY).
    soft_dirty = "sd",
    /// `mm`: mixed map area (PFNs and pages).
    mixedmap = "mm",
    /// `hg`: huge page advise (MADV_HUGEPAGE).
    hugepage = "hg",
    /// `nh`: no huge page advise (MADV_NOHUGEPAGE).
    nohugepage = "nh",
    /// `mg`: mergeable advise (MADV_MERGEABLE, KSM).
    mergeable = "mg",
    /// `bt`: arm64 BTI guarded page.
    arm64_bti = "bt",
    /// `mt`: arm64 MTE allocation tags enabled.
    arm64_mte = "mt",
    /// `um`: userfaultfd missing tracking.
    uffd_missing = "um",
    /// `uw`: userfaultfd write-protect tracking.
    uffd_wp = "uw",
    /// `ui`: userfaultfd minor fault tracking.
    uffd_minor = "ui",
    /// `ss`: shadow stack page (x86 CET / arm64 GCS).
    shadow_stack = "ss",
    /// `sl`: sealed (mseal); it can no longer be unmapped or changed.
    sealed = "sl",
    /// `lf`: lock on fault (mlock2 MLOCK_ONFAULT).
    lock_on_fault = "lf",
    /// `dp`: droppable: the kernel may free its pages under pressure.
    droppable = "dp",
    /// `nl`: non-linear mapping (remap_file_pages, kernels before 4.0).
    nonlinear = "nl",
    /// `mp`: MPX bounds table (kernels before 5.6).
    mpx = "mp",
}

impl VmFlags {
    /// Parses a `VmFlags:` line; the `VmFlags:` prefix is optional, so both
    /// the whole smaps line and just its value are accepted. Never fails:
    /// unknown mnemonics are kept in [`VmFlags::unknown`].
    pub fn from_smaps_line(line: &str) -> VmFlags {
        let value = line.trim_start();
        let value = value.strip_prefix("VmFlags:").unwrap_or(value);
        let mut flags = VmFlags::default();
        for code in value.split_whitespace() {
            flags.insert(code);
        }
        flags
    }

    /// Sets the flag with this mnemonic (kept in `unknown` if not known).
    pub fn insert(&mut self, code: &str) {
        match bit_of(code) {
            Some(bit) => self.bits |= 1 << bit,
            None => {
                if !self.unknown.iter().any(|u| u == code) {
                    self.unknown.push(code.to_string());
                }
            }
        }
    }

    /// Whether the flag with this two-letter mnemonic is set, including
    /// mnemonics this code does not know.
    pub fn contains(&self, code: &str) -> bool {
        match bit_of(code) {
            Some(bit) => self.bits & (1 << bit) != 0,
            None => self.unknown.iter().any(|u| u == code),
        }
    }

    /// Mnemonics that are set but not known to this code.
    pub fn unknown(&self) -> &[String] {
        &self.unknown
    }

    /// All set mnemonics, known ones first, in our table order.
    pub fn codes(&self) -> impl Iterator<Item = &str> + '_ {
        CODES
            .iter()
            .enumerate()
            .filter(|(bit, _)| self.bits & (1 << bit) != 0)
            .map(|(_, code)| *code)
            .chain(self.unknown.iter().map(String::as_str))
    }

    /// Whether no flag at all is set.
    pub fn is_empty(&self) -> bool {
        self.bits == 0 && self.unknown.is_empty()
    }
}

/// Formats as the kernel does: space-separated mnemonics.
impl fmt::Display for VmFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, code) in self.codes().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(code)?;
        }
        Ok(())
    }
}

fn bit_of(code: &str) -> Option<usize> {
    CODES.iter().position(|c| *c == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_fits_in_u64_and_has_no_duplicates() {
        assert!(CODES.len() <= 64);
        for (i, c) in CODES.iter().enumerate() {
            assert_eq!(c.len(), 2, "{c}");
            assert_eq!(bit_of(c), Some(i), "duplicate {c}");
        }
    }

    #[test]
    fn parses_real_lines() {
        // [vvar] on this kernel.
        let f = VmFlags::from_smaps_line("VmFlags: rd mr pf io de dd ");
        assert!(f.readable() && f.may_read() && f.pfnmap() && f.io());
        assert!(f.dontexpand() && f.dontdump());
        assert!(!f.writable() && !f.growsdown() && f.unknown().is_empty());

        // [stack].
        let f = VmFlags::from_smaps_line("VmFlags: rd wr mr mw me gd ac ");
        assert!(f.growsdown() && f.account() && f.writable());

        // mlock'ed MADV_HUGEPAGE area, shared anon, dontfork, wipeonfork.
        assert!(VmFlags::from_smaps_line("rd wr mr mw me lo ac hg").locked());
        assert!(VmFlags::from_smaps_line("rd wr mr mw me lo ac hg").hugepage());
        let f = VmFlags::from_smaps_line("VmFlags: rd wr sh mr mw me ms ");
        assert!(f.shared() && f.may_share());
        assert!(VmFlags::from_smaps_line("rd wr mr mw me dc ac").dontfork());
        assert!(VmFlags::from_smaps_line("rd wr mr mw me ac wf").wipeonfork());
    }

    #[test]
    fn every_named_accessor() {
        let all = "gd lo io pf mm dc wf dd hg nh mg uw um ui ht sl ss ms";
        let f = VmFlags::from_smaps_line(all);
        assert!(f.growsdown() && f.locked() && f.io() && f.pfnmap());
        assert!(f.mixedmap() && f.dontfork() && f.wipeonfork() && f.dontdump());
        assert!(f.hugepage() && f.nohugepage() && f.mergeable());
        assert!(f.uffd_wp() && f.uffd_missing() && f.uffd_minor());
        assert!(f.hugetlb() && f.sealed() && f.shadow_stack() && f.may_share());
        assert!(!f.readable());
        assert_eq!(f.to_string().split(' ').count(), 18);
    }

    #[test]
    fn keeps_unknown_codes() {
        let f = VmFlags::from_smaps_line("VmFlags: rd zz gu zz");
        assert!(f.readable());
        assert_eq!(f.unknown(), ["zz", "gu"]);
        assert!(f.contains("gu"));
        assert_eq!(f.to_string(), "rd zz gu");
    }

    #[test]
    fn empty_line() {
        assert!(VmFlags::from_smaps_line("VmFlags: ").is_empty());
        assert!(VmFlags::from_smaps_line("").is_empty());
    }

    #[test]
    fn display_round_trips() {
        let f = VmFlags::from_smaps_line("VmFlags: rd ex mr mw me de sl ");
        assert_eq!(VmFlags::from_smaps_line(&f.to_string()), f);
    }
}
