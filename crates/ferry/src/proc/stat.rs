//! /proc/PID/stat and /proc/PID/task/TID/stat (proc_pid_stat(5)).

use super::{pid_path, read_text, ProcError};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::str::FromStr;

/// The fields of /proc/PID/stat that ferry uses. Field numbers in the docs
/// below are the 1-based ones of proc_pid_stat(5). The address fields read
/// as 0 when the reader may not ptrace the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatInfo {
    /// (1) Process (or thread) id.
    pub pid: i32,
    /// (2) Command name, raw (may contain spaces, parentheses, newlines).
    pub comm: String,
    /// (3) State letter: R, S, D, Z, T, t, X, I, ...
    pub state: char,
    /// (4) Parent pid.
    pub ppid: i32,
    /// (5) Process group id.
    pub pgrp: i32,
    /// (6) Session id.
    pub session: i32,
    /// (7) Controlling terminal device number.
    pub tty_nr: i32,
    /// (9) Kernel PF_* flags.
    pub flags: u32,
    /// (20) Number of threads.
    pub num_threads: u32,
    /// (22) Start time after boot, in clock ticks.
    pub start_time: u64,
    /// (26) Start of the text segment.
    pub start_code: u64,
    /// (27) End of the text segment.
    pub end_code: u64,
    /// (28) Start (bottom) of the main stack.
    pub start_stack: u64,
    /// (45) Start of initialized and uninitialized data.
    pub start_data: u64,
    /// (46) End of initialized and uninitialized data.
    pub end_data: u64,
    /// (47) Start of the heap (brk area); the current brk is not in /proc.
    pub start_brk: u64,
    /// (48) Start of the argv strings.
    pub arg_start: u64,
    /// (49) End of the argv strings.
    pub arg_end: u64,
    /// (50) Start of the environment strings.
    pub env_start: u64,
    /// (51) End of the environment strings.
    pub env_end: u64,
    /// (38) Signal sent to the parent on exit.
    pub exit_signal: i32,
    /// (39) CPU last run on.
    pub processor: i32,
    /// Field 52: the wait status of a zombie (0 while running).
    pub exit_code: i32,
}

/// Parses stat text; errors name the file "stat".
pub fn parse_stat(text: &str) -> Result<StatInfo, ProcError> {
    parse_stat_at(Path::new("stat"), text)
}

/// Parses stat text; errors name `path`. The whole text is one record (a
/// comm may contain a newline), so every error is reported at line 1.
pub fn parse_stat_at(path: &Path, text: &str) -> Result<StatInfo, ProcError> {
    let err = |what: String| ProcError::parse(path, 1, what);

    // comm is whatever the task set, so only the outermost parentheses
    // delimit it.
    let open = text
        .find('(')
        .ok_or_else(|| err("no '(' before comm".into()))?;
    let close = text
        .rfind(')')
        .ok_or_else(|| err("no ')' after comm".into()))?;
    if close < open {
        return Err(err("')' before '('".into()));
    }
    let pid_str = text.get(..open).unwrap_or("").trim();
    let pid = pid_str
        .parse()
        .map_err(|_| err(format!("bad pid {pid_str:?}")))?;
    let comm = text.get(open + 1..close).unwrap_or("").to_string();
    let f = Fields {
        tokens: text
            .get(close + 1..)
            .unwrap_or("")
            .split_ascii_whitespace()
            .collect(),
        path,
    };
    let state_str = f.get(3)?;
    let mut chars = state_str.chars();
    let state = match (chars.next(), chars.next()) {
        (Some(c), None) => c,
        _ => return Err(err(format!("bad state {state_str:?}"))),
    };

    Ok(StatInfo {
        pid,
        comm,
        state,
        ppid: f.num(4)?,
        pgrp: f.num(5)?,
        session: f.num(6)?,
        tty_nr: f.num(7)?,
        flags: f.num(9)?,
        num_threads: f.num(20)?,
        start_time: f.num(22)?,
        start_code: f.num(26)?,
        end_code: f.num(27)?,
        start_stack: f.num(28)?,
        exit_signal: f.num(38)?,
        processor: f.num(39)?,
        start_data: f.num(45)?,
        end_data: f.num(46)?,
        start_brk: f.num(47)?,
        arg_start: f.num(48)?,
        arg_end: f.num(49)?,
        env_start: f.num(50)?,
        env_end: f.num(51)?,
        // Absent on kernels before 3.5.
        exit_code: f.num(52).unwrap_or(0),
    })
}

/// The space-separated fields after comm, addressed by their 1-based
/// proc_pid_stat(5) number.
struct Fields<'a> {
    tokens: Vec<&'a str>,
    path: &'a Path,
}

impl<'a> Fields<'a> {
    fn get(&self, n: usize) -> Result<&'a str, ProcError> {
        n.checked_sub(3)
            .and_then(|i| self.tokens.get(i))
            .copied()
            .ok_or_else(|| ProcError::parse(self.path, 1, format!("missing field {n}")))
    }

    fn num<T: FromStr>(&self, n: usize) -> Result<T, ProcError> {
        let s = self.get(n)?;
        s.parse()
            .map_err(|_| ProcError::parse(self.path, 1, format!("bad field {n}: {s:?}")))
    }
}

/// Reads /proc/PID/stat.
pub fn read_stat(pid: i32) -> Result<StatInfo, ProcError> {
    let path = pid_path(pid, "stat");
    parse_stat_at(&path, &read_text(pid, &path)?)
}

/// Reads /proc/PID/task/TID/stat (per-thread state, comm and processor).
pub fn read_task_stat(pid: i32, tid: i32) -> Result<StatInfo, ProcError> {
    let path = pid_path(pid, &format!("task/{tid}/stat"));
    parse_stat_at(&path, &read_text(pid, &path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc/self/stat of `cat` on Linux 6.18.
    const REAL: &str = "3138 (cat) R 3135 3135 1914 0 -1 4194304 101 0 0 0 0 0 0 0 20 0 1 0 24175 3133440 375 18446744073709551615 94095764082688 94095764102569 140723382479712 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94095764118576 94095764120192 94096665808896 140723382483680 140723382483700 140723382483700 140723382484971 0\n";

    /// A zombie: the mm fields are all 0.
    const ZOMBIE: &str = "3445 (python3) Z 3404 3394 1914 0 -1 4227148 222 0 0 0 0 0 0 0 20 0 1 0 36088 0 0 18446744073709551615 0 0 0 0 0 0 0 16781312 2 1 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn real_sample() {
        let s = parse_stat(REAL).unwrap();
        assert_eq!((s.pid, s.comm.as_str(), s.state), (3138, "cat", 'R'));
        assert_eq!((s.ppid, s.pgrp, s.session, s.tty_nr), (3135, 3135, 1914, 0));
        assert_eq!((s.flags, s.num_threads, s.start_time), (4194304, 1, 24175));
        assert_eq!((s.start_code, s.end_code), (94095764082688, 94095764102569));
        assert_eq!(s.start_stack, 140723382479712);
        assert_eq!((s.exit_signal, s.processor), (17, 1));
        assert_eq!((s.start_data, s.end_data), (94095764118576, 94095764120192));
        assert_eq!(s.start_brk, 94096665808896);
        assert_eq!((s.arg_start, s.arg_end), (140723382483680, 140723382483700));
        assert_eq!((s.env_start, s.env_end), (140723382483700, 140723382484971));
        assert!(s.start_code < s.end_code && s.arg_end <= s.env_start);
    }

    #[test]
    fn zombie() {
        let s = parse_stat(ZOMBIE).unwrap();
        assert_eq!((s.state, s.start_code, s.env_end), ('Z', 0, 0));
    }

    #[test]
    fn tricky_comm() {
        let text = REAL.replacen("(cat)", "(a) (b)", 1);
        assert_eq!(parse_stat(&text).unwrap().comm, "a) (b");
        let text = REAL.replacen("(cat)", "(x\ny ))", 1);
        let s = parse_stat(&text).unwrap();
        assert_eq!((s.comm.as_str(), s.ppid), ("x\ny )", 3135));
        let text = REAL.replacen("(cat)", "()", 1);
        assert_eq!(parse_stat(&text).unwrap().comm, "");
    }

    #[test]
    fn malformed_is_error() {
        let truncated: String = REAL.split(' ').take(30).collect::<Vec<_>>().join(" ");
        for bad in [
            "",
            "123",
            "123 (cat",
            "123 )cat( R",
            "x (cat) R 1 1 1 0",
            "-- (cat) R",
            &REAL.replacen(" R ", " RR ", 1),
            &REAL.replacen(" 3135 ", " x ", 1),
            &truncated,
        ] {
            match parse_stat_at(Path::new("/proc/9/stat"), bad) {
                Err(ProcError::Parse { line: 1, path, .. }) => {
                    assert_eq!(path, Path::new("/proc/9/stat"))
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn live_self() {
        let pid = std::process::id() as i32;
        let s = read_stat(pid).unwrap();
        assert_eq!(s.pid, pid);
        assert!(s.num_threads >= 1 && s.start_code < s.end_code);
        assert!(s.arg_start < s.arg_end && s.env_start <= s.env_end);
        assert_eq!(s.ppid, std::os::unix::process::parent_id() as i32);

        // Our own thread's stat, found through /proc/thread-self.
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        let tid: i32 = link
            .to_str()
            .and_then(|s| s.rsplit('/').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        let t = read_task_stat(pid, tid).unwrap();
        assert_eq!((t.pid, t.state), (tid, 'R'));
    }

    #[test]
    fn missing_process_is_gone() {
        assert!(matches!(read_stat(i32::MAX), Err(ProcError::Gone { .. })));
        let pid = std::process::id() as i32;
        // A missing thread of a live process is an I/O error, not Gone.
        assert!(matches!(
            read_task_stat(pid, i32::MAX),
            Err(ProcError::Io { .. })
        ));
    }
}
