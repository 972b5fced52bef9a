//! Sending pages: read them from the running (or frozen) job with
//! `process_vm_readv` straight into the batch being built (no copy of
//! their own), compress and write them on one connection.
//! With several page streams each connection has a sender thread; a page
//! always travels on the connection `wire::stream_for` picks, so a newer
//! copy never overtakes an older one.

use super::MigrateError;
use crate::sys::{self, RemoteRange, IOV_MAX, PAGE_SIZE};
use crate::wire::{BatchEncoder, Compression, FrameWriter, WireStats};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

/// Pages read per `process_vm_readv` (1 MiB).
const READ_PAGES: usize = 256;
const PAGE: u64 = PAGE_SIZE as u64;

pub type Conn = FrameWriter<Box<dyn Write + Send>>;

/// Batches pages onto one connection.
pub struct PageSender {
    pub w: Conn,
    enc: BatchEncoder,
    current: Option<(i32, u32)>,
    /// Pages of the last read that arrived (by index in the read).
    ok: Vec<bool>,
    ranges: Vec<RemoteRange>,
    mem: Option<(i32, File)>,
    /// PageBatch frames written so far.
    pub batches: u64,
    cancel: Arc<AtomicBool>,
}

impl PageSender {
    pub fn new(
        w: Conn,
        compression: Compression,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, MigrateError> {
        Ok(Self {
            w,
            enc: BatchEncoder::new(compression)?,
            current: None,
            ok: Vec::with_capacity(READ_PAGES),
            ranges: Vec::with_capacity(IOV_MAX),
            mem: None,
            batches: 0,
            cancel,
        })
    }

    pub fn stats(&self) -> &WireStats {
        self.enc.stats()
    }

    fn write_batch(&mut self) -> Result<(), MigrateError> {
        if !self.enc.is_empty() {
            self.w.write_batch(&mut self.enc)?;
            self.batches += 1;
        }
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
        self.w.flush()?;
        Ok(self.batches)
    }
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
                *s.stats()
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
