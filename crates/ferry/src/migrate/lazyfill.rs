//! Lazy restore after pre-copy: every page is already on this node, but
//! copying a job's memory into place takes about half a second per GiB, all
//! of it downtime. Instead the job is restored without its private
//! anonymous memory, which is registered with userfaultfd as in post-copy,
//! and resumes at once; the post-copy pager then fills it from the
//! received pages held here, pages the job faults on first. Nothing waits
//! on the network: the source has already sent everything.
//!
//! The feeder hands the pager whole arena chunks of received pages (moved,
//! not copied), one at a time, and answers the pager's requests for
//! faulted pages from chunks not handed over yet.

use super::mempages::MemPages;
use super::postcopy::{Arrival, Inbox, Input, Item};
use crate::image::{PageKind, PageRun, ProcessImage, VmaKind};
use crate::restore::postcopy::{carve, first_touched};
use crate::restore::PlannedPages;
use crate::sys::PAGE_SIZE;
use crate::wire::messages::{PageRequest, PlanRun, PostcopyPlan};
use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

const PAGE: u64 = PAGE_SIZE as u64;

/// Takes the data runs of the private anonymous areas out of `processes`
/// (so the restore leaves those pages missing) and returns them as planned
/// pages, per image pid. Pages the threads and the restore touch first
/// (restore::postcopy::first_touched) stay with the restore.
pub fn plan(processes: &mut [ProcessImage]) -> PlannedPages {
    let mut planned = PlannedPages::new();
    for p in processes.iter_mut() {
        let hot = first_touched(p);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for v in p.vmas.iter_mut() {
            if v.shared || !matches!(v.kind, VmaKind::Anon { .. }) {
                continue;
            }
            let mut keep = Vec::with_capacity(v.pages.len());
            for r in v.pages.drain(..) {
                let PageKind::Data { offset, .. } = r.kind else {
                    keep.push(r);
                    continue;
                };
                let (s, e) = (r.addr, r.addr + r.npages as u64 * PAGE);
                // Hot parts stay with the restore, the rest is planned.
                let (hot_parts, cold_parts) = carve(&[(s, e)], &hot);
                keep.extend(hot_parts.into_iter().map(|(a, b)| PageRun {
                    addr: a,
                    npages: ((b - a) / PAGE) as u32,
                    kind: PageKind::Data {
                        offset: offset + (a - s),
                        crc: 0,
                    },
                }));
                for (a, b) in cold_parts {
                    push_range(&mut ranges, a, b);
                }
            }
            v.pages = keep;
        }
        if !ranges.is_empty() {
            planned.insert(p.pid, ranges);
        }
    }
    planned
}

fn push_range(ranges: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    match ranges.last_mut() {
        Some(last) if last.1 == s => last.1 = e,
        _ => ranges.push((s, e)),
    }
}

/// Whether `addr` of image pid `pid` lies in `planned` (sorted ranges).
pub fn holds(planned: &PlannedPages, pid: i32, addr: u64) -> bool {
    planned.get(&pid).is_some_and(|r| {
        let i = r.partition_point(|&(_, e)| e <= addr);
        r.get(i).is_some_and(|&(s, _)| s <= addr)
    })
}

/// The planned pages as the pager's plans.
pub fn plans(planned: &PlannedPages) -> Vec<PostcopyPlan> {
    planned
        .iter()
        .map(|(&pid, ranges)| PostcopyPlan {
            pid,
            runs: ranges
                .iter()
                .flat_map(|&(s, e)| PlanRun::covering(s, e))
                .collect(),
        })
        .collect()
}

/// Feeds every received page to the pager behind `inbox`, chunk by chunk,
/// answering `requests` (faults) first. Returns when all is handed over or
/// the pager is gone.
pub fn feed(mut pages: MemPages, inbox: Inbox, requests: mpsc::Receiver<PageRequest>) {
    let order = pages.data_by_chunk();
    for (c, held) in order.into_iter().enumerate() {
        if !serve_requests(&pages, &inbox, &requests, Duration::ZERO) {
            return;
        }
        if held.is_empty() {
            continue;
        }
        let chunk = pages.take_chunk(c);
        let token = Arc::new(());
        let mut by_pid: HashMap<i32, Vec<Item>> = HashMap::new();
        for &(pid, addr, at) in &held {
            by_pid.entry(pid).or_default().push(Item::Data { addr, at });
        }
        if by_pid.len() == 1 {
            let (pid, items) = by_pid.into_iter().next().unwrap_or_default();
            inbox.send(Input::Pages(Arrival::local(
                pid,
                items,
                chunk,
                Some(token.clone()),
            )));
        } else {
            // Pages of several processes in one chunk: one arrival each.
            for (pid, items) in by_pid {
                let mut payload = Vec::with_capacity(items.len() * PAGE_SIZE);
                let mut own = Vec::with_capacity(items.len());
                for it in items {
                    if let Item::Data { addr, at } = it {
                        own.push(Item::Data {
                            addr,
                            at: payload.len(),
                        });
                        payload.extend_from_slice(&chunk[at..at + PAGE_SIZE]);
                    }
                }
                inbox.send(Input::Pages(Arrival::local(
                    pid,
                    own,
                    payload,
                    Some(token.clone()),
                )));
            }
        }
        // One chunk in flight: faults keep being answered from the rest.
        while Arc::strong_count(&token) > 1 {
            if !serve_requests(&pages, &inbox, &requests, Duration::from_millis(1)) {
                return;
            }
        }
    }
}

/// Answers the requests waiting (for up to `wait` for the first); false
/// once the pager is gone.
fn serve_requests(
    pages: &MemPages,
    inbox: &Inbox,
    requests: &mpsc::Receiver<PageRequest>,
    wait: Duration,
) -> bool {
    let mut first = true;
    loop {
        let r = if first && !wait.is_zero() {
            requests.recv_timeout(wait).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => mpsc::TryRecvError::Empty,
                mpsc::RecvTimeoutError::Disconnected => mpsc::TryRecvError::Disconnected,
            })
        } else {
            requests.try_recv()
        };
        first = false;
        let q = match r {
            Ok(q) => q,
            Err(mpsc::TryRecvError::Empty) => return true,
            Err(mpsc::TryRecvError::Disconnected) => return false,
        };
        let mut items = Vec::new();
        let mut payload = Vec::new();
        for k in 0..q.npages as u64 {
            let addr = q.addr + k * PAGE;
            match pages.page(q.pid, addr) {
                Some(Some(data)) => {
                    items.push(Item::Data {
                        addr,
                        at: payload.len(),
                    });
                    payload.extend_from_slice(data);
                }
                Some(None) => items.push(Item::Zero { addr, npages: 1 }),
                // In the chunk the pager is placing now.
                None => {}
            }
        }
        if !items.is_empty() {
            inbox.send(Input::Pages(Arrival::local(q.pid, items, payload, None)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests_support::process;
    use crate::image::{Advice, Vma};

    fn vma(start: u64, end: u64, kind: VmaKind, shared: bool, pages: Vec<PageRun>) -> Vma {
        Vma {
            start,
            end,
            prot: 3,
            shared,
            kind,
            advice: Advice::default(),
            pages,
            guards: Vec::new(),
        }
    }

    fn data(addr: u64, npages: u32) -> PageRun {
        PageRun {
            addr,
            npages,
            kind: PageKind::Data { offset: 0, crc: 0 },
        }
    }

    #[test]
    fn plan_takes_private_anonymous_data_only() {
        let anon = VmaKind::Anon {
            name: None,
            heap: false,
            stack: false,
        };
        let zero = PageRun {
            addr: 0x3000,
            npages: 1,
            kind: PageKind::Zero,
        };
        let mut procs = vec![process(
            7,
            vec![
                vma(
                    0x1000,
                    0x9000,
                    anon.clone(),
                    false,
                    vec![data(0x1000, 2), zero, data(0x4000, 1)],
                ),
                vma(0x9000, 0xb000, anon, true, vec![data(0x9000, 2)]),
            ],
        )];
        let planned = plan(&mut procs);
        assert_eq!(planned[&7], vec![(0x1000, 0x3000), (0x4000, 0x5000)]);
        // Zero runs and shared memory stay with the restore.
        assert_eq!(procs[0].vmas[0].pages, vec![zero]);
        assert_eq!(procs[0].vmas[1].pages.len(), 1);
        let plans = plans(&planned);
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].runs.len(), 2);
        assert_eq!(
            (plans[0].runs[0].addr, plans[0].runs[0].npages),
            (0x1000, 2)
        );
    }
}
