//! Non-memory state of a process and its threads: registers, signals,
//! timers, rseq, TID address, robust list, mm fields, rlimits and the rest.
//! What only the process can read is read by remote syscalls.

use super::{remote_for, CheckpointError, Frozen};
use crate::image::{MachineInfo, MmFields, ProcessImage, ThreadImage};
use crate::proc;
use crate::remote::Remote;
use crate::sys::{self, ptrace, ItimerVal, KernelSigaction, StackT};

/// RLIMIT_CPU ..= RLIMIT_RTTIME.
const NLIMITS: u32 = 16;

fn read_pod<T: sys::Pod + Default>(r: &Remote, addr: u64) -> Result<T, CheckpointError> {
    let mut buf = vec![0u8; std::mem::size_of::<T>()];
    r.read(addr, &mut buf)?;
    Ok(sys::pod_from_bytes(&buf).unwrap_or_default())
}

fn pt(tid: i32, op: &'static str) -> impl FnOnce(std::io::Error) -> CheckpointError {
    move |source| CheckpointError::Ptrace { tid, op, source }
}

/// Captures everything of process `pid` except memory and descriptors.
pub fn capture_process(
    pid: i32,
    frozen: &Frozen,
    gadget: u64,
    machine: &MachineInfo,
) -> Result<ProcessImage, CheckpointError> {
    let stat = proc::read_stat(pid)?;
    let status = proc::read_status(pid)?;
    let mut leader = remote_for(pid, gadget)?;
    let scratch = leader.map_scratch(4096)?;
    let result = capture_with(
        pid,
        frozen,
        gadget,
        machine,
        &mut leader,
        scratch,
        &stat,
        &status,
    );
    // Always undo the scratch mapping and registers, even on error, so a
    // failed checkpoint leaves the process as it was.
    let undo = leader.unmap_scratch().and_then(|_| leader.finish());
    let img = result?;
    undo?;
    Ok(img)
}

#[allow(clippy::too_many_arguments)]
fn capture_with(
    pid: i32,
    frozen: &Frozen,
    gadget: u64,
    machine: &MachineInfo,
    leader: &mut Remote,
    scratch: u64,
    stat: &proc::StatInfo,
    status: &proc::StatusInfo,
) -> Result<ProcessImage, CheckpointError> {
    // Signal dispositions: only signals that are caught or ignored can
    // differ from the default, so only those cost a remote call.
    let mut sigactions = vec![KernelSigaction::default(); 64];
    for sig in 1..=64u64 {
        let bit = 1u64 << (sig - 1);
        if (status.sig_cgt | status.sig_ign) & bit == 0 {
            continue;
        }
        leader.syscall(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[sig, 0, scratch, 8],
        )?;
        sigactions[(sig - 1) as usize] = read_pod(leader, scratch)?;
    }
    let mut itimers = [ItimerVal::default(); 3];
    for (which, t) in itimers.iter_mut().enumerate() {
        leader.syscall("getitimer", libc::SYS_getitimer, &[which as u64, scratch])?;
        *t = read_pod(leader, scratch)?;
    }
    let brk = leader.syscall("brk", libc::SYS_brk, &[0])?;

    let mut threads = Vec::with_capacity(frozen.order.len());
    for &tid in &frozen.order {
        let t = if tid == pid {
            capture_thread(leader, frozen, machine, scratch)?
        } else {
            let mut r = remote_for(tid, gadget)?;
            r.use_scratch(scratch, 4096);
            let t = capture_thread(&mut r, frozen, machine, scratch);
            r.finish()?;
            t?
        };
        threads.push(t);
    }

    let mut rlimits = Vec::with_capacity(NLIMITS as usize);
    for res in 0..NLIMITS {
        let (cur, max) = sys::prlimit(pid, res, None).map_err(|source| CheckpointError::Io {
            pid,
            what: format!("prlimit({res})"),
            source,
        })?;
        rlimits.push((res, cur, max));
    }
    let shared_pending = ptrace::peek_siginfo(pid, true)
        .map_err(pt(pid, "PEEKSIGINFO"))?
        .into_iter()
        .map(|s| s.to_vec())
        .collect();
    let exe = proc::exe(pid)?.to_string_lossy().into_owned();
    if exe.ends_with(" (deleted)") {
        return Err(CheckpointError::Unsupported {
            pid,
            what: format!("its executable {exe}, which was deleted"),
        });
    }
    Ok(ProcessImage {
        pid,
        zombie: None,
        ppid: stat.ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        comm: proc::read_comm(pid)?,
        exe,
        cwd: proc::cwd(pid)?.to_string_lossy().into_owned(),
        umask: status.umask.unwrap_or(0o022),
        personality: proc::read_personality(pid)?,
        rlimits,
        mm: MmFields {
            start_code: stat.start_code,
            end_code: stat.end_code,
            start_data: stat.start_data,
            end_data: stat.end_data,
            start_brk: stat.start_brk,
            brk,
            start_stack: stat.start_stack,
            arg_start: stat.arg_start,
            arg_end: stat.arg_end,
            env_start: stat.env_start,
            env_end: stat.env_end,
        },
        auxv: proc::read_auxv(pid)?,
        vmas: Vec::new(),
        threads,
        sigactions,
        shared_pending,
        itimers,
        fds: Vec::new(),
        pages_file: format!("pages-{pid}.img"),
    })
}

fn capture_thread(
    r: &mut Remote,
    frozen: &Frozen,
    machine: &MachineInfo,
    scratch: u64,
) -> Result<ThreadImage, CheckpointError> {
    let tid = r.tid;
    r.syscall("sigaltstack", libc::SYS_sigaltstack, &[0, scratch])?;
    let sigaltstack: StackT = read_pod(r, scratch)?;
    r.syscall(
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        &[sys::PR_GET_TID_ADDRESS, scratch],
    )?;
    let tid_address: u64 = {
        let mut b = [0u8; 8];
        r.read(scratch, &mut b)?;
        u64::from_ne_bytes(b)
    };
    let robust_list = sys::get_robust_list(tid).map_err(pt(tid, "get_robust_list"))?;
    let rseq = ptrace::get_rseq_config(tid).map_err(pt(tid, "GET_RSEQ_CONFIGURATION"))?;
    let mut xstate = vec![0u8; machine.xstate_size as usize];
    let n = ptrace::get_xstate(tid, &mut xstate).map_err(pt(tid, "GETREGSET(XSTATE)"))?;
    xstate.truncate(n);
    let pending = ptrace::peek_siginfo(tid, false)
        .map_err(pt(tid, "PEEKSIGINFO"))?
        .into_iter()
        .map(|s| s.to_vec())
        .collect();
    Ok(ThreadImage {
        tid,
        regs: r.saved,
        xstate,
        sigmask: frozen.threads.get(&tid).copied().unwrap_or(0),
        sigaltstack,
        rseq: (rseq.rseq_abi_pointer != 0).then_some(rseq),
        tid_address,
        robust_list,
        pending,
    })
}
