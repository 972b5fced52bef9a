//! The node agent (`ferry agent`): accepts migrations, keeps each session's
//! pages in memory, restores the job when the source commits, and reaps
//! the jobs it restored. A connection is a thread; the protocol logic is
//! the wire module's receiver state machine, so a bad peer only ever ends
//! its own session.

use super::lazyfill;
use super::mempages::MemPages;
use super::postcopy::{self, Pager};
use super::MigrateError;
use crate::image::{self, ImageDir, Inventory};
use crate::restore;
use crate::sys::{self, WaitStatus};
use crate::wire::{
    self, messages::Restored, AuthToken, Event, Features, FrameReader, FrameType, FrameWriter,
    Message, Receiver, ReceiverConfig, SessionId, SinkError,
};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The token used when none is configured (the agent then only listens on
/// loopback, where every peer is local).
pub const LOOPBACK_TOKEN: &[u8] = b"ferry: no token configured (loopback only)";

/// Most page streams a source may open.
const MAX_STREAMS: u16 = 16;
/// A connection silent for this long is dropped.
const IDLE: Duration = Duration::from_secs(120);

pub struct AgentConfig {
    pub listen: SocketAddr,
    pub token: AuthToken,
    /// Where blobs of incoming jobs are staged during a restore.
    pub work_dir: PathBuf,
}

/// Pages of a session, as the receiver hands them over.
#[derive(Default)]
pub struct MemSink(pub MemPages);

impl wire::PageSink for MemSink {
    fn page(
        &mut self,
        pid: i32,
        round: u32,
        addr: u64,
        data: &[u8; wire::PAGE_SIZE],
    ) -> Result<(), SinkError> {
        self.0.put(pid, addr, round, Some(data));
        Ok(())
    }

    fn zero(&mut self, pid: i32, round: u32, addr: u64, npages: u32) -> Result<(), SinkError> {
        for k in 0..npages as u64 {
            self.0
                .put(pid, addr + k * wire::PAGE_SIZE as u64, round, None);
        }
        Ok(())
    }

    fn absent(&mut self, pid: i32, _round: u32, addr: u64, npages: u32) -> Result<(), SinkError> {
        for k in 0..npages as u64 {
            self.0.drop_page(pid, addr + k * wire::PAGE_SIZE as u64);
        }
        Ok(())
    }
}

type Conn = FrameWriter<TcpStream>;

struct Session {
    rx: Mutex<Receiver<MemSink>>,
    main: Arc<Mutex<Conn>>,
    /// Post-copy: where page batches go once the job runs here.
    postcopy: Mutex<Option<postcopy::Inbox>>,
    /// The job's init, started when the migration begins (see PreInit).
    init: Arc<Mutex<Option<crate::jobinit::PreInit>>>,
}

struct Agent {
    cfg: AgentConfig,
    sessions: Mutex<HashMap<SessionId, Arc<Session>>>,
    /// Restored jobs to reap: (pid the agent waits for, job root pid).
    jobs: Mutex<Vec<(i32, i32)>>,
}

/// Runs the agent until `stop` is set. `ready` is called once listening.
pub fn run(
    cfg: AgentConfig,
    stop: &AtomicBool,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), MigrateError> {
    let l = TcpListener::bind(cfg.listen).map_err(|source| MigrateError::Io {
        what: format!("cannot listen on {}", cfg.listen),
        source,
    })?;
    let local = l.local_addr().unwrap_or(cfg.listen);
    l.set_nonblocking(true).map_err(|source| MigrateError::Io {
        what: "listener".into(),
        source,
    })?;
    std::fs::create_dir_all(&cfg.work_dir).map_err(|source| MigrateError::Io {
        what: format!("cannot create {}", cfg.work_dir.display()),
        source,
    })?;
    let agent = Arc::new(Agent {
        cfg,
        sessions: Mutex::new(HashMap::new()),
        jobs: Mutex::new(Vec::new()),
    });
    ready(local);
    let mut last_reap = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, peer)) => {
                let a = agent.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("ferry-conn-{peer}"))
                    .spawn(move || {
                        if let Err(e) = serve(&a, s) {
                            tracing::warn!(%peer, "connection ended: {e}");
                        }
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
        if last_reap.elapsed() > Duration::from_millis(100) {
            agent.reap();
            last_reap = Instant::now();
        }
    }
    Ok(())
}

impl Agent {
    /// Reaps restored jobs that ended (they are the agent's children).
    fn reap(&self) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.retain(|&(wait, root)| match sys::waitpid(wait, libc::WNOHANG) {
            Ok(Some((_, WaitStatus::Exited(c)))) => {
                tracing::info!(pid = root, "job exited with status {c}");
                false
            }
            Ok(Some((_, WaitStatus::Signaled(s)))) => {
                tracing::info!(pid = root, "job killed by signal {s}");
                false
            }
            Ok(_) => true,
            Err(_) => false,
        });
    }

    fn session(&self, id: &SessionId) -> Option<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
}

fn send_all(w: &Mutex<Conn>, msgs: &[Message]) -> Result<(), MigrateError> {
    if msgs.is_empty() {
        return Ok(());
    }
    let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
    for m in msgs {
        w.send(m)?;
    }
    w.flush()?;
    Ok(())
}

/// One connection: a session's main connection or one of its page streams.
fn serve(agent: &Arc<Agent>, s: TcpStream) -> Result<(), MigrateError> {
    let io = |e| MigrateError::Io {
        what: "socket".into(),
        source: e,
    };
    s.set_nonblocking(false).map_err(io)?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(IDLE)).map_err(io)?;
    let _ = s.set_write_timeout(Some(IDLE));
    let mut r = FrameReader::new(s.try_clone().map_err(io)?);
    let w = FrameWriter::new(s);
    let first = r.read_frame()?.to_owned();
    match first.ty {
        FrameType::Hello => serve_main(agent, r, w, first),
        FrameType::StreamJoin => serve_stream(agent, r, w, first),
        other => {
            let mut w = w;
            let _ = w.send(&Message::Error {
                message: format!("{other} cannot open a connection"),
            });
            let _ = w.flush();
            Err(MigrateError::Refused(format!("a peer opened with {other}")))
        }
    }
}

fn serve_main(
    agent: &Arc<Agent>,
    mut r: FrameReader<TcpStream>,
    w: Conn,
    first: wire::OwnedFrame,
) -> Result<(), MigrateError> {
    let cfg = ReceiverConfig {
        token: agent.cfg.token.clone(),
        features: Features::ours(MAX_STREAMS),
        machine: Some(crate::checkpoint::machine_info()),
    };
    let sess = Arc::new(Session {
        rx: Mutex::new(Receiver::new(cfg, MemSink::default())?),
        main: Arc::new(Mutex::new(w)),
        postcopy: Mutex::new(None),
        init: Arc::new(Mutex::new(None)),
    });
    let mut id: Option<SessionId> = None;
    let mut first = Some(first);
    let result = loop {
        // Frames are handled where the reader holds them: page batches are
        // most of the bytes, and copying each out cost a pass over them.
        let owned;
        let f = match first.take() {
            Some(f) => {
                owned = f;
                owned.as_frame()
            }
            None => match r.read_frame() {
                Ok(f) => f,
                Err(e) => {
                    let ev = lock(&sess.rx).on_main_closed();
                    tracing::info!("source connection closed ({e}): {ev:?}");
                    break Ok(());
                }
            },
        };
        let a = {
            let mut rx = lock(&sess.rx);
            let was_started = rx.start_info().is_some();
            let a = rx.on_frame(&f);
            if !was_started {
                if let Some(n) = rx.start_info().map(|s| s.total_pages) {
                    rx.sink_mut().0.expect(n);
                }
            }
            a
        };
        let a = match a {
            Ok(a) => a,
            Err(e) => {
                let _ = send_all(&sess.main, &[wire::error_message(&e)]);
                break Err(e.into());
            }
        };
        if id.is_none() {
            if let Some(s) = lock(&sess.rx).session() {
                agent
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(s, sess.clone());
                id = Some(s);
            }
        }
        send_all(&sess.main, &a.send)?;
        match a.event {
            Event::Restore(inv) => {
                if let Some(pager) = restore_job(agent, &sess, inv)? {
                    break serve_postcopy(&mut r, &sess, pager);
                }
            }
            Event::Started(_) => match crate::jobinit::PreInit::spawn() {
                Ok(init) => *lock(&sess.init) = Some(init),
                // The restore starts one itself then.
                Err(e) => tracing::warn!("starting the job's init ahead: {e}"),
            },
            Event::Close { .. } | Event::Aborted { .. } => break Ok(()),
            Event::Released => {}
            _ => {}
        }
    };
    if let Some(s) = id {
        agent
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&s);
    }
    result
}

fn serve_stream(
    agent: &Arc<Agent>,
    mut r: FrameReader<TcpStream>,
    mut w: Conn,
    first: wire::OwnedFrame,
) -> Result<(), MigrateError> {
    let join = match Message::decode(&first.as_frame())? {
        Message::StreamJoin(j) => j,
        _ => return Err(MigrateError::Refused("malformed StreamJoin".into())),
    };
    let Some(sess) = agent.session(&join.session) else {
        let _ = w.send(&Message::AuthFail {
            reason: "no such session".into(),
        });
        let _ = w.flush();
        return Err(MigrateError::Refused(
            "a stream joined an unknown session".into(),
        ));
    };
    let (idx, a) = match lock(&sess.rx).on_stream_join(&first.as_frame()) {
        Ok(x) => x,
        Err(e) => {
            let _ = w.send(&Message::AuthFail {
                reason: e.to_string(),
            });
            let _ = w.flush();
            return Err(e.into());
        }
    };
    for m in &a.send {
        w.send(m)?;
    }
    w.flush()?;
    let mut decoder: Option<wire::BatchDecoder> = None;
    loop {
        let f = match r.read_frame() {
            Ok(f) => f,
            Err(_) if lock(&sess.postcopy).is_some() => return Ok(()),
            Err(_) => {
                let a = lock(&sess.rx).on_stream_closed(idx);
                if let Ok(a) = a {
                    send_all(&sess.main, &a.send)?;
                }
                return Ok(());
            }
        };
        let inbox = lock(&sess.postcopy).clone();
        if let Some(inbox) = inbox {
            // The job runs here: this stream carries the background pages.
            if f.ty != FrameType::PageBatch {
                return Err(MigrateError::Refused(format!(
                    "{} on a page stream during post-copy",
                    f.ty
                )));
            }
            let d = match &mut decoder {
                Some(d) => d,
                None => decoder.insert(wire::BatchDecoder::new()?),
            };
            match postcopy::decode_batch(d, f.payload.to_vec()) {
                Ok(a) => inbox.send(postcopy::Input::Pages(a)),
                Err(e) => {
                    inbox.send(postcopy::Input::Lost(format!("bad page batch: {e}")));
                    return Err(e.into());
                }
            }
            continue;
        }
        let a = lock(&sess.rx).on_stream_frame(idx, &f);
        let a = match a {
            Ok(a) => a,
            Err(e) => {
                let _ = send_all(&sess.main, &[wire::error_message(&e)]);
                return Err(e.into());
            }
        };
        send_all(&sess.main, &a.send)?;
        if let Event::Restore(inv) = a.event {
            // A commit completed by a stream: the main connection's thread
            // is waiting in read, so post-copy serving goes to a thread.
            if let Some(pager) = restore_job(agent, &sess, inv)? {
                std::thread::spawn(move || {
                    if let Err(e) = pager.join() {
                        tracing::warn!("post-copy pager: {e:?}");
                    }
                });
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Restores a committed job from the session's pages, on this thread (the
/// whole restore must be traced by one thread), and tells the source.
fn restore_job(
    agent: &Arc<Agent>,
    sess: &Arc<Session>,
    mut inv: Box<Inventory>,
) -> Result<Option<PagerThread>, MigrateError> {
    let t = Instant::now();
    let (mut pages, blobs, sid, mut plans, postcopy, lazy_ok) = {
        let mut rx = lock(&sess.rx);
        let pages = std::mem::take(&mut rx.sink_mut().0);
        let postcopy = rx.start_info().is_some_and(|s| s.mode.is_postcopy());
        let lazy_ok = rx
            .negotiated()
            .is_some_and(|f| f.flags & wire::Features::LAZY_RESTORE != 0);
        (
            pages,
            rx.take_blobs(),
            rx.session().unwrap_or_default(),
            rx.take_plans(),
            postcopy,
            lazy_ok,
        )
    };
    // Pre-copy: fill the private memory after the resume from the pages
    // held here. Hybrid: the same for the pages its live rounds sent, the
    // rest coming from the source as in post-copy.
    let lazy = !postcopy && lazy_ok;
    let local = postcopy && lazy_ok && !pages.is_empty();
    let mut local_ranges: HashMap<i32, Vec<(u64, u64)>> = HashMap::new();
    // Planned pages stay missing: an older copy from a pre-copy round must
    // not be restored in their place.
    let mut planned: HashMap<i32, Vec<(u64, u64)>> = HashMap::new();
    for p in &plans {
        let v = planned.entry(p.pid).or_default();
        for r in &p.runs {
            let len = r.npages as u64 * wire::PAGE_SIZE as u64;
            v.push((r.addr, r.addr + len));
        }
    }
    // A shared page is planned under one of its mappings: it is missing
    // in all of them.
    let shared = restore::postcopy::SharedLayout::new(&inv);
    if postcopy {
        shared.expand(&mut planned);
    }
    for (pid, ranges) in &planned {
        pages.drop_ranges(*pid, ranges);
    }
    let mut lazy_plans = Vec::new();
    let outcome = (|| -> Result<restore::Report, MigrateError> {
        image::validate_inventory(&inv)?;
        for p in inv.processes.iter_mut() {
            pages.build_runs(p);
        }
        if lazy {
            // Private memory is filled after the resume (lazyfill).
            planned = lazyfill::plan(&mut inv.processes);
            lazy_plans = lazyfill::plans(&planned);
        } else if local {
            local_ranges = lazyfill::plan(&mut inv.processes);
            lazy_plans = lazyfill::plans(&local_ranges);
            for (pid, ranges) in &local_ranges {
                let v = planned.entry(*pid).or_default();
                v.extend_from_slice(ranges);
                v.sort_unstable();
            }
        }
        let dir = agent.cfg.work_dir.join(format!("session-{sid}"));
        let img = ImageDir::new(&dir, true)?;
        for (b, data) in inv.blobs.iter().zip(&blobs) {
            img.write_blob(&b.file, &b.origin, data)?;
        }
        // Two nodes on one host share a pid namespace: a fresh one per job
        // keeps every pid free whatever else runs here.
        let opts = restore::Options {
            fresh_pidns: true,
            postcopy: (postcopy || lazy).then(|| Arc::new(std::mem::take(&mut planned))),
            init: Some(sess.init.clone()),
        };
        let r = restore::restore_from(&inv, &pages, &img, &opts);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(r?)
    })();
    let mut pages = Some(pages).filter(|_| lazy || local);
    let mut pager = None;
    let result = match outcome {
        Ok(mut rep) if lazy => {
            lock(&agent.jobs).push((rep.wait_pid, rep.pid));
            let spaces = std::mem::take(&mut rep.spaces);
            match start_lazy_fill(spaces, &lazy_plans, &rep, pages.take()) {
                Ok(()) => {
                    tracing::info!(
                        pid = rep.pid,
                        "job resumed in {:?}; filling its memory",
                        t.elapsed()
                    );
                    Ok(Restored {
                        pid: rep.pid,
                        restore_ms: t.elapsed().as_millis() as u64,
                    })
                }
                Err(e) => {
                    let _ = sys::kill(rep.wait_pid, libc::SIGKILL);
                    Err(format!("lazy restore: {e}"))
                }
            }
        }
        Ok(mut rep) if postcopy => {
            lock(&agent.jobs).push((rep.wait_pid, rep.pid));
            let held = std::mem::take(&mut local_ranges);
            let (send, req_rx) = fault_router(Some((held, sess.main.clone())));
            let spaces = std::mem::take(&mut rep.spaces);
            let shmem = std::mem::take(&mut rep.shmem);
            plans.extend(std::mem::take(&mut lazy_plans));
            match Pager::new(spaces, &plans, shared, &shmem, rep.pid, rep.wait_pid, send) {
                Ok((p, inbox)) => {
                    if let Some(pages) = pages.take() {
                        let feed = inbox.clone();
                        spawn("ferry-lazy-feed", move || {
                            lazyfill::feed(pages, feed, req_rx)
                        })?;
                    }
                    *lock(&sess.postcopy) = Some(inbox);
                    pager = Some(p);
                    tracing::info!(pid = rep.pid, "job resumed in {:?}; post-copy", t.elapsed());
                    Ok(Restored {
                        pid: rep.pid,
                        restore_ms: t.elapsed().as_millis() as u64,
                    })
                }
                Err(e) => {
                    let _ = sys::kill(rep.wait_pid, libc::SIGKILL);
                    Err(format!("post-copy setup: {e}"))
                }
            }
        }
        Ok(rep) => {
            lock(&agent.jobs).push((rep.wait_pid, rep.pid));
            tracing::info!(pid = rep.pid, "job restored in {:?}", t.elapsed());
            Ok(Restored {
                pid: rep.pid,
                restore_ms: t.elapsed().as_millis() as u64,
            })
        }
        Err(e) => {
            tracing::warn!("restore failed: {e}");
            Err(e.to_string())
        }
    };
    let a = lock(&sess.rx).restore_finished(result)?;
    send_all(&sess.main, &a.send)?;
    // Serving starts once the source knows the job runs here (it sends the
    // rest only then); faults meanwhile wait in the kernel.
    Ok(match pager {
        Some(p) => Some(spawn("ferry-pager", move || p.run())?),
        None => None,
    })
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, MigrateError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| MigrateError::Io {
            what: format!("starting {name}"),
            source: e,
        })
}

/// The pager's way out for a job whose memory is (partly) filled from
/// pages held here: its requests for those pages go to the local feeder
/// (the receiver returned); with `remote` = (pages held here, the source's
/// connection) everything else goes to the source, without it (a lazy
/// restore after pre-copy) nothing does.
fn fault_router(
    remote: Option<(restore::PlannedPages, Arc<Mutex<Conn>>)>,
) -> (
    postcopy::SendFn,
    std::sync::mpsc::Receiver<wire::messages::PageRequest>,
) {
    let (req_tx, req_rx) = std::sync::mpsc::channel();
    let send: postcopy::SendFn = Box::new(move |msgs| {
        let mut out = Vec::new();
        for m in msgs {
            match (m, &remote) {
                (Message::PageRequest(q), None) => {
                    let _ = req_tx.send(*q);
                }
                (Message::PageRequest(q), Some((held, _)))
                    if lazyfill::holds(held, q.pid, q.addr) =>
                {
                    let _ = req_tx.send(*q);
                }
                (m, Some(_)) => out.push(m.clone()),
                (_, None) => {}
            }
        }
        match &remote {
            Some((_, main)) if !out.is_empty() => send_all(main, &out),
            _ => Ok(()),
        }
    });
    (send, req_rx)
}

/// Runs the pager of a lazily restored job and its local feeder, each on a
/// thread of its own.
fn start_lazy_fill(
    spaces: Vec<restore::postcopy::RegisteredSpace>,
    plans: &[wire::messages::PostcopyPlan],
    rep: &restore::Report,
    pages: Option<MemPages>,
) -> Result<(), MigrateError> {
    let pages = pages.ok_or_else(|| MigrateError::Internal("lazy restore without pages".into()))?;
    let (send, req_rx) = fault_router(None);
    // Shared memory is restored whole before the resume (plan() leaves it).
    let (p, inbox) = Pager::new(
        spaces,
        plans,
        Default::default(),
        &HashMap::new(),
        rep.pid,
        rep.wait_pid,
        send,
    )?;
    let pid = rep.pid;
    spawn("ferry-lazy-pager", move || {
        match p.run() {
        Ok(d) => tracing::info!(
            pid,
            "memory in place after {:.0} ms: {} pages, {} faults served (p50 {:.0} µs, p99 {:.0} µs)",
            d.last_page_ms,
            d.pages_placed,
            d.remote_faults,
            d.fault_latency_p50_us,
            d.fault_latency_p99_us
        ),
        Err(e) => tracing::warn!(pid, "lazy restore failed, the job was killed: {e}"),
    }
    })?;
    spawn("ferry-lazy-feed", move || {
        lazyfill::feed(pages, inbox, req_rx)
    })?;
    Ok(())
}

type PagerThread = std::thread::JoinHandle<Result<wire::messages::PostcopyDone, MigrateError>>;

/// The main connection during post-copy: page replies go to the pager,
/// which ends the session with PostcopyDone; a lost source makes the pager
/// kill the job.
fn serve_postcopy(
    r: &mut FrameReader<TcpStream>,
    sess: &Arc<Session>,
    pager: PagerThread,
) -> Result<(), MigrateError> {
    let Some(inbox) = lock(&sess.postcopy).clone() else {
        return Err(MigrateError::Internal("post-copy without a pager".into()));
    };
    let mut decoder = wire::BatchDecoder::new()?;
    let mut done = false;
    let lost = loop {
        let f = match r.read_frame() {
            Ok(f) => f.to_owned(),
            Err(e) => break format!("{e}"),
        };
        match f.ty {
            FrameType::PageBatch | FrameType::PageReply => {
                match postcopy::decode_batch(&mut decoder, f.payload) {
                    Ok(a) => inbox.send(postcopy::Input::Pages(a)),
                    Err(e) => break format!("bad page batch: {e}"),
                }
            }
            _ => match Message::decode(&f.as_frame()) {
                Ok(Message::Ping { seq }) => send_all(&sess.main, &[Message::Pong { seq }])?,
                Ok(Message::Ack) => {
                    done = true;
                    break String::new();
                }
                Ok(Message::Abort { reason }) | Ok(Message::Error { message: reason }) => {
                    break format!("the source aborted: {reason}")
                }
                Ok(m) => break format!("unexpected {} during post-copy", m.frame_type()),
                Err(e) => break format!("{e}"),
            },
        }
    };
    if !done {
        inbox.send(postcopy::Input::Lost(lost));
    }
    match pager.join() {
        Ok(Ok(d)) => {
            tracing::info!(
                "post-copy complete: {} pages, {} remote faults (p50 {:.0} µs, p99 {:.0} µs), last page after {:.0} ms",
                d.pages_placed,
                d.remote_faults,
                d.fault_latency_p50_us,
                d.fault_latency_p99_us,
                d.last_page_ms
            );
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::warn!("post-copy failed; the restored job was killed: {e}");
            Err(e)
        }
        Err(_) => Err(MigrateError::Internal("the pager panicked".into())),
    }
}
