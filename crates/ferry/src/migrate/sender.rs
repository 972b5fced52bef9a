//! Sending pages: read them from the running (or frozen) job with
//! `process_vm_readv` straight into the batch being built (no copy of
//! their own), compress them, and hand finished batches to a writer
//! thread that checksums and writes them, so reading the next batch
//! overlaps writing the last one.
//! With several page streams each connection has a sender thread; a page
//! always travels on the connection `wire::stream_for` picks, so a newer
//! copy never overtakes an older one.

use super::MigrateError;
use crate::sys::{self, RemoteRange, IOV_MAX, PAGE_SIZE};
use crate::wire::{BatchEncoder, Compression, FrameWriter, Message, WireError, WireStats};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

/// Pages read per `process_vm_readv` (1 MiB).
const READ_PAGES: usize = 256;
const PAGE: u64 = PAGE_SIZE as u64;
/// Batches in flight: one filling, one being written.
const ENCODERS: usize = 2;

pub type Conn = FrameWriter<Box<dyn Write + Send>>;

/// A finished batch going to the writer thread, or coming back written.
type Written = (BatchEncoder, Result<(), WireError>);

/// Batches pages onto one connection.
pub struct PageSender {
    /// Shared with the writer thread, which holds it for each batch;
    /// control messages are written here only once no batch is in flight.
    w: Arc<Mutex<Conn>>,
    /// The batch being filled.
    enc: BatchEncoder,
    /// Written batches back from the writer, ready for reuse.
    spare: Vec<BatchEncoder>,
    to_writer: Option<mpsc::SyncSender<BatchEncoder>>,
    from_writer: mpsc::Receiver<Written>,
    in_flight: usize,
    current: Option<(i32, u32)>,
    /// Pages of the last read that arrived (by index in the read).
    ok: Vec<bool>,
    ranges: Vec<RemoteRange>,
    mem: Option<(i32, File)>,
    /// PageBatch frames handed to the writer so far.
    pub batches: u64,
    /// Write batches on the calling thread (see [`PageSender::set_direct`]).
    direct: bool,
    cancel: Arc<AtomicBool>,
}

impl PageSender {
    pub fn new(
        w: Conn,
        compression: Compression,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, MigrateError> {
        let w = Arc::new(Mutex::new(w));
        let (to_writer, jobs) = mpsc::sync_channel::<BatchEncoder>(ENCODERS);
        let (done, from_writer) = mpsc::channel::<Written>();
        let conn = w.clone();
        std::thread::Builder::new()
            .name("ferry-writer".into())
            .spawn(move || {
                for mut enc in jobs {
                    let r = lock(&conn).write_batch(&mut enc);
                    let failed = r.is_err();
                    if done.send((enc, r)).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| MigrateError::Internal(format!("cannot start a page writer: {e}")))?;
        let mut spare = Vec::with_capacity(ENCODERS);
        for _ in 1..ENCODERS {
            spare.push(BatchEncoder::new(compression)?);
        }
        Ok(Self {
            w,
            enc: BatchEncoder::new(compression)?,
            spare,
            to_writer: Some(to_writer),
            from_writer,
            in_flight: 0,
            current: None,
            ok: Vec::with_capacity(READ_PAGES),
            ranges: Vec::with_capacity(IOV_MAX),
            mem: None,
            batches: 0,
            direct: false,
            cancel,
        })
    }

    /// Writes each batch on the calling thread when it is complete instead
    /// of handing it to the writer thread: for single pages that someone
    /// waits for (post-copy's answers to faults), where the hand-over
    /// costs more than it saves.
    pub fn set_direct(&mut self, direct: bool) -> Result<(), MigrateError> {
        self.drain()?;
        self.direct = direct;
        Ok(())
    }

    /// What every batch handed over so far carried (waits for the writer).
    pub fn stats(&mut self) -> WireStats {
        let _ = self.drain();
        let mut st = *self.enc.stats();
        for e in &self.spare {
            st += e.stats();
        }
        st
    }

    /// Frame bytes (headers included) written so far on the connection.
    pub fn bytes_written(&self) -> u64 {
        lock(&self.w).counters().1
    }

    /// Takes back one written batch; an error if writing it failed.
    fn reclaim_one(&mut self) -> Result<(), MigrateError> {
        let (enc, r) = self
            .from_writer
            .recv()
            .map_err(|_| MigrateError::Internal("the page writer thread ended".into()))?;
        self.spare.push(enc);
        self.in_flight -= 1;
        Ok(r?)
    }

    /// Waits until every batch handed over is written.
    fn drain(&mut self) -> Result<(), MigrateError> {
        while self.in_flight > 0 {
            self.reclaim_one()?;
        }
        Ok(())
    }

    /// Hands the batch being built (if any) to the writer and starts
    /// filling a spare one, waiting for one if all are in flight.
    fn write_batch(&mut self) -> Result<(), MigrateError> {
        if self.enc.is_empty() {
            return Ok(());
        }
        if self.direct {
            self.drain()?;
            lock(&self.w).write_batch(&mut self.enc)?;
            self.batches += 1;
            return Ok(());
        }
        while self.spare.is_empty() {
            self.reclaim_one()?;
        }
        let next = self.spare.pop().ok_or_else(|| {
            MigrateError::Internal("no spare page batch after the writer returned one".into())
        })?;
        let full = std::mem::replace(&mut self.enc, next);
        let tx = self
            .to_writer
            .as_ref()
            .ok_or_else(|| MigrateError::Internal("the page writer is closed".into()))?;
        if tx.send(full).is_err() {
            // The writer stopped after a failed write: report that error.
            self.drain()?;
            return Err(MigrateError::Internal(
                "the page writer thread ended".into(),
            ));
        }
        self.in_flight += 1;
        self.batches += 1;
        Ok(())
    }

    /// Writes a control message after every batch handed over so far.
    pub fn send_msg(&mut self, m: &Message) -> Result<(), MigrateError> {
        self.drain()?;
        let mut w = lock(&self.w);
        w.send(m)?;
        w.flush()?;
        Ok(())
    }

    /// Sends the pages at `pages` (sorted, distinct addresses) of process `pid` (as
    /// ferry sees it), labelled `vpid` (as the image numbers it) and `round`.
    pub fn send(
        &mut self,
        pid: i32,
        vpid: i32,
        round: u32,
        pages: &[u64],
    ) -> Result<(), MigrateError> {
        if self.current != Some((vpid, round)) {
            self.write_batch()?;
            self.enc.begin(vpid, round);
            self.current = Some((vpid, round));
        }
        let mut rest = pages;
        while !rest.is_empty() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(MigrateError::Cancelled);
            }
            // Read as many pages as the batch still takes (at most
            // READ_PAGES ≤ IOV_MAX, so the ranges always fit) into its room.
            let room = self.enc.page_slots(rest.len().min(READ_PAGES));
            let n = room.len() / PAGE_SIZE;
            let (chunk, later) = rest.split_at(n);
            rest = later;
            self.ranges.clear();
            for &a in chunk {
                sys::push_page_range(&mut self.ranges, a);
            }
            let want = n * PAGE_SIZE;
            let got = sys::process_vm_readv(pid, &mut room[..want], &self.ranges).unwrap_or(0);
            self.ok.clear();
            for (i, &addr) in chunk.iter().enumerate() {
                let ok = i * PAGE_SIZE + PAGE_SIZE <= got
                    // PROT_NONE pages, or a range that went away: try
                    // /proc/PID/mem page by page.
                    || read_slow(
                        &mut self.mem,
                        pid,
                        addr,
                        &mut room[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
                    );
                self.ok.push(ok);
            }
            let ok = &self.ok;
            self.enc.commit_slots(chunk, |i| ok[i])?;
            if self.enc.is_full() {
                self.write_batch()?;
                self.enc.begin(vpid, round);
            }
        }
        Ok(())
    }

    /// Writes what is pending and flushes; returns the batches written so far.
    pub fn end_round(&mut self) -> Result<u64, MigrateError> {
        self.write_batch()?;
        self.current = None;
        self.drain()?;
        lock(&self.w).flush()?;
        Ok(self.batches)
    }
}

impl Drop for PageSender {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread once it is idle.
        self.to_writer = None;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads one page through /proc/PID/mem (which ignores protections).
fn read_slow(mem: &mut Option<(i32, File)>, pid: i32, addr: u64, out: &mut [u8]) -> bool {
    if mem.as_ref().is_none_or(|(p, _)| *p != pid) {
        *mem = File::open(format!("/proc/{pid}/mem"))
            .ok()
            .map(|f| (pid, f));
    }
    match mem {
        Some((_, f)) => f.read_exact_at(out, addr).is_ok(),
        None => false,
    }
}

/// Work for a page-stream thread.
pub enum Cmd {
    Pages {
        pid: i32,
        vpid: i32,
        round: u32,
        pages: Vec<u64>,
    },
    EndRound(mpsc::Sender<Result<u64, String>>),
}

/// A page stream driven by its own thread.
pub struct Stream {
    pub tx: mpsc::Sender<Cmd>,
    pub handle: Option<std::thread::JoinHandle<WireStats>>,
}

impl Stream {
    pub fn spawn(mut s: PageSender, index: u16) -> Stream {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let handle = std::thread::Builder::new()
            .name(format!("ferry-stream-{index}"))
            .spawn(move || {
                let mut failed: Option<String> = None;
                for cmd in rx {
                    match cmd {
                        Cmd::Pages {
                            pid,
                            vpid,
                            round,
                            pages,
                        } => {
                            if failed.is_none() {
                                if let Err(e) = s.send(pid, vpid, round, &pages) {
                                    failed = Some(format!("page stream {index}: {e}"));
                                }
                            }
                        }
                        Cmd::EndRound(reply) => {
                            let r = match &failed {
                                Some(e) => Err(e.clone()),
                                None => s
                                    .end_round()
                                    .map_err(|e| format!("page stream {index}: {e}")),
                            };
                            let _ = reply.send(r);
                        }
                    }
                }
                s.stats()
            })
            .ok();
        Stream { tx, handle }
    }
}

/// Pages spread to their connection: index 0 the main connection.
pub fn split_by_stream(vpid: i32, pages: &[u64], streams: u16, out: &mut [Vec<u64>]) {
    for v in out.iter_mut() {
        v.clear();
    }
    for &a in pages {
        let i = crate::wire::stream_for(vpid, a, streams) as usize;
        out[i].push(a);
    }
}

/// Page addresses of dirty ranges, in order.
pub fn expand(ranges: &[crate::track::DirtyRange], out: &mut Vec<u64>) {
    for r in ranges {
        for k in 0..r.npages {
            out.push(r.start + k * PAGE);
        }
    }
}
