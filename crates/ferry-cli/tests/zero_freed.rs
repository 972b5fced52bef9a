//! End-to-end tests of ferry's freed-memory library from the CLI: `ferry
//! zero-lib-path` and `ferry run --zero-freed[=zero|release]`, which runs a
//! job with `LD_PRELOAD=libferry_zero.so FERRY_ZERO=MODE` (see
//! `crates/ferry-zero`).
//!
//! - `zero_lib_path_prints_library`: an existing absolute path ending in
//!   `libferry_zero.so`, next to the ferry binary.
//! - `run_zero_freed_*`: the allocation workloads `zero_alloc` (C) and
//!   `zero_cpp` (C++) run in the foreground under `--zero-freed=zero` and
//!   `--zero-freed` (release): exit 0, one PASS, and the statistics line
//!   the workload prints (FERRY_ZERO_STATS=1 in `ferry run`'s environment,
//!   inherited by the job) shows the library active in that mode.
//! - `checkpoint_shrinks_with_zero_freed`: a program that fills 200 heap
//!   blocks of 1 MiB (MALLOC_MMAP_THRESHOLD_=4 MiB keeps them on the brk
//!   heap), frees 150 of them (three in four, never next to the top chunk,
//!   so glibc cannot trim them) and waits, checkpointed as a detached `ferry
//!   run` job without the library, with `zero` and with `release`: with the
//!   library the image holds far fewer data pages (< 40 %), in zero mode
//!   the freed blocks are zero pages; the zero-mode image restores
//!   (`--detach`), keeps running, and its kept blocks are intact.
//! - `migrate_zero_alloc_under_zero_freed`: zero_alloc (WORKLOAD_SECS=10)
//!   started with `ferry run --detach --zero-freed=zero` on node A is
//!   live-migrated to an agent on node B (`common/netns.rs`) with the
//!   default controller and at most 4 live rounds (zero_alloc dirties
//!   200-300 MiB a second, so the adaptive controller alone may take 6 s
//!   or more): `ferry migrate --json` exits 0, reports zero pages, and the
//!   job PASSes once on B, still with the library in zero mode.
//!
//! `cargo test -p ferry-cli` does not build the cdylib, so the first test
//! that needs it runs `cargo build -p ferry-zero --lib` for the profile of
//! the ferry binary (see [`zero_lib`]); ferry finds it next to itself.
//!
//! Needs root (skips otherwise). Tests run one at a time under
//! [`ptrace_lock`]; the test process is a child subreaper, so detached
//! jobs' inits become our children and are reaped here. About 30 s on 2
//! cores.

mod common;

use common::netns::{Agent, Nodes, Ns, AGENT_PORT};
use common::procs::{self, Bg};
use common::*;
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Bound for processes to disappear after being killed or finishing.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for a migration that should succeed.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
const LIB_NAME: &str = "libferry_zero.so";

// ---------------------------------------------------------------------------
// The library and the programs

/// `libferry_zero.so` next to the ferry binary (`target/<profile>/`),
/// built once per test binary with `cargo build -p ferry-zero --lib` for
/// that profile (a no-op when it is fresh).
fn zero_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = fs::canonicalize(FERRY)
            .expect("canonicalize the ferry binary")
            .parent()
            .expect("ferry binary in target/<profile>")
            .to_path_buf();
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let profile = if profile == "debug" { "dev" } else { profile };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let res = Command::new(&cargo)
            .args(["build", "-p", "ferry-zero", "--lib", "--profile", profile])
            .current_dir(workspace_root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
        assert!(
            res.status.success(),
            "cargo build -p ferry-zero failed:\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let lib = dir.join(LIB_NAME);
        assert!(lib.is_file(), "{} missing after cargo build", lib.display());
        lib
    })
    .clone()
}

/// Compiles `src` with `compiler -O2 -g -pthread` into
/// CARGO_TARGET_TMPDIR/workloads/NAME, once per test binary (and only when
/// the binary is older than the source or common.h).
fn compile(compiler: &str, src: &Path, name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("workloads");
    fs::create_dir_all(&out_dir).expect("create workload output dir");
    let out = out_dir.join(name);
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let newest = [mtime(src), mtime(&workloads_dir().join("common.h"))]
        .into_iter()
        .flatten()
        .max();
    if !matches!((mtime(&out), newest), (Some(b), Some(s)) if b >= s) {
        let tmp = out_dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let res = Command::new(compiler)
            .args(["-O2", "-g", "-pthread", "-o"])
            .arg(&tmp)
            .arg(src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
        assert!(
            res.status.success(),
            "building {name} failed:\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        fs::rename(&tmp, &out).expect("rename built program");
    }
    built.push((name.to_string(), out.clone()));
    out
}

/// The allocation workloads: zero_alloc.c through the harness, zero_cpp.cc
/// (C++, which `workload()` does not build) with g++.
fn zero_workload(name: &str) -> PathBuf {
    if name == "zero_cpp" {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        compile(&cxx, &workloads_dir().join("zero_cpp.cc"), name)
    } else {
        workload(name)
    }
}

/// The checkpoint subject of `checkpoint_shrinks_with_zero_freed`.
const HOLD_C: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 200
#define SZ (1u << 20)

static volatile sig_atomic_t check;
static void on_usr1(int s) { (void)s; check = 1; }

static void say(const char *s)
{
    (void)!write(1, s, strlen(s));
}

int main(void)
{
    static unsigned char *b[N];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    for (int i = 0; i < N; i++) {
        b[i] = malloc(SZ);
        if (!b[i]) {
            say("FAIL zero_hold: malloc\n");
            return 1;
        }
        memset(b[i], 1 + i % 251, SZ);
    }
    /* Free three blocks in four; the kept ones (i % 4 == 3, the last block
     * among them) separate the freed runs from each other and from the top
     * chunk, so the heap cannot shrink. */
    for (int i = 0; i < N; i++)
        if (i % 4 != 3) {
            free(b[i]);
            b[i] = NULL;
        }
    say("READY\n");
    while (!check)
        usleep(20000);
    for (int i = 3; i < N; i += 4)
        for (size_t j = 0; j < SZ; j++)
            if (b[i][j] != 1 + i % 251) {
                say("FAIL zero_hold: kept block changed\n");
                return 1;
            }
    say("PASS zero_hold\n");
    return 0;
}
"#;

fn hold_program() -> PathBuf {
    static SRC: OnceLock<PathBuf> = OnceLock::new();
    let src = SRC.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("workloads");
        fs::create_dir_all(&dir).expect("create workload output dir");
        let src = dir.join("zero_hold.c");
        if fs::read_to_string(&src).ok().as_deref() != Some(HOLD_C) {
            fs::write(&src, HOLD_C).expect("write zero_hold.c");
        }
        src
    });
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    compile(&cc, src, "zero_hold")
}

// ---------------------------------------------------------------------------
// Jobs and their cleanup

fn fresh_dir(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jobs");
    fs::create_dir_all(&base).expect("create job base dir");
    let dir = base.join(format!(
        "zero-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// A job directory (log, images) and every pid the job had, killed (if
/// still running one of its programs) and reaped on drop.
struct ZJob {
    name: String,
    dir: PathBuf,
    exe: PathBuf,
    pids: Vec<i32>,
}

impl ZJob {
    fn new(name: &str, exe: PathBuf) -> ZJob {
        ZJob {
            name: name.to_string(),
            dir: fresh_dir(name),
            exe,
            pids: Vec::new(),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn remember(&mut self, pids: &[i32]) {
        for &p in pids {
            if p > 0 && !self.pids.contains(&p) {
                self.pids.push(p);
            }
        }
    }

    /// Remembers `pid` and its parent (the job's init).
    fn remember_with_init(&mut self, pid: i32) -> i32 {
        let init = procs::ppid_of(pid).unwrap_or_else(|| panic!("job pid {pid} is gone"));
        self.remember(&[init, pid]);
        init
    }

    /// Waits for a line equal to `line` while `pid` lives.
    fn wait_line(&self, line: &str, pid: i32) {
        let end = Instant::now() + TIMEOUT;
        while !self.log().lines().any(|l| l == line) {
            assert!(
                pid_alive(pid),
                "{} (pid {pid}) ended before `{line}`; log:\n{}",
                self.name,
                self.log()
            );
            assert!(
                Instant::now() < end,
                "{}: no `{line}` after {TIMEOUT:?}; log:\n{}",
                self.name,
                self.log()
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a PASS or FAIL line (the job may have moved to another
    /// pid) and returns the log.
    fn wait_verdict(&self) -> String {
        wait_log_verdict(&self.log_path(), &self.name, TIMEOUT, String::new)
    }
}

impl Drop for ZJob {
    fn drop(&mut self) {
        end_job(&self.pids, &self.exe, &self.dir, &self.name, || self.log());
    }
}

/// `KEY=VALUE` for env(1).
fn env_arg(key: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut s = OsString::from(format!("{key}="));
    s.push(value);
    s
}

/// A `ferry` command without any inherited library settings.
fn clean(mut cmd: Command) -> Command {
    for k in [
        "LD_PRELOAD",
        "FERRY_ZERO",
        "FERRY_ZERO_MIN",
        "FERRY_ZERO_STATS",
        "FERRY_ZERO_REALLOC",
    ] {
        cmd.env_remove(k);
    }
    cmd
}

/// Appends `run --detach --log LOG [ZERO] -- /usr/bin/env ENV.. EXE` to
/// `cmd` (`ferry`, possibly through `ip netns exec`), runs it, and returns
/// the job's pid (remembered with its init in `job`).
fn run_detached(mut cmd: Command, job: &mut ZJob, zero: Option<&str>, env: &[OsString]) -> i32 {
    let log = job.log_path();
    cmd.args(["run", "--detach", "--log"]).arg(&log);
    if let Some(z) = zero {
        cmd.arg(z);
    }
    cmd.args(["--", "/usr/bin/env"]).args(env).arg(&job.exe);
    let out = procs::output_with_timeout(&mut cmd, "ferry run --detach", TIMEOUT);
    ok(&out, "ferry run --detach", job);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let pid: i32 = text
        .parse()
        .unwrap_or_else(|_| panic!("ferry run --detach should print a pid, printed {text:?}"));
    let init = job.remember_with_init(pid);
    eprintln!("job {}: pid {pid}, init {init}", job.name);
    pid
}

fn ok(out: &Output, what: &str, job: &ZJob) {
    assert!(
        out.status.success(),
        "{what} failed: {}\nstderr: {}\njob log:\n{}",
        describe(out.status),
        String::from_utf8_lossy(&out.stderr),
        job.log()
    );
    assert_no_panic(out);
}

/// Whether `pid` has the library mapped.
fn maps_library(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .contains(LIB_NAME)
}

/// Counters of the `ferry-zero: mode=..` statistics line the workload
/// printed before its PASS line (ferry's init, preloaded too, may print one
/// of its own at exit, after it).
fn workload_stats(log: &str, name: &str) -> Vec<(String, String)> {
    let pass = format!("PASS {name}");
    let before_pass = log.lines().take_while(|l| *l != pass);
    let line = before_pass
        .filter(|l| l.starts_with("ferry-zero: mode="))
        .last()
        .unwrap_or_else(|| panic!("{name}: no ferry-zero statistics line before PASS:\n{log}"));
    line["ferry-zero: ".len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn stat<'a>(stats: &'a [(String, String)], key: &str) -> &'a str {
    stats
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no `{key}` in the statistics {stats:?}"))
}

fn counter(stats: &[(String, String)], key: &str) -> u64 {
    stat(stats, key)
        .parse()
        .unwrap_or_else(|_| panic!("`{key}` is not a number in {stats:?}"))
}

/// `json["pages"][kind]`.
fn pages(json: &Value, kind: &str) -> u64 {
    json.get("pages")
        .and_then(|p| p.get(kind))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no pages.{kind} in {json}"))
}

fn parse_json(out: &Output, what: &str) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what} should print one JSON object ({e}):\n{text}"))
}

/// None (after a note) when not root; otherwise the ptrace lock, with the
/// test process made a child subreaper.
fn setup() -> Option<MutexGuard<'static, ()>> {
    if skip_unless_root() {
        return None;
    }
    let lock = ptrace_lock();
    procs::become_subreaper();
    Some(lock)
}

// ---------------------------------------------------------------------------
// 1. ferry zero-lib-path

#[test]
fn zero_lib_path_prints_library() {
    let Some(_lock) = setup() else { return };
    let lib = zero_lib();
    let out = ferry(&["zero-lib-path"]);
    assert!(
        out.status.success(),
        "ferry zero-lib-path failed: {}\nstderr: {}",
        describe(out.status),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_panic(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got {text:?}");
    let printed = Path::new(lines[0]);
    assert!(printed.is_absolute(), "not an absolute path: {printed:?}");
    assert!(
        printed.file_name().is_some_and(|n| n == LIB_NAME),
        "does not end in {LIB_NAME}: {printed:?}"
    );
    assert!(printed.is_file(), "{printed:?} does not exist");
    assert_eq!(
        fs::canonicalize(printed).ok(),
        fs::canonicalize(&lib).ok(),
        "should be the library next to the ferry binary"
    );
}

// ---------------------------------------------------------------------------
// 2. The allocation workloads in the foreground

/// `ferry run --log LOG ZERO_ARG -- WORKLOAD` with FERRY_ZERO_STATS=1 (and
/// WORKLOAD_SECS=1) in ferry's environment: exit 0, one PASS, statistics of
/// an active library in `mode`.
fn run_foreground(name: &str, zero_arg: &str, mode: &str) {
    let Some(_lock) = setup() else { return };
    zero_lib();
    let job = ZJob::new(name, zero_workload(name));
    let mut cmd = clean(Command::new(FERRY));
    cmd.args(["run", "--log"])
        .arg(job.log_path())
        .args([zero_arg, "--"])
        .arg(&job.exe)
        .env("WORKLOAD_SECS", "1")
        .env("FERRY_TEST_TMP", &job.dir)
        .env("FERRY_ZERO_STATS", "1");
    let out = procs::output_with_timeout(&mut cmd, &format!("ferry run {zero_arg}"), TIMEOUT);
    ok(&out, &format!("ferry run {zero_arg} -- {name}"), &job);
    let log = job.log();
    assert_passes(&log, name, 1);
    let s = workload_stats(&log, name);
    eprintln!("{name} {zero_arg}: {s:?}");
    assert_eq!(stat(&s, "mode"), mode, "{s:?}");
    assert_eq!(
        stat(&s, "active"),
        "1",
        "glibc malloc not recognised: {s:?}"
    );
    assert_eq!(
        stat(&s, "stats"),
        "1",
        "FERRY_ZERO_STATS not inherited: {s:?}"
    );
    assert!(counter(&s, "chunks") > 1000, "{s:?}");
    assert_eq!(counter(&s, "bootstrap_leaks"), 0, "{s:?}");
    if mode == "zero" {
        assert!(counter(&s, "bytes_zeroed") > 1 << 20, "{s:?}");
        assert_eq!(counter(&s, "pages_released"), 0, "{s:?}");
    } else {
        assert!(counter(&s, "pages_released") > 100, "{s:?}");
        assert_eq!(counter(&s, "madvise_failures"), 0, "{s:?}");
    }
}

#[test]
fn run_zero_freed_zero_alloc_zero() {
    run_foreground("zero_alloc", "--zero-freed=zero", "zero");
}

#[test]
fn run_zero_freed_zero_alloc_release() {
    run_foreground("zero_alloc", "--zero-freed", "release");
}

#[test]
fn run_zero_freed_zero_cpp_zero() {
    run_foreground("zero_cpp", "--zero-freed=zero", "zero");
}

#[test]
fn run_zero_freed_zero_cpp_release() {
    run_foreground("zero_cpp", "--zero-freed", "release");
}

// ---------------------------------------------------------------------------
// 3. Effect on a checkpoint

/// Runs zero_hold detached with `zero` (None: without the library), waits
/// for READY and checkpoints it into `img`; returns the report.
fn hold_and_checkpoint(job: &mut ZJob, zero: Option<&str>, img: &Path) -> Value {
    let env = [env_arg("MALLOC_MMAP_THRESHOLD_", "4194304")];
    let pid = run_detached(clean(Command::new(FERRY)), job, zero, &env);
    job.wait_line("READY", pid);
    assert_eq!(
        maps_library(pid),
        zero.is_some(),
        "zero_hold {zero:?} (pid {pid}): libferry_zero.so mapped: {}",
        maps_library(pid)
    );
    let tree = procs::tree_of(procs::ppid_of(pid).expect("job init"));
    let p = pid.to_string();
    let out = ferry(&[
        "checkpoint",
        p.as_str(),
        "-D",
        img.to_str().unwrap(),
        "--json",
    ]);
    ok(
        &out,
        &format!("ferry checkpoint of zero_hold {zero:?}"),
        job,
    );
    if let Err(e) = procs::wait_vanished(&tree, GONE_TIMEOUT) {
        panic!("checkpointed job {tree:?} not gone: {e}");
    }
    let json = parse_json(&out, "ferry checkpoint --json");
    eprintln!(
        "zero_hold {}: pages.data {} pages.zero {}",
        zero.unwrap_or("(no library)"),
        pages(&json, "data"),
        pages(&json, "zero")
    );
    json
}

#[test]
fn checkpoint_shrinks_with_zero_freed() {
    let Some(_lock) = setup() else { return };
    zero_lib();
    let exe = hold_program();
    // One job (directory, log, image) per configuration.
    let mut job_none = ZJob::new("zero_hold", exe.clone());
    let mut job_zero = ZJob::new("zero_hold", exe.clone());
    let mut job_release = ZJob::new("zero_hold", exe);
    let img_none = job_none.dir.join("img");
    let img_zero = job_zero.dir.join("img");
    let img_release = job_release.dir.join("img");
    let none = hold_and_checkpoint(&mut job_none, None, &img_none);
    let zero = hold_and_checkpoint(&mut job_zero, Some("--zero-freed=zero"), &img_zero);
    let release = hold_and_checkpoint(&mut job_release, Some("--zero-freed=release"), &img_release);
    let data = |j: &Value| pages(j, "data");
    let counts = format!(
        "pages (data, zero): none ({}, {}), zero ({}, {}), release ({}, {})",
        data(&none),
        pages(&none, "zero"),
        data(&zero),
        pages(&zero, "zero"),
        data(&release),
        pages(&release, "zero")
    );
    eprintln!("{counts}");
    // 200 MiB of filled blocks, 150 MiB of them freed.
    assert!(
        data(&none) >= 200 * 256,
        "no-library image too small: {counts}"
    );
    for (what, j) in [("zero", &zero), ("release", &release)] {
        assert!(
            data(j) * 100 < data(&none) * 40,
            "with --zero-freed={what} the image should hold < 40 % of the data pages: {counts}"
        );
    }
    assert!(
        pages(&zero, "zero") >= 140 * 256,
        "zero mode: the freed 150 MiB should be zero pages: {counts}"
    );
    assert!(
        pages(&release, "zero") < 10 * 256,
        "release mode: the freed pages should be absent, not zero pages: {counts}"
    );
    drop(job_none);
    drop(job_release);

    // The zero-mode image restores and keeps running, kept blocks intact.
    let out = ferry(&["restore", "-D", img_zero.to_str().unwrap(), "--detach"]);
    ok(
        &out,
        "ferry restore --detach of the zero-mode image",
        &job_zero,
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let pid: i32 = text
        .parse()
        .unwrap_or_else(|_| panic!("ferry restore --detach should print a pid, printed {text:?}"));
    let init = job_zero.remember_with_init(pid);
    assert!(
        procs::runs(pid, &job_zero.exe),
        "restored pid {pid} runs {:?}",
        procs::exe_of(pid)
    );
    assert!(
        maps_library(pid),
        "restored pid {pid} lost the library mapping"
    );
    sleep(Duration::from_millis(300));
    assert!(
        pid_alive(pid),
        "restored zero_hold (pid {pid}) is not running; log:\n{}",
        job_zero.log()
    );
    assert!(
        job_zero.log().lines().all(|l| !l.starts_with("FAIL")),
        "{}",
        job_zero.log()
    );
    // Kept blocks must have survived checkpoint and restore.
    procs::signal(pid, libc::SIGUSR1);
    let log = job_zero.wait_verdict();
    assert_passes(&log, "zero_hold", 1);
    if let Err(e) = procs::wait_vanished(&[pid, init], GONE_TIMEOUT) {
        panic!("restored job did not end after its PASS: {e}");
    }
}

// ---------------------------------------------------------------------------
// 4. Live migration under the library

fn write_token(path: &Path) {
    let mut raw = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .expect("read /dev/urandom");
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(path, format!("{hex}\n")).expect("write token");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod token");
}

#[test]
fn migrate_zero_alloc_under_zero_freed() {
    let Some(_lock) = setup() else { return };
    zero_lib();
    let nodes = Nodes::new();
    let mut job = ZJob::new("zero_alloc", workload("zero_alloc"));
    let token = job.dir.join("token");
    write_token(&token);
    let mut agent = Agent::start(&nodes, Ns::B, AGENT_PORT, Some(&token));

    let env = [
        env_arg("WORKLOAD_SECS", "10"),
        env_arg("FERRY_TEST_TMP", &job.dir),
        env_arg("FERRY_ZERO_STATS", "1"),
    ];
    let pid = run_detached(
        clean(nodes.exec(Ns::A, FERRY)),
        &mut job,
        Some("--zero-freed=zero"),
        &env,
    );
    job.wait_line("READY", pid);
    assert!(nodes.contains(Ns::A, pid), "job pid {pid} is not on A");
    assert!(maps_library(pid), "job pid {pid} does not map {LIB_NAME}");
    sleep(Duration::from_millis(300));
    let source = procs::tree_of(procs::ppid_of(pid).expect("job init"));
    job.remember(&source);

    let mut cmd = nodes.exec(Ns::A, FERRY);
    cmd.arg("migrate")
        .arg(pid.to_string())
        .arg("--to")
        .arg(agent.addr().to_string())
        .arg("--token-file")
        .arg(&token)
        // zero_alloc rewrites its memory all the time (and zero mode
        // memsets every freed chunk): bound the live phase so that the
        // migration ends well before the job does, however the default
        // controller judges the rounds.
        .args(["--json", "--max-iterations", "4"]);
    let out = Bg::spawn(&mut cmd, &format!("ferry migrate {pid}")).wait(MIGRATE_TIMEOUT);
    if !out.status.success() {
        panic!(
            "ferry migrate failed: {}\nstderr: {}\nagent stderr:\n{}\njob log:\n{}",
            describe(out.status),
            String::from_utf8_lossy(&out.stderr),
            agent.stderr(),
            job.log()
        );
    }
    assert_no_panic(&out);
    let json = parse_json(&out, "ferry migrate --json");
    eprintln!("migrate report: {json}");
    let target = json
        .get("target_pid")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("no target_pid in {json}")) as i32;
    job.remember(&[target]);
    if let Some(init) = procs::ppid_of(target) {
        job.remember(&[init]);
    }
    assert!(
        pages(&json, "zero") > 0,
        "zero mode: the migration should have sent zero pages: {json}"
    );
    if let Err(e) = procs::wait_vanished(&source, GONE_TIMEOUT) {
        panic!("the source job {source:?} is not gone after the migration: {e}");
    }
    if pid_alive(target) {
        assert!(
            nodes.contains(Ns::B, target),
            "target pid {target} is not on node B"
        );
    }

    let log = job.wait_verdict();
    assert_passes(&log, "zero_alloc", 1);
    let ready = log.lines().filter(|l| *l == "READY").count();
    assert_eq!(ready, 1, "READY printed {ready} times; log:\n{log}");
    let s = workload_stats(&log, "zero_alloc");
    assert_eq!(stat(&s, "mode"), "zero", "{s:?}");
    assert_eq!(stat(&s, "active"), "1", "{s:?}");
    agent.assert_healthy("after the migration");
    if let Err(e) = procs::wait_vanished(&[target], GONE_TIMEOUT) {
        panic!("the migrated job did not end after its PASS: {e}");
    }
}
