//! Shared helpers for ferry's end-to-end tests: building the C workloads in
//! `tests/workloads/`, running them as [`Job`]s with their output in a log
//! file, running the `ferry` binary with a timeout, and checking verdicts.
//!
//! The workload protocol (READY / PASS / FAIL lines) is described in
//! `tests/workloads/README.md`.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Generous bound for anything that should take seconds: a workload getting
/// READY, exiting, a ferry command finishing.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Default working time of a workload after READY (WORKLOAD_SECS).
pub const WORKLOAD_SECS: &str = "1.5";

/// Path of the ferry binary under test.
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

pub fn workloads_dir() -> PathBuf {
    workspace_root().join("tests/workloads")
}

/// True (after printing a note) when the tests cannot run here: ferry needs
/// root for ptrace of arbitrary processes, PR_SET_MM and choosing pids.
pub fn skip_unless_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: ferry end-to-end tests need root");
        return true;
    }
    false
}

// ---------------------------------------------------------------------------
// Building workloads

fn mtime(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Builds `tests/workloads/NAME.c` (once per test binary, again whenever the
/// source or common.h is newer than the binary) and returns the binary.
pub fn workload(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let src = workloads_dir().join(format!("{name}.c"));
    let header = workloads_dir().join("common.h");
    assert!(src.exists(), "no workload source {}", src.display());
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("workloads");
    fs::create_dir_all(&out_dir).expect("create workload output dir");
    let out = out_dir.join(name);

    let newest_src = [mtime(&src), mtime(&header)].into_iter().flatten().max();
    let fresh = matches!((mtime(&out), newest_src), (Some(b), Some(s)) if b >= s);
    if !fresh {
        // Build under a temporary name and rename, so another test binary
        // building the same workload at the same time never sees half a file.
        let tmp = out_dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
        let mut cmd = Command::new(&cc);
        cmd.args(["-O2", "-g", "-pthread"]);
        if name == "avx" {
            cmd.arg("-mavx2");
        }
        cmd.args(extra_cflags(&src));
        cmd.arg("-o").arg(&tmp).arg(&src);
        let res = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cc} to build workload {name}: {e}"));
        assert!(
            res.status.success(),
            "building workload {name} failed ({}):\n{}",
            res.status,
            String::from_utf8_lossy(&res.stderr)
        );
        fs::rename(&tmp, &out).expect("rename built workload");
    }
    built.insert(name.to_string(), out.clone());
    out
}

/// Extra compiler flags a workload asks for with a `ferry-cflags: FLAGS`
/// line in its source (omp.c: `-fopenmp`); selftest.sh reads the same line.
/// Workloads without one get none, so their build is unchanged.
pub fn extra_cflags(src: &Path) -> Vec<String> {
    let text = fs::read_to_string(src).unwrap_or_default();
    text.lines()
        .find_map(|l| l.split_once("ferry-cflags:").map(|(_, rest)| rest))
        .map(|rest| {
            rest.split("*/")
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Serialising ptrace-heavy tests

/// Tests that checkpoint or restore hold this for their whole run: they
/// fork, ptrace and reuse pids, and two at once would also distort the
/// workloads' timing on a small machine. Survives a panicking holder.
pub fn ptrace_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes every inherited fd >= 3 close-on-exec in a child about to exec, so
/// workloads (and ferry) see only stdin/stdout/stderr whatever the test
/// runner leaked to us (a make/cargo jobserver pipe, say: ferry would refuse
/// to checkpoint a pipe to the outside).
pub fn cloexec_inherited_fds(cmd: &mut Command) {
    // SAFETY: the closure only makes a raw syscall, which is
    // async-signal-safe. CLOSE_RANGE_CLOEXEC (not closing) keeps std's own
    // exec-error pipe working.
    unsafe {
        cmd.pre_exec(|| {
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------
// Process helpers

/// State letter from /proc/PID/stat, or None if there is no such process.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may contain spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// A process with this pid exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Polls until `pid` is gone (or a zombie, which a non-parent cannot reap).
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while pid_alive(pid) {
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A delay of 100-600 ms, different from call to call, so checkpoints land
/// at varied points of a workload's work. FERRY_TEST_DELAY_MS pins it.
pub fn random_delay() -> Duration {
    if let Some(ms) = std::env::var("FERRY_TEST_DELAY_MS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let d = Duration::from_millis(100 + x % 501);
    eprintln!("delay before checkpoint: {} ms", d.as_millis());
    d
}

// ---------------------------------------------------------------------------
// Jobs

/// A running workload with its own temporary directory (FERRY_TEST_TMP) and
/// a log file that receives its stdout and stderr.
pub struct Job {
    name: String,
    exe: PathBuf,
    pid: i32,
    /// None once reaped.
    child: Option<Child>,
    dir: PathBuf,
    log_path: PathBuf,
    /// Copies a piped stdout into the log (see [`Job::start_piped`]).
    copier: Option<JoinHandle<()>>,
}

fn fresh_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jobs");
    fs::create_dir_all(&base).expect("create job base dir");
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let d = base.join(format!("{name}-{}-{n}", std::process::id()));
        match fs::create_dir(&d) {
            Ok(()) => return d,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Left over from an earlier run whose pid we now have.
                let _ = fs::remove_dir_all(&d);
            }
            Err(e) => panic!("create {}: {e}", d.display()),
        }
    }
}

impl Job {
    /// Starts workload `name` with `args`; `env` adds to (or overrides) the
    /// defaults FERRY_TEST_TMP=<its dir> and WORKLOAD_SECS=1.5. stdin is
    /// /dev/null, stdout and stderr the log file opened with O_APPEND.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Job {
        Self::spawn(name, args, env, false)
    }

    /// Like [`Job::start`], but stdout is a pipe to the test process (which
    /// copies it into the log): a process ferry must refuse to checkpoint.
    pub fn start_piped(name: &str, args: &[&str], env: &[(&str, &str)]) -> Job {
        Self::spawn(name, args, env, true)
    }

    fn spawn(name: &str, args: &[&str], env: &[(&str, &str)], pipe: bool) -> Job {
        let exe = workload(name);
        let dir = fresh_dir(name);
        let log_path = dir.join("log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&log_path)
            .expect("open job log");
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("FERRY_TEST_TMP", &dir)
            .env("WORKLOAD_SECS", WORKLOAD_SECS)
            .stdin(Stdio::null())
            .stderr(log.try_clone().expect("dup log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        if pipe {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(log.try_clone().expect("dup log"));
        }
        cloexec_inherited_fds(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
        let pid = child.id() as i32;
        eprintln!("started {name} {args:?} as pid {pid} in {}", dir.display());
        let copier = child.stdout.take().map(|mut out| {
            let mut log = log.try_clone().expect("dup log");
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match out.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let _ = log.write_all(&buf[..n]);
                        }
                    }
                }
            })
        });
        Job {
            name: name.to_string(),
            exe,
            pid,
            child: Some(child),
            dir,
            log_path,
            copier,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job's private directory (FERRY_TEST_TMP); images go here too.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the job directory, e.g. for an image.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Everything the workload (and any restored copy) has written so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits for the READY line. Panics (with the log) if the workload exits
    /// first or the timeout passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            if self.log().lines().any(|l| l == "READY") {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    panic!(
                        "{} exited before READY ({st}); log:\n{}",
                        self.name,
                        self.log()
                    );
                }
            }
            assert!(
                Instant::now() < end,
                "{} not READY after {timeout:?}; log:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether our child (the original process) has not exited yet.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Reaps the original after ferry killed it. It must be dead already (or
    /// within a few seconds); returns how it ended.
    pub fn reap(&mut self) -> ExitStatus {
        self.wait_child(Duration::from_secs(10), "to be dead after the checkpoint")
    }

    /// Waits for the original to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_child(timeout, "to exit")
    }

    fn wait_child(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let child = self.child.as_mut().expect("job already reaped");
        let end = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    eprintln!("{} (pid {}) ended: {st}", self.name, self.pid);
                    return st;
                }
                Ok(None) => {}
                Err(e) => panic!("waitpid {}: {e}", self.pid),
            }
            if Instant::now() > end {
                let state = proc_state(self.pid);
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "waited {timeout:?} for {} (pid {}, state {state:?}) {what}; log:\n{}",
                    self.name,
                    self.pid,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether `pid` currently runs this job's program: the original, or a
    /// restored copy (which is not our child). Guards kills against a pid
    /// that has been reused by something else.
    fn pid_runs_us(&self) -> bool {
        if !pid_alive(self.pid) {
            return false;
        }
        if let Ok(exe) = fs::read_link(format!("/proc/{}/exe", self.pid)) {
            if fs::canonicalize(&self.exe)
                .map(|e| e == exe)
                .unwrap_or(false)
            {
                return true;
            }
        }
        let comm = fs::read_to_string(format!("/proc/{}/comm", self.pid)).unwrap_or_default();
        let comm = comm.trim_end();
        // comm is the file name cut to 15 bytes, or what the workload set
        // with PR_SET_NAME (files.c).
        let short: String = self.name.chars().take(15).collect();
        comm == short || (self.name == "files" && comm == "ferry-files")
    }

    /// Kills whatever runs this job's program under its pid (the original,
    /// or a restored copy left behind) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.pid_runs_us() {
            eprintln!("killing leftover {} (pid {})", self.name, self.pid);
            // SAFETY: plain kill(2) on a pid we just checked.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            wait_gone(self.pid, Duration::from_secs(10));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill();
        if let Some(t) = self.copier.take() {
            let _ = t.join();
        }
        let keep = thread::panicking() || std::env::var_os("FERRY_TEST_KEEP").is_some();
        if keep {
            eprintln!(
                "kept job directory {} (log: {})",
                self.dir.display(),
                self.log_path.display()
            );
            if thread::panicking() {
                eprintln!(
                    "--- log of {} ---\n{}--- end of log ---",
                    self.name,
                    self.log()
                );
            }
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------
// Running ferry

/// Runs `ferry ARGS` with the default timeout (see [`ferry_with_timeout`]).
pub fn ferry<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    ferry_with_timeout(args, TIMEOUT)
}

/// Runs the ferry binary, killing it after `timeout`. Logs the command, its
/// exit status, and its stdout/stderr when it fails. Panics on a timeout, or
/// if ferry's stdout/stderr stay open after it exited (leaked into a
/// restored process).
pub fn ferry_with_timeout<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: Duration) -> Output {
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let shown = shown.join(" ");
    eprintln!("$ ferry {shown}");
    let mut cmd = Command::new(FERRY);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cloexec_inherited_fds(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {FERRY}: {e}"));

    // Drain both pipes in threads so a chatty ferry never blocks on them.
    let (tx, rx) = mpsc::channel::<(u8, Vec<u8>)>();
    for (which, mut pipe) in [
        (
            1u8,
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        ),
        (2u8, Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((which, buf));
        });
    }
    drop(tx);

    let end = started + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waitpid ferry") {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferry {shown} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let left = end
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        match rx.recv_timeout(left) {
            Ok((1, b)) => stdout = b,
            Ok((_, b)) => stderr = b,
            Err(_) => panic!(
                "ferry {shown} exited ({status}) but its stdout/stderr stayed open: \
                 leaked into another process (a restored one?)"
            ),
        }
    }
    eprintln!("  -> {status} after {:.2?}", started.elapsed());
    if !status.success() || !stderr.is_empty() {
        if !stdout.is_empty() {
            eprintln!("  stdout: {}", String::from_utf8_lossy(&stdout).trim_end());
        }
        if !stderr.is_empty() {
            eprintln!("  stderr: {}", String::from_utf8_lossy(&stderr).trim_end());
        }
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Panics unless ferry exited 0; `what` and `job`'s log go in the message.
pub fn assert_ferry_ok(out: &Output, what: &str, job: &Job) {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstderr: {}\nworkload log:\n{}",
        describe(out.status),
        String::from_utf8_lossy(&out.stderr),
        job.log()
    );
    assert_no_panic(out);
}

/// ferry must fail cleanly: non-zero exit, exactly one line on stderr, no
/// Rust panic. Returns that line.
pub fn assert_ferry_refused(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what}: ferry succeeded but should have failed"
    );
    assert!(
        out.status.code().is_some(),
        "{what}: ferry died from a signal: {}",
        describe(out.status)
    );
    assert_no_panic(out);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want exactly one error line on stderr, got:\n{stderr}"
    );
    lines[0].to_string()
}

pub fn assert_no_panic(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "ferry panicked:\n{stderr}");
}

/// Whether `text` contains `n` as a whole number (not part of a longer one).
pub fn mentions_number(text: &str, n: i64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|tok| tok.parse::<i64>().ok() == Some(n))
}

pub fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st}"),
    }
}

// ---------------------------------------------------------------------------
// Verdicts

/// Number of `PASS name` lines.
pub fn count_pass(log: &str, name: &str) -> usize {
    let want = format!("PASS {name}");
    log.lines().filter(|l| *l == want).count()
}

/// The log must contain `PASS name` and no FAIL line.
pub fn assert_pass(log: &str, name: &str) {
    let fails: Vec<&str> = log.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        fails.is_empty(),
        "{name} reported failure: {fails:?}\nlog:\n{log}"
    );
    assert!(
        count_pass(log, name) >= 1,
        "no `PASS {name}` in the log:\n{log}"
    );
}

/// The log must contain exactly `n` `PASS name` lines and no FAIL line.
pub fn assert_passes(log: &str, name: &str, n: usize) {
    assert_pass(log, name);
    let got = count_pass(log, name);
    assert_eq!(
        got, n,
        "want {n} `PASS {name}` lines, got {got}; log:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// Image directories

/// Copies directory `from` to `to` recursively (regular files and dirs).
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.unwrap();
        let ty = entry.file_type().unwrap();
        let dest = to.join(entry.file_name());
        if ty.is_dir() {
            copy_dir(&entry.path(), &dest);
        } else if ty.is_file() {
            fs::copy(entry.path(), &dest)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// Paths (relative to `dir`) of all regular files below it, sorted.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(base.join(rel)).unwrap() {
            let entry = entry.unwrap();
            let ty = entry.file_type().unwrap();
            let r = rel.join(entry.file_name());
            if ty.is_dir() {
                walk(base, &r, out);
            } else if ty.is_file() {
                out.push(r);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out);
    out.sort();
    out
}

/// XORs the byte at `offset` of `path` with 0xff.
pub fn flip_byte(path: &Path, offset: u64) {
    let mut data = fs::read(path).unwrap();
    data[offset as usize] ^= 0xff;
    File::create(path).unwrap().write_all(&data).unwrap();
}

/// Truncates `path` to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Waits up to `timeout` for a PASS or FAIL line in the log at `path`
/// (whichever copy of the job writes it) and returns the log; on timeout
/// panics with `context()` and the log.
pub fn wait_log_verdict(
    path: &Path,
    name: &str,
    timeout: Duration,
    context: impl Fn() -> String,
) -> String {
    let end = Instant::now() + timeout;
    loop {
        let log = fs::read_to_string(path).unwrap_or_default();
        if log
            .lines()
            .any(|l| l.starts_with("PASS ") || l.starts_with("FAIL"))
        {
            // A FAIL may be followed by more lines; give them a moment.
            thread::sleep(Duration::from_millis(50));
            return fs::read_to_string(path).unwrap_or_default();
        }
        assert!(
            Instant::now() < end,
            "{name}: no verdict within {timeout:?}{}; log:\n{log}",
            context()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Ends a `ferry run` job of a test: kills what is left of it (inits
/// running ferry first: killing one ends its namespace) and removes its
/// directory, unless the test failed or FERRY_TEST_KEEP is set; then the
/// directory is kept and, on failure, `log()` shown.
pub fn end_job(pids: &[i32], exe: &Path, dir: &Path, name: &str, log: impl FnOnce() -> String) {
    let ferry = fs::canonicalize(FERRY).ok();
    let mut pids = pids.to_vec();
    pids.sort_by_key(|&p| procs::exe_of(p) != ferry);
    procs::kill_leftovers(&pids, &[PathBuf::from(FERRY), exe.to_path_buf()]);
    if thread::panicking() || std::env::var_os("FERRY_TEST_KEEP").is_some() {
        eprintln!("kept job directory {}", dir.display());
        if thread::panicking() {
            eprintln!("--- log of {name} ---\n{}--- end of log ---", log());
        }
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}

pub mod netns;
pub mod procs;
