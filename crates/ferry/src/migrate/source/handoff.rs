//! The source's side of post-copy (and of hybrid, after its live rounds):
//! with the tree frozen, send the state and only the pages the job needs
//! first, let the target resume it, then stream the rest in the background
//! while answering the target's page requests first. The frozen tree is
//! kept until the target says every page is in place.
//!
//! Sent before the resume ("eager"): pages the target cannot leave missing
//! (those of file-backed and shared areas: userfaultfd MISSING mode takes
//! private anonymous memory only — KERNEL.md §4) and the pages each thread
//! touches first (around its stack pointer and instruction pointer).

use super::*;
use crate::image::{ProcessImage, VmaKind};
use crate::wire::messages::{PlanRun, PostcopyDone, PostcopyPlan, MAX_PLAN_RUNS};

/// Pages below / above a thread's stack pointer sent before the resume.
const STACK_BELOW: u64 = 1;
const STACK_ABOVE: u64 = 8;
/// Pages on each side of a thread's instruction pointer.
const CODE_AROUND: u64 = 1;
/// Pages per background batch: small enough that a page request does not
/// wait long behind one.
const BG_CHUNK: usize = 32;

pub(super) struct Handoff {
    pub handed: Handed,
    pub resume: Duration,
    pub done: PostcopyDone,
    pub before: u64,
    pub after: u64,
}

/// What is left of one process after the resume.
struct Rest {
    pid: i32,
    vpid: i32,
    pages: Vec<u64>,
    sent: Vec<bool>,
    cursor: usize,
    left: usize,
}

enum FromTarget {
    Request(wire::messages::PageRequest),
    Done(PostcopyDone),
    Lost(String),
}

/// Sorted, disjoint `[start, end)` windows of `p` around each thread's
/// stack and instruction pointers: what the threads touch first.
fn hot_windows(p: &ProcessImage) -> Vec<(u64, u64)> {
    windows_around(p.threads.iter().map(|t| (t.regs.rsp, t.regs.rip)))
}

/// The windows for (stack pointer, instruction pointer) pairs.
fn windows_around(regs: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut w: Vec<(u64, u64)> = regs
        .flat_map(|(rsp, rip)| {
            let sp = rsp & !(PAGE - 1);
            let ip = rip & !(PAGE - 1);
            [
                (
                    sp.saturating_sub(STACK_BELOW * PAGE),
                    sp + (STACK_ABOVE + 1) * PAGE,
                ),
                (
                    ip.saturating_sub(CODE_AROUND * PAGE),
                    ip + (CODE_AROUND + 1) * PAGE,
                ),
            ]
        })
        .collect();
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
    let left = remaining_pages(tree, tracked, resent_total, false)?;
    let inv = capture_frozen(tree, work)?;
    let n = counts(&inv);
    // Split into what goes now and what is planned.
    let mut split: Vec<Vec<u64>> = vec![Vec::new(); links.n as usize + 1];
    let mut plans = Vec::new();
    let mut rest = Vec::new();
    let mut before = 0u64;
    for Left { pid, vpid, pages } in left {
        let Some(p) = inv.processes.iter().find(|p| p.pid == vpid) else {
            continue;
        };
        let hot = hot_windows(p);
        let (now, later): (Vec<u64>, Vec<u64>) =
            pages.into_iter().partition(|&a| eager(p, &hot, a));
        before += now.len() as u64;
        links.send(pid, vpid, wire_round, &now, &mut split)?;
        if !later.is_empty() {
            let runs = runs_of(&later);
            for chunk in runs.chunks(MAX_PLAN_RUNS) {
                plans.push(PostcopyPlan {
                    pid: vpid,
                    runs: chunk.to_vec(),
                });
            }
            rest.push(Rest {
                pid,
                vpid,
                sent: vec![false; later.len()],
                left: later.len(),
                pages: later,
                cursor: 0,
            });
        }
    }
    end_frozen_round(links, rounds, round, wire_round, before, t_freeze)?;
    commit(links, work, inv, plans)?;
    let handed = await_restored(links, n)?;
    let resume = t_freeze.elapsed();
    let after: u64 = rest.iter().map(|r| r.pages.len() as u64).sum();
    progress(&Progress {
        round: round + 1,
        dirty_pages: after,
        pages_sent: 0,
        bandwidth: 0.0,
        estimated_downtime: Duration::ZERO,
        phase: "post-copy",
    });
    let done = stream_rest(links, rest, wire_round + 1, cancel)?;
    links.send_msg(&Message::Ack)?;
    Ok(Handoff {
        handed,
        resume,
        done,
        before,
        after,
    })
}

/// The post-copy phase: background pages in address order from where the
/// job last faulted, requested pages first, until the target is done.
fn stream_rest(
    links: &mut Links,
    mut rest: Vec<Rest>,
    round: u32,
    cancel: &AtomicBool,
) -> Result<PostcopyDone, MigrateError> {
    let sock = links
        .r
        .get_ref()
        .try_clone()
        .map_err(|e| MigrateError::Io {
            what: "socket".into(),
            source: e,
        })?;
    let mut reader = std::mem::replace(&mut links.r, FrameReader::new(sock));
    let (tx, rx) = mpsc::channel();
    let lenient = true;
    std::thread::Builder::new()
        .name("ferry-postcopy-rx".into())
        .spawn(move || loop {
            let m = match wire::source::read_message(&mut reader, lenient) {
                Ok(Message::PageRequest(r)) => FromTarget::Request(r),
                Ok(Message::PostcopyDone(d)) => {
                    let _ = tx.send(FromTarget::Done(d));
                    return;
                }
                Ok(Message::Pong { .. }) => continue,
                Ok(Message::Abort { reason }) | Ok(Message::Error { message: reason }) => {
                    FromTarget::Lost(format!("the target gave up: {reason}"))
                }
                Ok(m) => FromTarget::Lost(format!("unexpected {} from the target", m.frame_type())),
                Err(e) => FromTarget::Lost(e.to_string()),
            };
            let end = matches!(m, FromTarget::Lost(_));
            if tx.send(m).is_err() || end {
                return;
            }
        })
        .map_err(|e| MigrateError::Io {
            what: "starting the post-copy reader".into(),
            source: e,
        })?;
    let mut total: usize = rest.iter().map(|r| r.left).sum();
    let mut current = 0usize;
    let mut chunk: Vec<u64> = Vec::with_capacity(BG_CHUNK);
    let lost = |why: String| {
        MigrateError::Stream(format!(
            "post-copy failed, the target kills its copy: {why}"
        ))
    };
    loop {
        // Requests first.
        let mut wait = if total == 0 {
            Some(Duration::from_secs(600))
        } else {
            None
        };
        loop {
            let m = match wait.take() {
                Some(d) => rx
                    .recv_timeout(d)
                    .map_err(|_| lost("no answer from the target".into()))?,
                None => match rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        return Err(lost("connection closed".into()))
                    }
                },
            };
            match m {
                FromTarget::Request(q) => {
                    let Some(i) = rest.iter().position(|r| r.vpid == q.pid) else {
                        continue;
                    };
                    let r = &mut rest[i];
                    chunk.clear();
                    for k in 0..q.npages.min(64) as u64 {
                        let a = q.addr + k * PAGE;
                        if let Ok(j) = r.pages.binary_search(&a) {
                            if !r.sent[j] {
                                r.sent[j] = true;
                                r.left -= 1;
                                total -= 1;
                                chunk.push(a);
                            }
                            if k == 0 {
                                // The background continues from here.
                                r.cursor = j + 1;
                                current = i;
                            }
                        }
                    }
                    if !chunk.is_empty() {
                        links.main.send(r.pid, r.vpid, round, &chunk)?;
                        links.main.end_round()?;
                    }
                }
                FromTarget::Done(d) => return Ok(d),
                FromTarget::Lost(why) => return Err(lost(why)),
            }
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrateError::Cancelled);
        }
        if total == 0 {
            continue;
        }
        // One background batch.
        while rest[current].left == 0 {
            current = (current + 1) % rest.len();
        }
        let r = &mut rest[current];
        chunk.clear();
        let n = r.pages.len();
        while chunk.len() < BG_CHUNK && r.left > 0 {
            if r.cursor >= n {
                if !chunk.is_empty() {
                    // A batch's addresses must increase.
                    break;
                }
                r.cursor = 0;
            }
            let j = r.cursor;
            r.cursor += 1;
            if !r.sent[j] {
                r.sent[j] = true;
                r.left -= 1;
                total -= 1;
                chunk.push(r.pages[j]);
            } else if !chunk.is_empty() {
                // Keep a batch contiguous in address order.
                break;
            }
        }
        let bg = links.bg.as_mut().unwrap_or(&mut links.main);
        bg.send(r.pid, r.vpid, round, &chunk)?;
        bg.end_round()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_windows_cover_stack_and_code_and_merge() {
        // Two threads with neighbouring stacks, one shared code page.
        let w = windows_around([(0x7000_0010, 0x40_1234), (0x7000_3ff0, 0x40_1000)].into_iter());
        assert_eq!(
            w,
            vec![
                (0x40_0000, 0x40_3000),
                (0x7000_0000 - PAGE, 0x7000_3000 + (STACK_ABOVE + 1) * PAGE),
            ]
        );
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
