//! /proc/PID/status and /proc/PID/task/TID/status.

use super::{dec_u64, hex_u64, oct_u32, pid_path, read_text, ProcError};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::str::FromStr;

/// The fields of /proc/PID/status that ferry uses.
///
/// Name, State, Tgid, Pid, Uid and Gid are present for every task, even
/// zombies and kernel threads, and are required; every other field falls
/// back to the value documented on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// `Name`: the comm, with the kernel's `\n` and `\\` escapes undone.
    pub name: String,
    /// `Umask`; `None` when absent (zombies, tasks without an fs_struct).
    pub umask: Option<u32>,
    /// `State`: the state letter.
    pub state: char,
    /// `Tgid`: the thread group (process) id.
    pub tgid: i32,
    /// `Pid`: the thread id.
    pub pid: i32,
    /// `PPid`: parent pid (0 if absent).
    pub ppid: i32,
    /// `TracerPid`: pid of the ptracer, 0 if none (or absent).
    pub tracer_pid: i32,
    /// `Uid`: real, effective, saved, filesystem.
    pub uid: [u32; 4],
    /// `Gid`: real, effective, saved, filesystem.
    pub gid: [u32; 4],
    /// `Groups`: supplementary groups (empty if absent).
    pub groups: Vec<u32>,
    /// `NStgid`: tgid in each pid namespace, outermost first (empty if absent).
    pub ns_tgid: Vec<i32>,
    /// `NSpid`: pid in each pid namespace, outermost first.
    pub ns_pid: Vec<i32>,
    /// `NSpgid`: process group id in each pid namespace.
    pub ns_pgid: Vec<i32>,
    /// `NSsid`: session id in each pid namespace.
    pub ns_sid: Vec<i32>,
    /// `Threads`: threads in the group (0 if absent).
    pub threads: u32,
    /// `SigPnd`: signals pending for this thread.
    pub sig_pnd: u64,
    /// `ShdPnd`: signals pending for the whole group.
    pub shd_pnd: u64,
    /// `SigBlk`: blocked mask.
    pub sig_blk: u64,
    /// `SigIgn`: ignored mask.
    pub sig_ign: u64,
    /// `SigCgt`: signals with a handler.
    pub sig_cgt: u64,
    /// `CapInh`: inheritable capabilities.
    pub cap_inh: u64,
    /// `CapPrm`: permitted capabilities.
    pub cap_prm: u64,
    /// `CapEff`: effective capabilities.
    pub cap_eff: u64,
    /// `CapBnd`: bounding set.
    pub cap_bnd: u64,
    /// `CapAmb`: ambient capabilities.
    pub cap_amb: u64,
    /// `NoNewPrivs` (false if absent).
    pub no_new_privs: bool,
    /// `Seccomp`: 0 off, 1 strict, 2 filter (0 if absent).
    pub seccomp: u32,
}

/// Parses status text; errors name the file "status".
pub fn parse_status(text: &str) -> Result<StatusInfo, ProcError> {
    parse_status_at(Path::new("status"), text)
}

/// Parses status text; errors name `path`. Unknown keys are ignored.
pub fn parse_status_at(path: &Path, text: &str) -> Result<StatusInfo, ProcError> {
    let mut s = StatusInfo {
        name: String::new(),
        umask: None,
        state: '?',
        tgid: 0,
        pid: 0,
        ppid: 0,
        tracer_pid: 0,
        uid: [0; 4],
        gid: [0; 4],
        groups: Vec::new(),
        ns_tgid: Vec::new(),
        ns_pid: Vec::new(),
        ns_pgid: Vec::new(),
        ns_sid: Vec::new(),
        threads: 0,
        sig_pnd: 0,
        shd_pnd: 0,
        sig_blk: 0,
        sig_ign: 0,
        sig_cgt: 0,
        cap_inh: 0,
        cap_prm: 0,
        cap_eff: 0,
        cap_bnd: 0,
        cap_amb: 0,
        no_new_privs: false,
        seccomp: 0,
    };
    let mut seen = Seen::default();

    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| ProcError::parse(path, i + 1, format!("bad {what}: {line:?}"));
        let Some((key, raw)) = line.split_once(':') else {
            return Err(ProcError::parse(path, i + 1, format!("no ':' in {line:?}")));
        };
        let v = raw.trim();
        match key {
            // The name is printed raw after one tab, except for two escapes;
            // trimming would eat spaces that belong to it.
            "Name" => {
                s.name = unescape_name(raw.strip_prefix('\t').unwrap_or(raw));
                seen.name = true;
            }
            "Umask" => s.umask = Some(oct_u32(v).ok_or_else(|| bad("Umask"))?),
            "State" => {
                s.state = v.chars().next().ok_or_else(|| bad("State"))?;
                seen.state = true;
            }
            "Tgid" => {
                s.tgid = v.parse().map_err(|_| bad("Tgid"))?;
                seen.tgid = true;
            }
            "Pid" => {
                s.pid = v.parse().map_err(|_| bad("Pid"))?;
                seen.pid = true;
            }
            "PPid" => s.ppid = v.parse().map_err(|_| bad("PPid"))?,
            "TracerPid" => s.tracer_pid = v.parse().map_err(|_| bad("TracerPid"))?,
            "Uid" => {
                s.uid = ids4(v).ok_or_else(|| bad("Uid"))?;
                seen.uid = true;
            }
            "Gid" => {
                s.gid = ids4(v).ok_or_else(|| bad("Gid"))?;
                seen.gid = true;
            }
            "Groups" => s.groups = list(v).ok_or_else(|| bad("Groups"))?,
            "NStgid" => s.ns_tgid = list(v).ok_or_else(|| bad("NStgid"))?,
            "NSpid" => s.ns_pid = list(v).ok_or_else(|| bad("NSpid"))?,
            "NSpgid" => s.ns_pgid = list(v).ok_or_else(|| bad("NSpgid"))?,
            "NSsid" => s.ns_sid = list(v).ok_or_else(|| bad("NSsid"))?,
            "Threads" => {
                let n = dec_u64(v).and_then(|n| u32::try_from(n).ok());
                s.threads = n.ok_or_else(|| bad("Threads"))?;
            }
            "SigPnd" => s.sig_pnd = hex_u64(v).ok_or_else(|| bad("SigPnd"))?,
            "ShdPnd" => s.shd_pnd = hex_u64(v).ok_or_else(|| bad("ShdPnd"))?,
            "SigBlk" => s.sig_blk = hex_u64(v).ok_or_else(|| bad("SigBlk"))?,
            "SigIgn" => s.sig_ign = hex_u64(v).ok_or_else(|| bad("SigIgn"))?,
            "SigCgt" => s.sig_cgt = hex_u64(v).ok_or_else(|| bad("SigCgt"))?,
            "CapInh" => s.cap_inh = hex_u64(v).ok_or_else(|| bad("CapInh"))?,
            "CapPrm" => s.cap_prm = hex_u64(v).ok_or_else(|| bad("CapPrm"))?,
            "CapEff" => s.cap_eff = hex_u64(v).ok_or_else(|| bad("CapEff"))?,
            "CapBnd" => s.cap_bnd = hex_u64(v).ok_or_else(|| bad("CapBnd"))?,
            "CapAmb" => s.cap_amb = hex_u64(v).ok_or_else(|| bad("CapAmb"))?,
            "NoNewPrivs" => {
                s.no_new_privs = match v {
                    "0" => false,
                    "1" => true,
                    _ => return Err(bad("NoNewPrivs")),
                }
            }
            "Seccomp" => {
                let n = dec_u64(v).and_then(|n| u32::try_from(n).ok());
                s.seccomp = n.ok_or_else(|| bad("Seccomp"))?;
            }
            _ => {}
        }
    }

    if let Some(missing) = seen.first_missing() {
        return Err(ProcError::parse(path, 0, format!("missing {missing}")));
    }
    Ok(s)
}

/// Reads /proc/PID/status.
pub fn read_status(pid: i32) -> Result<StatusInfo, ProcError> {
    let path = pid_path(pid, "status");
    parse_status_at(&path, &read_text(pid, &path)?)
}

/// Reads /proc/PID/task/TID/status (per-thread SigPnd, SigBlk, caps).
pub fn read_task_status(pid: i32, tid: i32) -> Result<StatusInfo, ProcError> {
    let path = pid_path(pid, &format!("task/{tid}/status"));
    parse_status_at(&path, &read_text(pid, &path)?)
}

/// Which required keys were found.
#[derive(Default)]
struct Seen {
    name: bool,
    state: bool,
    tgid: bool,
    pid: bool,
    uid: bool,
    gid: bool,
}

impl Seen {
    fn first_missing(&self) -> Option<&'static str> {
        [
            (self.name, "Name"),
            (self.state, "State"),
            (self.tgid, "Tgid"),
            (self.pid, "Pid"),
            (self.uid, "Uid"),
            (self.gid, "Gid"),
        ]
        .into_iter()
        .find(|(seen, _)| !seen)
        .map(|(_, key)| key)
    }
}

fn list<T: FromStr>(v: &str) -> Option<Vec<T>> {
    v.split_ascii_whitespace().map(|x| x.parse().ok()).collect()
}

fn ids4(v: &str) -> Option<[u32; 4]> {
    let ids: Vec<u32> = list(v)?;
    ids.try_into().ok()
}

/// Undoes `seq_escape_str(.., "\n\\")` in fs/proc/array.c: only newline and
/// backslash are escaped, so any other backslash sequence is kept as is.
fn unescape_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
