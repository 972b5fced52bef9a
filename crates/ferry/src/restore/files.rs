//! Recreating descriptors: every open file description is created once in
//! the stub (parked above the highest wanted fd so it cannot collide with
//! a target number), then dup3'd to each fd that shares it.

use super::stub::Stub;
use super::RestoreError;
use crate::image::{FileKind, ImageDir, Inventory, ProcessImage};
use crate::sys;
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Flags that only make sense when a file is first created.
const CREATE_ONLY: u32 = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32;

pub fn restore(
    st: &mut Stub,
    img: &ImageDir,
    inv: &Inventory,
    p: &ProcessImage,
) -> Result<(), RestoreError> {
    if p.fds.is_empty() {
        return Ok(());
    }
    let max_fd = p.fds.iter().map(|f| f.fd).max().unwrap_or(0) as u64;
    // Room for the parked descriptors above every target fd.
    // Descriptors opened along the way take the lowest free numbers, which
    // stay below 2 per fd (pipe ends) + 1; parking starts above that.
    let mut park = max_fd + 1 + 2 * p.fds.len() as u64 + 8;
    let need = park + p.fds.len() as u64 + 16;
    let (cur, max) = sys::prlimit(st.pid, libc::RLIMIT_NOFILE, None).unwrap_or((1024, 1024));
    if cur < need {
        let _ = sys::prlimit(
            st.pid,
            libc::RLIMIT_NOFILE,
            Some((need.max(cur), max.max(need))),
        );
    }
    // file index → parked fd in the stub
    let mut parked: HashMap<u32, u64> = HashMap::new();
    // pipe index → (read end, write end) parked
    let mut pipes: HashMap<u32, (u64, u64)> = HashMap::new();
    for f in &p.fds {
        if parked.contains_key(&f.file) {
            continue;
        }
        let file = &inv.files[f.file as usize];
        let is_pipe = matches!(file.kind, FileKind::Pipe { .. });
        let fd = match &file.kind {
            FileKind::Path { path, blob, .. } => {
                let open_path = match blob {
                    Some(b) => recreate_deleted(st, img, inv, *b, path)?,
                    None => path.clone(),
                };
                let fd = open(st, &open_path, file.flags & !CREATE_ONLY, f.fd)?;
                if file.pos > 0 {
                    st.call(
                        "lseek",
                        libc::SYS_lseek,
                        &[fd, file.pos, libc::SEEK_SET as u64],
                    )?;
                }
                fd
            }
            FileKind::CharDev { path, .. } => open(st, path, file.flags & !CREATE_ONLY, f.fd)?,
            FileKind::Pipe { pipe, write_end } => {
                let ends = match pipes.get(pipe) {
                    Some(&e) => e,
                    None => {
                        let e = make_pipe(st, inv, *pipe)?;
                        pipes.insert(*pipe, e);
                        e
                    }
                };
                let fd = if *write_end { ends.1 } else { ends.0 };
                // O_NONBLOCK and friends live in the open file description.
                st.call(
                    "fcntl(F_SETFL)",
                    libc::SYS_fcntl,
                    &[fd, libc::F_SETFL as u64, file.flags as u64],
                )?;
                fd
            }
        };
        let target = park;
        park += 1;
        st.call("dup3", libc::SYS_dup3, &[fd, target, 0])?;
        if !is_pipe {
            st.call("close", libc::SYS_close, &[fd])?;
        }
        parked.insert(f.file, target);
    }
    for (_, (r, w)) in pipes.drain() {
        // Pipe ends not wanted by any fd (e.g. a read end whose fd the
        // process had closed) are dropped; the parked copies stay.
        for fd in [r, w] {
            st.call("close", libc::SYS_close, &[fd])?;
        }
    }
    for f in &p.fds {
        let from = parked[&f.file];
        let flags = if f.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        st.call("dup3", libc::SYS_dup3, &[from, f.fd as u64, flags])?;
    }
    for (_, fd) in parked {
        st.call("close", libc::SYS_close, &[fd])?;
    }
    Ok(())
}

fn open(st: &mut Stub, path: &str, flags: u32, fd: i32) -> Result<u64, RestoreError> {
    st.r.reset_scratch();
    let p = st.r.put_cstr(path)?;
    let r =
        st.r.syscall_raw("open", libc::SYS_open, &[p, flags as u64, 0])?;
    if r.0 < 0 {
        return Err(RestoreError::Step {
            pid: st.pid,
            what: format!("fd {fd} ({path})"),
            why: std::io::Error::from_raw_os_error(-r.0 as i32).to_string(),
        });
    }
    Ok(r.0 as u64)
}

/// Creates a pipe in the stub and refills it from the tracker side.
fn make_pipe(st: &mut Stub, inv: &Inventory, pipe: u32) -> Result<(u64, u64), RestoreError> {
    let img = &inv.pipes[pipe as usize];
    st.r.reset_scratch();
    let fds = st.r.reserve(8)?;
    st.call("pipe2", libc::SYS_pipe2, &[fds, 0])?;
    let mut b = [0u8; 8];
    st.r.read(fds, &mut b)?;
    let r = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let w = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]) as u64;
    if img.capacity > 0 {
        let _ = st.r.syscall_raw(
            "fcntl(F_SETPIPE_SZ)",
            libc::SYS_fcntl,
            &[w, libc::F_SETPIPE_SZ as u64, img.capacity as u64],
        );
    }
    if !img.data.is_empty() {
        let mine = sys::pidfd_getfd(&st.pidfd, w as i32).map_err(|e| RestoreError::Step {
            pid: st.pid,
            what: format!("pipe {}", img.ino),
            why: format!("pidfd_getfd: {e}"),
        })?;
        let mut f = std::fs::File::from(mine);
        let _ = sys::fcntl_int(f.as_raw_fd(), libc::F_SETFL, 0);
        f.write_all(&img.data).map_err(|e| RestoreError::Step {
            pid: st.pid,
            what: format!("pipe {} contents", img.ino),
            why: e.to_string(),
        })?;
    }
    Ok((r, w))
}

/// Writes the saved contents of a deleted file next to where it was (or in
/// /tmp), to be opened and then unlinked again.
fn recreate_deleted(
    st: &mut Stub,
    img: &ImageDir,
    inv: &Inventory,
    blob: u32,
    path: &str,
) -> Result<String, RestoreError> {
    let data = img.read_blob(&inv.blobs[blob as usize])?;
    let orig = Path::new(path);
    let dir = orig
        .parent()
        .filter(|d| d.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let name = orig
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.ferry-{}-{blob}", st.pid));
    std::fs::write(&tmp, &data).map_err(|e| RestoreError::Missing {
        path: tmp.clone(),
        why: format!("cannot recreate deleted file {path}: {e}"),
    })?;
    st.temp_files.push(tmp.clone());
    Ok(tmp.to_string_lossy().into_owned())
}
