//! Images: the model of a checkpointed process tree ([`model`]), its
//! on-disk container ([`format`]), and the image directory that holds an
//! inventory, one page store per process and blobs.

pub mod format;
pub mod model;
mod validate;

pub use model::*;

use format::{FileKindTag, HEADER_LEN};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Name of the inventory file inside an image directory.
pub const INVENTORY: &str = "inventory.img";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: corrupt image: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("{}: image format version {found}, this ferry reads version {supported}", path.display())]
    Version {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error("cannot encode image metadata: {0}")]
    Encode(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An image directory.
#[derive(Debug, Clone)]
pub struct ImageDir {
    pub dir: PathBuf,
}

impl ImageDir {
    /// Opens (and creates, when `create`) an image directory.
    pub fn new(dir: &Path, create: bool) -> Result<Self, ImageError> {
        if create {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        } else if !dir.is_dir() {
            return Err(ImageError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such image directory",
                ),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes the inventory (last, so a directory without one is incomplete).
    pub fn write_inventory(&self, inv: &Inventory) -> Result<u64, ImageError> {
        let bytes = format::encode(FileKindTag::Inventory, inv)?;
        let path = self.path(INVENTORY);
        let tmp = self.path("inventory.img.tmp");
        std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(bytes.len() as u64)
    }

    /// Reads and validates the inventory and the files it refers to.
    pub fn read_inventory(&self) -> Result<Inventory, ImageError> {
        let path = self.path(INVENTORY);
        let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
        if meta.len() > format::MAX_INVENTORY + HEADER_LEN as u64 {
            return Err(ImageError::Corrupt {
                path,
                why: format!(
                    "inventory of {} bytes is larger than any ferry writes",
                    meta.len()
                ),
            });
        }
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let inv: Inventory =
            format::decode(&path, FileKindTag::Inventory, &bytes, format::MAX_INVENTORY)?;
        validate::inventory(&path, &inv)?;
        for p in inv.processes.iter().filter(|p| p.zombie.is_none()) {
            let store = PageStoreReader::open(&self.path(&p.pages_file))?;
            validate::page_offsets(&store.path, p, store.payload_len)?;
        }
        Ok(inv)
    }

    /// Stores `data` as a blob file, returning its reference.
    pub fn write_blob(&self, name: &str, origin: &str, data: &[u8]) -> Result<BlobRef, ImageError> {
        let path = self.path(name);
        let crc = crc32c::crc32c(data);
        let mut f = File::create(&path).map_err(io_err(&path))?;
        f.write_all(&format::header(FileKindTag::Blob, data.len() as u64, crc))
            .and_then(|_| f.write_all(data))
            .map_err(io_err(&path))?;
        Ok(BlobRef {
            file: name.to_string(),
            len: data.len() as u64,
            crc,
            origin: origin.to_string(),
        })
    }

    /// Reads and checks a blob.
    pub fn read_blob(&self, blob: &BlobRef) -> Result<Vec<u8>, ImageError> {
        let path = self.path(&blob.file);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let h = format::parse_header(&path, &bytes, FileKindTag::Blob, bytes.len() as u64)?;
        let data = &bytes[HEADER_LEN..];
        if h.payload_len != blob.len
            || crc32c::crc32c(data) != blob.crc
            || h.payload_crc != blob.crc
        {
            return Err(ImageError::Corrupt {
                path,
                why: "blob length or checksum mismatch".into(),
            });
        }
        Ok(data.to_vec())
    }
}

/// Checks an inventory that did not come from a file (e.g. received over
/// the wire) as strictly as [`ImageDir::read_inventory`] checks one that did.
pub fn validate_inventory(inv: &Inventory) -> Result<(), ImageError> {
    validate::inventory(Path::new("<received inventory>"), inv)
}

/// Appends page data to a process's page store.
pub struct PageStoreWriter {
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
}

impl PageStoreWriter {
    pub fn create(path: &Path) -> Result<Self, ImageError> {
        let mut f = File::create(path).map_err(io_err(path))?;
        // Placeholder header; the real one is written by `finish` once the
        // payload length is known.
        f.write_all(&[0u8; HEADER_LEN]).map_err(io_err(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            // Small buffer: the dumper appends whole stretches of pages, which
            // BufWriter passes straight to the file without copying.
            out: BufWriter::with_capacity(64 << 10, f),
            len: 0,
        })
    }

    /// Appends bytes, returning their offset in the payload.
    pub fn append(&mut self, data: &[u8]) -> Result<u64, ImageError> {
        let off = self.len;
        self.out.write_all(data).map_err(io_err(&self.path))?;
        self.len += data.len() as u64;
        Ok(off)
    }

    /// Writes the final header; returns the payload length.
    pub fn finish(self) -> Result<u64, ImageError> {
        let path = self.path;
        let mut f = self
            .out
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        f.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        f.write_all(&format::header(FileKindTag::Pages, self.len, 0))
            .map_err(io_err(&path))?;
        Ok(self.len)
    }
}

/// Reads runs out of a page store, checking each run's CRC.
pub struct PageStoreReader {
    pub path: PathBuf,
    file: File,
    pub payload_len: u64,
}

impl PageStoreReader {
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut hdr = [0u8; HEADER_LEN];
        let n = file.read_at(&mut hdr, 0).map_err(io_err(path))?;
        let h = format::parse_header(path, &hdr[..n], FileKindTag::Pages, len)?;
        // Runs carry their own CRCs; the header's payload CRC is always 0.
        if h.payload_crc != 0 {
            return Err(ImageError::Corrupt {
                path: path.to_path_buf(),
                why: "page store header has a payload checksum".into(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            payload_len: h.payload_len,
        })
    }

    /// Streams a run of `len` bytes at payload offset `offset` through
    /// `chunk` (a reused buffer, at most its length at a time), handing each
    /// piece to `sink` with its offset within the run, and checks `crc` at
    /// the end. Long runs never need a buffer of their own size.
    pub fn read_run_chunked<E: From<ImageError>>(
        &self,
        offset: u64,
        len: u64,
        crc: u32,
        chunk: &mut [u8],
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.payload_len) || chunk.is_empty() {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                why: format!("page run at {offset}+{len} lies outside the store"),
            }
            .into());
        }
        let mut done = 0u64;
        let mut sum = 0u32;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            let piece = &mut chunk[..n];
            self.file
                .read_exact_at(piece, HEADER_LEN as u64 + offset + done)
                .map_err(io_err(&self.path))?;
            sum = crc32c::crc32c_append(sum, piece);
            sink(done, piece)?;
            done += n as u64;
        }
        if sum != crc {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                why: format!("checksum mismatch in page data at offset {offset}"),
            }
            .into());
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at payload offset `offset` and checks `crc`.
    pub fn read_run(&self, offset: u64, crc: u32, buf: &mut [u8]) -> Result<(), ImageError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.payload_len) {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                why: format!("page run at {offset}+{} lies outside the store", buf.len()),
            });
        }
        self.file
            .read_exact_at(buf, HEADER_LEN as u64 + offset)
            .map_err(io_err(&self.path))?;
        if crc32c::crc32c(buf) != crc {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                why: format!("checksum mismatch in page data at offset {offset}"),
            });
        }
        Ok(())
    }
}

/// Minimal model values for unit tests elsewhere in the crate.
#[cfg(test)]
pub mod tests_support {
    use super::*;

    pub fn process(pid: i32, vmas: Vec<Vma>) -> ProcessImage {
        ProcessImage {
            pid,
            zombie: None,
            ppid: 1,
            pgid: pid,
            sid: pid,
            comm: "test".into(),
            exe: "/bin/true".into(),
            cwd: "/".into(),
            umask: 0o22,
            personality: 0,
            rlimits: Vec::new(),
            mm: MmFields::default(),
            auxv: Vec::new(),
            vmas,
            threads: Vec::new(),
            sigactions: Vec::new(),
            shared_pending: Vec::new(),
            itimers: Default::default(),
            fds: Vec::new(),
            pages_file: format!("pages-{pid}.img"),
        }
    }

    /// An inventory of `processes`, with no files.
    pub fn inventory(processes: Vec<ProcessImage>) -> Inventory {
        Inventory {
            machine: MachineInfo {
                kernel_release: "test".into(),
                hostname: "test".into(),
                page_size: 4096,
                xstate_size: 0,
                xcr0: 0,
                vdso_layout: Vec::new(),
            },
            root_pid: processes.first().map_or(1, |p| p.pid),
            processes,
            files: Vec::new(),
            pipes: Vec::new(),
            blobs: Vec::new(),
            created_ns: 0,
            pidns: None,
        }
    }

    /// A mapping of shared object `id` from byte `offset`.
    pub fn shmem_vma(start: u64, end: u64, id: u64, offset: u64) -> Vma {
        Vma {
            start,
            end,
            prot: 3,
            shared: true,
            kind: VmaKind::Shmem {
                name: "/dev/zero (deleted)".into(),
                offset,
                size: offset + (end - start),
                id,
            },
            advice: Advice::default(),
            pages: Vec::new(),
            guards: Vec::new(),
        }
    }
}
