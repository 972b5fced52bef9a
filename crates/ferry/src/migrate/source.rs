//! The source side of a live migration (`ferry migrate`): connect and
//! authenticate, track the job's writes, copy its memory round after round
//! while it runs until the convergence controller says stop, then freeze it,
//! send the last pages and every other piece of state, and let the target
//! restore it. The job is killed only once the target says it runs; any
//! failure before that leaves it running here exactly as before.

use super::controller::{Controller, Decision, RoundStats, StopReason};
use super::report::{MigrationReport, PagesByKind, RoundReport};
use super::sender::{expand, split_by_stream, Cmd, Conn, PageSender, Stream};
use super::MigrateError;
use crate::checkpoint::{self, memory as ckmem, FrozenTree};
use crate::image::ImageDir;
use crate::proc::{self, Pagemap};
use crate::track::{self, DirtyRange, Tracker};
use crate::wire::{
    self, AuthToken, Compression, Features, FrameReader, FrameWriter, Message, MigrationStart,
    Outcome, RateLimiter, SourceSession, Throttled, WireStats,
};
use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

mod handoff;

const PAGE: u64 = crate::sys::PAGE_SIZE as u64;

/// How to migrate.
pub struct Options {
    /// The target agent, ADDR:PORT.
    pub to: String,
    pub token: AuthToken,
    pub controller: Box<dyn Controller>,
    pub compression: Compression,
    /// Extra page connections (0: pages on the main connection).
    pub streams: u16,
    /// Bytes per second over all connections.
    pub max_bandwidth: Option<u64>,
    /// `auto`, `uffd-wp`, `soft-dirty` or `hash`.
    pub tracker: String,
    /// How long to wait for a connection or a reply.
    pub timeout: Duration,
    /// Pre-copy, post-copy or hybrid.
    pub mode: wire::MigrationMode,
    /// Pre-copy: let the target fill the job's memory after resuming it
    /// (see migrate::lazyfill) when it can; false copies it all first.
    pub lazy_restore: bool,
}

/// A progress sample, for the line on stderr.
#[derive(Debug, Clone)]
pub struct Progress {
    pub round: u32,
    pub dirty_pages: u64,
    pub pages_sent: u64,
    pub bandwidth: f64,
    pub estimated_downtime: Duration,
    pub phase: &'static str,
}

/// A tracked process of the job.
struct Tracked {
    pid: i32,
    vpid: i32,
    /// `None` without a live phase: the frozen phase then finds every page.
    tracker: Option<Box<dyn Tracker>>,
    /// Pages to send next (sorted).
    pending: Vec<u64>,
    /// Writable anonymous/shared pages with no data at the start.
    not_present: u64,
    /// Pages sent in the previous round (sorted), to count retransmissions.
    last_sent: Vec<u64>,
    /// The process exited during the live phase (a short-lived child).
    gone: bool,
    /// Without a live phase: its areas as the setup read them (smaps), for
    /// the frozen phase to reuse their flags (see capture_frozen).
    setup_maps: Option<checkpoint::Maps>,
    /// With `setup_maps`: the guard regions of those areas then.
    setup_layout: Vec<crate::image::Vma>,
}

/// The connections of a session.
struct Links {
    r: FrameReader<TcpStream>,
    main: PageSender,
    streams: Vec<Stream>,
    n: u16,
    /// Every page stream's socket, to cut them short on failure.
    socks: Vec<TcpStream>,
    /// Post-copy: the connection for background pages after the resume
    /// (the last stream; idle until then).
    bg: Option<PageSender>,
}

impl Links {
    /// Sends `pages` of one process in `round` on their connections.
    fn send(
        &mut self,
        pid: i32,
        vpid: i32,
        round: u32,
        pages: &[u64],
        split: &mut [Vec<u64>],
    ) -> Result<(), MigrateError> {
        if self.n == 0 {
            return self.main.send(pid, vpid, round, pages);
        }
        split_by_stream(vpid, pages, self.n, split);
        for (i, part) in split.iter_mut().enumerate().skip(1) {
            if part.is_empty() {
                continue;
            }
            let cmd = Cmd::Pages {
                pid,
                vpid,
                round,
                pages: std::mem::take(part),
            };
            self.streams[i - 1]
                .tx
                .send(cmd)
                .map_err(|_| MigrateError::Internal(format!("page stream {i} is gone")))?;
        }
        Ok(())
    }

    /// Completes a round on every connection; returns the cumulative
    /// batch counts (main first).
    fn end_round(&mut self) -> Result<Vec<u64>, MigrateError> {
        let mut counts = vec![self.main.end_round()?];
        let bg = match &mut self.bg {
            Some(b) => Some(b.end_round()?),
            None => None,
        };
        let mut replies = Vec::new();
        for s in &self.streams {
            let (tx, rx) = mpsc::channel();
            s.tx.send(Cmd::EndRound(tx))
                .map_err(|_| MigrateError::Internal("page stream gone".into()))?;
            replies.push(rx);
        }
        for rx in replies {
            let n = rx
                .recv()
                .map_err(|_| MigrateError::Internal("page stream gone".into()))?
                .map_err(MigrateError::Stream)?;
            counts.push(n);
        }
        counts.extend(bg);
        Ok(counts)
    }

    fn send_msg(&mut self, m: &Message) -> Result<(), MigrateError> {
        self.main.send_msg(m)
    }

    /// Closes the streams and sums every connection's statistics.
    fn finish(mut self) -> (WireStats, u64) {
        let mut stats = self.main.stats();
        let mut bytes = self.main.bytes_written();
        if let Some(bg) = &mut self.bg {
            stats += &bg.stats();
            bytes += bg.bytes_written();
        }
        for s in &mut self.streams {
            let (tx, _) = mpsc::channel::<Cmd>();
            drop(std::mem::replace(&mut s.tx, tx));
            if let Some(h) = s.handle.take() {
                if let Ok(st) = h.join() {
                    bytes += st.payload_bytes() + st.batches * wire::frame::HEADER_LEN as u64;
                    stats += &st;
                }
            }
        }
        (stats, bytes)
    }
}

fn connect(addr: &SocketAddr, timeout: Duration) -> Result<TcpStream, MigrateError> {
    let s = TcpStream::connect_timeout(addr, timeout).map_err(|source| MigrateError::Connect {
        addr: addr.to_string(),
        source,
    })?;
    let _ = s.set_nodelay(true);
    // A dead peer or link must end the migration, not hang it.
    let _ = s.set_write_timeout(Some(timeout));
    let _ = s.set_read_timeout(Some(timeout));
    Ok(s)
}

fn writer(s: TcpStream, limiter: &Option<Arc<RateLimiter>>, timeout: Duration) -> Conn {
    let w: Box<dyn Write + Send> = match limiter {
        Some(l) => Box::new(Throttled::new(s, l.clone())),
        None => Box::new(s),
    };
    let mut fw = FrameWriter::new(w);
    fw.set_frame_deadline(Some(timeout));
    fw
}

/// Pages of a process that hold data only the process has, chosen from
/// pagemap as a checkpoint does (private file pages only once written).
fn wanted_pages(pid: i32, maps: &[proc::MapEntry], out: &mut Vec<u64>) -> Result<(), MigrateError> {
    let mut pm = Pagemap::open(pid)?;
    let mut regions = Vec::new();
    for m in maps {
        let kind = ckmem::kind_of(m);
        let Some(masks) = ckmem::wanted_scan(&kind, m.perms.shared) else {
            continue;
        };
        regions.clear();
        pm.scan(m.start, m.end, &masks, &mut regions)?;
        for r in regions
            .iter()
            .filter(|r| ckmem::wanted_region(&kind, r.categories))
        {
            out.extend((r.start..r.end).step_by(PAGE as usize));
        }
    }
    Ok(())
}

/// Pages of writable anonymous and shared areas that hold nothing.
fn count_not_present(maps: &[proc::MapEntry], wanted: &[u64]) -> u64 {
    let mut n = 0;
    for m in maps {
        let anon = matches!(
            ckmem::kind_of(m),
            crate::image::VmaKind::Anon { .. } | crate::image::VmaKind::Shmem { .. }
        );
        if !anon || !m.perms.write {
            continue;
        }
        let lo = wanted.partition_point(|&a| a < m.start);
        let hi = wanted.partition_point(|&a| a < m.end);
        n += (m.end - m.start) / PAGE - (hi - lo) as u64;
    }
    n
}

/// Present pages of the shared-memory areas (memfd, shared anonymous) of a
/// process. Another process's writes to such memory show in its own page
/// tables only, so each process's tracked copy can be stale: the frozen
/// round resends them all, making every copy final.
fn shmem_pages(pid: i32, out: &mut Vec<u64>) -> Result<(), MigrateError> {
    let maps: Vec<proc::MapEntry> = proc::read_maps(pid)?
        .into_iter()
        .filter(|m| m.is_shmem())
        .collect();
    wanted_pages(pid, &maps, out)
}

/// Pages that must not be sent: those of shared file mappings, whose
/// contents live in the (shared) file. `areas` is what the harvest read.
fn drop_unsendable(areas: &[track::Area], pages: &mut Vec<u64>) {
    let skip: Vec<(u64, u64)> = areas
        .iter()
        .filter(|a| a.shared && a.kind == track::AreaKind::File)
        .map(|a| (a.start, a.end))
        .collect();
    if !skip.is_empty() {
        pages.retain(|a| !skip.iter().any(|&(s, e)| *a >= s && *a < e));
    }
}

/// How many of the sorted `pages` are also in the sorted `before`.
fn count_common(before: &[u64], pages: &[u64]) -> u64 {
    let (mut i, mut n) = (0, 0);
    for &a in pages {
        while i < before.len() && before[i] < a {
            i += 1;
        }
        if before.get(i) == Some(&a) {
            n += 1;
        }
    }
    n
}

/// Migrates the job rooted at `pid`. `cancel` (set by Ctrl-C) aborts it.
pub fn migrate(
    pid: i32,
    mut opts: Options,
    cancel: Arc<AtomicBool>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrateError> {
    let t0 = Instant::now();
    let mut controller = std::mem::replace(&mut opts.controller, Box::new(NoController));
    if opts.mode == wire::MigrationMode::PostCopy {
        // No live phase: freeze and hand over at once.
        controller = Box::new(NoController);
    }
    let addr = opts
        .to
        .to_socket_addrs()
        .map_err(|source| MigrateError::Connect {
            addr: opts.to.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| MigrateError::Refused(format!("{} resolves to no address", opts.to)))?;
    let limiter = opts.max_bandwidth.map(|b| Arc::new(RateLimiter::new(b)));
    let main = connect(&addr, opts.timeout)?;
    let mut r = FrameReader::new(main.try_clone().map_err(|e| MigrateError::Io {
        what: "socket".into(),
        source: e,
    })?);
    let mut w = writer(main, &limiter, opts.timeout);
    // Post-copy keeps one more connection for background pages.
    let bg = u16::from(opts.mode.is_postcopy());
    let mut features = Features::ours(opts.streams.saturating_add(bg));
    if !opts.lazy_restore {
        features.flags &= !Features::LAZY_RESTORE;
    }
    let session = SourceSession::handshake(&mut r, &mut w, &opts.token, features)?;
    if opts.mode.is_postcopy() && session.negotiated.flags & Features::POST_COPY == 0 {
        return Err(MigrateError::Refused(format!(
            "the agent at {addr} does not support {} migration",
            opts.mode
        )));
    }
    let n = opts
        .streams
        .min(session.negotiated.max_streams.saturating_sub(bg));
    let work = tempdir()?;
    let result = run(
        pid,
        &opts,
        &mut *controller,
        n,
        &session,
        r,
        w,
        &limiter,
        &work,
        cancel,
        progress,
        t0,
        addr,
    );
    let _ = std::fs::remove_dir_all(&work.dir);
    result
}

fn tempdir() -> Result<ImageDir, MigrateError> {
    let dir = std::env::temp_dir().join(format!(
        "ferry-migrate-{}-{}",
        crate::sys::getpid(),
        rand_suffix()
    ));
    Ok(ImageDir::new(&dir, true)?)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn run(
    pid: i32,
    opts: &Options,
    controller: &mut dyn Controller,
    n: u16,
    session: &SourceSession,
    r: FrameReader<TcpStream>,
    w: Conn,
    limiter: &Option<Arc<RateLimiter>>,
    work: &ImageDir,
    cancel: Arc<AtomicBool>,
    progress: &mut dyn FnMut(&Progress),
    t0: Instant,
    addr: SocketAddr,
) -> Result<MigrationReport, MigrateError> {
    // Setup, with the tree frozen for a moment: the full state is captured
    // once to refuse what cannot be migrated before any memory moves, the
    // first pass's pages are chosen from pagemap, and write tracking is
    // armed (uffd-wp markers would look like swapped pages in pagemap).
    let tree = FrozenTree::freeze(pid)?;
    let setup = (|| -> Result<(Vec<Tracked>, crate::image::MachineInfo, u32), MigrateError> {
        let (inv, maps_of) = checkpoint::capture_state(&tree, work)?;
        let mut tracked = Vec::new();
        // Without a live phase (stop-copy, post-copy) nothing is tracked:
        // the frozen phase finds every page itself, and arming a tracker
        // would only cost its disarming (a walk over all the memory) there.
        let live = controller.live_phase();
        // Post-copy's frozen phase reuses what is costly to read (see
        // capture_frozen).
        let reuse = opts.mode.is_postcopy() && !live;
        for (task, maps) in tree.tasks.iter().zip(&maps_of) {
            let Some(maps) = maps else { continue };
            let mut pending = Vec::new();
            wanted_pages(task.pid, maps, &mut pending)?;
            let not_present = count_not_present(maps, &pending);
            let tracker = if live {
                let mut tracker = track::by_name(&opts.tracker, task.pid, task.pid)?;
                let areas = track::read_areas(task.pid)?;
                tracker.start(&areas)?;
                let mut first = Vec::new();
                tracker.harvest(&areas, &mut first)?;
                Some(tracker)
            } else {
                None
            };
            tracked.push(Tracked {
                pid: task.pid,
                vpid: tree.vpid_of(task.pid),
                tracker,
                pending,
                not_present,
                last_sent: Vec::new(),
                gone: false,
                setup_maps: reuse.then(|| maps.clone()),
                setup_layout: if reuse {
                    ckmem::layout(task.pid, maps, &[])?
                } else {
                    Vec::new()
                },
            });
        }
        Ok((tracked, inv.machine, inv.processes.len() as u32))
    })();
    let (mut tracked, machine, processes) = match setup {
        Ok(s) => s,
        Err(e) => {
            tree.thaw()?;
            return Err(e);
        }
    };
    tree.thaw()?;
    let guard = TrackGuard(&mut tracked);
    let out = live(
        pid, opts, controller, n, session, r, w, limiter, work, cancel, progress, t0, addr,
        guard.0, machine, processes,
    );
    drop(guard);
    out
}

/// Stops every tracker however the migration ends.
struct TrackGuard<'a>(&'a mut Vec<Tracked>);

impl Drop for TrackGuard<'_> {
    fn drop(&mut self) {
        for t in self.0.iter_mut() {
            if let Err(e) = t.tracker.as_mut().map_or(Ok(()), |t| t.stop()) {
                tracing::warn!(pid = t.pid, "stopping the write tracker: {e}");
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn live(
    pid: i32,
    opts: &Options,
    controller: &mut dyn Controller,
    n: u16,
    session: &SourceSession,
    mut r: FrameReader<TcpStream>,
    mut w: Conn,
    limiter: &Option<Arc<RateLimiter>>,
    work: &ImageDir,
    cancel: Arc<AtomicBool>,
    progress: &mut dyn FnMut(&Progress),
    t0: Instant,
    addr: SocketAddr,
    tracked: &mut [Tracked],
    machine: crate::image::MachineInfo,
    processes: u32,
) -> Result<MigrationReport, MigrateError> {
    let total_pages: u64 = tracked.iter().map(|t| t.pending.len() as u64).sum();
    // What the first round sends (the target prepares memory for it):
    // post-copy sends a few eager pages only, the rest after the resume.
    let first_round = if opts.mode == wire::MigrationMode::PostCopy {
        0
    } else {
        total_pages
    };
    let bg_streams = u16::from(opts.mode.is_postcopy());
    let start = MigrationStart {
        job: format!("pid {pid}"),
        description: proc::read_comm(pid).unwrap_or_default(),
        mode: opts.mode,
        compression: opts.compression,
        streams: n + bg_streams,
        total_pages: first_round,
        processes,
        machine,
    };
    session.start(&mut r, &mut w, &start)?;
    let mut streams = Vec::new();
    let mut socks = Vec::new();
    let mut join = |index: u16| -> Result<PageSender, MigrateError> {
        let s = connect(&addr, opts.timeout)?;
        let io = |e| MigrateError::Io {
            what: "socket".into(),
            source: e,
        };
        let mut sr = FrameReader::new(s.try_clone().map_err(io)?);
        socks.push(s.try_clone().map_err(io)?);
        let mut sw = writer(s, limiter, opts.timeout);
        session.join_stream(&mut sr, &mut sw, index)?;
        PageSender::new(sw, opts.compression, cancel.clone())
    };
    for i in 1..=n {
        streams.push(Stream::spawn(join(i)?, i));
    }
    let bg = if bg_streams > 0 {
        Some(join(n + 1)?)
    } else {
        None
    };
    let mut links = Links {
        r,
        main: PageSender::new(w, opts.compression, cancel.clone())?,
        streams,
        n,
        socks,
        bg,
    };
    let outcome = precopy(
        pid,
        opts,
        controller,
        &mut links,
        work,
        &cancel,
        progress,
        t0,
        tracked,
        total_pages,
    );
    match outcome {
        Ok(mut rep) => {
            let (stats, bytes) = links.finish();
            rep.bytes_sent = bytes;
            rep.memory_bytes = stats.pages() * PAGE;
            rep.pages.zero = stats.zero_pages;
            rep.pages.raw = stats.raw_pages;
            rep.pages.lz4 = stats.lz4_pages;
            rep.pages.zstd = stats.zstd_pages;
            rep.pages.absent = stats.absent_pages;
            rep.pages.total = stats.pages();
            rep.target = addr.to_string();
            rep.streams = n;
            rep.lazy_restore =
                !opts.mode.is_postcopy() && session.negotiated.flags & Features::LAZY_RESTORE != 0;
            Ok(rep)
        }
        Err(e) => {
            // Blocked writers (a dead link) must not hold the job's release
            // up: streams are cut, the Abort gets a short chance.
            for s in &links.socks {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            let _ = links
                .r
                .get_ref()
                .set_write_timeout(Some(Duration::from_secs(2)));
            let reason = e.to_string();
            let _ = links.send_msg(&Message::Abort { reason });
            let _ = links.r.get_ref().shutdown(std::net::Shutdown::Both);
            let _ = links.finish();
            Err(e)
        }
    }
}

fn wait_interval(
    since: Instant,
    iv: Option<Duration>,
    cancel: &AtomicBool,
) -> Result<(), MigrateError> {
    let Some(iv) = iv else { return Ok(()) };
    while since.elapsed() < iv {
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrateError::Cancelled);
        }
        std::thread::sleep((iv - since.elapsed()).min(Duration::from_millis(20)));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn precopy(
    pid: i32,
    opts: &Options,
    controller: &mut dyn Controller,
    links: &mut Links,
    work: &ImageDir,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
    t0: Instant,
    tracked: &mut [Tracked],
    total_pages: u64,
) -> Result<MigrationReport, MigrateError> {
    let mut split: Vec<Vec<u64>> = vec![Vec::new(); links.n as usize + 1];
    let mut rounds: Vec<RoundReport> = Vec::new();
    let mut resent_total = 0u64;
    let mut wire_round: u32 = 1;
    let mut ranges: Vec<DirtyRange> = Vec::new();
    let mut stop: Option<StopReason> = None;
    if !controller.live_phase() {
        stop = Some(StopReason::Manual);
    }
    let mut round: u32 = 0;
    // Live rounds: send what is pending, harvest, ask the controller.
    while stop.is_none() {
        let round_start = Instant::now();
        let mut pages_sent = 0u64;
        let mut resent = 0u64;
        let bytes_before = links.main.bytes_written();
        let send_t = Instant::now();
        for t in tracked.iter_mut() {
            let pages = std::mem::take(&mut t.pending);
            resent += count_common(&t.last_sent, &pages);
            pages_sent += pages.len() as u64;
            links.send(t.pid, t.vpid, wire_round, &pages, &mut split)?;
            // Keep this round's list; the old one's buffer collects the next.
            t.pending = std::mem::replace(&mut t.last_sent, pages);
            t.pending.clear();
        }
        let batches = links.end_round()?;
        let send_time = send_t.elapsed();
        // Stream threads' bytes are not in the main counter: estimate the
        // round's bytes from the pages when streams carry them.
        let bytes = if links.n == 0 {
            links.main.bytes_written() - bytes_before
        } else {
            pages_sent * PAGE
        };
        wait_interval(
            round_start,
            controller.interval().filter(|_| round > 0),
            cancel,
        )?;
        // Harvest: what the job wrote since these pages were read.
        let mut dirty = 0u64;
        for t in tracked.iter_mut() {
            if t.gone {
                continue;
            }
            let harvested = track::read_areas(t.pid)
                .map_err(MigrateError::from)
                .and_then(|areas| {
                    if let Some(tr) = t.tracker.as_mut() {
                        tr.harvest(&areas, &mut ranges)?;
                    }
                    Ok(areas)
                });
            let areas = match harvested {
                Ok(a) => a,
                // A short-lived child of the job exited: nothing to send.
                Err(_) if t.pid != pid && !crate::sys::pid_exists(t.pid) => {
                    tracing::debug!(pid = t.pid, "process exited during the live phase");
                    t.gone = true;
                    t.pending.clear();
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Sorted, disjoint ranges (the Tracker contract): sorted pages.
            expand(&ranges, &mut t.pending);
            drop_unsendable(&areas, &mut t.pending);
            dirty += t.pending.len() as u64;
        }
        let duration = round_start.elapsed();
        let bandwidth = bytes as f64 / send_time.as_secs_f64().max(1e-6);
        let stats = RoundStats {
            round,
            duration,
            pages_sent,
            bytes_sent: bytes,
            dirty_pages: dirty,
            resent_pages: resent,
            total_pages,
            bandwidth,
        };
        let est = controller.estimated_downtime(&stats);
        links.send_msg(&Message::RoundEnd(wire::messages::RoundEnd {
            round: wire_round,
            pages_sent,
            dirty_count: dirty,
            last: false,
            batches,
        }))?;
        resent_total += resent;
        rounds.push(RoundReport {
            round,
            dirty_pages: dirty,
            pages_sent,
            bytes_sent: bytes,
            duration_ms: duration.as_secs_f64() * 1e3,
            bandwidth,
            estimated_downtime_ms: est.as_secs_f64() * 1e3,
            frozen: false,
        });
        progress(&Progress {
            round,
            dirty_pages: dirty,
            pages_sent,
            bandwidth,
            estimated_downtime: est,
            phase: "live",
        });
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrateError::Cancelled);
        }
        if let Decision::StopAndCopy { reason } = controller.decide(&stats) {
            stop = Some(reason);
        }
        round += 1;
        wire_round += 1;
    }
    let live_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t_freeze = Instant::now();
    let tree = FrozenTree::freeze(pid)?;
    tracing::debug!(elapsed = ?t_freeze.elapsed(), "frozen: tree stopped");
    let frozen = Final {
        tree: &tree,
        links,
        work,
        tracked: &mut *tracked,
        rounds: &mut rounds,
        round,
        wire_round,
        resent_total: &mut resent_total,
        t_freeze,
    };
    let res = if opts.mode.is_postcopy() {
        // Hand over now; the rest follows once the job runs there.
        handoff::handoff(frozen, cancel, progress).map(|h| (h.handed, Some(h)))
    } else {
        stop_and_copy(frozen).map(|h| (h, None))
    };
    let (handed, post) = match res {
        Ok(x) => x,
        Err(e) => {
            // Also after a resume there: without the pages still here, the
            // target kills its copy (it must never run on without them).
            tree.thaw()?;
            return Err(e);
        }
    };
    let Handed {
        target_pid,
        restore_ms,
        threads,
        processes,
    } = handed;
    let downtime = match &post {
        Some(h) => h.resume,
        None => t_freeze.elapsed(),
    };
    tree.kill()?;
    let reason = stop.unwrap_or(StopReason::Manual);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(MigrationReport {
        mode: opts.mode.to_string(),
        pid,
        target: String::new(),
        target_pid,
        processes,
        threads,
        controller: if opts.mode == wire::MigrationMode::PostCopy {
            "none".into()
        } else {
            controller.name()
        },
        pattern: reason.pattern().map(str::to_string),
        stop_reason: if opts.mode == wire::MigrationMode::PostCopy {
            "post-copy: no live phase".into()
        } else {
            reason.describe().to_string()
        },
        downtime_ms: ms(downtime),
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        restore_ms,
        lazy_restore: false,
        live_ms,
        bytes_sent: 0,
        memory_bytes: 0,
        pages: PagesByKind {
            resent: resent_total,
            not_present: tracked.iter().map(|t| t.not_present).sum(),
            ..Default::default()
        },
        rounds,
        compression: opts.compression.to_string(),
        streams: 0,
        tracker: tracked
            .first()
            .and_then(|t| t.tracker.as_ref())
            .map_or("none", |t| t.name())
            .to_string(),
        resume_ms: post.as_ref().map(|h| ms(h.resume)),
        remote_faults: post.as_ref().map(|h| h.done.remote_faults),
        local_faults: post.as_ref().map(|h| h.done.local_faults),
        fault_latency_us: post.as_ref().map(|h| super::report::Latency {
            p50: h.done.fault_latency_p50_us,
            p99: h.done.fault_latency_p99_us,
            max: h.done.fault_latency_max_us,
        }),
        last_page_ms: post.as_ref().map(|h| h.done.last_page_ms),
        pages_before_resume: post.as_ref().map(|h| h.before),
        pages_after_resume: post.as_ref().map(|h| h.after),
        shared_pages_after_resume: post.as_ref().map(|h| h.shared_after),
        shared_page_requests: post.as_ref().map(|h| h.shared_requested),
    })
}

/// With the tree frozen: the last harvest of tracked `t`, then tracking
/// off (restore must not see uffd state); `t.pending` becomes every page
/// the target still lacks. With `defer_stop`, tracking may stay on for the
/// caller to stop (returns false then).
fn final_harvest(
    t: &mut Tracked,
    tracker: &mut dyn Tracker,
    ranges: &mut Vec<DirtyRange>,
    defer_stop: bool,
) -> Result<bool, MigrateError> {
    let areas = track::read_areas(t.pid)?;
    tracker.harvest(&areas, ranges)?;
    expand(ranges, &mut t.pending);
    // Shared memory is found in pagemap, where tracking markers look like
    // swapped pages until tracking stops. Without any, the stop (a pass
    // over every tracked page table: ~0.1 s per GiB) can overlap sending.
    let shmem = areas.iter().any(|a| a.kind == track::AreaKind::Shmem);
    let stopped = !defer_stop || shmem;
    if stopped {
        tracker.stop()?;
        shmem_pages(t.pid, &mut t.pending)?;
    }
    // Merges three sources: the round the controller stopped before
    // sending, this harvest, and the shared memory.
    t.pending.sort_unstable();
    t.pending.dedup();
    drop_unsendable(&areas, &mut t.pending);
    Ok(stopped)
}

/// Ends the frozen round: flushes every connection, announces the round
/// as the last one and records it.
fn end_frozen_round(
    links: &mut Links,
    rounds: &mut Vec<RoundReport>,
    round: u32,
    wire_round: u32,
    pages_sent: u64,
    t_freeze: Instant,
) -> Result<(), MigrateError> {
    let batches = links.end_round()?;
    let t = t_freeze.elapsed();
    links.send_msg(&Message::RoundEnd(wire::messages::RoundEnd {
        round: wire_round,
        pages_sent,
        dirty_count: 0,
        last: true,
        batches,
    }))?;
    rounds.push(RoundReport {
        round,
        dirty_pages: 0,
        pages_sent,
        bytes_sent: pages_sent * PAGE,
        duration_ms: t.as_secs_f64() * 1e3,
        bandwidth: 0.0,
        estimated_downtime_ms: 0.0,
        frozen: true,
    });
    Ok(())
}

/// Sends the frozen tree's state, the contents of its deleted files, the
/// post-copy plans if any, and Commit.
fn commit(
    links: &mut Links,
    work: &ImageDir,
    inv: crate::image::Inventory,
    plans: Vec<wire::messages::PostcopyPlan>,
) -> Result<(), MigrateError> {
    let blobs: Vec<Vec<u8>> = inv
        .blobs
        .iter()
        .map(|b| work.read_blob(b))
        .collect::<Result<_, _>>()?;
    links.send_msg(&Message::FinalState(Box::new(inv)))?;
    for (i, data) in blobs.iter().enumerate() {
        // Pieces in order; an empty blob still gets its one (empty) piece.
        let mut off = 0usize;
        loop {
            let end = (off + wire::messages::BLOB_CHUNK).min(data.len());
            links.send_msg(&Message::Blob(wire::messages::BlobChunk {
                index: i as u32,
                offset: off as u64,
                data: data[off..end].to_vec(),
            }))?;
            off = end;
            if off >= data.len() {
                break;
            }
        }
    }
    for p in plans {
        links.send_msg(&Message::PostcopyPlan(p))?;
    }
    links.send_msg(&Message::Commit)
}

/// Placeholder left in the options once the real controller is taken out.
struct NoController;

impl Controller for NoController {
    fn name(&self) -> String {
        "stop-copy".into()
    }
    fn live_phase(&self) -> bool {
        false
    }
    fn interval(&self) -> Option<Duration> {
        None
    }
    fn decide(&mut self, _: &RoundStats) -> Decision {
        Decision::StopAndCopy {
            reason: StopReason::Manual,
        }
    }
}

/// Where the job ended up on the target.
#[derive(Debug, Clone, Copy)]
struct Handed {
    target_pid: i32,
    restore_ms: f64,
    threads: usize,
    processes: usize,
}

/// The pages of one live process of the frozen tree that the target lacks.
struct Left {
    pid: i32,
    vpid: i32,
    /// Listed pages (sorted).
    pages: Vec<u64>,
    /// Readable private anonymous areas `[start, end)` (sorted) wanted
    /// whole, their pages not listed: post-copy of an untracked process
    /// plans them as they are, so the frozen phase does not grow with
    /// memory; pages with nothing in them go as zero pages later.
    areas: Vec<(u64, u64)>,
}

/// With the tree frozen: every page the target still lacks. Tracked
/// processes get their last harvest (tracking off, unless `defer_stop`
/// lets it wait for [`stop_tracking`]); untracked ones (no live phase, or
/// born during it) all of theirs — with `whole_areas`, their readable
/// private anonymous areas as whole areas.
fn remaining_pages(
    tree: &FrozenTree,
    tracked: &mut [Tracked],
    resent_total: &mut u64,
    whole_areas: bool,
    defer_stop: bool,
) -> Result<Vec<Left>, MigrateError> {
    let mut left = Vec::new();
    let mut ranges = Vec::new();
    for t in tracked.iter_mut().filter(|t| !t.gone && tree.runs(t.pid)) {
        let Some(mut tracker) = t.tracker.take() else {
            left.push(untracked(t.pid, t.vpid, whole_areas)?);
            continue;
        };
        let r = final_harvest(t, &mut *tracker, &mut ranges, defer_stop);
        t.tracker = Some(tracker);
        r?;
        *resent_total += count_common(&t.last_sent, &t.pending);
        left.push(Left {
            pid: t.pid,
            vpid: t.vpid,
            pages: std::mem::take(&mut t.pending),
            areas: Vec::new(),
        });
    }
    for task in &tree.tasks {
        if task.frozen.is_none() || tracked.iter().any(|t| t.pid == task.pid) {
            continue;
        }
        left.push(untracked(task.pid, tree.vpid_of(task.pid), whole_areas)?);
    }
    Ok(left)
}

/// What the target lacks of an untracked frozen process: everything.
fn untracked(pid: i32, vpid: i32, whole_areas: bool) -> Result<Left, MigrateError> {
    let maps = proc::read_maps(pid)?;
    let (whole, listed): (Vec<proc::MapEntry>, Vec<proc::MapEntry>) =
        maps.into_iter().partition(|m| {
            whole_areas
                && m.perms.read
                && !m.perms.shared
                && matches!(ckmem::kind_of(m), crate::image::VmaKind::Anon { .. })
        });
    let mut pages = Vec::new();
    wanted_pages(pid, &listed, &mut pages)?;
    Ok(Left {
        pid,
        vpid,
        pages,
        areas: whole.iter().map(|m| (m.start, m.end)).collect(),
    })
}

/// Stops every tracker [`remaining_pages`] left running (a no-op for the
/// others).
fn stop_tracking(tracked: &mut [Tracked]) -> Result<(), MigrateError> {
    for t in tracked.iter_mut().filter(|t| !t.gone) {
        if let Some(tr) = t.tracker.as_mut() {
            tr.stop()?;
        }
    }
    Ok(())
}

/// The frozen tree's state with its areas (their page runs are built by
/// the target from what it received). Post-copy reuses the flags of areas
/// the setup read moments before (what smaps costs grows with memory);
/// [`check_reused_flags`] looks again once the job runs on the target.
fn capture_frozen(
    tree: &FrozenTree,
    work: &ImageDir,
    tracked: &[Tracked],
) -> Result<crate::image::Inventory, MigrateError> {
    let of = |pid: i32| tracked.iter().find(|t| t.pid == pid);
    let earlier = |pid: i32| of(pid).and_then(|t| t.setup_maps.as_deref());
    let (mut inv, maps_of) = checkpoint::capture_state_reusing(tree, work, &earlier)?;
    for (task, (p, maps)) in tree
        .tasks
        .iter()
        .zip(inv.processes.iter_mut().zip(&maps_of))
    {
        if let Some(maps) = maps {
            let before = of(task.pid).map_or(&[][..], |t| &t.setup_layout[..]);
            p.vmas = ckmem::layout(task.pid, maps, before)?;
        }
    }
    Ok(inv)
}

/// With the tree still frozen, after the resume on the target: whether an
/// area's flags (madvise advice, mlock) or guard regions changed between
/// the setup's look and the freeze, which the target then lacks. Rare
/// (the window is the session's start, tens of milliseconds), but never
/// silent.
fn check_reused_flags(tree: &FrozenTree, tracked: &[Tracked]) {
    for t in tracked.iter().filter(|t| tree.runs(t.pid)) {
        let Some(before) = t.setup_maps.as_deref() else {
            continue;
        };
        let Ok(now) = proc::read_smaps(t.pid) else {
            continue;
        };
        if let Ok(layout) = ckmem::layout(t.pid, &now, &[]) {
            for v in &layout {
                let i = t.setup_layout.partition_point(|e| e.start < v.start);
                if let Some(e) = t.setup_layout.get(i).filter(|e| e.end == v.end) {
                    if e.guards != v.guards {
                        tracing::warn!(
                            pid = t.pid,
                            "area {:#x}-{:#x} changed its guard regions just before the \
                             freeze; the copy on the target has the earlier ones",
                            v.start,
                            v.end
                        );
                    }
                }
            }
        }
        for m in &now {
            let i = before.partition_point(|e| e.start < m.start);
            if let Some(e) = before.get(i).filter(|e| e.end == m.end) {
                if e.vm_flags != m.vm_flags {
                    tracing::warn!(
                        pid = t.pid,
                        "area {:#x}-{:#x} changed its flags just before the freeze \
                         ({:?} -> {:?}); the copy on the target has the earlier ones",
                        m.start,
                        m.end,
                        e.vm_flags,
                        m.vm_flags
                    );
                }
            }
        }
    }
}

/// After Commit: the target's answer, once the tree runs there. Restores
/// of large jobs take a while, so it waits patiently (link loss still ends
/// the wait).
fn await_restored(links: &mut Links, inv_counts: (usize, usize)) -> Result<Handed, MigrateError> {
    let _ = links
        .r
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(600)));
    match await_outcome(links)? {
        Outcome::Restored(x) => Ok(Handed {
            target_pid: x.pid,
            restore_ms: x.restore_ms as f64,
            threads: inv_counts.0,
            processes: inv_counts.1,
        }),
        Outcome::Failed(reason) => Err(MigrateError::Refused(format!(
            "the target could not restore the job: {reason}"
        ))),
    }
}

/// Threads and processes of an inventory.
fn counts(inv: &crate::image::Inventory) -> (usize, usize) {
    (
        inv.processes.iter().map(|p| p.threads.len()).sum(),
        inv.processes.len(),
    )
}

/// What the frozen phase works with (stop-and-copy or post-copy handoff).
struct Final<'a> {
    tree: &'a FrozenTree,
    links: &'a mut Links,
    work: &'a ImageDir,
    tracked: &'a mut [Tracked],
    rounds: &'a mut Vec<RoundReport>,
    /// The report's round number and the wire's of the frozen round.
    round: u32,
    wire_round: u32,
    resent_total: &'a mut u64,
    t_freeze: Instant,
}

/// With the tree frozen: last pages, full state, commit, and the target's
/// answer.
fn stop_and_copy(f: Final) -> Result<Handed, MigrateError> {
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
    let left = remaining_pages(tree, tracked, resent_total, false, true)?;
    let pages_sent: u64 = left.iter().map(|l| l.pages.len() as u64).sum();
    // The pages stream from another thread while this one, the tracer
    // (ptrace works only from it), stops tracking and captures the state:
    // with the tree frozen the two are independent.
    let (sent, inv) = std::thread::scope(|s| {
        let links = &mut *links;
        let pages = std::thread::Builder::new()
            .name("ferry-pages".into())
            .spawn_scoped(s, move || -> Result<(), MigrateError> {
                let mut split: Vec<Vec<u64>> = vec![Vec::new(); links.n as usize + 1];
                for l in &left {
                    links.send(l.pid, l.vpid, wire_round, &l.pages, &mut split)?;
                }
                Ok(())
            });
        let inv = stop_tracking(tracked).and_then(|()| capture_frozen(tree, work, tracked));
        let sent = match pages {
            Ok(h) => h
                .join()
                .unwrap_or_else(|_| Err(MigrateError::Internal("the page thread panicked".into()))),
            Err(e) => Err(MigrateError::Internal(format!(
                "cannot start the page thread: {e}"
            ))),
        };
        (sent, inv)
    });
    sent?;
    let inv = inv?;
    let n = counts(&inv);
    end_frozen_round(links, rounds, round, wire_round, pages_sent, t_freeze)?;
    commit(links, work, inv, Vec::new())?;
    await_restored(links, n)
}

fn await_outcome(links: &mut Links) -> Result<Outcome, MigrateError> {
    loop {
        match wire::source::read_message(&mut links.r, true)? {
            Message::Restored(x) => return Ok(Outcome::Restored(x)),
            Message::RestoreFailed { reason }
            | Message::Abort { reason }
            | Message::Error { message: reason } => return Ok(Outcome::Failed(reason)),
            Message::Ping { seq } => links.send_msg(&Message::Pong { seq })?,
            m => {
                return Err(MigrateError::Refused(format!(
                    "unexpected {} from the target",
                    m.frame_type()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_common_counts_pages_sent_in_both_rounds() {
        assert_eq!(count_common(&[], &[1, 2]), 0);
        assert_eq!(
            count_common(&[0x1000, 0x3000, 0x5000], &[0x1000, 0x2000, 0x5000, 0x6000]),
            2
        );
        assert_eq!(count_common(&[0x1000, 0x2000], &[0x3000]), 0);
    }
}
