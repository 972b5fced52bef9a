//! Every open file description of the image, opened once by ferry itself:
//! regular files at their offset, devices, pipes refilled with their data,
//! and memfds standing in for shared memory. Each process then receives
//! the ones it uses over SCM_RIGHTS, so descriptors shared across fork or
//! dup share one open file again, offset and flags included.

use super::RestoreError;
use crate::image::{FileKind, ImageDir, Inventory, VmaKind};
use crate::sys;
use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Flags that only make sense when a file is first created.
const CREATE_ONLY: i32 = libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC;

pub struct FileTable {
    /// By index into `Inventory::files`.
    files: Vec<OwnedFd>,
    /// Shared-memory object id → memfd.
    shmem: HashMap<u64, OwnedFd>,
    /// Recreated deleted files, unlinked once everything is open.
    temp: Vec<PathBuf>,
}

fn step(what: String, e: impl std::fmt::Display) -> RestoreError {
    RestoreError::Step {
        pid: 0,
        what,
        why: e.to_string(),
    }
}

impl FileTable {
    pub fn open(img: &ImageDir, inv: &Inventory) -> Result<Self, RestoreError> {
        let mut t = FileTable {
            files: Vec::with_capacity(inv.files.len()),
            shmem: HashMap::new(),
            temp: Vec::new(),
        };
        // Shared memory: one memfd per object, as large as its furthest use
        // (a mapping, or the size a memfd descriptor saw).
        let mut sizes: HashMap<u64, u64> = HashMap::new();
        for p in &inv.processes {
            for v in &p.vmas {
                if let VmaKind::Shmem { id, offset, .. } = v.kind {
                    let e = sizes.entry(id).or_insert(0);
                    *e = (*e).max(offset + v.len());
                }
            }
        }
        for f in &inv.files {
            if let FileKind::Memfd { id, size, .. } = f.kind {
                let e = sizes.entry(id).or_insert(0);
                *e = (*e).max(size);
            }
        }
        for (id, size) in sizes {
            let fd =
                sys::memfd_create("ferry-shmem").map_err(|e| step("shared memory".into(), e))?;
            let f = std::fs::File::from(fd);
            f.set_len(size)
                .map_err(|e| step("shared memory size".into(), e))?;
            t.shmem.insert(id, OwnedFd::from(f));
        }
        let mut pipe_ends: HashMap<u32, (Option<OwnedFd>, Option<OwnedFd>)> = HashMap::new();
        for (i, f) in inv.files.iter().enumerate() {
            let fd = match &f.kind {
                FileKind::Path { path, blob, .. } => {
                    let open_path = match blob {
                        Some(b) => t.recreate_deleted(img, inv, *b, path)?,
                        None => PathBuf::from(path),
                    };
                    let mut file = open_with_flags(&open_path, f.flags)
                        .map_err(|e| step(format!("file {path}"), e))?;
                    if f.pos > 0 {
                        file.seek(SeekFrom::Start(f.pos))
                            .map_err(|e| step(format!("offset {} of {path}", f.pos), e))?;
                    }
                    OwnedFd::from(file)
                }
                FileKind::Memfd { id, blob, name, .. } => {
                    let Some(obj) = t.shmem.get(id) else {
                        return Err(step(format!("memfd {name}"), "object missing"));
                    };
                    if let Some(b) = blob {
                        let data = img.read_blob(&inv.blobs[*b as usize])?;
                        use std::os::unix::fs::FileExt;
                        let f = std::fs::File::from(
                            obj.try_clone()
                                .map_err(|e| step(format!("memfd {name}"), e))?,
                        );
                        f.write_all_at(&data, 0)
                            .map_err(|e| step(format!("memfd {name} contents"), e))?;
                    }
                    // A descriptor of its own on the same object (its own offset).
                    let path = PathBuf::from(format!("/proc/self/fd/{}", obj.as_raw_fd()));
                    let mut file = open_with_flags(&path, f.flags)
                        .map_err(|e| step(format!("memfd {name}"), e))?;
                    if f.pos > 0 {
                        file.seek(SeekFrom::Start(f.pos))
                            .map_err(|e| step(format!("offset of memfd {name}"), e))?;
                    }
                    OwnedFd::from(file)
                }
                FileKind::CharDev { path, .. } => OwnedFd::from(
                    open_with_flags(Path::new(path), f.flags)
                        .map_err(|e| step(format!("device {path}"), e))?,
                ),
                FileKind::Pipe { pipe, write_end } => {
                    let ends = match pipe_ends.get_mut(pipe) {
                        Some(e) => e,
                        None => {
                            let (r, w) = make_pipe(inv, *pipe)?;
                            pipe_ends.entry(*pipe).or_insert((Some(r), Some(w)))
                        }
                    };
                    let end = if *write_end {
                        ends.1.take()
                    } else {
                        ends.0.take()
                    };
                    // A second description of the same end (a FIFO-style reopen)
                    // gets a duplicate of the same end.
                    let end = match end {
                        Some(e) => e,
                        None => return Err(step(format!("file #{i}"), "pipe end described twice")),
                    };
                    // O_NONBLOCK and friends belong to the open file description.
                    let _ = sys::fcntl_int(end.as_raw_fd(), libc::F_SETFL, f.flags as i32);
                    end
                }
            };
            t.files.push(fd);
        }
        Ok(t)
    }

    pub fn file(&self, idx: u32) -> RawFd {
        self.files[idx as usize].as_raw_fd()
    }

    pub fn shmem(&self, id: u64) -> Option<RawFd> {
        self.shmem.get(&id).map(|f| f.as_raw_fd())
    }

    /// A descriptor of ferry's own on every shared-memory object.
    pub fn dup_shmem(&self) -> Result<HashMap<u64, std::sync::Arc<OwnedFd>>, RestoreError> {
        self.shmem
            .iter()
            .map(|(&id, fd)| {
                fd.try_clone()
                    .map(|d| (id, std::sync::Arc::new(d)))
                    .map_err(|e| step("shared memory descriptor".into(), e))
            })
            .collect()
    }

    /// Removes recreated deleted files once every process has them open.
    pub fn unlink_temp(&mut self) {
        for f in self.temp.drain(..) {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Writes the saved contents of a deleted file next to where it was (or
    /// in /tmp), to be opened and then unlinked again.
    fn recreate_deleted(
        &mut self,
        img: &ImageDir,
        inv: &Inventory,
        blob: u32,
        path: &str,
    ) -> Result<PathBuf, RestoreError> {
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
        let tmp = dir.join(format!(".{name}.ferry-{}-{blob}", sys::getpid()));
        std::fs::write(&tmp, &data).map_err(|e| RestoreError::Missing {
            path: tmp.clone(),
            why: format!("cannot recreate deleted file {path}: {e}"),
        })?;
        self.temp.push(tmp.clone());
        Ok(tmp)
    }
}

impl Drop for FileTable {
    fn drop(&mut self) {
        self.unlink_temp();
    }
}

fn open_with_flags(path: &Path, flags: u32) -> std::io::Result<std::fs::File> {
    let acc = flags as i32 & libc::O_ACCMODE;
    std::fs::OpenOptions::new()
        .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
        .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
        .custom_flags((flags as i32) & !(CREATE_ONLY | libc::O_ACCMODE))
        .open(path)
}

/// A pipe of the image's capacity holding the image's bytes.
fn make_pipe(inv: &Inventory, pipe: u32) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    let img = &inv.pipes[pipe as usize];
    let (r, w) = sys::pipe().map_err(|e| step(format!("pipe {}", img.ino), e))?;
    if img.capacity > 0 {
        let _ = sys::fcntl_int(w.as_raw_fd(), libc::F_SETPIPE_SZ, img.capacity as i32);
    }
    let mut f = std::fs::File::from(w);
    f.write_all(&img.data)
        .map_err(|e| step(format!("pipe {} contents", img.ino), e))?;
    Ok((r, OwnedFd::from(f)))
}
