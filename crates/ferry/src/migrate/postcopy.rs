//! Post-copy on the target: the *pager* serves the restored job's page
//! faults while the source streams the rest of its memory.
//!
//! One thread owns every userfaultfd operation and all the state. That is
//! what makes non-cooperative events safe: a `UFFDIO_COPY` either happens
//! before the pager reads a REMOVE/UNMAP/REMAP/FORK event (then the job's
//! madvise/munmap/mremap/fork, which waits for that read, acts on the placed
//! page), or fails with EAGAIN while the event is unread (the kernel's
//! `mmap_changing`), or comes after the pager has updated its view. Network
//! threads only decode batches and hand them over ([`Inbox`]).
//!
//! A page is *planned* when the source will still send it; planned pages
//! are missing in the job. A fault on a planned page that has not come yet
//! is sent to the source as a `PageRequest`; a fault anywhere else (a page
//! the source never had, or one the job dropped or unmapped since) is
//! answered here with a zero page. When the last planned page is in place,
//! the job's own userfaultfd reference is closed (a moment under ptrace)
//! and ferry's duplicates are dropped, which unregisters everything.
//!
//! Shared memory is kept by object, not by address: a planned page of a
//! shared object is one bit of that object's [`PendingSet`] (over object
//! offsets), whichever processes and addresses map it. When it arrives it
//! is written into the object's page cache through ferry's own descriptor,
//! then mapped with UFFDIO_CONTINUE wherever the job maps it (which wakes
//! any thread waiting on it). A later touch in a mapping that was missed
//! (a forked child, a moved area) faults MINOR and gets the same
//! CONTINUE; a hole that was never planned faults MISSING and gets a zero
//! page.

use super::MigrateError;
use crate::checkpoint::FrozenTree;
use crate::remote::{self, Remote};
use crate::restore::postcopy::{RegisteredSpace, SharedLayout};
use crate::sys::{self, uffd, PAGE_SIZE};
use crate::wire::messages::{PageRequest, PlanRun, PostcopyDone};
use crate::wire::{BatchDecoder, Page, WireError};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const PAGE: u64 = PAGE_SIZE as u64;
/// How long the pager waits for anything before checking again.
const POLL: Duration = Duration::from_millis(200);
const MSG_LEN: usize = 32;
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// A `struct uffd_msg` (32 bytes) as far as the pager cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UffdEvent {
    /// A fault on the page at `addr`; `minor`: the page is in the page
    /// cache but not mapped there (MINOR mode), else it is missing.
    Fault {
        addr: u64,
        minor: bool,
    },
    /// The process forked; `ufd` is the child's userfaultfd, installed in
    /// this process by the read.
    Fork {
        ufd: u32,
    },
    /// mremap moved `[from, from+len)` to `to`.
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// madvise(DONTNEED) or munmap dropped `[start, end)`.
    Dropped {
        start: u64,
        end: u64,
    },
    Other(u8),
}

impl UffdEvent {
    fn parse(m: &[u8]) -> UffdEvent {
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&m[o..o + 8]);
            u64::from_ne_bytes(b)
        };
        match m[0] {
            EVENT_PAGEFAULT => UffdEvent::Fault {
                addr: u64_at(16) & !(PAGE - 1),
                minor: u64_at(8) & uffd::UFFD_PAGEFAULT_FLAG_MINOR != 0,
            },
            EVENT_FORK => {
                let mut b = [0u8; 4];
                b.copy_from_slice(&m[8..12]);
                UffdEvent::Fork {
                    ufd: u32::from_ne_bytes(b),
                }
            }
            EVENT_REMAP => UffdEvent::Remap {
                from: u64_at(8),
                to: u64_at(16),
                len: u64_at(24),
            },
            EVENT_REMOVE | EVENT_UNMAP => UffdEvent::Dropped {
                start: u64_at(8),
                end: u64_at(16),
            },
            other => UffdEvent::Other(other),
        }
    }
}

/// The planned pages of one source process, as a bitmap over its runs.
#[derive(Debug, Default)]
pub struct PendingSet {
    /// (first address, pages, first bit).
    runs: Vec<(u64, u32, usize)>,
    bits: Vec<u64>,
    left: u64,
}

impl PendingSet {
    /// `runs` sorted by address; where one overlaps the one before, only
    /// its new pages count (the receiver checks a plan's order, but shared
    /// pages are gathered from several plans).
    pub fn new(runs: &[PlanRun]) -> Self {
        let mut s = PendingSet::default();
        let mut bit = 0usize;
        let mut end = 0u64;
        for r in runs {
            let r_end = r.addr + r.npages as u64 * PAGE;
            let start = r.addr.max(end);
            if start >= r_end {
                continue;
            }
            let n = ((r_end - start) / PAGE) as u32;
            s.runs.push((start, n, bit));
            bit += n as usize;
            end = r_end;
        }
        s.bits = vec![u64::MAX; bit.div_ceil(64)];
        if bit % 64 != 0 {
            if let Some(last) = s.bits.last_mut() {
                *last = (1u64 << (bit % 64)) - 1;
            }
        }
        s.left = bit as u64;
        s
    }

    fn bit(&self, addr: u64) -> Option<usize> {
        let i = self.runs.partition_point(|&(a, _, _)| a <= addr);
        let &(a, n, b) = self.runs.get(i.checked_sub(1)?)?;
        let k = (addr - a) / PAGE;
        (k < n as u64).then_some(b + k as usize)
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.bit(addr)
            .is_some_and(|b| self.bits[b / 64] & (1 << (b % 64)) != 0)
    }

    /// Marks `addr` as arrived; whether it was still planned.
    pub fn take(&mut self, addr: u64) -> bool {
        match self.bit(addr) {
            Some(b) if self.bits[b / 64] & (1 << (b % 64)) != 0 => {
                self.bits[b / 64] &= !(1 << (b % 64));
                self.left -= 1;
                true
            }
            _ => false,
        }
    }

    pub fn left(&self) -> u64 {
        self.left
    }
}

/// Pages decoded from one batch. A page's contents are at `at` in the
/// batch's own payload (raw pages: no copy) or, past its end, in
/// `decompressed`.
#[derive(Debug, Default)]
pub struct Arrival {
    pub vpid: i32,
    pub items: Vec<Item>,
    payload: Vec<u8>,
    decompressed: Vec<u8>,
    /// Dropped with the arrival once placed: a local feeder (lazy
    /// restore) watches it to keep one arrival in flight.
    _hold: Option<Arc<()>>,
}

#[derive(Debug, Clone, Copy)]
pub enum Item {
    Data { addr: u64, at: usize },
    Zero { addr: u64, npages: u32 },
}

impl Arrival {
    /// Pages of `vpid` whose contents are in `payload` (items' `at` are
    /// offsets into it), from a local page source rather than a batch.
    pub fn local(vpid: i32, items: Vec<Item>, payload: Vec<u8>, hold: Option<Arc<()>>) -> Self {
        Arrival {
            vpid,
            items,
            payload,
            decompressed: Vec::new(),
            _hold: hold,
        }
    }

    /// `n` pages of contents from `at`, if they lie in one buffer.
    fn pages(&self, at: usize, n: usize) -> Option<&[u8]> {
        let len = n * PAGE_SIZE;
        let p = self.payload.len();
        if at + len <= p {
            Some(&self.payload[at..at + len])
        } else if at >= p {
            self.decompressed.get(at - p..at - p + len)
        } else {
            None
        }
    }
}

pub enum Input {
    Pages(Arrival),
    /// The source is gone or gave up.
    Lost(String),
}

/// Where network threads put what they received; wakes the pager.
#[derive(Clone)]
pub struct Inbox {
    tx: mpsc::Sender<Input>,
    wake: Arc<UnixStream>,
}

impl Inbox {
    pub fn send(&self, input: Input) {
        if self.tx.send(input).is_ok() {
            let _ = (&*self.wake).write(&[1]);
        }
    }
}

/// Decodes a page batch into an [`Arrival`] (checks as the receiver does),
/// keeping `payload` so raw pages are not copied again.
pub fn decode_batch(dec: &mut BatchDecoder, payload: Vec<u8>) -> Result<Arrival, WireError> {
    let mut items = Vec::new();
    let mut decompressed = Vec::new();
    let base = payload.as_ptr() as usize;
    let end = base + payload.len();
    let h = dec.decode(&payload, |_, page| {
        match page {
            Page::Data { addr, bytes } => {
                let p = bytes.as_ptr() as usize;
                let at = if p >= base && p < end {
                    p - base
                } else {
                    decompressed.extend_from_slice(bytes);
                    payload.len() + decompressed.len() - PAGE_SIZE
                };
                items.push(Item::Data { addr, at });
            }
            Page::Zero { addr, npages } | Page::Absent { addr, npages } => {
                items.push(Item::Zero { addr, npages })
            }
        }
        Ok(())
    })?;
    Ok(Arrival {
        vpid: h.pid,
        items,
        payload,
        decompressed,
        _hold: None,
    })
}

/// A userfaultfd context: a restored process, or a child it forked during
/// post-copy (which inherited the parent's missing pages).
struct Space {
    fd: Arc<OwnedFd>,
    reader: File,
    /// The source process whose pages fill it.
    vpid: i32,
    /// mremaps seen: pages of `[from, end)` now live at `to..`.
    moves: Vec<(u64, u64, u64)>,
    /// Local ranges dropped or unmapped since the resume: never filled.
    gone: Vec<(u64, u64)>,
    dead: bool,
}

impl Space {
    fn new(fd: Arc<OwnedFd>, vpid: i32) -> Result<Self, MigrateError> {
        let reader = fd
            .try_clone()
            .map(File::from)
            .map_err(|e| io_err("duplicating a userfaultfd", e))?;
        Ok(Space {
            fd,
            reader,
            vpid,
            moves: Vec::new(),
            gone: Vec::new(),
            dead: false,
        })
    }

    fn to_local(&self, addr: u64) -> u64 {
        let mut a = addr;
        for &(from, end, to) in &self.moves {
            if a >= from && a < end {
                a = a - from + to;
            }
        }
        a
    }

    fn to_source(&self, addr: u64) -> u64 {
        let mut a = addr;
        for &(from, end, to) in self.moves.iter().rev() {
            if a >= to && a < to + (end - from) {
                a = a - to + from;
            }
        }
        a
    }

    fn is_gone(&self, addr: u64) -> bool {
        self.gone.iter().any(|&(s, e)| addr >= s && addr < e)
    }

    fn drop_range(&mut self, start: u64, end: u64) {
        if start < end {
            self.gone.push((start, end));
        }
    }

    fn remap(&mut self, from: u64, to: u64, len: u64) {
        // What was dropped inside the old range moves along; whatever was
        // dropped where the pages land no longer applies.
        let mut gone = Vec::with_capacity(self.gone.len());
        for &(s, e) in &self.gone {
            let (s2, e2) = (s.max(from), e.min(from + len));
            if s2 < e2 {
                gone.push((s2 - from + to, e2 - from + to));
            }
            for (a, b) in [(s, e.min(from)), (s.max(from + len), e)] {
                if a < b {
                    subtract(&mut gone, a, b, to, to + len);
                }
            }
        }
        self.gone = gone;
        self.moves.push((from, from + len, to));
    }
}

/// Pushes `[a, b)` minus `[x, y)` onto `out`.
fn subtract(out: &mut Vec<(u64, u64)>, a: u64, b: u64, x: u64, y: u64) {
    if b <= x || a >= y {
        out.push((a, b));
        return;
    }
    if a < x {
        out.push((a, x));
    }
    if b > y {
        out.push((y, b));
    }
}

/// Splits a planned run of process `vpid` into private pages (pushed onto
/// `private`) and pages of shared objects (onto `names`, by object: offset,
/// pages, and the run's own process and address).
fn split_run(
    shared: &SharedLayout,
    vpid: i32,
    run: &PlanRun,
    private: &mut Vec<PlanRun>,
    names: &mut HashMap<u64, Vec<(u64, u32, i32, u64)>>,
) {
    let end = run.addr + run.npages as u64 * PAGE;
    let mut a = run.addr;
    while a < end {
        let e = match shared.area(vpid, a) {
            Some(ar) => {
                let e = end.min(ar.end);
                let n = ((e - a) / PAGE) as u32;
                names
                    .entry(ar.id)
                    .or_default()
                    .push((ar.offset_of(a), n, vpid, a));
                e
            }
            None => {
                let areas = shared.areas(vpid);
                let next = areas
                    .get(areas.partition_point(|x| x.start <= a))
                    .map_or(end, |x| x.start);
                let e = end.min(next);
                private.push(PlanRun {
                    addr: a,
                    npages: ((e - a) / PAGE) as u32,
                });
                e
            }
        };
        a = e;
    }
}

/// Sorts an object's names by offset and keeps each page once, even if a
/// (faulty) source named one twice: a fault must always find the name to
/// request.
fn tidy_names(n: &mut Vec<(u64, u32, i32, u64)>) {
    n.sort_unstable_by_key(|x| x.0);
    let mut end = 0u64;
    n.retain_mut(|(off, np, _, addr)| {
        let e = *off + *np as u64 * PAGE;
        if e <= end {
            return false;
        }
        if *off < end {
            *addr += end - *off;
            *np = ((e - end) / PAGE) as u32;
            *off = end;
        }
        end = e;
        true
    });
}

fn io_err(what: &str, source: std::io::Error) -> MigrateError {
    MigrateError::Io {
        what: what.into(),
        source,
    }
}

/// A fill that met EAGAIN: an event is unread (the kernel's
/// `mmap_changing`); tried again once the events are read.
enum Retry {
    /// A zero page for a fault in one space.
    Fault { space: usize, addr: u64 },
    /// A fault or a mapping in a shared area of one space (never of a
    /// page still planned).
    Shared { space: usize, addr: u64 },
    /// A page from the source: into *every* space of its process, since
    /// the unread event may be the fork of a child that lacks it too.
    Page {
        vpid: i32,
        src: u64,
        data: Option<Box<[u8; PAGE_SIZE]>>,
    },
}

/// Sends control messages to the source (on the main connection).
pub type SendFn = Box<dyn FnMut(&[crate::wire::Message]) -> Result<(), MigrateError> + Send>;

/// A shared-memory object with pages still on the source.
struct SharedObject {
    /// Ferry's own descriptor: pages go into the page cache through it.
    file: File,
    /// Planned pages, by byte offset in the object.
    pending: PendingSet,
    /// (object offset, pages, process, address): under which process and
    /// address the source planned (and sends) each page. Sorted, disjoint.
    names: Vec<(u64, u32, i32, u64)>,
}

impl SharedObject {
    /// The (process, address) the source knows the page at `off` by.
    fn name_of(&self, off: u64) -> Option<(i32, u64)> {
        let i = self.names.partition_point(|&(o, _, _, _)| o <= off);
        let &(o, n, vpid, addr) = self.names.get(i.checked_sub(1)?)?;
        (off < o + n as u64 * PAGE).then_some((vpid, addr + (off - o)))
    }
}

/// The target's post-copy state.
pub struct Pager {
    spaces: Vec<Space>,
    /// Planned private pages, by source process.
    pending: HashMap<i32, PendingSet>,
    /// Where the job maps shared objects that have planned pages.
    shared: SharedLayout,
    objects: HashMap<u64, SharedObject>,
    /// A page of zeros for shared pages that arrive as zero.
    zero: Box<[u8; PAGE_SIZE]>,
    /// Planned pages requested from the source: (vpid, addr) → when the
    /// first fault on it was read.
    awaiting: HashMap<(i32, u64), Instant>,
    latencies_us: Vec<f64>,
    remote_faults: u64,
    local_faults: u64,
    /// Faults the kernel reported MINOR (shared pages cached, not mapped).
    minor_faults: u64,
    placed: u64,
    /// Fills that met EAGAIN (an unread event): (space, local addr, data or zero).
    retry: Vec<Retry>,
    rx: mpsc::Receiver<Input>,
    wake: UnixStream,
    send: SendFn,
    /// The job's root (for the final freeze) and the pid to kill it by.
    root: i32,
    kill_pid: i32,
    resumed: Instant,
    last_page: Option<Instant>,
    requests: Vec<PageRequest>,
}

impl Pager {
    /// A pager for the restored job's `spaces` and the source's `plans`;
    /// `shared` and `shmem` (ferry's descriptors of the job's shared
    /// objects) as the restore used them.
    pub fn new(
        spaces: Vec<RegisteredSpace>,
        plans: &[crate::wire::messages::PostcopyPlan],
        shared: SharedLayout,
        shmem: &HashMap<u64, Arc<OwnedFd>>,
        root: i32,
        kill_pid: i32,
        send: SendFn,
    ) -> Result<(Pager, Inbox), MigrateError> {
        let (tx, rx) = mpsc::channel();
        let (a, b) = UnixStream::pair().map_err(|e| io_err("socketpair", e))?;
        a.set_nonblocking(true)
            .map_err(|e| io_err("socketpair", e))?;
        b.set_nonblocking(true)
            .map_err(|e| io_err("socketpair", e))?;
        let mut pending: HashMap<i32, PendingSet> = HashMap::new();
        let mut runs: HashMap<i32, Vec<PlanRun>> = HashMap::new();
        for p in plans {
            runs.entry(p.pid).or_default().extend_from_slice(&p.runs);
        }
        // Runs in shared areas become object pages.
        let mut names: HashMap<u64, Vec<(u64, u32, i32, u64)>> = HashMap::new();
        for (vpid, mut r) in runs {
            // Plans may come in pieces (the source's, and a lazy restore's
            // own for pages already here): in address order.
            r.sort_unstable_by_key(|run| run.addr);
            let mut private = Vec::with_capacity(r.len());
            for run in &r {
                split_run(&shared, vpid, run, &mut private, &mut names);
            }
            if !private.is_empty() {
                pending.insert(vpid, PendingSet::new(&private));
            }
        }
        let mut objects = HashMap::new();
        for (id, mut n) in names {
            tidy_names(&mut n);
            let fd = shmem.get(&id).ok_or_else(|| {
                MigrateError::Internal(format!("shared object {id:#x} planned but not restored"))
            })?;
            let file = fd
                .try_clone()
                .map(File::from)
                .map_err(|e| io_err("duplicating a shared-memory descriptor", e))?;
            let runs: Vec<PlanRun> = n
                .iter()
                .map(|&(off, npages, _, _)| PlanRun { addr: off, npages })
                .collect();
            objects.insert(
                id,
                SharedObject {
                    file,
                    pending: PendingSet::new(&runs),
                    names: n,
                },
            );
        }
        let spaces = spaces
            .into_iter()
            .map(|s| Space::new(s.uffd, s.vpid))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((
            Pager {
                spaces,
                pending,
                shared,
                objects,
                zero: Box::new([0u8; PAGE_SIZE]),
                awaiting: HashMap::new(),
                latencies_us: Vec::new(),
                remote_faults: 0,
                local_faults: 0,
                minor_faults: 0,
                placed: 0,
                retry: Vec::new(),
                rx,
                wake: a,
                send,
                root,
                kill_pid,
                resumed: Instant::now(),
                last_page: None,
                requests: Vec::new(),
            },
            Inbox {
                tx,
                wake: Arc::new(b),
            },
        ))
    }

    fn left(&self) -> u64 {
        self.pending.values().map(PendingSet::left).sum::<u64>()
            + self.objects.values().map(|o| o.pending.left()).sum::<u64>()
    }

    /// Serves until every planned page is in place (or the job ended).
    /// If the source is lost first, the job is killed and the reason
    /// returned: it must never run on with pages it does not have.
    pub fn run(mut self) -> Result<PostcopyDone, MigrateError> {
        self.resumed = Instant::now();
        let out = self.serve();
        if let Err(e) = &out {
            tracing::warn!(
                pid = self.root,
                "post-copy failed ({e}): killing the restored job"
            );
            self.kill_job();
            return out;
        }
        let done = out?;
        tracing::debug!(
            pid = self.root,
            pages = done.pages_placed,
            remote_faults = done.remote_faults,
            local_faults = done.local_faults,
            minor_faults = self.minor_faults,
            "pager done after {:.1} ms",
            done.last_page_ms
        );
        self.release();
        let msg = crate::wire::Message::PostcopyDone(done);
        (self.send)(std::slice::from_ref(&msg))?;
        Ok(done)
    }

    fn serve(&mut self) -> Result<PostcopyDone, MigrateError> {
        let mut buf = vec![0u8; MSG_LEN * 64];
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        let mut job_ended = false;
        loop {
            if self.left() == 0 && self.retry.is_empty() {
                break;
            }
            if self.spaces.iter().all(|s| s.dead) {
                job_ended = true;
                break;
            }
            pfds.clear();
            pfds.push(libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for s in &self.spaces {
                pfds.push(libc::pollfd {
                    fd: if s.dead { -1 } else { s.fd.as_raw_fd() },
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            sys::poll(&mut pfds, POLL.as_millis() as i32).map_err(|e| io_err("poll", e))?;
            // Events first: a fill must never land after an unread event.
            for i in 0..self.spaces.len() {
                if !self.spaces[i].dead {
                    self.read_events(i, &mut buf)?;
                }
            }
            self.flush_requests()?;
            self.retry_fills();
            let mut drain = [0u8; 256];
            while matches!((&self.wake).read(&mut drain), Ok(n) if n > 0) {}
            loop {
                match self.rx.try_recv() {
                    Ok(Input::Pages(a)) => self.place(a)?,
                    Ok(Input::Lost(why)) => {
                        return Err(MigrateError::Stream(format!(
                            "the source was lost with {} pages still there: {why}",
                            self.left()
                        )))
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    // Whoever fed the pages (a local feeder) is done with
                    // them: an ending, not a loss, once every page is in.
                    Err(mpsc::TryRecvError::Disconnected) if self.left() == 0 => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        return Err(MigrateError::Stream(format!(
                            "the connection to the source ended with {} pages still there",
                            self.left()
                        )))
                    }
                }
            }
        }
        let lat = &mut self.latencies_us;
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |q: f64| -> f64 {
            if lat.is_empty() {
                0.0
            } else {
                lat[((lat.len() - 1) as f64 * q).round() as usize]
            }
        };
        Ok(PostcopyDone {
            remote_faults: self.remote_faults,
            local_faults: self.local_faults,
            fault_latency_p50_us: pct(0.5),
            fault_latency_p99_us: pct(0.99),
            fault_latency_max_us: lat.last().copied().unwrap_or(0.0),
            last_page_ms: self
                .last_page
                .unwrap_or_else(Instant::now)
                .duration_since(self.resumed)
                .as_secs_f64()
                * 1e3,
            pages_placed: self.placed,
            job_ended,
        })
    }

    /// Kills every process of the job and waits until they are dead
    /// before ferry's userfaultfd descriptors may close: a forked child's
    /// context is held by ferry alone, and closing it would let a waiting
    /// fault go on and read a zero page.
    fn kill_job(&self) {
        let _ = sys::kill(self.kill_pid, libc::SIGKILL);
        let _ = sys::kill(self.root, libc::SIGKILL);
        // Killing a namespace's init kills everything in it; init becomes
        // a zombie only once they are all gone.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            match crate::proc::read_stat(self.kill_pid) {
                Ok(st) if st.state != 'Z' => std::thread::sleep(Duration::from_millis(2)),
                _ => return,
            }
        }
        tracing::warn!(pid = self.root, "the killed job did not end within 10 s");
    }

    fn flush_requests(&mut self) -> Result<(), MigrateError> {
        if self.requests.is_empty() {
            return Ok(());
        }
        let msgs: Vec<crate::wire::Message> = self
            .requests
            .drain(..)
            .map(crate::wire::Message::PageRequest)
            .collect();
        (self.send)(&msgs)
    }

    fn read_events(&mut self, i: usize, buf: &mut [u8]) -> Result<(), MigrateError> {
        loop {
            let n = match self.spaces[i].reader.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("userfaultfd read: {e}");
                    self.spaces[i].dead = true;
                    return Ok(());
                }
            };
            if n == 0 {
                return Ok(());
            }
            for m in buf[..n].chunks_exact(MSG_LEN) {
                self.on_event(i, m)?;
            }
            if n < buf.len() {
                return Ok(());
            }
        }
    }

    fn on_event(&mut self, i: usize, m: &[u8]) -> Result<(), MigrateError> {
        match UffdEvent::parse(m) {
            UffdEvent::Fault { addr, minor } => self.on_fault(i, addr, minor),
            UffdEvent::Fork { ufd } => {
                let fd = sys::adopt_fork_uffd(ufd)
                    .map_err(|e| io_err("userfaultfd of a forked child", e))?;
                let parent = &self.spaces[i];
                let mut child = Space::new(Arc::new(fd), parent.vpid)?;
                child.moves = parent.moves.clone();
                child.gone = parent.gone.clone();
                tracing::debug!(vpid = parent.vpid, "the job forked during post-copy");
                self.spaces.push(child);
            }
            UffdEvent::Remap { from, to, len } => self.spaces[i].remap(from, to, len),
            UffdEvent::Dropped { start, end } => self.spaces[i].drop_range(start, end),
            UffdEvent::Other(e) => tracing::debug!("userfaultfd event {e:#x} ignored"),
        }
        Ok(())
    }

    fn on_fault(&mut self, i: usize, addr: u64, minor: bool) {
        let s = &self.spaces[i];
        let src = s.to_source(addr);
        if self.shared.area(s.vpid, src).is_some() {
            self.minor_faults += minor as u64;
            if self.on_shared(i, addr, minor) {
                self.local_faults += 1;
            }
            return;
        }
        let planned =
            !s.is_gone(addr) && self.pending.get(&s.vpid).is_some_and(|p| p.contains(src));
        if planned {
            let key = (s.vpid, src);
            if let std::collections::hash_map::Entry::Vacant(e) = self.awaiting.entry(key) {
                e.insert(Instant::now());
                self.remote_faults += 1;
                self.requests.push(PageRequest {
                    pid: s.vpid,
                    addr: src,
                    npages: 1,
                });
            }
            return;
        }
        self.local_faults += 1;
        let fd = s.fd.clone();
        self.fill(i, addr, None, None, &fd);
    }

    /// A fault (or a page to map) at `addr` of space `i`, in a shared area:
    /// a planned page is requested; any other is in the page cache (it
    /// arrived, or a mapping elsewhere placed it), so CONTINUE maps it, or
    /// it is a hole the source never had, which gets a zero page. `minor`
    /// says which the kernel saw; either is tried when the other fails,
    /// since the cache may have changed between the fault and now. Whether
    /// it was answered here (not requested).
    fn on_shared(&mut self, i: usize, addr: u64, minor: bool) -> bool {
        let s = &self.spaces[i];
        let src = s.to_source(addr);
        let Some(area) = self.shared.area(s.vpid, src) else {
            return false;
        };
        let off = area.offset_of(src);
        if let Some(obj) = self.objects.get(&area.id) {
            if obj.pending.contains(off) {
                let Some((vpid, name)) = obj.name_of(off) else {
                    return false;
                };
                if let std::collections::hash_map::Entry::Vacant(e) =
                    self.awaiting.entry((vpid, name))
                {
                    e.insert(Instant::now());
                    self.remote_faults += 1;
                    self.requests.push(PageRequest {
                        pid: vpid,
                        addr: name,
                        npages: 1,
                    });
                }
                return false;
            }
        }
        let fd = s.fd.clone();
        let fd = fd.as_fd();
        let r = if minor {
            match uffd::cont(fd, addr, PAGE, 0) {
                Err(e) if e.error.raw_os_error() == Some(libc::EFAULT) => {
                    uffd::zeropage(fd, addr, PAGE, 0)
                }
                r => r,
            }
        } else {
            match uffd::zeropage(fd, addr, PAGE, 0) {
                Err(e) if e.error.raw_os_error() == Some(libc::EEXIST) => {
                    uffd::cont(fd, addr, PAGE, 0)
                }
                r => r,
            }
        };
        if let Err(e) = r {
            match e.error.raw_os_error() {
                Some(libc::EEXIST) => {
                    let _ = uffd::wake(fd, addr, PAGE);
                }
                Some(libc::EAGAIN) => self.retry.push(Retry::Shared { space: i, addr }),
                Some(libc::ESRCH) => self.spaces[i].dead = true,
                _ => tracing::debug!("shared page {addr:#x}: {e}"),
            }
        }
        true
    }

    /// Fills one page of space `i` (zero when `data` is None); `src` is
    /// (process, source address) for a page from the source.
    fn fill(
        &mut self,
        i: usize,
        addr: u64,
        src: Option<(i32, u64)>,
        data: Option<&[u8]>,
        fd: &OwnedFd,
    ) {
        let r = match data {
            Some(d) => uffd::copy(fd.as_fd(), addr, d, 0),
            None => uffd::zeropage(fd.as_fd(), addr, PAGE, 0),
        };
        match r {
            Ok(_) => {}
            Err(e) => match e.error.raw_os_error() {
                // Already there (e.g. filled by a racing fault): wake
                // anyone waiting on it.
                Some(libc::EEXIST) => {
                    let _ = uffd::wake(fd.as_fd(), addr, PAGE);
                }
                Some(libc::EAGAIN) => match src {
                    Some((vpid, src)) => {
                        let data = data.map(|d| {
                            let mut b = Box::new([0u8; PAGE_SIZE]);
                            b.copy_from_slice(d);
                            b
                        });
                        self.retry.push(Retry::Page { vpid, src, data });
                    }
                    None => self.retry.push(Retry::Fault { space: i, addr }),
                },
                Some(libc::ESRCH) => self.spaces[i].dead = true,
                // Unmapped or unregistered meanwhile: nothing to fill.
                _ => tracing::debug!("fill {addr:#x}: {e}"),
            },
        }
    }

    fn retry_fills(&mut self) {
        for r in std::mem::take(&mut self.retry) {
            match r {
                Retry::Shared { space, addr } => {
                    if !self.spaces[space].dead {
                        self.on_shared(space, addr, true);
                    }
                }
                Retry::Fault { space, addr } => {
                    let s = &self.spaces[space];
                    if s.dead || s.is_gone(addr) {
                        continue;
                    }
                    let fd = s.fd.clone();
                    self.fill(space, addr, None, None, &fd);
                }
                Retry::Page { vpid, src, data } => {
                    for j in 0..self.spaces.len() {
                        let s = &self.spaces[j];
                        if s.dead || s.vpid != vpid {
                            continue;
                        }
                        let local = s.to_local(src);
                        if s.is_gone(local) {
                            continue;
                        }
                        let fd = s.fd.clone();
                        self.fill(
                            j,
                            local,
                            Some((vpid, src)),
                            data.as_deref().map(|d| &d[..]),
                            &fd,
                        );
                    }
                }
            }
        }
    }

    fn place(&mut self, a: Arrival) -> Result<(), MigrateError> {
        let now = Instant::now();
        // Pages still planned, as (addr, data offset or None for zero):
        // private ones, and shared ones (with their object and offset).
        let mut todo: Vec<(u64, Option<usize>)> = Vec::with_capacity(a.items.len());
        let mut shared: Vec<(u64, u64, u64, Option<usize>)> = Vec::new();
        let mut pending = self.pending.get_mut(&a.vpid);
        let mut take = |addr: u64, at: Option<usize>| {
            if pending.as_mut().is_some_and(|p| p.take(addr)) {
                todo.push((addr, at));
            } else if let Some(area) = self.shared.area(a.vpid, addr) {
                let off = area.offset_of(addr);
                if let Some(obj) = self.objects.get_mut(&area.id) {
                    if obj.pending.take(off) {
                        shared.push((area.id, off, addr, at));
                    }
                }
            }
        };
        for it in &a.items {
            match *it {
                Item::Data { addr, at } => take(addr, Some(at)),
                Item::Zero { addr, npages } => {
                    for k in 0..npages as u64 {
                        take(addr + k * PAGE, None);
                    }
                }
            }
        }
        if todo.is_empty() && shared.is_empty() {
            return Ok(());
        }
        self.placed += (todo.len() + shared.len()) as u64;
        self.last_page = Some(now);
        if !shared.is_empty() {
            self.place_shared(&a, &shared)?;
            for &(_, _, addr, _) in &shared {
                if let Some(t) = self.awaiting.remove(&(a.vpid, addr)) {
                    self.latencies_us
                        .push(now.duration_since(t).as_secs_f64() * 1e6);
                }
            }
            if todo.is_empty() {
                return Ok(());
            }
        }
        // Runs of pages at consecutive addresses whose contents are
        // consecutive in one buffer: one UFFDIO_COPY each where the space
        // has the source's addresses.
        let mut runs: Vec<(u64, Option<usize>, usize)> = Vec::with_capacity(todo.len());
        for &(addr, at) in &todo {
            if let Some((a0, Some(at0), n)) = runs.last_mut() {
                if at.is_some()
                    && addr == *a0 + *n as u64 * PAGE
                    && at == Some(*at0 + *n * PAGE_SIZE)
                    && a.pages(*at0, *n + 1).is_some()
                {
                    *n += 1;
                    continue;
                }
            }
            runs.push((addr, at, 1));
        }
        for i in 0..self.spaces.len() {
            if self.spaces[i].vpid != a.vpid || self.spaces[i].dead {
                continue;
            }
            let fd = self.spaces[i].fd.clone();
            let unmoved = self.spaces[i].moves.is_empty() && self.spaces[i].gone.is_empty();
            for &(addr, at, n) in &runs {
                match (at.and_then(|at| a.pages(at, n)), unmoved) {
                    (Some(data), true) if n > 1 => self.copy_run(i, a.vpid, addr, data, &fd),
                    _ => {
                        for j in 0..n {
                            let src = addr + j as u64 * PAGE;
                            let local = self.spaces[i].to_local(src);
                            if self.spaces[i].is_gone(local) {
                                continue;
                            }
                            let data = at.and_then(|at| a.pages(at + j * PAGE_SIZE, 1));
                            self.fill(i, local, Some((a.vpid, src)), data, &fd);
                        }
                    }
                }
            }
        }
        for (addr, _) in todo {
            if let Some(t) = self.awaiting.remove(&(a.vpid, addr)) {
                self.latencies_us
                    .push(now.duration_since(t).as_secs_f64() * 1e6);
            }
        }
        Ok(())
    }

    /// Shared pages that arrived, as (object, offset, source address,
    /// contents or zero): into the object's page cache first, then mapped
    /// wherever the job maps them. A failed write must end the post-copy:
    /// the hole left would read as zeros.
    fn place_shared(
        &mut self,
        a: &Arrival,
        pages: &[(u64, u64, u64, Option<usize>)],
    ) -> Result<(), MigrateError> {
        // Runs of consecutive offsets of one object with consecutive
        // contents in one buffer: one write each.
        let mut k = 0;
        while k < pages.len() {
            let (id, off, _, at) = pages[k];
            let mut n = 1;
            while let Some(&(id2, off2, _, at2)) = pages.get(k + n) {
                let next = match (at, at2) {
                    (Some(x), Some(y)) => y == x + n * PAGE_SIZE && a.pages(x, n + 1).is_some(),
                    (None, None) => true,
                    _ => false,
                };
                if id2 != id || off2 != off + n as u64 * PAGE || !next {
                    break;
                }
                n += 1;
            }
            let Some(obj) = self.objects.get(&id) else {
                k += n;
                continue;
            };
            let res = match at.and_then(|at| a.pages(at, n)) {
                Some(data) => obj.file.write_all_at(data, off),
                None if at.is_some() => Err(std::io::Error::other("contents not in one buffer")),
                None => (0..n as u64)
                    .try_for_each(|j| obj.file.write_all_at(&self.zero[..], off + j * PAGE)),
            };
            res.map_err(|e| {
                io_err(
                    &format!("writing shared object {id:#x} at offset {off:#x} ({n} pages)"),
                    e,
                )
            })?;
            self.map_shared(id, off, off + n as u64 * PAGE);
            k += n;
        }
        Ok(())
    }

    /// Maps object `id`'s `[start, end)` (in the page cache now) in every
    /// space that maps it; wakes threads waiting there.
    fn map_shared(&mut self, id: u64, start: u64, end: u64) {
        for i in 0..self.spaces.len() {
            if self.spaces[i].dead {
                continue;
            }
            let vpid = self.spaces[i].vpid;
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for ar in self.shared.areas(vpid).iter().filter(|x| x.id == id) {
                let top = ar.offset + (ar.end - ar.start);
                let (s, e) = (start.max(ar.offset), end.min(top));
                if s < e {
                    ranges.push((ar.start + (s - ar.offset), ar.start + (e - ar.offset)));
                }
            }
            let fd = self.spaces[i].fd.clone();
            let unmoved = self.spaces[i].moves.is_empty();
            for (s, e) in ranges {
                // The whole run at once where the addresses are the
                // source's; page by page from where that stops (a page
                // mapped already, a moved area, an unread event).
                let mut at = s;
                if unmoved {
                    match uffd::cont(fd.as_fd(), s, e - s, 0) {
                        Ok(_) => continue,
                        Err(err) => at = s + err.done,
                    }
                }
                while at < e {
                    let local = self.spaces[i].to_local(at);
                    match uffd::cont(fd.as_fd(), local, PAGE, 0) {
                        Ok(_) => {}
                        Err(err) => match err.error.raw_os_error() {
                            Some(libc::EEXIST) => {
                                let _ = uffd::wake(fd.as_fd(), local, PAGE);
                            }
                            Some(libc::EAGAIN) => self.retry.push(Retry::Shared {
                                space: i,
                                addr: local,
                            }),
                            Some(libc::ESRCH) => {
                                self.spaces[i].dead = true;
                                break;
                            }
                            // Not mapped there any more, or not registered.
                            _ => {}
                        },
                    }
                    at += PAGE;
                }
            }
        }
    }

    /// Copies contiguous pages to `addr` of space `i`, whose addresses are
    /// the source's (no remaps there).
    fn copy_run(&mut self, i: usize, vpid: i32, addr: u64, data: &[u8], fd: &OwnedFd) {
        let mut done = 0usize;
        while done < data.len() {
            match uffd::copy(fd.as_fd(), addr + done as u64, &data[done..], 0) {
                Ok(n) => done += (n as usize).max(PAGE_SIZE).min(data.len() - done),
                Err(e) => {
                    done += e.done as usize;
                    if done >= data.len() {
                        break;
                    }
                    // One page at a time from here (EEXIST, EAGAIN, ...).
                    let at = addr + done as u64;
                    let page = &data[done..done + PAGE_SIZE];
                    self.fill(i, at, Some((vpid, at)), Some(page), fd);
                    done += PAGE_SIZE;
                }
            }
        }
    }

    /// The last page is in: close the job's own reference to every
    /// userfaultfd (a moment under ptrace) and drop ferry's, which
    /// unregisters the areas. Faults during that moment get zero pages (no
    /// page is planned any more).
    fn release(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let fds: Vec<Arc<OwnedFd>> = self.spaces.iter().map(|s| s.fd.clone()).collect();
        let server = {
            let stop = stop.clone();
            let fds = fds.clone();
            std::thread::Builder::new()
                .name("ferry-zero-faults".into())
                .spawn(move || serve_zero_faults(&fds, &stop))
                .ok()
        };
        if let Err(e) = close_job_references(self.root, &fds) {
            // The job keeps a descriptor with nothing registered: harmless
            // but visible to a later checkpoint.
            tracing::warn!(pid = self.root, "closing the job's userfaultfd: {e}");
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(h) = server {
            let _ = h.join();
        }
        self.spaces.clear();
        self.objects.clear();
    }
}

/// Answers every fault with a zero page until `stop` (see [`Pager::release`]).
fn serve_zero_faults(fds: &[Arc<OwnedFd>], stop: &AtomicBool) {
    let mut readers: Vec<File> = fds
        .iter()
        .filter_map(|f| f.try_clone().ok().map(File::from))
        .collect();
    let mut buf = [0u8; MSG_LEN * 16];
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        pfds.clear();
        pfds.extend(readers.iter().map(|r| libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        if sys::poll(&mut pfds, 10).is_err() {
            return;
        }
        for (k, r) in readers.iter_mut().enumerate() {
            if pfds[k].revents == 0 {
                continue;
            }
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                for m in buf[..n].chunks_exact(MSG_LEN) {
                    match UffdEvent::parse(m) {
                        // In the page cache (shared memory): map it;
                        // mapped already: wake the waiter instead.
                        UffdEvent::Fault { addr, .. }
                            if uffd::zeropage(r.as_fd(), addr, PAGE, 0).is_err()
                                && uffd::cont(r.as_fd(), addr, PAGE, 0).is_err() =>
                        {
                            let _ = uffd::wake(r.as_fd(), addr, PAGE);
                        }
                        UffdEvent::Fork { ufd } => drop(sys::adopt_fork_uffd(ufd)),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Closes, in every process of the job, the descriptors that refer to one
/// of `fds` (the job's own references: the one made at restore, and copies
/// its children inherited).
fn close_job_references(root: i32, fds: &[Arc<OwnedFd>]) -> Result<(), MigrateError> {
    let me = sys::getpid();
    let tree = FrozenTree::freeze(root)?;
    let res = (|| -> Result<(), MigrateError> {
        for task in &tree.tasks {
            let Some(frozen) = &task.frozen else { continue };
            let Some(&tid) = frozen.order.first() else {
                continue;
            };
            let mut doomed = Vec::new();
            let dir = format!("/proc/{}/fd", task.pid);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let is_uffd = std::fs::read_link(e.path())
                    .map(|l| l.to_string_lossy().contains("userfaultfd"))
                    .unwrap_or(false);
                if is_uffd
                    && fds.iter().any(|f| {
                        sys::kcmp_same_file(task.pid, n, me, f.as_raw_fd()).unwrap_or(false)
                    })
                {
                    doomed.push(n);
                }
            }
            if doomed.is_empty() {
                continue;
            }
            let gadget = remote::find_vdso_gadget(task.pid)?;
            let mut r = Remote::new(tid, gadget)?;
            for fd in doomed {
                let _ = r.syscall("close", libc::SYS_close, &[fd as u64]);
            }
            r.finish()?;
        }
        Ok(())
    })();
    tree.thaw()?;
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(addr: u64, npages: u32) -> PlanRun {
        PlanRun { addr, npages }
    }

    #[test]
    fn uffd_messages_are_parsed() {
        let msg = |event: u8, words: [u64; 3]| {
            let mut m = [0u8; MSG_LEN];
            m[0] = event;
            for (k, w) in words.iter().enumerate() {
                m[8 + 8 * k..16 + 8 * k].copy_from_slice(&w.to_ne_bytes());
            }
            m
        };
        assert_eq!(
            UffdEvent::parse(&msg(EVENT_PAGEFAULT, [1, 0x7000_1234, 0])),
            UffdEvent::Fault {
                addr: 0x7000_1000,
                minor: false
            }
        );
        assert_eq!(
            UffdEvent::parse(&msg(EVENT_PAGEFAULT, [4, 0x7000_1234, 0])),
            UffdEvent::Fault {
                addr: 0x7000_1000,
                minor: true
            }
        );
        assert_eq!(
            UffdEvent::parse(&msg(EVENT_FORK, [0xffff_ffff_0000_0009, 0, 0])),
            UffdEvent::Fork { ufd: 9 }
        );
        assert_eq!(
            UffdEvent::parse(&msg(EVENT_REMAP, [0x1000, 0x9000, 0x2000])),
            UffdEvent::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        for e in [EVENT_REMOVE, EVENT_UNMAP] {
            assert_eq!(
                UffdEvent::parse(&msg(e, [0x1000, 0x3000, 0])),
                UffdEvent::Dropped {
                    start: 0x1000,
                    end: 0x3000
                }
            );
        }
        assert_eq!(UffdEvent::parse(&msg(0x99, [0; 3])), UffdEvent::Other(0x99));
    }

    #[test]
    fn pending_set_takes_each_page_once() {
        let mut p = PendingSet::new(&[run(0x1000, 3), run(0x10000, 70)]);
        assert_eq!(p.left(), 73);
        assert!(p.contains(0x2000));
        assert!(!p.contains(0x4000));
        assert!(!p.contains(0x0));
        assert!(p.take(0x2000));
        assert!(!p.take(0x2000));
        assert!(!p.contains(0x2000));
        assert!(p.take(0x10000 + 69 * PAGE));
        assert!(!p.contains(0x10000 + 70 * PAGE));
        assert_eq!(p.left(), 71);
        for k in 0..70 {
            p.take(0x10000 + k * PAGE);
        }
        p.take(0x1000);
        p.take(0x3000);
        assert_eq!(p.left(), 0);
    }

    #[test]
    fn pending_set_counts_overlapping_runs_once() {
        let mut p = PendingSet::new(&[run(0x1000, 4), run(0x3000, 4), run(0x4000, 1)]);
        assert_eq!(p.left(), 6);
        for k in 1..7 {
            assert!(p.take(k * PAGE), "page {k}");
        }
        assert_eq!(p.left(), 0);
    }

    #[test]
    fn planned_runs_split_into_private_and_object_pages() {
        use crate::image::tests_support::{inventory, process, shmem_vma};
        let inv = inventory(vec![process(
            3,
            vec![
                shmem_vma(0x10000, 0x10000 + 4 * PAGE, 5, 8 * PAGE),
                shmem_vma(0x20000, 0x20000 + 2 * PAGE, 6, 0),
            ],
        )]);
        let l = SharedLayout::new(&inv);
        let mut private = Vec::new();
        let mut names = HashMap::new();
        // From two pages below the first area to the end of the second.
        split_run(
            &l,
            3,
            &run(0x10000 - 2 * PAGE, 20),
            &mut private,
            &mut names,
        );
        let got: Vec<(u64, u32)> = private.iter().map(|r| (r.addr, r.npages)).collect();
        assert_eq!(got, vec![(0xe000, 2), (0x14000, 12)]);
        assert_eq!(names[&5], vec![(8 * PAGE, 4, 3, 0x10000)]);
        assert_eq!(names[&6], vec![(0, 2, 3, 0x20000)]);
        let o = SharedObject {
            file: File::open("/dev/null").unwrap(),
            pending: PendingSet::new(&[run(8 * PAGE, 4)]),
            names: names.remove(&5).unwrap(),
        };
        assert_eq!(o.name_of(10 * PAGE), Some((3, 0x12000)));
        assert_eq!(o.name_of(12 * PAGE), None);
        assert_eq!(o.name_of(0), None);
    }

    #[test]
    fn object_pages_named_twice_keep_one_name() {
        let mut n = vec![
            (4 * PAGE, 4, 2, 0x50000),
            (0, 6, 1, 0x10000),
            (PAGE, 1, 3, 0x90000),
        ];
        tidy_names(&mut n);
        assert_eq!(n, vec![(0, 6, 1, 0x10000), (6 * PAGE, 2, 2, 0x52000)]);
    }

    #[test]
    fn remaps_translate_both_ways_and_carry_dropped_ranges() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let fd: OwnedFd = a.into();
        let mut s = Space::new(Arc::new(fd), 1).unwrap();
        s.drop_range(0x11000, 0x12000);
        s.remap(0x10000, 0x50000, 0x4000);
        assert_eq!(s.to_local(0x10000), 0x50000);
        assert_eq!(s.to_local(0x13000), 0x53000);
        assert_eq!(s.to_local(0x14000), 0x14000);
        assert_eq!(s.to_source(0x52000), 0x12000);
        assert!(s.is_gone(0x51000));
        assert!(!s.is_gone(0x11000), "the dropped page moved with its range");
        s.drop_range(0x60000, 0x70000);
        s.remap(0x80000, 0x60000, 0x1000);
        assert!(!s.is_gone(0x60000));
        assert!(s.is_gone(0x61000));
    }
}
