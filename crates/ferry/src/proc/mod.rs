//! Readers and parsers for the /proc files of a live process.
//!
//! Every `parse_*` function is pure (text in, struct out) so it can be tested
//! on captured samples; every `read_*` function reads the live file and maps
//! "the process is gone" to [`ProcError::Gone`]. Nothing here needs ptrace or
//! `unsafe`: values that /proc does not expose (current brk, sigactions,
//! registers) are collected by the checkpoint code through injection.

mod error;
pub mod fdinfo;
pub mod maps;
pub mod pagemap;
pub mod stat;
pub mod status;
pub mod task;
pub mod vmflags;

#[cfg(test)]
mod fuzz_tests;

pub use error::ProcError;
pub use fdinfo::{parse_fdinfo, parse_fdinfo_at, read_fdinfo, FdInfo};
pub use maps::{
    parse_maps, parse_maps_at, parse_smaps, parse_smaps_at, read_maps, read_smaps, MapEntry, Perms,
    ShmemKind, Special,
};
pub use pagemap::{Pagemap, PagemapEntry};
pub use stat::{parse_stat, parse_stat_at, read_stat, read_task_stat, StatInfo};
pub use status::{parse_status, parse_status_at, read_status, read_task_status, StatusInfo};
pub use task::{
    children, cwd, exe, exists, fd_target, list_fds, list_tids, read_auxv, read_comm,
    read_personality, root,
};
pub use vmflags::VmFlags;

use std::path::{Path, PathBuf};

/// `/proc/PID/REL`.
pub(crate) fn pid_path(pid: i32, rel: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rel}"))
}

/// Reads a whole /proc file as bytes, classifying errors for `pid`.
pub(crate) fn read_bytes(pid: i32, path: &Path) -> Result<Vec<u8>, ProcError> {
    std::fs::read(path).map_err(|e| ProcError::from_io(pid, path, e))
}

/// Reads a whole /proc file as text. File names inside maps or fd links are
/// arbitrary bytes, so invalid UTF-8 is replaced rather than rejected: one
/// odd file name must not make a whole process unreadable.
pub(crate) fn read_text(pid: i32, path: &Path) -> Result<String, ProcError> {
    let bytes = read_bytes(pid, path)?;
    Ok(String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// Strict hexadecimal: `from_str_radix` alone would also accept a sign.
pub(crate) fn hex_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Strict unsigned decimal (no sign, no spaces).
pub(crate) fn dec_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Strict octal, as fdinfo `flags` and status `Umask` print it.
pub(crate) fn oct_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok()
}
