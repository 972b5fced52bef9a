//! Kernel ABI structures and constants not (reliably) in the libc crate,
//! with their sizes checked at compile time.

use serde::{Deserialize, Serialize};

/// Marker for `#[repr(C)]` kernel structs made only of integers, which any
/// bit pattern makes valid.
///
/// # Safety
/// Implementors must be `repr(C)`, contain only integer fields and have no
/// padding bytes.
pub unsafe trait Pod: Copy + 'static {}

/// `struct user_regs_struct` (x86_64), the `NT_PRSTATUS` regset.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}
const _: () = assert!(std::mem::size_of::<UserRegs>() == 216);
// SAFETY: repr(C), 27 u64 fields, no padding.
unsafe impl Pod for UserRegs {}

/// `struct clone_args` (clone3), version with `cgroup` (88 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}
const _: () = assert!(std::mem::size_of::<CloneArgs>() == 88);
// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for CloneArgs {}

/// `struct ptrace_rseq_configuration`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}
const _: () = assert!(std::mem::size_of::<RseqConfig>() == 24);
// SAFETY: repr(C), integer fields, no padding (8+4+4+4+4).
unsafe impl Pod for RseqConfig {}

/// `struct prctl_mm_map` for `PR_SET_MM_MAP`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PrctlMmMap {
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
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}
const _: () = assert!(std::mem::size_of::<PrctlMmMap>() == 104);
// SAFETY: repr(C), integer fields, no padding (12*8 + 2*4).
unsafe impl Pod for PrctlMmMap {}

/// The kernel's `struct sigaction` as `rt_sigaction` takes it on x86_64.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}
const _: () = assert!(std::mem::size_of::<KernelSigaction>() == 32);
// SAFETY: repr(C), u64 fields only.
unsafe impl Pod for KernelSigaction {}

/// `stack_t` for `sigaltstack`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackT {
    pub ss_sp: u64,
    pub ss_flags: i32,
    pub pad: u32,
    pub ss_size: u64,
}
const _: () = assert!(std::mem::size_of::<StackT>() == 24);
// SAFETY: repr(C), integer fields with explicit padding field.
unsafe impl Pod for StackT {}

/// `struct itimerval` (two timevals).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItimerVal {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}
const _: () = assert!(std::mem::size_of::<ItimerVal>() == 32);
// SAFETY: repr(C), i64 fields only.
unsafe impl Pod for ItimerVal {}

/// `struct ptrace_peeksiginfo_args`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PeekSiginfoArgs {
    pub off: u64,
    pub flags: u32,
    pub nr: i32,
}
const _: () = assert!(std::mem::size_of::<PeekSiginfoArgs>() == 16);
// SAFETY: repr(C), integer fields, no padding.
unsafe impl Pod for PeekSiginfoArgs {}

/// Raw `siginfo_t` (128 bytes); ferry stores and replays it opaquely.
pub const SIGINFO_SIZE: usize = 128;

pub const PTRACE_GET_RSEQ_CONFIGURATION: u32 = 0x420f;
pub const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
pub const NT_PRSTATUS: u32 = 1;
pub const NT_X86_XSTATE: u32 = 0x202;
pub const ARCH_MAP_VDSO_64: u64 = 0x2003;
pub const PR_SET_MM: u64 = 35;
pub const PR_SET_MM_MAP: u64 = 14;
pub const PR_SET_MM_MAP_SIZE: u64 = 15;
pub const PR_GET_TID_ADDRESS: u64 = 40;
pub const RSEQ_FLAG_UNREGISTER: u64 = 1;
pub const MADV_GUARD_INSTALL: u64 = 102;
pub const MAP_FIXED_NOREPLACE: u64 = 0x100000;
/// Restart codes a syscall interrupted by a stop leaves in `rax`.
pub const ERESTARTSYS: i64 = -512;
pub const ERESTARTNOINTR: i64 = -513;
pub const ERESTARTNOHAND: i64 = -514;
pub const ERESTART_RESTARTBLOCK: i64 = -516;
/// Highest user address + 1 with 4-level paging.
pub const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Signal mask with every signal blocked (SIGKILL and SIGSTOP cannot be).
pub const ALL_SIGNALS: u64 = !((1u64 << (libc::SIGKILL - 1)) | (1u64 << (libc::SIGSTOP - 1)));
