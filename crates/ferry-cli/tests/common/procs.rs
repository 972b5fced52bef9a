//! Process helpers for the multi-node tests (`migrate.rs`): the process
//! table as /proc shows it, reaping orphans as a child subreaper, and
//! commands run in the background with their output collected ([`Bg`]).
//!
//! Everything here reads /proc of the test's own pid namespace, which on
//! the test machine is the host's: the "nodes" of `netns.rs` are network
//! namespaces only, so processes on both nodes are visible here.

use super::{cloexec_inherited_fds, describe};
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, sleep, JoinHandle};
use std::time::{Duration, Instant};

/// Makes the test process a child subreaper (PR_SET_CHILD_SUBREAPER): the
/// orphans of the jobs we start (a detached `ferry run` job's init, a
/// restored job whose agent was killed) become our children rather than
/// pid 1's, which on the test machines never reaps them.
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    assert_eq!(
        r,
        0,
        "prctl(PR_SET_CHILD_SUBREAPER): {}",
        std::io::Error::last_os_error()
    );
}

pub fn my_pid() -> i32 {
    std::process::id() as i32
}

/// (ppid, state) of `pid` from /proc/PID/stat, None if there is no such
/// process (a zombie still has one).
pub fn stat_of(pid: i32) -> Option<(i32, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may contain spaces and parentheses.
    let mut it = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((ppid, state))
}

/// The parent of `pid`, if it exists.
pub fn ppid_of(pid: i32) -> Option<i32> {
    stat_of(pid).map(|(ppid, _)| ppid)
}

/// All processes as (pid, ppid, state).
pub fn all_procs() -> Vec<(i32, i32, char)> {
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some((ppid, state)) = stat_of(pid) {
                    out.push((pid, ppid, state));
                }
            }
        }
    }
    out
}

/// `root` and all its descendants (processes, not threads), root first.
pub fn tree_of(root: i32) -> Vec<i32> {
    let procs = all_procs();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let mut kids: Vec<i32> = procs
            .iter()
            .filter(|&&(_, ppid, _)| ppid == p)
            .map(|&(pid, _, _)| pid)
            .collect();
        kids.sort_unstable();
        out.extend(kids);
        i += 1;
    }
    out
}

pub fn thread_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The NSpid line of /proc/PID/status: the pid in each pid namespace,
/// outermost first.
pub fn ns_pids(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Identity (device, inode) of namespace `kind` ("net", "pid", ...) of
/// `pid`. None for a process that is gone or a zombie.
pub fn ns_id(pid: i32, kind: &str) -> Option<(u64, u64)> {
    let m = fs::metadata(format!("/proc/{pid}/ns/{kind}")).ok()?;
    Some((m.dev(), m.ino()))
}

pub fn exe_of(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Whether `pid` runs the program `exe` (compared after canonicalising).
pub fn runs(pid: i32, exe: &std::path::Path) -> bool {
    match (exe_of(pid), fs::canonicalize(exe)) {
        (Some(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Sends `sig` to `pid` (errors ignored: it may be gone already).
pub fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid, sig) };
    }
}

/// Waits until none of `pids` exists in /proc, reaping those that are our
/// zombies (orphans reparented to us). Returns the (pid, wait status) of
/// the reaped ones, or a description of what is left after `timeout`.
/// Never pass a pid that a live `std::process::Child` still owns.
pub fn wait_vanished(pids: &[i32], timeout: Duration) -> Result<Vec<(i32, i32)>, String> {
    let end = Instant::now() + timeout;
    let mut reaped = Vec::new();
    loop {
        let mut left = Vec::new();
        for &pid in pids {
            let Some((ppid, state)) = stat_of(pid) else {
                continue;
            };
            if state == 'Z' && ppid == my_pid() {
                let mut st = 0;
                // SAFETY: waitpid on a zombie child of ours, by pid.
                if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
                    reaped.push((pid, st));
                    continue;
                }
            }
            left.push(format!("{pid} (state {state}, parent {ppid})"));
        }
        if left.is_empty() {
            return Ok(reaped);
        }
        if Instant::now() > end {
            return Err(format!(
                "still there after {timeout:?}: {}",
                left.join(", ")
            ));
        }
        sleep(Duration::from_millis(10));
    }
}

/// Kills (SIGKILL) whichever of `pids` still runs one of `exes`, in the
/// order given, then reaps those and any of `pids` that are our zombies
/// (bounded). For cleanup: pids that now belong to something else are left
/// alone.
pub fn kill_leftovers(pids: &[i32], exes: &[PathBuf]) {
    let exes: Vec<PathBuf> = exes
        .iter()
        .filter_map(|e| fs::canonicalize(e).ok())
        .collect();
    let mut targets = Vec::new();
    for &pid in pids {
        let alive = matches!(stat_of(pid), Some((_, s)) if s != 'Z' && s != 'X');
        if alive && exe_of(pid).is_some_and(|e| exes.contains(&e)) {
            eprintln!("killing leftover pid {pid}");
            signal(pid, libc::SIGKILL);
            targets.push(pid);
        } else if stat_of(pid) == Some((my_pid(), 'Z')) {
            targets.push(pid);
        }
    }
    if let Err(e) = wait_vanished(&targets, Duration::from_secs(5)) {
        eprintln!("cleanup: {e}");
    }
}

// ---------------------------------------------------------------------------
// Background commands

/// A command running in the background with stdin /dev/null and its stdout
/// and stderr collected (each by a thread) into buffers readable at any
/// time. Killed and reaped on drop if still running.
pub struct Bg {
    what: String,
    pid: i32,
    /// None once reaped.
    child: Option<Child>,
    status: Option<ExitStatus>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

fn collect(mut pipe: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&chunk[..n]),
            }
        }
    })
}

impl Bg {
    /// Starts `cmd` (described as `what` in messages). Inherited fds above
    /// 2 are made close-on-exec first.
    pub fn spawn(cmd: &mut Command, what: &str) -> Bg {
        eprintln!("$ {}", shown(cmd));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cloexec_inherited_fds(cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Bg {
            what: what.to_string(),
            pid: child.id() as i32,
            child: Some(child),
            status: None,
            stdout,
            stderr,
            readers,
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything written to stdout so far.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    /// Everything written to stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    /// The exit status if it has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.status = Some(st);
                    self.child = None;
                }
            }
        }
        self.status
    }

    /// Still running (not exited, or not reaped yet).
    pub fn running(&mut self) -> bool {
        self.try_status().is_none()
    }

    pub fn signal(&self, sig: i32) {
        if self.child.is_some() {
            signal(self.pid, sig);
        }
    }

    /// Waits up to `timeout` for the exit; None if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the exit (killing it and panicking after `timeout`), then
    /// for both pipes to close: a pipe still open 5 s after the exit was
    /// leaked into another process (a job ferry restored or resumed), which
    /// is a bug of its own. Returns the status and everything printed.
    pub fn wait(&mut self, timeout: Duration) -> Output {
        let Some(status) = self.wait_timeout(timeout) else {
            self.kill();
            panic!(
                "{} did not finish within {timeout:?}; stderr so far:\n{}",
                self.what,
                self.stderr_text()
            );
        };
        self.join_readers(Duration::from_secs(5), true);
        let out = Output {
            status,
            stdout: self
                .stdout
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            stderr: self
                .stderr
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        eprintln!(
            "  -> {} after {:.2?}",
            describe(status),
            self.started.elapsed()
        );
        if !status.success() || !out.stderr.is_empty() {
            let so = String::from_utf8_lossy(&out.stdout);
            let se = String::from_utf8_lossy(&out.stderr);
            if !so.trim().is_empty() {
                eprintln!("  stdout: {}", so.trim_end());
            }
            if !se.trim().is_empty() {
                eprintln!("  stderr: {}", se.trim_end());
            }
        }
        out
    }

    fn join_readers(&mut self, timeout: Duration, strict: bool) {
        let end = Instant::now() + timeout;
        while self.readers.iter().any(|r| !r.is_finished()) {
            if Instant::now() > end {
                if strict {
                    panic!(
                        "{} exited but its stdout/stderr stayed open: leaked into another \
                         process (a restored or resumed job?)",
                        self.what
                    );
                }
                // Leave the threads to finish whenever the pipe closes.
                self.readers.clear();
                return;
            }
            sleep(Duration::from_millis(5));
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// SIGKILLs it if it still runs and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                self.status = Some(st);
            }
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.kill();
        self.join_readers(Duration::from_secs(1), false);
    }
}

/// Runs `cmd` to completion (see [`Bg::wait`]): panics after `timeout`.
pub fn output_with_timeout(cmd: &mut Command, what: &str, timeout: Duration) -> Output {
    Bg::spawn(cmd, what).wait(timeout)
}

/// A command line for messages.
pub fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
