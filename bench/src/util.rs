//! Process plumbing shared by the benchmarks: common options, signal
//! handling, temporary directories, spawning workloads and commands with
//! bounded waits, guards that kill and reap everything on every exit path,
//! JSON report parsing and small statistics.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How long a killed process may take to disappear before we give up.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Options every benchmark takes.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// The ferry binary [default: <workspace>/target/release/ferry].
    #[arg(long, value_name = "PATH")]
    pub ferry: Option<PathBuf>,
    /// Append the results, with the machine's description, to bench/RESULTS.md.
    #[arg(long)]
    pub record: bool,
    /// Directory for images, logs and the workload binary (a fresh
    /// subdirectory is created and removed) [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Keep the work directory (logs, last images) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Give up on any single ferry command after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
}

/// The workspace root (this crate lives in `<root>/bench`).
pub fn workspace_root() -> PathBuf {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench.parent().unwrap_or(bench).to_path_buf()
}

/// This crate's directory, where RESULTS.md lives.
pub fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "ferry-bench must run as root: ferry needs ptrace, clone3 with set_tid and \
             PR_SET_MM_MAP (try: sudo {})",
            std::env::args().collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}

/// The ferry binary to benchmark: `--ferry` or the workspace's release build.
pub fn resolve_ferry(opt: Option<&Path>) -> Result<PathBuf> {
    let (path, explicit) = match opt {
        Some(p) => (p.to_path_buf(), true),
        None => (workspace_root().join("target/release/ferry"), false),
    };
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if explicit {
                bail!("ferry binary {} does not exist", path.display());
            }
            bail!(
                "ferry binary {} not found: build it first with \
                 `cargo build --release -p ferry-cli` (or pass --ferry PATH)",
                path.display()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    };
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("{} is not an executable file", path.display());
    }
    Ok(fs::canonicalize(&path).unwrap_or(path))
}

// ---- signals ---------------------------------------------------------------

static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    INTERRUPTED.store(sig, Ordering::SeqCst);
}

/// The run was interrupted by a signal (SIGINT, SIGTERM or SIGHUP).
#[derive(Debug)]
pub struct Interrupted(pub i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            libc::SIGHUP => "SIGHUP",
            _ => "a signal",
        };
        write!(f, "interrupted by {name}")
    }
}

impl std::error::Error for Interrupted {}

/// Turns SIGINT/SIGTERM/SIGHUP into a flag that every wait checks, so an
/// interrupted run unwinds through the guards (which kill what was started)
/// instead of dying on the spot. SA_RESETHAND: a second Ctrl-C kills at once.
pub fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an
        // atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESETHAND;
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error()).context("sigaction");
            }
        }
    }
    Ok(())
}

pub fn check_interrupted() -> Result<()> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => Ok(()),
        sig => Err(Interrupted(sig).into()),
    }
}

/// Sleeps, waking early (with an error) if the run is interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// Makes orphaned descendants (a process restored by `ferry restore
/// --detach`, whose parent ferry exits) our children, so we can reap them
/// and nothing is left to init.
pub fn become_subreaper() -> Result<()> {
    // SAFETY: plain prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error()).context("prctl(PR_SET_CHILD_SUBREAPER)");
    }
    Ok(())
}

// ---- temporary directories ---------------------------------------------------

/// A fresh directory, removed (recursively) on drop unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(parent: &Path, prefix: &str, keep: bool) -> Result<Self> {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        let tmpl = parent.join(format!("{prefix}.XXXXXX"));
        let mut buf = CString::new(tmpl.as_os_str().as_bytes())
            .context("temporary directory path contains a NUL byte")?
            .into_bytes_with_nul();
        // SAFETY: buf is a writable NUL-terminated template.
        let p = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("mkdtemp {}", tmpl.display()));
        }
        buf.pop(); // the NUL
        Ok(Self {
            path: PathBuf::from(OsString::from_vec(buf)),
            keep,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("ferry-bench: kept work directory {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Total size of the regular files under `dir`, recursively.
pub fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?; // does not follow symlinks
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

// ---- waiting for processes ---------------------------------------------------

/// A pidfd: becomes readable the moment the process exits, so waits with a
/// timeout need neither polling nor a thread (and wall times are exact).
struct PidFd(OwnedFd);

impl PidFd {
    fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly opened descriptor that we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// True once the process has exited, false on timeout. With
    /// `interruptible`, a pending Ctrl-C aborts the wait with an error.
    fn wait_exit(&self, timeout: Duration, interruptible: bool) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if interruptible {
                check_interrupted()?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(100) as libc::c_int;
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return Ok(true);
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e).context("poll(pidfd)");
                }
            } else if left.is_zero() {
                return Ok(false);
            }
        }
    }
}

/// Waits up to `timeout` for `child` to exit and reaps it; None on timeout.
pub fn wait_child(
    child: &mut Child,
    timeout: Duration,
    interruptible: bool,
) -> Result<Option<ExitStatus>> {
    if let Some(st) = child.try_wait()? {
        return Ok(Some(st));
    }
    match PidFd::open(child.id() as i32) {
        Ok(fd) => {
            if fd.wait_exit(timeout, interruptible)? {
                Ok(Some(child.wait()?))
            } else {
                Ok(None)
            }
        }
        Err(_) => {
            // No pidfd (old kernel): poll.
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(st) = child.try_wait()? {
                    return Ok(Some(st));
                }
                if interruptible {
                    check_interrupted()?;
                }
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// A child process that is SIGKILLed and reaped when dropped, unless it was
/// reaped before.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
    /// How it ended, once reaped.
    exited: Option<ExitStatus>,
    /// It leads its own process group: kill the whole group.
    group: bool,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child: Some(child),
            what: what.into(),
            exited: None,
            group: false,
        }
    }

    /// The child was spawned as leader of its own process group
    /// (`process_group(0)`): killing it kills the group, so helpers it
    /// started die with it.
    pub fn own_group(mut self) -> Self {
        self.group = true;
        self
    }

    /// How the process ended, once it was reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exited
    }

    /// Still running (not exited)? Reaps it if it exited.
    pub fn running(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            None => Ok(false),
            Some(c) => match c.try_wait()? {
                None => Ok(true),
                Some(st) => {
                    self.child = None;
                    self.exited = Some(st);
                    Ok(false)
                }
            },
        }
    }

    /// Waits for the process to exit by itself and reaps it.
    pub fn wait(&mut self, timeout: Duration, interruptible: bool) -> Result<ExitStatus> {
        let c = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("{} was already reaped", self.what))?;
        match wait_child(c, timeout, interruptible)? {
            Some(st) => {
                self.child = None;
                self.exited = Some(st);
                Ok(st)
            }
            None => {
                let _ = self.kill();
                bail!(
                    "{} is still running after {:?}; killed it",
                    self.what,
                    timeout
                )
            }
        }
    }

    /// SIGKILLs the process (if not reaped yet) and reaps it.
    pub fn kill(&mut self) -> Result<Option<ExitStatus>> {
        let Some(c) = self.child.as_mut() else {
            return Ok(None);
        };
        if self.group {
            // SAFETY: kill(2) on the group our unreaped child leads: the
            // pgid cannot have been reused while the leader is unreaped.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        }
        let _ = c.kill(); // fails only if it already exited
        match wait_child(c, REAP_TIMEOUT, false)? {
            Some(st) => {
                self.child = None;
                self.exited = Some(st);
                Ok(Some(st))
            }
            None => bail!(
                "{} (pid {}) did not die within {:?} of SIGKILL",
                self.what,
                c.id(),
                REAP_TIMEOUT
            ),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("ferry-bench: cleanup: {e:#}");
        }
    }
}

pub fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}{}", signal_name(s)),
        _ => format!("{st}"),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGBUS => " (SIGBUS)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGILL => " (SIGILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGTRAP => " (SIGTRAP)",
        _ => "",
    }
}

// ---- workloads ---------------------------------------------------------------

/// Builds `tests/workloads/<name>.c` into `out_dir` and returns the binary.
pub fn build_workload(name: &str, out_dir: &Path, extra_flags: &[&str]) -> Result<PathBuf> {
    let src = workspace_root()
        .join("tests/workloads")
        .join(format!("{name}.c"));
    build_c(&src, name, out_dir, extra_flags)
}

/// Builds `bench/workloads/<name>.c` (workloads made for the benchmarks, same
/// protocol as `tests/workloads`) into `out_dir` and returns the binary.
pub fn build_bench_workload(name: &str, out_dir: &Path, extra_flags: &[&str]) -> Result<PathBuf> {
    let src = bench_dir().join("workloads").join(format!("{name}.c"));
    build_c(&src, name, out_dir, extra_flags)
}

fn build_c(src: &Path, name: &str, out_dir: &Path, extra_flags: &[&str]) -> Result<PathBuf> {
    if !src.is_file() {
        bail!("workload source {} not found", src.display());
    }
    let out = out_dir.join(name);
    let mut cmd = Command::new("gcc");
    cmd.args(["-O2", "-pthread"])
        .args(extra_flags)
        .arg("-o")
        .arg(&out)
        .arg(src);
    let res = run_command(
        &mut cmd,
        Duration::from_secs(120),
        out_dir,
        &format!("gcc-{name}"),
    );
    let res = match res {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::NotFound) =>
        {
            bail!("gcc not found: install a C compiler to build the workloads")
        }
        r => r.with_context(|| format!("building {}", src.display()))?,
    };
    if !res.status.success() {
        bail!(
            "building {} failed ({}):\n{}",
            src.display(),
            describe_status(res.status),
            res.stderr.trim_end()
        );
    }
    Ok(out)
}

/// A running workload from `tests/workloads`: stdin is /dev/null, stdout and
/// stderr are appended to a log file (as the workload protocol expects), no
/// other descriptor is inherited, and it has its own process group so a
/// terminal's Ctrl-C reaches only us. Killed and reaped on drop.
pub struct Workload {
    guard: ChildGuard,
    pid: i32,
    log: PathBuf,
    name: String,
}

impl Workload {
    pub fn spawn(bin: &Path, args: &[String], env: &[(&str, &OsStr)], log: &Path) -> Result<Self> {
        check_interrupted()?;
        let name = bin
            .file_name()
            .map_or_else(|| "workload".into(), |n| n.to_string_lossy().into_owned());
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: close_range is async-signal-safe. CLOSE_RANGE_CLOEXEC (not
        // closing) keeps std's exec-error pipe working; the descriptors we
        // inherited without CLOEXEC (ferry refuses to checkpoint pipes and
        // sockets) are closed at exec.
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
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id() as i32;
        Ok(Self {
            guard: ChildGuard::new(child, format!("workload {name} (pid {pid})")).own_group(),
            pid,
            log: log.to_path_buf(),
            name,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Waits until the workload prints READY.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            check_interrupted()?;
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if text.lines().any(|l| l == "READY") {
                return Ok(());
            }
            if !self.guard.running()? {
                bail!(
                    "workload {} (pid {}) exited before READY ({}); log {}:\n{}",
                    self.name,
                    self.pid,
                    self.guard
                        .exit_status()
                        .map_or_else(|| "?".into(), describe_status),
                    self.log.display(),
                    log_tail(&self.log, 20)
                );
            }
            if t0.elapsed() > timeout {
                bail!(
                    "workload {} (pid {}) not READY after {:?}; log:\n{}",
                    self.name,
                    self.pid,
                    timeout,
                    log_tail(&self.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Fails if the workload exited or reported FAIL.
    pub fn check_healthy(&mut self, when: &str) -> Result<()> {
        if !self.guard.running()? {
            bail!(
                "workload {} (pid {}) is no longer running {when} ({}); log:\n{}",
                self.name,
                self.pid,
                self.guard
                    .exit_status()
                    .map_or_else(|| "?".into(), describe_status),
                log_tail(&self.log, 20)
            );
        }
        check_log_ok(&self.log, when)
    }

    /// SIGKILLs and reaps the workload.
    pub fn kill(&mut self) -> Result<()> {
        self.guard.kill().map(|_| ())
    }

    /// Reaps a workload that something else (ferry) is killing.
    pub fn reap(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.guard.wait(timeout, false)
    }
}

/// Fails if a workload log contains a FAIL line.
pub fn check_log_ok(log: &Path, when: &str) -> Result<()> {
    let text = fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    if let Some(l) = text.lines().find(|l| l.starts_with("FAIL")) {
        bail!("workload reported a failure {when}: {l}");
    }
    Ok(())
}

/// The last `n` lines of a file, indented, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let tail: Vec<String> = lines[start..]
        .iter()
        .map(|l| format!("    | {l}"))
        .collect();
    if tail.is_empty() {
        "    (empty)".into()
    } else {
        tail.join("\n")
    }
}

// ---- processes we did not spawn ----------------------------------------------

/// A process we are responsible for but did not spawn: one restored by
/// `ferry restore --detach`. Once ferry exits it is re-parented to us (we
/// are a subreaper), so only we can reap it and its pid cannot be reused
/// before we do. On drop it is killed and reaped — but only if it is still
/// our child, so a stranger that happens to get the pid is left alone.
pub struct Adopted {
    pid: i32,
    done: bool,
}

impl Adopted {
    pub fn new(pid: i32) -> Self {
        Self { pid, done: false }
    }

    fn is_our_child(&self) -> bool {
        // /proc/PID/stat: "pid (comm) state ppid ..."; comm may contain ')'.
        let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let ppid: Option<i32> = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        // SAFETY: getpid has no preconditions.
        ppid == Some(unsafe { libc::getpid() })
    }

    /// Running (not a zombie, not gone)?
    pub fn running(&self) -> bool {
        let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        !matches!(state, None | Some("Z") | Some("X"))
    }

    /// SIGKILLs the process and waits until /proc/PID is gone.
    pub fn kill(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let pid = self.pid;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            self.done = true;
            return Ok(());
        }
        if !self.is_our_child() {
            // Not re-parented to us (yet?): ferry may still be its parent, or
            // it is a stranger. Signal it only if it is ferry-restored, i.e.
            // we did get it as a child within a short grace period.
            let t0 = Instant::now();
            while !self.is_our_child() && t0.elapsed() < Duration::from_millis(500) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !self.is_our_child() {
                self.done = true;
                bail!("pid {pid} is not our child; not killing it");
            }
        }
        // SAFETY: plain kill(2) on a child we have not reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t0 = Instant::now();
        loop {
            let mut status = 0;
            // SAFETY: waitpid on a specific pid with WNOHANG.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
            let errno = io::Error::last_os_error().raw_os_error();
            let gone = !Path::new(&format!("/proc/{pid}")).exists();
            if (r == pid || (r < 0 && errno == Some(libc::ECHILD))) && gone {
                self.done = true;
                return Ok(());
            }
            if t0.elapsed() > REAP_TIMEOUT {
                self.done = true;
                bail!("restored pid {pid} still present {REAP_TIMEOUT:?} after SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("ferry-bench: cleanup: {e:#}");
        }
    }
}

// ---- process trees --------------------------------------------------------------

/// (ppid, state) of `pid` from /proc/PID/stat; None once it is gone (reaped).
pub fn proc_stat(pid: i32) -> Option<(i32, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..."; comm may contain ')'.
    let mut it = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Every process on the system as (pid, ppid). (Not the
/// /proc/PID/task/TID/children files: kernels without CONFIG_PROC_CHILDREN
/// lack them.)
fn process_table() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = proc_stat(pid) {
                out.push((pid, ppid));
            }
        }
    }
    out
}

/// `root` and all its descendants (processes, not threads), root first, in
/// breadth-first order, children sorted by pid. Empty if `root` is gone.
pub fn descendants(root: i32) -> Vec<i32> {
    if proc_stat(root).is_none() {
        return Vec::new();
    }
    let table = process_table();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let mut kids: Vec<i32> = table
            .iter()
            .filter(|&&(pid, ppid)| ppid == p && !out.contains(&pid))
            .map(|&(pid, _)| pid)
            .collect();
        kids.sort_unstable();
        out.extend(kids);
        i += 1;
    }
    out
}

/// Number of threads of `pid` (entries of /proc/PID/task).
pub fn thread_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// /proc/PID/exe (unreadable for zombies and once the process is gone).
pub fn exe_of(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

fn my_pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// A process tree we are responsible for: a workload's root and its
/// descendants, or a tree restored by `ferry restore --detach`. On drop
/// every process of it is SIGKILLed and reaped, and the guard waits (bounded)
/// until none of its pids is left in /proc.
///
/// Which pids are ours: the ones recorded when the guard was made (taken
/// before a checkpoint, so exactly those a restore recreates) plus any
/// descendant of them found later, but only while they run one of `exes`
/// (the workload, and ferry, whose restored processes run ferry's code until
/// their memory is in place): a pid that was freed and reused by an
/// unrelated process is never signalled. We are a child subreaper, so when a
/// tree's root dies its orphans become our children and we can reap them;
/// zombies that are another tree member's children are waited for until
/// that parent dies too.
///
/// A root that a [`ChildGuard`] (a [`Workload`]) owns is signalled but not
/// reaped here (`root_owned`): std's `Child` must reap it itself.
pub struct ProcTree {
    root: i32,
    pids: Vec<i32>,
    exes: Vec<PathBuf>,
    root_owned: bool,
    what: String,
    /// Pids seen running one of `exes` (or the owned root): while they
    /// exit, /proc/PID/exe is already unreadable, yet they are still ours.
    confirmed: Vec<i32>,
    /// Wait statuses of the processes this guard reaped.
    reaped: Vec<(i32, i32)>,
    done: bool,
}

impl ProcTree {
    /// A guard for `root` and `pids` (the recorded tree; the root is added
    /// if missing) whose processes run one of `exes`.
    pub fn new(
        root: i32,
        pids: &[i32],
        exes: &[&Path],
        root_owned: bool,
        what: impl Into<String>,
    ) -> Self {
        let mut tree = Self {
            root,
            pids: vec![root],
            exes: exes
                .iter()
                .map(|e| fs::canonicalize(e).unwrap_or_else(|_| e.to_path_buf()))
                .collect(),
            root_owned,
            what: what.into(),
            confirmed: Vec::new(),
            reaped: Vec::new(),
            done: false,
        };
        tree.add(&[root]);
        tree.add(pids);
        tree
    }

    /// Adds pids (recorded later) to the tree; those that run one of `exes`
    /// now stay ours until they are gone.
    pub fn add(&mut self, pids: &[i32]) {
        for &p in pids {
            if !self.pids.contains(&p) {
                self.pids.push(p);
            }
            if !self.confirmed.contains(&p) && self.is_ours(p) {
                self.confirmed.push(p);
            }
        }
    }

    /// The root is no longer owned by a `ChildGuard` (it was reaped).
    pub fn set_root_owned(&mut self, owned: bool) {
        self.root_owned = owned;
    }

    /// Wait statuses of the processes this guard has reaped so far.
    pub fn reaped(&self) -> &[(i32, i32)] {
        &self.reaped
    }

    fn is_ours(&self, pid: i32) -> bool {
        exe_of(pid).is_some_and(|e| self.exes.contains(&e))
    }

    /// Adds the current descendants of our live processes to the known pids.
    fn discover(&mut self) {
        let table = process_table();
        let mut i = 0;
        while i < self.pids.len() {
            let p = self.pids[i];
            if self.is_ours(p) || (p == self.root && proc_stat(p).is_some()) {
                for &(pid, ppid) in &table {
                    if ppid == p && !self.pids.contains(&pid) {
                        self.pids.push(pid);
                    }
                }
            }
            i += 1;
        }
    }

    /// One pass: reaps what it can and (with `kill`) SIGKILLs what still
    /// runs. Returns descriptions of the processes that are still there.
    fn sweep(&mut self, kill: bool) -> Vec<String> {
        self.discover();
        let me = my_pid();
        let mut left = Vec::new();
        for pid in self.pids.clone() {
            let Some((ppid, state)) = proc_stat(pid) else {
                continue; // gone
            };
            if matches!(state, 'Z' | 'X') {
                if pid == self.root && self.root_owned {
                    continue; // its ChildGuard reaps it
                }
                if ppid == me {
                    let mut st = 0;
                    // SAFETY: waitpid on a specific zombie child, WNOHANG.
                    let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG | libc::__WALL) };
                    if r == pid {
                        self.reaped.push((pid, st));
                        continue;
                    }
                } else if !self.pids.contains(&ppid) {
                    // Someone else's zombie: the pid was reused.
                    continue;
                }
                left.push(format!("{pid} (zombie, parent {ppid})"));
            } else if self.is_ours(pid) || (pid == self.root && self.root_owned) {
                if !self.confirmed.contains(&pid) {
                    self.confirmed.push(pid);
                }
                if kill {
                    // SAFETY: kill(2) on a process running our workload (or
                    // ferry's restorer), or on our own unreaped child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                left.push(format!("{pid} (state {state}, parent {ppid})"));
            } else if self.confirmed.contains(&pid) && exe_of(pid).is_none() {
                // Ours and dying: its memory (and so /proc/PID/exe) is gone
                // but it is not a zombie yet. Not signalled again: the pid
                // could be reused once its parent reaps it.
                left.push(format!("{pid} (exiting, parent {ppid})"));
            }
            // else: a live process that is not ours (a reused pid): ignore.
        }
        left
    }

    /// Waits up to `timeout` until every process of the tree is gone
    /// (reaping our zombies), without signalling anything: for a tree that
    /// ferry is killing. Fails naming what is left.
    pub fn wait_gone(&mut self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let left = self.sweep(false);
            if left.is_empty() {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "{}: still there {timeout:?} later: {}",
                    self.what,
                    left.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILLs every process of the tree, reaps them and waits until none
    /// is left in /proc (the root only until it is a zombie, if a
    /// `ChildGuard` owns it).
    pub fn kill(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let t0 = Instant::now();
        loop {
            let left = self.sweep(true);
            if left.is_empty() {
                self.done = true;
                return Ok(());
            }
            if t0.elapsed() > REAP_TIMEOUT {
                self.done = true;
                bail!(
                    "{}: still there {REAP_TIMEOUT:?} after SIGKILL: {}",
                    self.what,
                    left.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for ProcTree {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("ferry-bench: cleanup: {e:#}");
        }
    }
}

// ---- commands -----------------------------------------------------------------

/// What a finished command printed, and how long it ran.
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From just before spawning to its exit.
    pub wall: Duration,
}

/// Runs `cmd` to completion with a timeout. stdin is /dev/null; stdout and
/// stderr go to `<scratch>/<label>.{stdout,stderr}` (files, so a chatty
/// command can never block on a full pipe). The command gets its own
/// process group and is SIGKILLed on timeout or interruption.
pub fn run_command(
    cmd: &mut Command,
    timeout: Duration,
    scratch: &Path,
    label: &str,
) -> Result<CmdOutput> {
    check_interrupted()?;
    let out_path = scratch.join(format!("{label}.stdout"));
    let err_path = scratch.join(format!("{label}.stderr"));
    let out = File::create(&out_path).with_context(|| format!("create {}", out_path.display()))?;
    let err = File::create(&err_path).with_context(|| format!("create {}", err_path.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let t0 = Instant::now();
    let child = cmd.spawn()?;
    let mut guard = ChildGuard::new(child, "the command").own_group();
    let status = guard.wait(timeout, true);
    let wall = t0.elapsed();
    let status = status?;
    Ok(CmdOutput {
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        wall,
    })
}

/// Runs `ferry ARGS` to completion (see [`run_command`]); a non-zero exit is
/// an error quoting the exact command and ferry's stderr.
pub fn run_ferry(
    ferry: &Path,
    args: &[&OsStr],
    timeout: Duration,
    scratch: &Path,
    label: &str,
) -> Result<CmdOutput> {
    let mut cmd = Command::new(ferry);
    cmd.args(args);
    let shown = show_command(&cmd);
    let out = run_command(&mut cmd, timeout, scratch, label)
        .with_context(|| format!("running `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}); stderr:\n{}",
            describe_status(out.status),
            indent(out.stderr.trim_end())
        );
    }
    Ok(out)
}

/// Indents every line by four spaces ("(empty)" for nothing).
pub fn indent(s: &str) -> String {
    if s.is_empty() {
        return "    (empty)".into();
    }
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The pid that `ferry restore --detach` printed on stdout (last non-empty
/// line).
pub fn detached_pid(stdout: &str) -> Result<i32> {
    stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("ferry restore --detach printed no pid: {stdout:?}"))
}

/// `ferry checkpoint --json` (stdout).
#[derive(serde::Deserialize, Debug, Clone)]
#[allow(dead_code)] // fields kept for completeness of the report format
pub struct CheckpointJson {
    pub pid: i32,
    /// Processes in the checkpointed tree (absent from older ferry builds).
    #[serde(default)]
    pub processes: u64,
    /// Threads of all of them.
    pub threads: u64,
    pub frozen_ms: f64,
    pub state_ms: f64,
    pub total_ms: f64,
    pub bytes_written: u64,
    pub pages: Pages,
    pub leave_running: bool,
}

/// `ferry restore --json` (stderr).
#[derive(serde::Deserialize, Debug, Clone)]
#[allow(dead_code)]
pub struct RestoreJson {
    pub pid: i32,
    #[serde(default)]
    pub processes: u64,
    pub threads: u64,
    pub total_ms: f64,
    pub state_ms: f64,
    pub bytes_read: u64,
    pub pages: Pages,
}

#[derive(serde::Deserialize, Debug, Clone)]
pub struct Pages {
    pub data: u64,
    pub zero: u64,
}

/// A command line as one shell-pasteable string.
pub fn show_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./,=:+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Parses the last line of `text` that is a JSON object of type T (ferry's
/// JSON report shares stderr with its log lines).
pub fn parse_json_line<T: DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    let mut last_err = None;
    for line in text.lines().rev().map(str::trim) {
        if !line.starts_with('{') {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => return Ok(v),
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) => Err(e).with_context(|| format!("parsing the JSON {what}: {}", text.trim())),
        None => bail!("no JSON {what} in ferry's output: {:?}", text.trim()),
    }
}

// ---- statistics ---------------------------------------------------------------

/// Median of the values (mean of the middle two for an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Waits until the log has a line `want` (or fails on FAIL, on the death
/// of `pid` when given, or after `limit`).
pub fn wait_line(
    log: &Path,
    want: &str,
    pid: Option<i32>,
    limit: Duration,
    when: &str,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        check_interrupted()?;
        let text = fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("FAIL")) {
            bail!("the job failed {when}: {l}");
        }
        if text.lines().any(|l| l == want) {
            return Ok(());
        }
        if let Some(pid) = pid {
            if proc_stat(pid).is_none_or(|(_, s)| matches!(s, 'Z' | 'X')) {
                bail!(
                    "the job (pid {pid}) exited {when} without `{want}`; log:\n{}",
                    log_tail(log, 10)
                );
            }
        }
        if t0.elapsed() > limit {
            bail!(
                "no `{want}` from the job {when} after {limit:?}; log:\n{}",
                log_tail(log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median([]).is_nan());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--sizes"), "--sizes");
        assert_eq!(shell_quote("16,1024"), "16,1024");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn json_line() {
        #[derive(serde::Deserialize)]
        struct X {
            a: u32,
        }
        let x: X = parse_json_line("WARN something\n{\"a\": 7}\n", "report").unwrap();
        assert_eq!(x.a, 7);
        assert!(parse_json_line::<X>("nothing here", "report").is_err());
    }

    #[test]
    fn tempdir_removed() {
        let p;
        {
            let t = TempDir::new(&std::env::temp_dir(), "ferry-bench-test", false).unwrap();
            p = t.path().to_path_buf();
            fs::write(p.join("f"), b"1234").unwrap();
            fs::create_dir(p.join("d")).unwrap();
            fs::write(p.join("d/g"), b"12").unwrap();
            assert_eq!(dir_size(&p).unwrap(), 6);
        }
        assert!(!p.exists());
    }
}
