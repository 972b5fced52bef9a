//! The source's side of post-copy (and of hybrid, after its live rounds):
//! with the tree frozen, send the state and only the pages the job needs
//! first, let the target resume it, then stream the rest in the background
//! while answering the target's page requests first. The frozen tree is
//! kept until the target says every page is in place.
//!
//! Sent before the resume ("eager"): pages the target cannot leave missing
//! (private file pages the job changed: userfaultfd cannot hold back a
//! private file mapping — KERNEL.md §4 — and shared memory the job can
//! reach through a descriptor, which read(2) would see as a hole) and the
//! pages each thread touches first (around its stack pointer and
//! instruction pointer). Shared memory reached through mappings only goes
//! after the resume, each page of an object once, under the first process
//! and address found mapping it (restore::postcopy).

use super::*;
use crate::image::{ProcessImage, VmaKind};
use crate::restore::postcopy::SharedLayout;
use crate::wire::messages::{PlanRun, PostcopyDone, PostcopyPlan, MAX_PLAN_RUNS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};

/// Pages per background batch: small enough that a page request does not
/// wait long behind one.
const BG_CHUNK: usize = 32;

pub(super) struct Handoff {
    pub handed: Handed,
    pub resume: Duration,
    pub done: PostcopyDone,
    pub before: u64,
    pub after: u64,
    /// Of `after`: pages of shared objects, and how many of those the
    /// target asked for (the job touched them before they came).
    pub shared_after: u64,
    pub shared_requested: u64,
}

/// What is left of one process after the resume.
struct Rest {
    pid: i32,
    vpid: i32,
    /// Its planned pages, sorted.
    pages: Vec<u64>,
    /// The process's areas of lazy shared objects, sorted.
    shared: Vec<(u64, u64)>,
}

/// Which planned pages have gone, shared by the thread that answers the
/// target's requests and the background loop: one bit per page of each
/// process's plan, set by whichever sends the page first.
struct SentMap {
    bits: Vec<Vec<AtomicU64>>,
    left_of: Vec<AtomicUsize>,
    left: AtomicUsize,
}

impl SentMap {
    fn new(rest: &[Rest]) -> Self {
        SentMap {
            bits: rest
                .iter()
                .map(|r| {
                    (0..r.pages.len().div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
            left_of: rest
                .iter()
                .map(|r| AtomicUsize::new(r.pages.len()))
                .collect(),
            left: AtomicUsize::new(rest.iter().map(|r| r.pages.len()).sum()),
        }
    }

    /// Marks page `j` of process `i` as sent; whether it was not yet.
    fn take(&self, i: usize, j: usize) -> bool {
        let bit = 1u64 << (j % 64);
        if self.bits[i][j / 64].fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return false;
        }
        self.left_of[i].fetch_sub(1, Ordering::AcqRel);
        self.left.fetch_sub(1, Ordering::AcqRel);
        true
    }

    fn left_of(&self, i: usize) -> usize {
        self.left_of[i].load(Ordering::Acquire)
    }

    fn left(&self) -> usize {
        self.left.load(Ordering::Acquire)
    }
}

impl Rest {
    fn is_shared(&self, addr: u64) -> bool {
        let i = self.shared.partition_point(|&(s, _)| s <= addr);
        i > 0 && addr < self.shared[i - 1].1
    }
}

/// Which pages of each shared object are planned already (one bit per
/// page of the object).
#[derive(Default)]
struct SharedSeen(HashMap<u64, Vec<u64>>);

impl SharedSeen {
    /// Marks page `off` of object `id` (of at least `size` bytes); whether
    /// it was new.
    fn first(&mut self, id: u64, size: u64, off: u64) -> bool {
        let bits = self.0.entry(id).or_default();
        let k = (off / PAGE) as usize;
        let words = (size / PAGE).div_ceil(64).max(k as u64 / 64 + 1) as usize;
        if bits.len() < words {
            bits.resize(words, 0);
        }
        let (w, b) = (k / 64, 1u64 << (k % 64));
        let new = bits[w] & b == 0;
        bits[w] |= b;
        new
    }
}

/// What the plan holds of one process, until the resume.
struct Planned {
    pid: i32,
    vpid: i32,
    runs: Vec<PlanRun>,
    /// Its shared areas `[start, end)`.
    shared: Vec<(u64, u64)>,
}

enum FromTarget {
    Done(PostcopyDone),
    Lost(String),
}

/// What goes before the resume in private anonymous memory: the pages
/// the threads (and the restore itself) touch first.
fn hot_windows(p: &ProcessImage) -> Vec<(u64, u64)> {
    crate::restore::postcopy::first_touched(p)
}

/// Whether the target must have `addr` of `p` before the job resumes:
/// it is not in private anonymous memory (userfaultfd MISSING mode cannot
/// hold it back), or it is in one of the `hot` windows.
fn eager(p: &ProcessImage, hot: &[(u64, u64)], addr: u64) -> bool {
    let i = p.vmas.partition_point(|v| v.end <= addr);
    let anon_private = p
        .vmas
        .get(i)
        .is_some_and(|v| v.start <= addr && !v.shared && matches!(v.kind, VmaKind::Anon { .. }));
    let i = hot.partition_point(|&(s, _)| s <= addr);
    !anon_private || (i > 0 && addr < hot[i - 1].1)
}

fn runs_of(pages: &[u64]) -> Vec<PlanRun> {
    let mut runs: Vec<PlanRun> = Vec::new();
    for &a in pages {
        match runs.last_mut() {
            Some(r) if r.addr + r.npages as u64 * PAGE == a && r.npages < u32::MAX => r.npages += 1,
            _ => runs.push(PlanRun { addr: a, npages: 1 }),
        }
    }
    runs
}

/// The sorted union of `runs` and the `[start, end)` ranges `areas` (both
/// sorted, disjoint from each other) as plan runs.
fn merge_runs(runs: Vec<PlanRun>, areas: &[(u64, u64)]) -> Vec<PlanRun> {
    let mut out: Vec<PlanRun> = Vec::with_capacity(runs.len() + areas.len());
    for &(s, e) in areas {
        out.extend(PlanRun::covering(s, e));
    }
    out.extend(runs);
    out.sort_unstable_by_key(|r| r.addr);
    out
}

/// With `tree` frozen: eager pages, state, plan, commit; then the post-copy
/// phase until the target has every page.
pub(super) fn handoff(
    f: Final,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Handoff, MigrateError> {
    let Final {
        tree,
        links,
        work,
        tracked,
        rounds,
        round,
        wire_round,
        resent_total,
        t_freeze,
    } = f;
    // What the target does not have yet: as a stop-and-copy would send it.
    let left = remaining_pages(tree, tracked, resent_total, true, false)?;
    tracing::debug!(elapsed = ?t_freeze.elapsed(), "frozen: remaining pages found");
    let inv = capture_frozen(tree, work, tracked)?;
    tracing::debug!(elapsed = ?t_freeze.elapsed(), "frozen: state captured");
    let n = counts(&inv);
    // Split into what goes now and what is planned.
    let mut split: Vec<Vec<u64>> = vec![Vec::new(); links.n as usize + 1];
    let mut plans = Vec::new();
    let mut planned: Vec<Planned> = Vec::new();
    let mut before = 0u64;
    let mut shared_after = 0u64;
    let layout = SharedLayout::new(&inv);
    let mut seen = SharedSeen::default();
    for Left {
        pid,
        vpid,
        pages,
        areas,
    } in left
    {
        let Some(p) = inv.processes.iter().find(|p| p.pid == vpid) else {
            continue;
        };
        let hot = hot_windows(p);
        let mut now = Vec::new();
        let mut later = Vec::new();
        for a in pages {
            match layout.area(vpid, a) {
                // Another mapping of the page was planned already.
                Some(ar) => {
                    if seen.first(ar.id, ar.offset + (ar.end - ar.start), ar.offset_of(a)) {
                        later.push(a);
                        shared_after += 1;
                    }
                }
                None if eager(p, &hot, a) => now.push(a),
                None => later.push(a),
            }
        }
        // Whole areas: their hot parts go now, the rest is planned as is.
        let (hot_parts, cold_parts) = crate::restore::postcopy::carve(&areas, &hot);
        if !hot_parts.is_empty() {
            for (s, e) in hot_parts {
                now.extend((s..e).step_by(PAGE as usize));
            }
            now.sort_unstable();
        }
        before += now.len() as u64;
        links.send(pid, vpid, wire_round, &now, &mut split)?;
        let runs = merge_runs(runs_of(&later), &cold_parts);
        if !runs.is_empty() {
            for chunk in runs.chunks(MAX_PLAN_RUNS) {
                plans.push(PostcopyPlan {
                    pid: vpid,
                    runs: chunk.to_vec(),
                });
            }
            let shared = layout
                .areas(vpid)
                .iter()
                .map(|a| (a.start, a.end))
                .collect();
            planned.push(Planned {
                pid,
                vpid,
                runs,
                shared,
            });
        }
    }
    end_frozen_round(links, rounds, round, wire_round, before, t_freeze)?;
    tracing::debug!(elapsed = ?t_freeze.elapsed(), pages = before, "frozen: eager pages sent");
    commit(links, work, inv, plans)?;
    tracing::debug!(elapsed = ?t_freeze.elapsed(), "frozen: committed");
    let handed = await_restored(links, n)?;
    let resume = t_freeze.elapsed();
    check_reused_flags(tree, tracked);
    let rest: Vec<Rest> = planned
        .into_iter()
        .map(
            |Planned {
                 pid,
                 vpid,
                 runs,
                 shared,
             }| {
                let pages: Vec<u64> = runs
                    .iter()
                    .flat_map(|r| (0..r.npages as u64).map(move |k| r.addr + k * PAGE))
                    .collect();
                Rest {
                    pid,
                    vpid,
                    pages,
                    shared,
                }
            },
        )
        .collect();
    let after: u64 = rest.iter().map(|r| r.pages.len() as u64).sum();
    progress(&Progress {
        round: round + 1,
        dirty_pages: after,
        pages_sent: 0,
        bandwidth: 0.0,
        estimated_downtime: Duration::ZERO,
        phase: "post-copy",
    });
    let (done, shared_requested) = stream_rest(links, rest, wire_round + 1, cancel)?;
    links.send_msg(&Message::Ack)?;
    Ok(Handoff {
        handed,
        resume,
        done,
        before,
        after,
        shared_after,
        shared_requested,
    })
}

/// The post-copy phase until the target has every page: a thread answers
/// the target's page requests on the main connection as they come (a
/// fault waits for nothing else), while this one streams the rest on the
/// background connection in address order, moving to where the job last
/// faulted.
fn stream_rest(
    links: &mut Links,
    rest: Vec<Rest>,
    round: u32,
    cancel: &AtomicBool,
) -> Result<(PostcopyDone, u64), MigrateError> {
    let io = |e| MigrateError::Io {
        what: "socket".into(),
        source: e,
    };
    let sock = links.r.get_ref().try_clone().map_err(io)?;
    let cut = sock.try_clone().map_err(io)?;
    let reader = std::mem::replace(&mut links.r, FrameReader::new(sock));
    let Links { main, bg, .. } = links;
    main.set_direct(true)?;
    let bg = bg
        .as_mut()
        .ok_or_else(|| MigrateError::Internal("post-copy without a background stream".into()))?;
    let sent = SentMap::new(&rest);
    // (process << 40) | page + 1 of the last fault; 0: none new.
    let last_fault = AtomicU64::new(0);
    let shared_requested = AtomicU64::new(0);
    let (tx, rx) = mpsc::channel();
    let out = std::thread::scope(|s| {
        let answering = std::thread::Builder::new()
            .name("ferry-postcopy-rx".into())
            .spawn_scoped(s, || {
                let why = answer_requests(
                    reader,
                    main,
                    &rest,
                    &sent,
                    &last_fault,
                    &shared_requested,
                    round,
                    &tx,
                );
                if let Some(why) = why {
                    let _ = tx.send(FromTarget::Lost(why));
                }
            })
            .map_err(|e| MigrateError::Io {
                what: "starting the post-copy reader".into(),
                source: e,
            })?;
        let out = background(bg, &rest, &sent, &last_fault, round, &rx, cancel);
        if out.is_err() {
            // Unblocks the reader; the target, losing us, kills its copy.
            let _ = cut.shutdown(std::net::Shutdown::Both);
        }
        let _ = answering.join();
        out
    })?;
    Ok((out, shared_requested.load(Ordering::Relaxed)))
}

/// The thread that answers page requests; returns why it stopped unless
/// the target said it is done.
#[allow(clippy::too_many_arguments)]
fn answer_requests(
    mut reader: FrameReader<TcpStream>,
    main: &mut PageSender,
    rest: &[Rest],
    sent: &SentMap,
    last_fault: &AtomicU64,
    shared_requested: &AtomicU64,
    round: u32,
    tx: &mpsc::Sender<FromTarget>,
) -> Option<String> {
    let mut chunk: Vec<u64> = Vec::with_capacity(64);
    loop {
        let q = match wire::source::read_message(&mut reader, true) {
            Ok(Message::PageRequest(q)) => q,
            Ok(Message::PostcopyDone(d)) => {
                let _ = tx.send(FromTarget::Done(d));
                return None;
            }
            Ok(Message::Pong { .. }) => continue,
            Ok(Message::Abort { reason }) | Ok(Message::Error { message: reason }) => {
                return Some(format!("the target gave up: {reason}"))
            }
            Ok(m) => return Some(format!("unexpected {} from the target", m.frame_type())),
            Err(e) => return Some(e.to_string()),
        };
        let Some(i) = rest.iter().position(|r| r.vpid == q.pid) else {
            continue;
        };
        let r = &rest[i];
        chunk.clear();
        for k in 0..q.npages.min(64) as u64 {
            let a = q.addr + k * PAGE;
            let Ok(j) = r.pages.binary_search(&a) else {
                continue;
            };
            if sent.take(i, j) {
                chunk.push(a);
                if r.is_shared(a) {
                    shared_requested.fetch_add(1, Ordering::Relaxed);
                }
            }
            if k == 0 {
                // The background continues from here.
                last_fault.store(((i as u64) << 40) | (j as u64 + 1), Ordering::Release);
            }
        }
        if !chunk.is_empty() {
            if let Err(e) = main
                .send(r.pid, r.vpid, round, &chunk)
                .and_then(|()| main.end_round().map(|_| ()))
            {
                return Some(e.to_string());
            }
        }
    }
}

/// Streams every page not requested first, then waits for the target's
/// PostcopyDone.
fn background(
    bg: &mut PageSender,
    rest: &[Rest],
    sent: &SentMap,
    last_fault: &AtomicU64,
    round: u32,
    rx: &mpsc::Receiver<FromTarget>,
    cancel: &AtomicBool,
) -> Result<PostcopyDone, MigrateError> {
    let lost = |why: String| {
        MigrateError::Stream(format!(
            "post-copy failed, the target kills its copy: {why}"
        ))
    };
    let mut cursor = vec![0usize; rest.len()];
    let mut current = 0usize;
    let mut chunk: Vec<u64> = Vec::with_capacity(BG_CHUNK);
    loop {
        let wait = (sent.left() == 0).then_some(Duration::from_secs(600));
        let m = match wait {
            Some(d) => Some(
                rx.recv_timeout(d)
                    .map_err(|_| lost("no answer from the target".into()))?,
            ),
            None => match rx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(lost("connection closed".into()))
                }
            },
        };
        match m {
            Some(FromTarget::Done(d)) => return Ok(d),
            Some(FromTarget::Lost(why)) => return Err(lost(why)),
            None => {}
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrateError::Cancelled);
        }
        let lf = last_fault.swap(0, Ordering::AcqRel);
        if lf != 0 {
            // Right after the faulted page.
            current = (lf >> 40) as usize;
            cursor[current] = (lf & ((1 << 40) - 1)) as usize;
        }
        // The next process with pages left (the answering thread may take
        // the last ones at any time).
        let Some(i) = (0..rest.len())
            .map(|k| (current + k) % rest.len())
            .find(|&i| sent.left_of(i) > 0)
        else {
            continue;
        };
        current = i;
        let r = &rest[i];
        let n = r.pages.len();
        chunk.clear();
        let mut wrapped = false;
        while chunk.len() < BG_CHUNK && sent.left_of(i) > 0 {
            if cursor[i] >= n {
                if !chunk.is_empty() || wrapped {
                    // A batch's addresses must increase.
                    break;
                }
                cursor[i] = 0;
                wrapped = true;
            }
            let j = cursor[i];
            cursor[i] += 1;
            if sent.take(i, j) {
                chunk.push(r.pages[j]);
            } else if !chunk.is_empty() {
                // Keep a batch contiguous in address order.
                break;
            }
        }
        if !chunk.is_empty() {
            bg.send(r.pid, r.vpid, round, &chunk)?;
            bg.end_round()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_runs_orders_pages_and_areas() {
        let p = PAGE;
        let runs = runs_of(&[0x5 * p, 0x6 * p, 0x50 * p]);
        let m = merge_runs(runs, &[(0x10 * p, 0x14 * p)]);
        let got: Vec<(u64, u32)> = m.iter().map(|r| (r.addr, r.npages)).collect();
        assert_eq!(got, vec![(0x5 * p, 2), (0x10 * p, 4), (0x50 * p, 1)]);
    }

    #[test]
    fn each_shared_page_is_planned_once() {
        let mut seen = SharedSeen::default();
        assert!(seen.first(1, 4 * PAGE, 0));
        assert!(seen.first(1, 4 * PAGE, 3 * PAGE));
        assert!(!seen.first(1, 4 * PAGE, 0));
        assert!(seen.first(2, 4 * PAGE, 0));
        // Beyond the size given first (a larger mapping seen later).
        assert!(seen.first(1, 4 * PAGE, 200 * PAGE));
        assert!(!seen.first(1, 4 * PAGE, 200 * PAGE));
    }

    #[test]
    fn runs_of_joins_consecutive_pages() {
        let r = runs_of(&[0x1000, 0x2000, 0x3000, 0x9000]);
        assert_eq!(
            r.iter().map(|r| (r.addr, r.npages)).collect::<Vec<_>>(),
            vec![(0x1000, 3), (0x9000, 1)]
        );
    }
}
