//! The image model: everything ferry knows about a frozen process tree,
//! independent of how it is stored (directory) or sent (wire stream).
//!
//! Page *contents* are not part of the model; [`PageRun`]s say where each
//! populated page lives in the page store and how it is encoded.

use crate::sys::{ItimerVal, KernelSigaction, RseqConfig, StackT, UserRegs};
use serde::{Deserialize, Serialize};

/// The whole checkpoint: one tree of processes and the objects they share.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Inventory {
    /// Machine facts a restore must match.
    pub machine: MachineInfo,
    /// pid of the root of the checkpointed tree.
    pub root_pid: i32,
    /// Processes, parents before children.
    pub processes: Vec<ProcessImage>,
    /// Open file descriptions, shared by index from [`FdImage::file`].
    pub files: Vec<FileImage>,
    /// Pipes, by index from [`FileKind::Pipe`].
    pub pipes: Vec<PipeImage>,
    /// Contents of files deleted while open or mapped, by index.
    pub blobs: Vec<BlobRef>,
    /// Wall-clock time of the checkpoint, ns since the epoch.
    pub created_ns: u64,
    /// Set when the tree ran in a PID namespace made by `ferry run`: all
    /// pids in the image are then the namespace's, and restore recreates it.
    pub pidns: Option<PidNsImage>,
}

/// A job started by `ferry run`: its own PID namespace, whose init (pid 1)
/// is ferry's and is recreated rather than restored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PidNsImage {
    /// pid (inside the namespace) of the job's main process.
    pub main: i32,
}

/// What must be equal between the checkpointing and the restoring machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineInfo {
    pub kernel_release: String,
    pub hostname: String,
    pub page_size: u32,
    /// Size of the XSAVE area (CPUID 0xD,0 EBX).
    pub xstate_size: u32,
    /// XCR0: the enabled xstate features.
    pub xcr0: u64,
    /// Lengths of [vvar], [vvar_vclock] and [vdso] on this kernel.
    pub vdso_layout: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessImage {
    pub pid: i32,
    /// Raw wait status of a zombie (exited, not yet reaped by its parent);
    /// a zombie has no threads, memory or files.
    pub zombie: Option<i32>,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub exe: String,
    pub cwd: String,
    pub umask: u32,
    pub personality: u32,
    /// (resource, soft, hard) for every RLIMIT_*.
    pub rlimits: Vec<(u32, u64, u64)>,
    pub mm: MmFields,
    pub auxv: Vec<u8>,
    pub vmas: Vec<Vma>,
    /// Threads; the first is the thread-group leader.
    pub threads: Vec<ThreadImage>,
    /// `rt_sigaction` state for signals 1..=64, index = signal - 1.
    pub sigactions: Vec<KernelSigaction>,
    /// Process-wide pending signals, raw siginfo.
    pub shared_pending: Vec<Vec<u8>>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub itimers: [ItimerVal; 3],
    pub fds: Vec<FdImage>,
    /// Name of the page store file in the image directory.
    pub pages_file: String,
}

/// The mm fields `PR_SET_MM_MAP` restores.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThreadImage {
    pub tid: i32,
    pub regs: UserRegs,
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    pub sigaltstack: StackT,
    pub rseq: Option<RseqConfig>,
    pub tid_address: u64,
    /// (head, len) of the robust futex list.
    pub robust_list: (u64, u64),
    /// Thread-directed pending signals, raw siginfo.
    pub pending: Vec<Vec<u8>>,
}

/// One virtual memory area.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    /// MAP_SHARED (true) or MAP_PRIVATE.
    pub shared: bool,
    pub kind: VmaKind,
    /// madvise/mlock state to re-apply.
    pub advice: Advice,
    /// Populated pages and where their contents are.
    pub pages: Vec<PageRun>,
    /// Guard regions (MADV_GUARD_INSTALL), as (addr, pages).
    pub guards: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum VmaKind {
    /// Private anonymous memory (including [heap] and [stack]).
    Anon {
        name: Option<String>,
        heap: bool,
        stack: bool,
    },
    /// A mapping of a file; for private mappings, `pages` holds the pages
    /// the process changed (copy-on-write), the rest comes from the file.
    File {
        path: String,
        offset: u64,
        blob: Option<u32>,
    },
    /// Shared anonymous memory or memfd/shmem: all contents in `pages`.
    Shmem {
        name: String,
        offset: u64,
        size: u64,
        id: u64,
    },
    Vdso,
    Vvar,
    VvarVclock,
    Vsyscall,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Advice {
    pub growsdown: bool,
    pub locked: bool,
    pub dontfork: bool,
    pub wipeonfork: bool,
    pub dontdump: bool,
    pub hugepage: bool,
    pub nohugepage: bool,
    pub mergeable: bool,
}

/// A run of consecutive populated pages with one encoding.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRun {
    pub addr: u64,
    pub npages: u32,
    pub kind: PageKind,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum PageKind {
    /// Present but all zero: nothing stored.
    Zero,
    /// Raw contents at `offset` in the process's page store, with the
    /// CRC32C of the run's bytes.
    Data { offset: u64, crc: u32 },
}

/// One file descriptor of a process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdImage {
    pub fd: i32,
    pub cloexec: bool,
    /// Index into [`Inventory::files`]; fds sharing one open file share it.
    pub file: u32,
}

/// One open file description.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileImage {
    /// O_* status flags and access mode, as fdinfo shows them (no O_CLOEXEC).
    pub flags: u32,
    pub pos: u64,
    pub kind: FileKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file or directory reopened by path; `blob` holds the
    /// contents of a file that was deleted while open.
    Path {
        path: String,
        blob: Option<u32>,
        size: u64,
    },
    /// A character device reopened by path (/dev/null, /dev/zero, ...).
    CharDev { path: String, rdev: u64 },
    /// One end of a pipe in [`Inventory::pipes`].
    Pipe { pipe: u32, write_end: bool },
    /// A memfd: the shared-memory object `id` (as in [`VmaKind::Shmem`]);
    /// `blob` holds its contents when no mapping in the image covers them.
    Memfd {
        name: String,
        id: u64,
        size: u64,
        blob: Option<u32>,
    },
}

/// A pipe with the bytes buffered in it at checkpoint time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PipeImage {
    pub ino: u64,
    pub capacity: u32,
    pub data: Vec<u8>,
}

/// Contents stored in a separate file of the image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobRef {
    pub file: String,
    pub len: u64,
    pub crc: u32,
    /// Path the contents came from (for messages and re-creation).
    pub origin: String,
}

/// Identity of a shared-memory object (memfd, shared anonymous memory),
/// the same whether it is seen through a mapping or a descriptor.
pub fn shmem_id(dev_major: u32, dev_minor: u32, inode: u64) -> u64 {
    ((dev_major as u64) << 56) ^ ((dev_minor as u64) << 48) ^ inode
}

impl Inventory {
    /// The process with `pid`, if in the image.
    pub fn process(&self, pid: i32) -> Option<&ProcessImage> {
        self.processes.iter().find(|p| p.pid == pid)
    }
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    /// Pages with stored data or zero flags.
    pub fn populated_pages(&self) -> u64 {
        self.pages.iter().map(|r| r.npages as u64).sum()
    }
}
