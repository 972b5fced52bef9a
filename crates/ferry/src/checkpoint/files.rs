//! File descriptors: regular files (deleted ones with their contents),
//! character devices such as /dev/null, and pipes whose both ends are in
//! the checkpointed tree, with the bytes buffered in them.

use super::CheckpointError;
use crate::image::{FdImage, FileImage, FileKind, ImageDir, Inventory, PipeImage};
use crate::proc;
use crate::sys;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// Character devices that carry no state and can simply be reopened.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

const O_CLOEXEC: u32 = libc::O_CLOEXEC as u32;

/// Captures the descriptors of `pid`, adding the open files they refer to
/// to `inv`. `tree` lists every pid being checkpointed (pipe ends held by
/// processes outside it make the checkpoint refuse).
/// Open files seen so far in the tree, to find descriptors that share one
/// open file description (dup, or inherited across fork).
#[derive(Default)]
pub struct Collector {
    /// (pid, fd, ino, mnt_id, file index)
    seen: Vec<(i32, i32, u64, u64, u32)>,
}

impl Collector {
    pub fn capture(
        &mut self,
        pid: i32,
        tree: &[i32],
        maps: &[crate::proc::MapEntry],
        img: &ImageDir,
        inv: &mut Inventory,
    ) -> Result<Vec<FdImage>, CheckpointError> {
        let unsupported = |fd: i32, what: String| CheckpointError::Unsupported {
            pid,
            what: format!("fd {fd} ({what})"),
        };
        let mut out = Vec::new();
        // (pid, fd, ino, mnt) of every fd seen, to find shared open files.
        let seen = &mut self.seen;
        let mut pidfd = None;
        for fd in proc::list_fds(pid)? {
            let target = proc::fd_target(pid, fd)?;
            let info = proc::read_fdinfo(pid, fd)?;
            let cloexec = info.flags & O_CLOEXEC != 0;
            let flags = info.flags & !O_CLOEXEC;
            // One open file description shared by several fds (dup, fork).
            if let Some(&(_, _, _, _, idx)) = seen.iter().find(|&&(p, f, ino, mnt, _)| {
                ino == info.ino
                    && mnt == info.mnt_id
                    && sys::kcmp_same_file(p, f, pid, fd).unwrap_or(false)
            }) {
                out.push(FdImage {
                    fd,
                    cloexec,
                    file: idx,
                });
                continue;
            }
            let kind = if let Some(rest) = target.strip_prefix("pipe:[") {
                let ino: u64 = rest.trim_end_matches(']').parse().unwrap_or(0);
                check_pipe_ends(pid, tree, ino).map_err(|w| unsupported(fd, w))?;
                let write_end = flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
                let idx = match inv.pipes.iter().position(|p| p.ino == ino) {
                    Some(i) => i,
                    None => {
                        if pidfd.is_none() {
                            pidfd = Some(sys::pidfd_open(pid).map_err(|source| {
                                CheckpointError::Io {
                                    pid,
                                    what: "pidfd_open".into(),
                                    source,
                                }
                            })?);
                        }
                        let pfd = pidfd.as_ref().expect("opened above");
                        let p = capture_pipe(pid, fd, pfd, ino)?;
                        inv.pipes.push(p);
                        inv.pipes.len() - 1
                    }
                };
                FileKind::Pipe {
                    pipe: idx as u32,
                    write_end,
                }
            } else if target.starts_with('/') {
                let link = format!("/proc/{pid}/fd/{fd}");
                let meta = std::fs::metadata(&link).map_err(|source| CheckpointError::Io {
                    pid,
                    what: format!("stat fd {fd}"),
                    source,
                })?;
                let ft = meta.file_type();
                let deleted = target.ends_with(" (deleted)");
                let path = target.trim_end_matches(" (deleted)").to_string();
                if ft.is_char_device() {
                    if !STATELESS_DEVICES.contains(&path.as_str()) || deleted {
                        return Err(unsupported(fd, format!("the character device {path}")));
                    }
                    FileKind::CharDev {
                        path,
                        rdev: meta.rdev(),
                    }
                } else if ft.is_file() || ft.is_dir() {
                    if path.starts_with("/memfd:") {
                        let dev = meta.dev();
                        let (major, minor) = (
                            (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32,
                            ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32,
                        );
                        let id = crate::image::shmem_id(major, minor, meta.ino());
                        let mapped = maps.iter().any(|m| {
                            m.is_shmem()
                                && crate::image::shmem_id(m.dev_major, m.dev_minor, m.inode) == id
                        });
                        let blob = if mapped {
                            None
                        } else {
                            let data =
                                std::fs::read(&link).map_err(|source| CheckpointError::Io {
                                    pid,
                                    what: format!("read memfd of fd {fd}"),
                                    source,
                                })?;
                            let name = format!("blob-{}.img", inv.blobs.len());
                            inv.blobs.push(img.write_blob(&name, &path, &data)?);
                            Some((inv.blobs.len() - 1) as u32)
                        };
                        inv.files.push(FileImage {
                            flags,
                            pos: info.pos,
                            kind: FileKind::Memfd {
                                name: path,
                                id,
                                size: meta.len(),
                                blob,
                            },
                        });
                        let idx = (inv.files.len() - 1) as u32;
                        seen.push((pid, fd, info.ino, info.mnt_id, idx));
                        out.push(FdImage {
                            fd,
                            cloexec,
                            file: idx,
                        });
                        continue;
                    }
                    let blob = if deleted && ft.is_file() {
                        let mut data = Vec::new();
                        std::fs::File::open(&link)
                            .and_then(|mut f| f.read_to_end(&mut data))
                            .map_err(|source| CheckpointError::Io {
                                pid,
                                what: format!("read deleted file of fd {fd}"),
                                source,
                            })?;
                        let name = format!("blob-{}.img", inv.blobs.len());
                        inv.blobs.push(img.write_blob(&name, &path, &data)?);
                        Some((inv.blobs.len() - 1) as u32)
                    } else {
                        None
                    };
                    if deleted && ft.is_dir() {
                        return Err(unsupported(fd, format!("deleted directory {path}")));
                    }
                    FileKind::Path {
                        path,
                        blob,
                        size: meta.len(),
                    }
                } else {
                    return Err(unsupported(
                        fd,
                        format!("{target}, a FIFO or other special file"),
                    ));
                }
            } else {
                let what = if target.starts_with("socket:") {
                    format!("a socket, {target}")
                } else {
                    target.clone()
                };
                return Err(unsupported(fd, what));
            };
            inv.files.push(FileImage {
                flags,
                pos: info.pos,
                kind,
            });
            let idx = (inv.files.len() - 1) as u32;
            seen.push((pid, fd, info.ino, info.mnt_id, idx));
            out.push(FdImage {
                fd,
                cloexec,
                file: idx,
            });
        }
        Ok(out)
    }
}

/// A pipe can be restored only if no process outside the tree holds it.
fn check_pipe_ends(pid: i32, tree: &[i32], ino: u64) -> Result<(), String> {
    let want = format!("pipe:[{ino}]");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Ok(());
    };
    for e in dir.flatten() {
        let Some(other) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tree.contains(&other) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for f in fds.flatten() {
            if std::fs::read_link(f.path()).is_ok_and(|l| l.as_os_str() == want.as_str()) {
                return Err(format!("{want}, whose other end is held by process {other} outside the checkpoint (pid {pid})"));
            }
        }
    }
    Ok(())
}

/// Copies the bytes buffered in a pipe without consuming them (tee).
fn capture_pipe(
    pid: i32,
    fd: i32,
    pidfd: &std::os::fd::OwnedFd,
    ino: u64,
) -> Result<PipeImage, CheckpointError> {
    let io = |what: &str| {
        let what = format!("pipe fd {fd}: {what}");
        move |source| CheckpointError::Io { pid, what, source }
    };
    let theirs = sys::pidfd_getfd(pidfd, fd).map_err(io("pidfd_getfd"))?;
    let capacity = sys::fcntl_int(theirs.as_raw_fd(), libc::F_GETPIPE_SZ, 0)
        .map_err(io("F_GETPIPE_SZ"))? as u32;
    let queued = sys::fionread(theirs.as_raw_fd()).unwrap_or(0);
    let mut data = Vec::with_capacity(queued);
    if queued > 0 {
        // tee() needs a readable end; a write-end fd reopened through /proc
        // gives one onto the same pipe.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/{pid}/fd/{fd}"))
            .map_err(io("reopen for reading"))?;
        let (mine_r, mine_w) = sys::pipe().map_err(io("pipe"))?;
        let _ = sys::fcntl_int(mine_w.as_raw_fd(), libc::F_SETPIPE_SZ, capacity as i32);
        let n =
            sys::tee(reader.as_raw_fd(), mine_w.as_raw_fd(), queued, true).map_err(io("tee"))?;
        drop(mine_w);
        let mut f = std::fs::File::from(mine_r);
        f.read_to_end(&mut data).map_err(io("read"))?;
        data.truncate(n);
    }
    Ok(PipeImage {
        ino,
        capacity,
        data,
    })
}

use std::os::unix::fs::OpenOptionsExt;
