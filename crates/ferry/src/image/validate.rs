//! Semantic checks on a decoded inventory. A checksum proves the bytes are
//! what ferry wrote; these checks make sure that restore can trust every
//! index, address and length in it even if it was crafted by hand.

use super::{FileKind, ImageError, Inventory, PageKind, ProcessImage, VmaKind};
use crate::sys::{PAGE_SIZE, TASK_SIZE};
use std::path::Path;

/// Largest pipe buffer the kernel allows by default (fs.pipe-max-size).
const MAX_PIPE: usize = 1 << 20;

pub fn inventory(path: &Path, inv: &Inventory) -> Result<(), ImageError> {
    let bad = |why: String| {
        Err(ImageError::Corrupt {
            path: path.to_path_buf(),
            why,
        })
    };
    if inv.machine.page_size as usize != PAGE_SIZE {
        return bad(format!("page size {}", inv.machine.page_size));
    }
    if inv.machine.xstate_size < 576 || inv.machine.xstate_size > 1 << 16 {
        return bad(format!("xstate size {}", inv.machine.xstate_size));
    }
    if inv.process(inv.root_pid).is_none() {
        return bad(format!(
            "root pid {} is not among the processes",
            inv.root_pid
        ));
    }
    let mut pids: Vec<i32> = inv.processes.iter().map(|p| p.pid).collect();
    pids.sort_unstable();
    if pids.windows(2).any(|w| w[0] == w[1]) || pids.iter().any(|&p| p <= 0) {
        return bad("duplicate or invalid pids".into());
    }
    for p in &inv.pipes {
        // More data than the pipe holds would block the refill forever.
        if p.data.len() > p.capacity as usize || p.capacity as usize > MAX_PIPE {
            return bad(format!(
                "pipe {} holds {} bytes in a capacity of {}",
                p.ino,
                p.data.len(),
                p.capacity
            ));
        }
    }
    for b in &inv.blobs {
        if !plain_name(&b.file) {
            return bad(format!("blob name {:?}", b.file));
        }
    }
    for f in &inv.files {
        match &f.kind {
            FileKind::Pipe { pipe, .. } if *pipe as usize >= inv.pipes.len() => {
                return bad(format!(
                    "file refers to pipe #{pipe} of {}",
                    inv.pipes.len()
                ))
            }
            FileKind::Path { blob: Some(b), .. } | FileKind::Memfd { blob: Some(b), .. }
                if *b as usize >= inv.blobs.len() =>
            {
                return bad(format!("file refers to blob #{b} of {}", inv.blobs.len()))
            }
            _ => {}
        }
    }
    // Parents come before their children, so restore can fork each process
    // from its already-created parent.
    for (i, p) in inv.processes.iter().enumerate() {
        let parent_later = inv.processes[i..].iter().any(|q| q.pid == p.ppid);
        if parent_later && p.pid != inv.root_pid {
            return bad(format!(
                "process {} is listed before its parent {}",
                p.pid, p.ppid
            ));
        }
        if p.pid == inv.root_pid && i != 0 {
            return bad("the root process is not first".into());
        }
    }
    for p in &inv.processes {
        if let Err(why) = process(inv, p) {
            return bad(format!("process {}: {why}", p.pid));
        }
    }
    Ok(())
}

fn process(inv: &Inventory, p: &ProcessImage) -> Result<(), String> {
    if p.zombie.is_some() {
        if !p.threads.is_empty() || !p.vmas.is_empty() || !p.fds.is_empty() {
            return Err("a zombie with threads, memory or files".into());
        }
        return Ok(());
    }
    let first = p.threads.first().ok_or("no threads")?;
    if first.tid != p.pid {
        return Err(format!("first thread {} is not the leader", first.tid));
    }
    for t in &p.threads {
        if t.xstate.len() != inv.machine.xstate_size as usize {
            return Err(format!(
                "thread {} xstate of {} bytes",
                t.tid,
                t.xstate.len()
            ));
        }
        if t.pending
            .iter()
            .any(|s| s.len() != crate::sys::SIGINFO_SIZE)
        {
            return Err(format!("thread {} has a malformed siginfo", t.tid));
        }
    }
    if p.sigactions.len() > 64 || p.shared_pending.iter().any(|s| s.len() != 128) {
        return Err("malformed signal state".into());
    }
    if !plain_name(&p.pages_file) {
        return Err(format!("page store name {:?}", p.pages_file));
    }
    let mut prev_end = 0u64;
    for v in &p.vmas {
        let aligned = v.start % PAGE_SIZE as u64 == 0 && v.end % PAGE_SIZE as u64 == 0;
        let in_range =
            v.start < v.end && (v.end <= TASK_SIZE || matches!(v.kind, VmaKind::Vsyscall));
        if !aligned || !in_range || v.start < prev_end {
            return Err(format!("bad area {:#x}-{:#x}", v.start, v.end));
        }
        prev_end = v.end;
        if let VmaKind::File { blob: Some(b), .. } = v.kind {
            if b as usize >= inv.blobs.len() {
                return Err(format!("area {:#x} refers to blob #{b}", v.start));
            }
        }
        let mut last = v.start;
        for r in &v.pages {
            let len = (r.npages as u64) * PAGE_SIZE as u64;
            let end = r.addr.checked_add(len).ok_or("page run overflows")?;
            if r.npages == 0 || r.addr < last || end > v.end || r.addr % PAGE_SIZE as u64 != 0 {
                return Err(format!(
                    "page run {:#x}+{} outside area {:#x}-{:#x}",
                    r.addr, r.npages, v.start, v.end
                ));
            }
            last = end;
        }
        for &(addr, n) in &v.guards {
            let end = n
                .checked_mul(PAGE_SIZE as u64)
                .and_then(|len| addr.checked_add(len));
            if n == 0
                || addr % PAGE_SIZE as u64 != 0
                || addr < v.start
                || end.is_none_or(|e| e > v.end)
            {
                return Err(format!(
                    "guard region {addr:#x}+{n} outside area {:#x}-{:#x}",
                    v.start, v.end
                ));
            }
        }
    }
    for f in &p.fds {
        if f.fd < 0 || f.file as usize >= inv.files.len() {
            return Err(format!("fd {} refers to file #{}", f.fd, f.file));
        }
    }
    Ok(())
}

/// A file name inside the image directory: no path, no `.` or `..`.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Every data run must lie inside the page store.
pub fn page_offsets(path: &Path, p: &ProcessImage, payload_len: u64) -> Result<(), ImageError> {
    for v in &p.vmas {
        for r in &v.pages {
            if let PageKind::Data { offset, .. } = r.kind {
                let len = r.npages as u64 * PAGE_SIZE as u64;
                if offset.checked_add(len).is_none_or(|e| e > payload_len) {
                    return Err(ImageError::Corrupt {
                        path: path.to_path_buf(),
                        why: format!("pages of {:#x} lie beyond the end of the store", r.addr),
                    });
                }
            }
        }
    }
    Ok(())
}
