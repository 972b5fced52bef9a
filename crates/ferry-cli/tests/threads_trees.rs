//! End-to-end tests of multi-threaded processes, process trees and `ferry
//! run` jobs, on the self-verifying workloads in `tests/workloads/`
//! (`threads`, `omp`, `tree`, `shm`, `counter`; see the README there).
//!
//! For each of threads, omp, tree and shm, two tests, each repeated
//! FERRY_TEST_REPS times (default 20) with a fresh job and a random
//! 100-500 ms delay before the checkpoint, stopping at the first failing
//! iteration:
//! - checkpoint (kills the whole tree: every recorded pid must be gone, the
//!   others SIGKILLed like the root), then restore in the foreground: exit 0
//!   and one PASS line;
//! - checkpoint --leave-running: the original PASSes, then the image is
//!   restored and PASSes too.
//!
//! And `ferry run`: a detached job checkpointed, restored detached (new
//! namespace, new outside pid, same inside pids), checkpointed again and
//! restored in the foreground; a foreground job's exit status.
//!
//! The test process makes itself a child subreaper (PR_SET_CHILD_SUBREAPER):
//! when ferry kills a tree, the root is our child and its children are
//! reparented to us rather than to pid 1 (which, in some containers, never
//! reaps them, so their pids would stay taken and the restore would fail);
//! we reap exactly the pids recorded before the checkpoint and wait until
//! /proc has none of them. A detached `ferry run` job's init ends up as our
//! child for the same reason.
//!
//! Needs root (skips otherwise). Tests run one at a time under
//! [`ptrace_lock`]; with 20 repetitions the file takes about 4 minutes on 2
//! cores.

mod common;

use common::procs::{
    become_subreaper, exe_of, kill_leftovers, ns_pids, stat_of, thread_count, tree_of,
    wait_vanished,
};
use common::*;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// WORKLOAD_SECS of the repeated jobs: long enough that a checkpoint after
/// at most 500 ms still finds them working.
const REP_SECS: &str = "1";

/// Bound for processes to disappear after being killed or finishing.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// Repetitions per test: FERRY_TEST_REPS, default 20.
fn reps() -> usize {
    std::env::var("FERRY_TEST_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(20)
}

/// 100-500 ms, different from call to call; FERRY_TEST_DELAY_MS pins it.
fn delay() -> Duration {
    if let Some(ms) = std::env::var("FERRY_TEST_DELAY_MS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let d = Duration::from_millis(100 + x % 401);
    eprintln!("delay before checkpoint: {} ms", d.as_millis());
    d
}

fn describe_wait(st: i32) -> String {
    describe(ExitStatus::from_raw(st))
}

// ---------------------------------------------------------------------------
// Workloads under test

struct Spec {
    name: &'static str,
    args: &'static [&'static str],
    /// Processes in the tree (root included) while it works.
    procs: usize,
    /// Threads of the root process.
    threads: usize,
}

const THREADS: Spec = Spec {
    name: "threads",
    args: &[],
    procs: 1,
    threads: 8 + 4 + 1, // workers, helpers, main
};
const OMP: Spec = Spec {
    name: "omp",
    args: &[],
    procs: 1,
    threads: 4,
};
const TREE: Spec = Spec {
    name: "tree",
    args: &[],
    procs: 4, // root, A, B and the zombie C
    threads: 1,
};
const SHM: Spec = Spec {
    name: "shm",
    args: &[],
    procs: 2,
    threads: 1,
};

/// A started job plus the other pids of its tree, so that whatever is left
/// of it after a failure is killed and reaped.
struct TreeJob {
    job: Job,
    exe: PathBuf,
    /// Every pid of the tree, root first, as recorded before the checkpoint.
    pids: Vec<i32>,
    /// The state of each at that moment ('Z' for a zombie).
    states: Vec<char>,
}

impl TreeJob {
    fn start(spec: &Spec) -> TreeJob {
        let exe = workload(spec.name);
        let mut job = Job::start(spec.name, spec.args, &[("WORKLOAD_SECS", REP_SECS)]);
        job.wait_ready(TIMEOUT);
        TreeJob {
            job,
            exe,
            pids: Vec::new(),
            states: Vec::new(),
        }
    }

    /// Records the tree just before a checkpoint and checks its shape.
    fn record(&mut self, spec: &Spec) {
        let root = self.job.pid();
        self.pids = tree_of(root);
        self.states = self
            .pids
            .iter()
            .map(|&p| stat_of(p).map_or('?', |s| s.1))
            .collect();
        eprintln!("tree of {}: {:?} {:?}", spec.name, self.pids, self.states);
        assert_eq!(
            self.pids.len(),
            spec.procs,
            "{} should be {} processes before the checkpoint, found {:?}; log:\n{}",
            spec.name,
            spec.procs,
            self.pids,
            self.job.log()
        );
        let threads = thread_count(root);
        assert_eq!(
            threads, spec.threads,
            "{} (pid {root}) should have {} threads, has {threads}",
            spec.name, spec.threads
        );
    }

    /// The recorded pids other than the root (the root is the Job's child).
    fn others(&self) -> &[i32] {
        &self.pids[1..]
    }

    fn checkpoint(&self, img: &Path, leave_running: bool) {
        let pid = self.job.pid().to_string();
        let mut args = vec!["checkpoint", pid.as_str(), "-D", img.to_str().unwrap()];
        if leave_running {
            args.push("--leave-running");
        }
        let out = ferry(&args);
        assert_ferry_ok(&out, "ferry checkpoint", &self.job);
    }

    /// After a killing checkpoint: the root died of SIGKILL, and every other
    /// process of the tree is gone too (reaped by us), killed by SIGKILL
    /// unless it was a zombie already.
    fn check_all_killed(&mut self) {
        let st = self.job.reap();
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "the checkpointed root should have been SIGKILLed, but it ended with {}; log:\n{}",
            describe(st),
            self.job.log()
        );
        let reaped = wait_vanished(self.others(), GONE_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "processes of the checkpointed {} tree {:?} not all gone: {e}; log:\n{}",
                self.job.name(),
                self.pids,
                self.job.log()
            )
        });
        for (pid, st) in reaped {
            let i = self.pids.iter().position(|&p| p == pid).unwrap();
            if self.states[i] == 'Z' {
                continue;
            }
            assert!(
                libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
                "pid {pid} of the checkpointed {} tree should have been SIGKILLed, \
                 but it ended with {}; log:\n{}",
                self.job.name(),
                describe_wait(st),
                self.job.log()
            );
        }
    }

    /// Foreground restore: ferry exits 0 and the whole restored tree is gone
    /// afterwards.
    fn restore_foreground(&self, img: &Path) {
        let out = ferry(&["restore", "-D", img.to_str().unwrap()]);
        assert_ferry_ok(&out, "ferry restore", &self.job);
        if let Err(e) = wait_vanished(&self.pids, GONE_TIMEOUT) {
            panic!(
                "restored {} tree {:?} left processes behind after the foreground restore \
                 returned: {e}; log:\n{}",
                self.job.name(),
                self.pids,
                self.job.log()
            );
        }
    }
}

impl Drop for TreeJob {
    fn drop(&mut self) {
        // The root (original or restored copy) first, then the rest.
        self.job.kill();
        kill_leftovers(&self.pids, std::slice::from_ref(&self.exe));
    }
}

/// a) checkpoint (kill), restore in the foreground.
fn kill_restore_once(spec: &Spec) {
    let mut t = TreeJob::start(spec);
    sleep(delay());
    t.record(spec);
    let img = t.job.path("img");
    t.checkpoint(&img, false);
    t.check_all_killed();
    t.restore_foreground(&img);
    assert_passes(&t.job.log(), spec.name, 1);
}

/// b) checkpoint --leave-running: the original PASSes, then the image does.
fn leave_running_once(spec: &Spec) {
    let mut t = TreeJob::start(spec);
    sleep(delay());
    t.record(spec);
    let img = t.job.path("img");
    t.checkpoint(&img, true);
    assert!(
        t.job.running(),
        "the original died after checkpoint --leave-running; log:\n{}",
        t.job.log()
    );
    let st = t.job.wait_exit(TIMEOUT);
    assert!(
        st.success(),
        "the original ended with {} after --leave-running; log:\n{}",
        describe(st),
        t.job.log()
    );
    assert_passes(&t.job.log(), spec.name, 1);
    // The root reaps its own children; they must all be gone before their
    // pids can be reused by the restore.
    if let Err(e) = wait_vanished(t.others(), GONE_TIMEOUT) {
        panic!(
            "the original {} tree left processes behind: {e}; log:\n{}",
            spec.name,
            t.job.log()
        );
    }
    t.restore_foreground(&img);
    assert_passes(&t.job.log(), spec.name, 2);
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "(non-string panic)".into()
    }
}

/// Runs `once(spec)` FERRY_TEST_REPS times, failing on the first failure
/// with its iteration number (the job's log is in the message and printed
/// by [`Job`]'s drop).
fn repeat(spec: &Spec, what: &str, once: fn(&Spec)) {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    become_subreaper();
    let n = reps();
    let started = Instant::now();
    for i in 1..=n {
        eprintln!("=== {} {what}: iteration {i}/{n}", spec.name);
        let t = Instant::now();
        if let Err(e) = panic::catch_unwind(AssertUnwindSafe(|| once(spec))) {
            panic!(
                "{} {what}: iteration {i} of {n} failed: {}",
                spec.name,
                panic_text(&*e)
            );
        }
        eprintln!("iteration {i} took {:.2?}", t.elapsed());
    }
    eprintln!(
        "{} {what}: {n} iterations passed in {:.1?}",
        spec.name,
        started.elapsed()
    );
}

macro_rules! repeated_tests {
    ($($module:ident: $spec:ident;)*) => {$(
        mod $module {
            #[test]
            fn checkpoint_kill_restore_repeated() {
                super::repeat(&super::$spec, "checkpoint+restore", super::kill_restore_once);
            }
            #[test]
            fn checkpoint_leave_running_then_restore_repeated() {
                super::repeat(
                    &super::$spec,
                    "checkpoint --leave-running + restore",
                    super::leave_running_once,
                );
            }
        }
    )*};
}

repeated_tests! {
    threads: THREADS;
    omp: OMP;
    tree: TREE;
    shm: SHM;
}

// ---------------------------------------------------------------------------
// ferry run

/// A directory for a `ferry run` job (its log, FERRY_TEST_TMP, images) and
/// the pids to clean up if the test fails.
struct RunJob {
    name: String,
    dir: PathBuf,
    pids: Vec<i32>,
    exes: Vec<PathBuf>,
}

impl RunJob {
    fn new(name: &str) -> RunJob {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jobs");
        fs::create_dir_all(&base).expect("create job base dir");
        let dir = base.join(format!(
            "run-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        RunJob {
            name: name.to_string(),
            dir,
            pids: Vec::new(),
            exes: vec![PathBuf::from(FERRY)],
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn wait_ready(&self, pid: i32) {
        let end = Instant::now() + TIMEOUT;
        while !self.log().lines().any(|l| l == "READY") {
            assert!(
                pid_alive(pid),
                "{} (pid {pid}) ended before READY; log:\n{}",
                self.name,
                self.log()
            );
            assert!(
                Instant::now() < end,
                "{} not READY after {TIMEOUT:?}; log:\n{}",
                self.name,
                self.log()
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// The job's init (its parent) and every process below it, init first.
    fn record(&mut self, pid: i32) -> Vec<i32> {
        let (init, _) = stat_of(pid).unwrap_or_else(|| panic!("pid {pid} is gone"));
        let pids = tree_of(init);
        assert!(
            pids.contains(&pid),
            "pid {pid} is not below its parent {init}?"
        );
        eprintln!("job {}: init {init}, tree {pids:?}", self.name);
        self.pids.extend(&pids);
        pids
    }
}

impl Drop for RunJob {
    fn drop(&mut self) {
        // Inits first: killing one takes its whole namespace down.
        let ferry = fs::canonicalize(FERRY).ok();
        let mut pids = self.pids.clone();
        pids.sort_by_key(|&p| exe_of(p) != ferry);
        kill_leftovers(&pids, &self.exes);
        if thread::panicking() || std::env::var_os("FERRY_TEST_KEEP").is_some() {
            eprintln!("kept job directory {}", self.dir.display());
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

/// Runs `ferry ARGS` with stdin /dev/null and stdout/stderr appended to
/// `log` (which a `ferry run` job inherits), plus `env`; kills it and panics
/// after `timeout`.
fn ferry_to_log(
    args: &[&OsStr],
    env: &[(&str, &OsStr)],
    log: &Path,
    timeout: Duration,
) -> ExitStatus {
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    eprintln!("$ ferry {} >>{}", shown.join(" "), log.display());
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(log)
        .expect("open log");
    let mut cmd = Command::new(FERRY);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cloexec_inherited_fds(&mut cmd);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {FERRY}: {e}"));
    let end = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("waitpid ferry") {
            eprintln!("  -> {st}");
            return st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ferry {} did not finish within {timeout:?}; log:\n{}",
                shown.join(" "),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(10));
    }
}

/// The single number ferry printed on stdout.
fn printed_pid(out: &std::process::Output, what: &str) -> i32 {
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    s.parse()
        .unwrap_or_else(|_| panic!("{what} should print a pid, printed {s:?}"))
}

fn assert_ok(out: &std::process::Output, what: &str, job: &RunJob) {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstderr: {}\njob log:\n{}",
        describe(out.status),
        String::from_utf8_lossy(&out.stderr),
        job.log()
    );
    assert_no_panic(out);
}

/// Checkpoints (kills) the job whose main process is `pid`, whose init and
/// tree are `pids`; all of them must be gone afterwards.
fn checkpoint_run_job(job: &RunJob, pid: i32, pids: &[i32], img: &Path) {
    let p = pid.to_string();
    let out = ferry(&["checkpoint", p.as_str(), "-D", img.to_str().unwrap()]);
    assert_ok(&out, "ferry checkpoint of a `ferry run` job", job);
    if let Err(e) = wait_vanished(pids, GONE_TIMEOUT) {
        panic!(
            "the checkpointed job's processes (init first) {pids:?} are not all gone: {e}; log:\n{}",
            job.log()
        );
    }
}

/// `ferry run --detach` a workload, checkpoint it, restore it detached,
/// let it run, checkpoint the restored job, restore that in the foreground.
fn run_detach_twice(name: &str, secs: &str, procs: usize) {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    become_subreaper();
    let exe = workload(name);
    let mut job = RunJob::new(name);
    job.exes.push(exe.clone());
    let tmp = job.dir.clone();
    let log = job.log_path();

    // The job's environment goes through env(1), which execs the workload
    // in place: the job's main process is the workload itself.
    let wl_secs = format!("WORKLOAD_SECS={secs}");
    let wl_tmp = format!("FERRY_TEST_TMP={}", tmp.display());
    let out = ferry(&[
        OsStr::new("run"),
        OsStr::new("--detach"),
        OsStr::new("--log"),
        log.as_os_str(),
        OsStr::new("--"),
        OsStr::new("/usr/bin/env"),
        OsStr::new(&wl_secs),
        OsStr::new(&wl_tmp),
        exe.as_os_str(),
    ]);
    assert_ok(&out, "ferry run --detach", &job);
    let pid = printed_pid(&out, "ferry run --detach");
    job.pids.push(pid);
    job.wait_ready(pid);
    sleep(delay());
    let pids = job.record(pid);
    assert_eq!(
        pids.len(),
        procs + 1,
        "want init + {procs} processes in the job, found {pids:?}"
    );
    let inside = ns_pids(pid);
    assert!(
        inside.len() >= 2,
        "pid {pid} is not in a nested pid namespace (NSpid {inside:?})"
    );

    let img1 = job.path("img1");
    checkpoint_run_job(&job, pid, &pids, &img1);

    let out = ferry(&["restore", "-D", img1.to_str().unwrap(), "--detach"]);
    assert_ok(&out, "ferry restore --detach of a `ferry run` job", &job);
    let new_pid = printed_pid(&out, "ferry restore --detach");
    job.pids.push(new_pid);
    assert!(
        pid_alive(new_pid),
        "restored job (pid {new_pid}) is not running; log:\n{}",
        job.log()
    );
    assert_eq!(
        exe_of(new_pid).and_then(|e| fs::canonicalize(e).ok()),
        fs::canonicalize(&exe).ok(),
        "pid {new_pid} printed by restore --detach does not run {name}"
    );
    let new_inside = ns_pids(new_pid);
    assert_eq!(
        new_inside.last(),
        inside.last(),
        "inside its namespace the restored main process should keep pid {:?} (NSpid was \
         {inside:?}, now {new_inside:?})",
        inside.last()
    );
    sleep(Duration::from_millis(300));
    let new_pids = job.record(new_pid);
    assert_eq!(
        new_pids.len(),
        procs + 1,
        "want init + {procs} processes in the restored job, found {new_pids:?}"
    );
    let img2 = job.path("img2");
    checkpoint_run_job(&job, new_pid, &new_pids, &img2);

    let out = ferry(&["restore", "-D", img2.to_str().unwrap()]);
    assert_ok(
        &out,
        "ferry restore (foreground) of a `ferry run` job",
        &job,
    );
    let log = job.log();
    assert_passes(&log, name, 1);
    let ready = log.lines().filter(|l| *l == "READY").count();
    assert_eq!(ready, 1, "READY printed {ready} times; log:\n{log}");
}

#[test]
fn run_detach_tree_checkpoint_restore_twice() {
    run_detach_twice("tree", "5", TREE.procs);
}

#[test]
fn run_detach_counter_checkpoint_restore_twice() {
    run_detach_twice("counter", "5", 1);
}

#[test]
fn run_foreground_exit_status() {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    become_subreaper();
    let exe = workload("counter");
    let job = RunJob::new("counter");
    let tmp = job.dir.clone();
    let st = ferry_to_log(
        &[OsStr::new("run"), OsStr::new("--"), exe.as_os_str()],
        &[
            ("WORKLOAD_SECS", OsStr::new("1")),
            ("FERRY_TEST_TMP", tmp.as_os_str()),
        ],
        &job.log_path(),
        TIMEOUT,
    );
    assert!(
        st.success(),
        "ferry run -- counter ended with {}; log:\n{}",
        describe(st),
        job.log()
    );
    assert_passes(&job.log(), "counter", 1);

    let st = ferry_to_log(
        &[
            OsStr::new("run"),
            OsStr::new("--"),
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new("exit 3"),
        ],
        &[],
        &job.path("sh.log"),
        TIMEOUT,
    );
    assert_eq!(
        st.code(),
        Some(3),
        "ferry run -- sh -c 'exit 3' ended with {}; output:\n{}",
        describe(st),
        fs::read_to_string(job.path("sh.log")).unwrap_or_default()
    );
}
