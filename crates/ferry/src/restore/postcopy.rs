//! Post-copy restore: a process whose memory is still partly on the source
//! gets a userfaultfd made *by itself* (a remote syscall in the stub, so it
//! keeps a reference: if ferry dies, a fault blocks instead of reading a
//! zero page — KERNEL.md §4), registered in MISSING mode over the private
//! anonymous areas that hold planned pages. Ferry takes a duplicate with
//! `pidfd_getfd` and serves the faults (migrate::postcopy).

use super::stub::Stub;
use super::RestoreError;
use crate::image::{ProcessImage, VmaKind};
use crate::sys::{self, uffd};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Events the pager must see to keep its view of the job's memory right.
pub const FEATURES: u64 = uffd::UFFD_FEATURE_EVENT_FORK
    | uffd::UFFD_FEATURE_EVENT_REMAP
    | uffd::UFFD_FEATURE_EVENT_REMOVE
    | uffd::UFFD_FEATURE_EVENT_UNMAP;

/// A restored process's userfaultfd.
#[derive(Debug, Clone)]
pub struct RegisteredSpace {
    /// The image's pid (what the source numbers pages by).
    pub vpid: i32,
    /// The pid as ferry sees it.
    pub pid: i32,
    /// The descriptor number of the job's own reference.
    pub job_fd: i32,
    /// Ferry's duplicate.
    pub uffd: Arc<OwnedFd>,
    /// Registered ranges `[start, end)`.
    pub ranges: Vec<(u64, u64)>,
}

/// Private anonymous areas of `p` holding a page of `planned` (sorted,
/// disjoint `[start, end)` runs): what must be registered.
pub fn areas_to_register(p: &ProcessImage, planned: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for v in &p.vmas {
        if v.shared || !matches!(v.kind, VmaKind::Anon { .. }) {
            continue;
        }
        let i = planned.partition_point(|&(_, end)| end <= v.start);
        if planned.get(i).is_some_and(|&(start, _)| start < v.end) {
            out.push((v.start, v.end));
        }
    }
    out
}

/// Creates the process's userfaultfd and registers `ranges` (the areas are
/// mapped, the pages already here are filled, nothing is planned elsewhere).
pub fn register(
    st: &mut Stub,
    p: &ProcessImage,
    ranges: Vec<(u64, u64)>,
) -> Result<RegisteredSpace, RestoreError> {
    let step = |why: String| RestoreError::Step {
        pid: p.pid,
        what: "post-copy userfaultfd".into(),
        why,
    };
    // Non-blocking: the descriptor is shared with ferry, which polls it.
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = st.call("userfaultfd", libc::SYS_userfaultfd, &[flags])?;
    let dup = sys::pidfd_open(st.pid)
        .and_then(|pfd| sys::pidfd_getfd(&pfd, fd as i32))
        .map_err(|e| step(format!("pidfd_getfd: {e}")))?;
    let (got, _) = uffd::api(dup.as_fd(), FEATURES).map_err(|e| {
        step(format!(
            "UFFDIO_API with fork/remap/remove/unmap events: {e}"
        ))
    })?;
    if got & FEATURES != FEATURES {
        return Err(step(format!(
            "the kernel lacks userfaultfd events {:#x}",
            FEATURES & !got
        )));
    }
    for &(start, end) in &ranges {
        uffd::register(
            dup.as_fd(),
            start,
            end - start,
            uffd::UFFDIO_REGISTER_MODE_MISSING,
        )
        .map_err(|e| step(format!("UFFDIO_REGISTER {start:#x}-{end:#x}: {e}")))?;
    }
    Ok(RegisteredSpace {
        vpid: p.pid,
        pid: st.pid,
        job_fd: fd as i32,
        uffd: Arc::new(dup),
        ranges,
    })
}
