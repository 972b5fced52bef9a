//! /proc/PID/maps and /proc/PID/smaps.
//!
//! Line format (fs/proc/task_mmu.c `show_map_vma`):
//! `start-end perms offset major:minor inode`, then, only if the VMA has a
//! name, padding and the name. File names are printed with `\n` escaped as
//! `\012` and nothing else escaped, so a name is kept exactly as printed.

use super::vmflags::VmFlags;
use super::{dec_u64, hex_u64, pid_path, read_text, ProcError};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// Size of the pages that `MapEntry::pages` counts (x86_64 base pages).
const PAGE_SIZE: u64 = 4096;

/// The `rwxp` column of a maps line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Perms {
    /// `r`: PROT_READ.
    pub read: bool,
    /// `w`: PROT_WRITE.
    pub write: bool,
    /// `x`: PROT_EXEC.
    pub exec: bool,
    /// `s` (MAP_SHARED) rather than `p` (MAP_PRIVATE).
    pub shared: bool,
}

impl Perms {
    /// Parses the 4-character column; `None` unless it is exactly `[r-][w-][x-][sp]`.
    pub fn parse(s: &str) -> Option<Perms> {
        let b = s.as_bytes();
        let &[r, w, x, s] = b else { return None };
        let flag = |c: u8, yes: u8| match c {
            c if c == yes => Some(true),
            b'-' => Some(false),
            _ => None,
        };
        Some(Perms {
            read: flag(r, b'r')?,
            write: flag(w, b'w')?,
            exec: flag(x, b'x')?,
            shared: match s {
                b's' => true,
                b'p' => false,
                _ => return None,
            },
        })
    }

    /// The `PROT_*` bits for mmap/mprotect.
    pub fn prot(&self) -> i32 {
        let mut prot = libc::PROT_NONE;
        if self.read {
            prot |= libc::PROT_READ;
        }
        if self.write {
            prot |= libc::PROT_WRITE;
        }
        if self.exec {
            prot |= libc::PROT_EXEC;
        }
        prot
    }
}

/// Formats as the kernel does, e.g. `r-xp`.
impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |on: bool, ch: char| if on { ch } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x'),
            if self.shared { 's' } else { 'p' }
        )
    }
}

/// A kernel-named mapping (`[...]` with no backing inode).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Special {
    /// `[heap]`: the brk area.
    Heap,
    /// `[stack]`: the main thread's stack.
    Stack,
    /// `[vdso]`: the vDSO code.
    Vdso,
    /// `[vvar]`: vDSO data pages.
    Vvar,
    /// `[vvar_vclock]`: vDSO clock pages (split out of `[vvar]` in 6.x).
    VvarVclock,
    /// `[vsyscall]`: the legacy fixed-address page.
    Vsyscall,
    /// Any other bracketed name, verbatim with brackets (`[uprobes]`, ...).
    Other(String),
}

/// What kind of shmem object backs a shared-memory mapping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ShmemKind {
    /// `mmap(MAP_SHARED|MAP_ANONYMOUS)` or a shared map of /dev/zero.
    DevZero,
    /// A SysV segment; `key` is the IPC key (0 for IPC_PRIVATE).
    SysV {
        /// The IPC key from the `/SYSVxxxxxxxx` name.
        key: u32,
    },
    /// A memfd; `name` is the name given to memfd_create.
    Memfd {
        /// The memfd name, without the `memfd:` prefix.
        name: String,
    },
    /// Shared anonymous memory named with PR_SET_VMA_ANON_NAME.
    AnonShmem {
        /// The name given to prctl.
        name: String,
    },
}

/// One VMA, from a maps line (plus its `VmFlags` when read from smaps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Protection and sharing.
    pub perms: Perms,
    /// Offset into the backing file, in bytes.
    pub offset: u64,
    /// Major number of the backing file's device (0 for anon and shmem).
    pub dev_major: u32,
    /// Minor number of the backing file's device.
    pub dev_minor: u32,
    /// Backing inode; 0 for anonymous memory, but also for SysV segment 0.
    pub inode: u64,
    /// The name column without padding and without a ` (deleted)` suffix;
    /// `None` for plain anonymous memory.
    pub path: Option<String>,
    /// The name ended in ` (deleted)`: the file was unlinked (always so for
    /// shmem and memfd). Use /proc/PID/map_files to reach it.
    pub deleted: bool,
    /// Flags from smaps; `None` when parsed from maps.
    pub vm_flags: Option<VmFlags>,
}

impl MapEntry {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range is empty (never true for a real VMA).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Length in 4096-byte pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE
    }

    /// Whether `addr` lies inside the VMA.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The kind of kernel-named mapping, if this is one. Named anonymous
    /// memory (`[anon:...]`, `[anon_shmem:...]`) is ordinary memory, not special.
    pub fn special(&self) -> Option<Special> {
        let name = self.path.as_deref()?;
        if self.inode != 0 || !name.starts_with('[') || !name.ends_with(']') {
            return None;
        }
        if name.starts_with("[anon:") || name.starts_with("[anon_shmem:") {
            return None;
        }
        Some(match name {
            "[heap]" => Special::Heap,
            "[stack]" => Special::Stack,
            "[vdso]" => Special::Vdso,
            "[vvar]" => Special::Vvar,
            "[vvar_vclock]" => Special::VvarVclock,
            "[vsyscall]" => Special::Vsyscall,
            other => Special::Other(other.to_string()),
        })
    }

    /// Whether this is anonymous memory not backed by a shmem object (so its
    /// pages live only in this process): no name, `[heap]`, `[stack]` or a
    /// prctl `[anon:NAME]`, all with inode 0.
    pub fn is_anon(&self) -> bool {
        if self.inode != 0 {
            return false;
        }
        match self.path.as_deref() {
            None => true,
            Some(p) => {
                p == "[heap]"
                    || p == "[stack]"
                    || p.starts_with("[anon:")
                    || p.starts_with("[stack:")
            }
        }
    }

    /// Whether the mapping is backed by a shmem object (shared anonymous
    /// memory, SysV shm, memfd), whose contents live outside the process.
    pub fn is_shmem(&self) -> bool {
        self.shmem_kind().is_some()
    }

    /// Which shmem object backs the mapping. Needs device major 0 so a real
    /// file called e.g. /dev/zero on a disk is not mistaken for shmem; the
    /// inode is not checked because SysV segment 0 is shown with inode 0.
    pub fn shmem_kind(&self) -> Option<ShmemKind> {
        if self.dev_major != 0 {
            return None;
        }
        let p = self.path.as_deref()?;
        if p == "/dev/zero" {
            Some(ShmemKind::DevZero)
        } else if let Some(key) = p.strip_prefix("/SYSV") {
            let key = u32::try_from(hex_u64(key)?).ok()?;
            Some(ShmemKind::SysV { key })
        } else if let Some(name) = p.strip_prefix("/memfd:") {
            Some(ShmemKind::Memfd {
                name: name.to_string(),
            })
        } else {
            let name = p.strip_prefix("[anon_shmem:")?.strip_suffix(']')?;
            Some(ShmemKind::AnonShmem {
                name: name.to_string(),
            })
        }
    }

    /// The prctl name of named private anonymous memory (`[anon:NAME]`).
    pub fn anon_name(&self) -> Option<&str> {
        self.path
            .as_deref()?
            .strip_prefix("[anon:")?
            .strip_suffix(']')
    }
}

/// Parses /proc/PID/maps text; errors name the file "maps".
pub fn parse_maps(text: &str) -> Result<Vec<MapEntry>, ProcError> {
    parse_maps_at(Path::new("maps"), text)
}

/// Parses /proc/PID/maps text; errors name `path`.
pub fn parse_maps_at(path: &Path, text: &str) -> Result<Vec<MapEntry>, ProcError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if !line.trim().is_empty() {
            out.push(parse_line(path, i + 1, line)?);
        }
    }
    Ok(out)
}

/// Parses /proc/PID/smaps text (maps headers followed by `Key: value`
/// lines, of which only `VmFlags` is kept); errors name the file "smaps".
pub fn parse_smaps(text: &str) -> Result<Vec<MapEntry>, ProcError> {
    parse_smaps_at(Path::new("smaps"), text)
}

/// Parses /proc/PID/smaps text; errors name `path`.
pub fn parse_smaps_at(path: &Path, text: &str) -> Result<Vec<MapEntry>, ProcError> {
    let mut out: Vec<MapEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        // A header starts with the address range, which never contains ':'.
        if !first.ends_with(':') {
            out.push(parse_line(path, i + 1, line)?);
            continue;
        }
        let Some(entry) = out.last_mut() else {
            return Err(ProcError::parse(path, i + 1, "field before any mapping"));
        };
        if first == "VmFlags:" {
            entry.vm_flags = Some(VmFlags::from_smaps_line(line));
        }
    }
    Ok(out)
}

/// Reads and parses /proc/PID/maps.
pub fn read_maps(pid: i32) -> Result<Vec<MapEntry>, ProcError> {
    let path = pid_path(pid, "maps");
    parse_maps_at(&path, &read_text(pid, &path)?)
}

/// Reads and parses /proc/PID/smaps (slower than maps: the kernel walks
/// the page tables to compute the sizes we then ignore).
pub fn read_smaps(pid: i32) -> Result<Vec<MapEntry>, ProcError> {
    let path = pid_path(pid, "smaps");
    parse_smaps_at(&path, &read_text(pid, &path)?)
}

/// Splits off the next space-separated field; the rest keeps its spaces
/// because the name column may itself contain spaces.
fn next_field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    Some(s.split_once(' ').unwrap_or((s, "")))
}

fn parse_line(path: &Path, lineno: usize, line: &str) -> Result<MapEntry, ProcError> {
    let err = |what: String| ProcError::parse(path, lineno, what);
    let field = |rest, name| {
        next_field(rest).ok_or_else(|| ProcError::parse(path, lineno, format!("missing {name}")))
    };
    let (range, rest) = field(line, "address range")?;
    let (perms, rest) = field(rest, "permissions")?;
    let (offset, rest) = field(rest, "offset")?;
    let (dev, rest) = field(rest, "device")?;
    let (inode, rest) = field(rest, "inode")?;

    let (start, end) = range
        .split_once('-')
        .and_then(|(s, e)| Some((hex_u64(s)?, hex_u64(e)?)))
        .ok_or_else(|| err(format!("bad address range {range:?}")))?;
    if end < start {
        return Err(err(format!(
            "address range {range:?} ends before it starts"
        )));
    }
    let perms = Perms::parse(perms).ok_or_else(|| err(format!("bad permissions {perms:?}")))?;
    let offset = hex_u64(offset).ok_or_else(|| err(format!("bad offset {offset:?}")))?;
    let (dev_major, dev_minor) = dev
        .split_once(':')
        .and_then(|(ma, mi)| {
            let ma = u32::try_from(hex_u64(ma)?).ok()?;
            let mi = u32::try_from(hex_u64(mi)?).ok()?;
            Some((ma, mi))
        })
        .ok_or_else(|| err(format!("bad device {dev:?}")))?;
    let inode = dec_u64(inode).ok_or_else(|| err(format!("bad inode {inode:?}")))?;

    // Names starting with a space cannot be told apart from the padding;
    // map_files gives the exact file when that matters.
    let name = rest.trim_start_matches(' ');
    let (path_col, deleted) = match name.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (name, false),
    };
    Ok(MapEntry {
        start,
        end,
        perms,
        offset,
        dev_major,
        dev_minor,
        inode,
        path: (!path_col.is_empty()).then(|| path_col.to_string()),
        deleted,
        vm_flags: None,
    })
}

#[cfg(test)]
#[path = "maps_tests.rs"]
mod tests;
