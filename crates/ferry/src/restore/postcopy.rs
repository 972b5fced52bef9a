//! Post-copy restore: a process whose memory is still partly on the source
//! gets a userfaultfd made *by itself* (a remote syscall in the stub, so it
//! keeps a reference: if ferry dies, a fault blocks instead of reading a
//! zero page — KERNEL.md §4), registered over the areas that hold planned
//! pages: MISSING mode on private anonymous memory, MISSING|MINOR on shared
//! memory. Ferry takes a duplicate with `pidfd_getfd` and serves the
//! faults (migrate::postcopy).
//!
//! Shared memory: a page of a shared object is planned once for the whole
//! tree (the source names one process and address that map it), and stays
//! a hole in the object (restore writes none of its mappings). A touch of
//! the hole faults MISSING; once the page is in the object's page cache
//! (the pager writes it there through its own descriptor) a touch in a
//! mapping that does not map it yet faults MINOR and is answered with
//! UFFDIO_CONTINUE. Only objects the job reaches through mappings alone go
//! this way: read(2)/write(2) on a descriptor see no userfaultfd, so a
//! hole would read as zeros.

use super::stub::Stub;
use super::{PlannedPages, RestoreError};
use crate::image::{FileKind, Inventory, ProcessImage, VmaKind};
use crate::sys::{self, uffd};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Events the pager must see to keep its view of the job's memory right.
pub const FEATURES: u64 = uffd::UFFD_FEATURE_EVENT_FORK
    | uffd::UFFD_FEATURE_EVENT_REMAP
    | uffd::UFFD_FEATURE_EVENT_REMOVE
    | uffd::UFFD_FEATURE_EVENT_UNMAP;

/// Shared-memory objects whose pages may stay on the source after the
/// resume: those no process of the image holds a descriptor to.
pub fn lazy_objects(inv: &Inventory) -> HashSet<u64> {
    let reachable: HashSet<u64> = inv
        .files
        .iter()
        .filter_map(|f| match f.kind {
            FileKind::Memfd { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    inv.processes
        .iter()
        .flat_map(|p| &p.vmas)
        .filter_map(|v| match v.kind {
            VmaKind::Shmem { id, .. } if !reachable.contains(&id) => Some(id),
            _ => None,
        })
        .collect()
}

/// One mapping of a lazy shared object: `[start, end)` of a process shows
/// the object `id` from byte `offset` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedArea {
    pub start: u64,
    pub end: u64,
    pub id: u64,
    pub offset: u64,
}

impl SharedArea {
    /// The object offset shown at `addr` (inside the area).
    pub fn offset_of(&self, addr: u64) -> u64 {
        self.offset + (addr - self.start)
    }
}

/// Where the processes of an image map lazy shared objects.
#[derive(Debug, Clone, Default)]
pub struct SharedLayout {
    /// Per image pid, sorted by address.
    by_pid: HashMap<i32, Vec<SharedArea>>,
}

impl SharedLayout {
    pub fn new(inv: &Inventory) -> Self {
        let lazy = lazy_objects(inv);
        let mut by_pid: HashMap<i32, Vec<SharedArea>> = HashMap::new();
        for p in inv.processes.iter().filter(|p| p.zombie.is_none()) {
            for v in &p.vmas {
                if let VmaKind::Shmem { id, offset, .. } = v.kind {
                    if lazy.contains(&id) {
                        by_pid.entry(p.pid).or_default().push(SharedArea {
                            start: v.start,
                            end: v.end,
                            id,
                            offset,
                        });
                    }
                }
            }
        }
        for a in by_pid.values_mut() {
            a.sort_unstable_by_key(|a| a.start);
        }
        SharedLayout { by_pid }
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    /// The lazy shared areas of process `vpid`.
    pub fn areas(&self, vpid: i32) -> &[SharedArea] {
        self.by_pid.get(&vpid).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The lazy shared area of `vpid` holding `addr`.
    pub fn area(&self, vpid: i32, addr: u64) -> Option<&SharedArea> {
        let a = self.areas(vpid);
        let i = a.partition_point(|x| x.start <= addr);
        a.get(i.checked_sub(1)?).filter(|x| addr < x.end)
    }

    /// Adds to `planned` every mapping of each object page that a planned
    /// page in a shared area names: the object page is missing in all of
    /// them (an older copy received for another mapping must not be
    /// restored into it).
    pub fn expand(&self, planned: &mut PlannedPages) {
        // Planned object ranges: id → [start, end) offsets.
        let mut objects: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        for (vpid, ranges) in planned.iter() {
            for a in self.areas(*vpid) {
                let i = ranges.partition_point(|&(_, e)| e <= a.start);
                for &(s, e) in ranges[i..].iter().take_while(|&&(s, _)| s < a.end) {
                    let (s, e) = (s.max(a.start), e.min(a.end));
                    objects
                        .entry(a.id)
                        .or_default()
                        .push((a.offset_of(s), a.offset_of(s) + (e - s)));
                }
            }
        }
        if objects.is_empty() {
            return;
        }
        for (vpid, areas) in &self.by_pid {
            let mut add = Vec::new();
            for a in areas {
                let Some(obj) = objects.get(&a.id) else {
                    continue;
                };
                let top = a.offset + (a.end - a.start);
                for &(s, e) in obj {
                    let (s, e) = (s.max(a.offset), e.min(top));
                    if s < e {
                        add.push((a.start + (s - a.offset), a.start + (e - a.offset)));
                    }
                }
            }
            if add.is_empty() {
                continue;
            }
            let v = planned.entry(*vpid).or_default();
            v.extend(add);
            v.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
            for &(s, e) in v.iter() {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            *v = merged;
        }
    }
}

/// Pages below / above a thread's stack pointer sent before the resume.
const STACK_BELOW: u64 = 1;
const STACK_ABOVE: u64 = 8;
/// Pages on each side of a thread's instruction pointer.
const CODE_AROUND: u64 = 1;
const PG: u64 = sys::PAGE_SIZE as u64;

/// Sorted, disjoint `[start, end)` windows of `p` that are touched first:
/// around each thread's stack and instruction pointers (what the threads
/// touch when they resume), and the pages the restore itself makes the
/// kernel write before the job's userfaultfd exists: the rseq area
/// (updated on each return to user space), the TID address, the robust
/// list head, the TLS block at fs_base. Left missing, such a page would be
/// zero-filled by that write and the data arriving later refused (EEXIST).
pub fn first_touched(p: &ProcessImage) -> Vec<(u64, u64)> {
    let mut w = windows_around(p.threads.iter().map(|t| (t.regs.rsp, t.regs.rip)));
    for t in &p.threads {
        let mut page = |addr: u64| {
            if addr != 0 {
                let a = addr & !(PG - 1);
                w.push((a, a + PG));
            }
        };
        page(t.tid_address);
        page(t.robust_list.0);
        page(t.regs.fs_base);
        page(t.regs.fs_base.saturating_sub(1));
        if let Some(r) = &t.rseq {
            page(r.rseq_abi_pointer);
            page(r.rseq_abi_pointer + u64::from(r.rseq_abi_size).saturating_sub(1));
        }
    }
    merge(w)
}

/// The windows for (stack pointer, instruction pointer) pairs.
fn windows_around(regs: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    merge(
        regs.flat_map(|(rsp, rip)| {
            let sp = rsp & !(PG - 1);
            let ip = rip & !(PG - 1);
            [
                (
                    sp.saturating_sub(STACK_BELOW * PG),
                    sp + (STACK_ABOVE + 1) * PG,
                ),
                (
                    ip.saturating_sub(CODE_AROUND * PG),
                    ip + (CODE_AROUND + 1) * PG,
                ),
            ]
        })
        .collect(),
    )
}

/// `areas` (sorted, disjoint) cut by the `hot` windows (sorted, disjoint):
/// the parts inside a window and the parts outside.
#[allow(clippy::type_complexity)]
pub fn carve(areas: &[(u64, u64)], hot: &[(u64, u64)]) -> (Vec<(u64, u64)>, Vec<(u64, u64)>) {
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for &(s, e) in areas {
        let mut pos = s;
        let first = hot.partition_point(|&(_, he)| he <= s);
        for &(hs, he) in hot[first..].iter().take_while(|&&(hs, _)| hs < e) {
            let (a, b) = (hs.max(s), he.min(e));
            if pos < a {
                outside.push((pos, a));
            }
            inside.push((a, b));
            pos = b;
        }
        if pos < e {
            outside.push((pos, e));
        }
    }
    (inside, outside)
}

/// Sorts `[start, end)` ranges and merges those that overlap or touch.
fn merge(mut w: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    w.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(w.len());
    for (s, e) in w {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

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

/// An area to register: `[start, end)` and its `UFFDIO_REGISTER_MODE_*`.
pub type Area = (u64, u64, u64);

const SHARED_MODE: u64 = uffd::UFFDIO_REGISTER_MODE_MISSING | uffd::UFFDIO_REGISTER_MODE_MINOR;

/// Areas of `p` holding a page of `planned` (sorted, disjoint `[start,
/// end)` runs, shared aliases included: [`SharedLayout::expand`]): what must
/// be registered, and how.
pub fn areas_to_register(
    p: &ProcessImage,
    planned: &[(u64, u64)],
    shared: &SharedLayout,
) -> Vec<Area> {
    let mut out = Vec::new();
    for v in &p.vmas {
        let mode = if !v.shared && matches!(v.kind, VmaKind::Anon { .. }) {
            uffd::UFFDIO_REGISTER_MODE_MISSING
        } else if shared.area(p.pid, v.start).is_some() {
            SHARED_MODE
        } else {
            continue;
        };
        let i = planned.partition_point(|&(_, end)| end <= v.start);
        if planned.get(i).is_some_and(|&(start, _)| start < v.end) {
            out.push((v.start, v.end, mode));
        }
    }
    out
}

/// Creates the process's userfaultfd and registers `ranges` (the areas are
/// mapped, the pages already here are filled, nothing is planned elsewhere).
pub fn register(
    st: &mut Stub,
    p: &ProcessImage,
    ranges: Vec<Area>,
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
    let want = if ranges.iter().any(|r| r.2 == SHARED_MODE) {
        FEATURES | uffd::UFFD_FEATURE_MISSING_SHMEM | uffd::UFFD_FEATURE_MINOR_SHMEM
    } else {
        FEATURES
    };
    let (got, _) = uffd::api(dup.as_fd(), want).map_err(|e| {
        step(format!(
            "UFFDIO_API with fork/remap/remove/unmap events (and shmem faults): {e}"
        ))
    })?;
    if got & want != want {
        return Err(step(format!(
            "the kernel lacks userfaultfd features {:#x}",
            want & !got
        )));
    }
    for &(start, end, mode) in &ranges {
        let ioctls = uffd::register(dup.as_fd(), start, end - start, mode)
            .map_err(|e| step(format!("UFFDIO_REGISTER {start:#x}-{end:#x}: {e}")))?;
        let need = if mode == SHARED_MODE {
            uffd::IOCTL_COPY_BIT | uffd::IOCTL_ZEROPAGE_BIT | uffd::IOCTL_CONTINUE_BIT
        } else {
            uffd::IOCTL_COPY_BIT | uffd::IOCTL_ZEROPAGE_BIT
        };
        if ioctls & need != need {
            return Err(step(format!(
                "{start:#x}-{end:#x} registered without the ioctls {:#x}",
                need & !ioctls
            )));
        }
    }
    Ok(RegisteredSpace {
        vpid: p.pid,
        pid: st.pid,
        job_fd: fd as i32,
        uffd: Arc::new(dup),
        ranges: ranges.into_iter().map(|(s, e, _)| (s, e)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carve_splits_areas_by_windows() {
        let p = PG;
        let areas = [(0x10 * p, 0x20 * p), (0x30 * p, 0x40 * p)];
        // One window straddling the first area's start, one inside the
        // second, one past everything.
        let hot = [
            (0x8 * p, 0x12 * p),
            (0x34 * p, 0x36 * p),
            (0x50 * p, 0x60 * p),
        ];
        let (inside, outside) = carve(&areas, &hot);
        assert_eq!(inside, vec![(0x10 * p, 0x12 * p), (0x34 * p, 0x36 * p)]);
        assert_eq!(
            outside,
            vec![
                (0x12 * p, 0x20 * p),
                (0x30 * p, 0x34 * p),
                (0x36 * p, 0x40 * p)
            ]
        );
        // No windows: the areas as they are.
        assert_eq!(carve(&areas, &[]), (vec![], areas.to_vec()));
    }

    #[test]
    fn hot_windows_cover_stack_and_code_and_merge() {
        // Two threads with neighbouring stacks, one shared code page.
        let w = windows_around([(0x7000_0010, 0x40_1234), (0x7000_3ff0, 0x40_1000)].into_iter());
        assert_eq!(
            w,
            vec![
                (0x40_0000, 0x40_3000),
                (0x7000_0000 - PG, 0x7000_3000 + (STACK_ABOVE + 1) * PG),
            ]
        );
    }

    use crate::image::tests_support::{inventory, process, shmem_vma};
    use crate::image::{FileImage, FileKind};

    const P: u64 = 4096;

    /// Object 7 mapped by 10 twice (whole, and its second half again) and
    /// by 11 from page 2; object 9 (open as a memfd) by 10.
    fn inv() -> Inventory {
        let mut inv = inventory(vec![
            process(
                10,
                vec![
                    shmem_vma(0x10000, 0x10000 + 8 * P, 7, 0),
                    shmem_vma(0x40000, 0x40000 + 4 * P, 7, 4 * P),
                    shmem_vma(0x80000, 0x80000 + 2 * P, 9, 0),
                ],
            ),
            process(11, vec![shmem_vma(0x20000, 0x20000 + 6 * P, 7, 2 * P)]),
        ]);
        inv.files.push(FileImage {
            flags: 2,
            pos: 0,
            kind: FileKind::Memfd {
                name: "m".into(),
                id: 9,
                size: 2 * P,
                blob: None,
            },
        });
        inv
    }

    #[test]
    fn objects_with_a_descriptor_are_not_lazy() {
        let inv = inv();
        assert_eq!(lazy_objects(&inv), HashSet::from([7]));
        let l = SharedLayout::new(&inv);
        assert_eq!(l.areas(10).len(), 2);
        assert!(l.area(10, 0x80000).is_none());
        let a = l.area(11, 0x20000 + P + 5).unwrap();
        assert_eq!((a.id, a.offset_of(0x20000 + P)), (7, 3 * P));
        assert!(l.area(11, 0x20000 + 6 * P).is_none());
        assert!(l.area(12, 0x20000).is_none());
    }

    #[test]
    fn a_planned_shared_page_is_missing_in_every_mapping() {
        let l = SharedLayout::new(&inv());
        // Object pages 5 and 6, planned under process 11 (its pages 3, 4).
        let mut planned = PlannedPages::new();
        planned.insert(11, vec![(0x20000 + 3 * P, 0x20000 + 5 * P)]);
        planned.insert(10, vec![(0x90000, 0x91000)]);
        l.expand(&mut planned);
        assert_eq!(
            planned[&10],
            vec![
                (0x10000 + 5 * P, 0x10000 + 7 * P),
                (0x40000 + P, 0x40000 + 3 * P),
                (0x90000, 0x91000)
            ]
        );
        assert_eq!(planned[&11], vec![(0x20000 + 3 * P, 0x20000 + 5 * P)]);
        let p10 = &inv().processes[0];
        let mode = uffd::UFFDIO_REGISTER_MODE_MISSING | uffd::UFFDIO_REGISTER_MODE_MINOR;
        assert_eq!(
            areas_to_register(p10, &planned[&10], &l),
            vec![
                (0x10000, 0x10000 + 8 * P, mode),
                (0x40000, 0x40000 + 4 * P, mode)
            ]
        );
    }
}
