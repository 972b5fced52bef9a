//! End-to-end tests of live migration: `ferry agent` and `ferry migrate`
//! between two "nodes" on one host, two network namespaces joined by a veth
//! pair (`common/netns.rs`), on the self-verifying workloads of
//! `tests/workloads/` (READY, then PASS or FAIL; see the README there).
//!
//! Every test builds a fresh pair of nodes A (source) and B (target) and,
//! except the refusal test, starts `ferry agent --listen ADDR_B:7707
//! --token-file T` on B. A job is started on A with `ferry run --detach
//! --log LOG -- env WORKLOAD_SECS=.. FERRY_TEST_TMP=.. WORKLOAD ARGS` (its
//! main process is the workload itself, in a pid namespace of its own), and
//! `ferry migrate PID --to ADDR_B:7707 --token-file T` runs on A as well.
//! The log is on the shared filesystem, so the restored job on B keeps
//! appending to it and the verdict is read there.
//!
//! Tests:
//!
//! - `netns_infrastructure`: the nodes themselves (addresses only inside,
//!   traffic across the veth, link down/up, shaping, teardown), and
//!   `job_on_node_a`: a `ferry run --detach` job on A runs to its PASS and
//!   leaves nothing behind. Neither needs migration support.
//! - `workload_*` (mem 8 MiB, avx, signals, files, blocked, counter,
//!   threads, omp, tree, shm): migrated mid-run with the default
//!   controller. `ferry migrate --json` exits 0 with a sane report; the
//!   source job (init and whole tree) is gone; the job runs on B (in B's
//!   network namespace, in a new pid namespace, same pid inside, same
//!   threads and processes, below the agent); its log ends with exactly one
//!   PASS (and one READY); afterwards the agent has reaped it.
//! - `controller_*`, `max_iterations_*`, `compress_*`, `streams_3`,
//!   `max_bandwidth_200m`, `tracker_*`: the same on mem with each
//!   convergence controller and transfer option, plus what each option
//!   implies for the report (no resent pages for stop-copy, round caps, no
//!   page of the other compression, the connections seen by the agent, the
//!   byte rate under the cap).
//! - `fault_*`: a migration that fails must leave the job running on A,
//!   untouched (not stopped, not traced, no copy on B), PASSing once at
//!   its end, and `ferry migrate` must exit non-zero with a reason as its
//!   last stderr line: the agent SIGKILLed mid live phase, the link cut mid
//!   live phase, a wrong token (refused before any memory crossed the
//!   link), SIGINT to `ferry migrate` (exit 130 or 1). And garbage thrown at
//!   the agent (random bytes, a frame header announcing 4 GiB, a dropped
//!   connection, a truncated frame): each connection is closed by the
//!   agent, which stays up, small, and accepts a real migration afterwards.
//! - `agent_requires_token_off_loopback`: without `--token-file` the agent
//!   refuses to listen on anything but loopback (one error line, non-zero
//!   exit), listens on 127.0.0.1, and goes away on SIGTERM.
//!
//! The "live phase" of the fault tests is stretched with a 128 MiB mem job,
//! `--compress none` and `--max-bandwidth 50M` (about 2.7 s for the first
//! full pass), and the fault is injected once 0.5 s have passed and 4 MiB
//! have crossed the link.
//!
//! The test process is a child subreaper (see threads_trees.rs): a
//! detached job's init becomes our child when `ferry run --detach` exits,
//! and we reap it when the job ends or is migrated away. Restored jobs are
//! the agent's to reap (checked); whatever is left at the end of a test is
//! killed (jobs by pid, then everything still in either namespace).
//!
//! Timing: a migration with the default (adaptive) controller takes at
//! least one 1 s sampling interval, and a debug build moves lz4 pages at
//! only 20-40 MiB/s on 2 busy cores, so jobs run 4 s (mem: 8 s, with an
//! 8 MiB region) to be migrated mid-run. When a migration ends less than
//! 300 ms before the job's natural end the copy on B is not inspected (a
//! note says so); everything else is still checked.
//!
//! Needs root (skips otherwise). Tests run one at a time under
//! [`ptrace_lock`]; the whole file takes about 3.5 minutes on 2 cores
//! (`fault_link_down` alone waits up to 60 s for `ferry migrate` to give
//! up and 25 s for its job).

mod common;

use common::netns::{Agent, Nodes, Ns, AGENT_PORT};
use common::procs::{self, Bg};
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::MutexGuard;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Bound for a migration that should succeed (debug build, 2 cores).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for processes to disappear after being killed or finishing.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// WORKLOAD_SECS of the jobs migrated in the workload tests: a migration
/// with the default controller takes 1-2 s (a full pass, one 1 s sampling
/// interval, the stop-and-copy).
const SECS: &str = "4";
/// WORKLOAD_SECS of the mem jobs. mem rewrites all its memory (its region
/// plus ~11 MiB of heap, stack and mappings) all the time, so every round
/// resends all of it, and a debug build compresses with lz4 at only
/// 20-40 MiB/s on 2 busy cores: a migration of `mem 8` can take 5 s.
const MEM_SECS: &str = "8";

// ---------------------------------------------------------------------------
// Fixture: two nodes, a token, an agent on B

/// Everything a migration test needs; dropped in field order: the agent,
/// then the nodes (killing whatever is left in them), then the lock.
struct Fixture {
    agent: Agent,
    nodes: Nodes,
    dir: PathBuf,
    token: PathBuf,
    _lock: MutexGuard<'static, ()>,
}

fn fresh_dir(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jobs");
    fs::create_dir_all(&base).expect("create job base dir");
    let dir = base.join(format!(
        "mig-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Writes a fresh random token (64 hex digits) to `path`, mode 0600.
fn write_token(path: &Path) {
    let mut raw = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .expect("read /dev/urandom");
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(path, format!("{hex}\n")).expect("write token");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod token");
}

impl Fixture {
    /// None (after a note) when not root. Takes the ptrace lock, makes us a
    /// subreaper, creates the nodes and starts the agent on B.
    fn new() -> Option<Fixture> {
        if skip_unless_root() {
            return None;
        }
        let lock = ptrace_lock();
        procs::become_subreaper();
        let nodes = Nodes::new();
        let dir = fresh_dir("fixture");
        let token = dir.join("token");
        write_token(&token);
        let agent = Agent::start(&nodes, Ns::B, AGENT_PORT, Some(&token));
        Some(Fixture {
            agent,
            nodes,
            dir,
            token,
            _lock: lock,
        })
    }

    /// `ip netns exec A ferry migrate PID --to AGENT --token-file T EXTRA`.
    fn migrate_cmd(&self, pid: i32, token: &Path, extra: &[&str]) -> Command {
        let mut cmd = self.nodes.exec(Ns::A, FERRY);
        cmd.arg("migrate")
            .arg(pid.to_string())
            .arg("--to")
            .arg(self.agent.addr().to_string())
            .arg("--token-file")
            .arg(token)
            .args(extra);
        cmd
    }

    /// Starts `ferry migrate` in the background with the fixture's token.
    fn migrate_bg(&self, job: &MigJob, extra: &[&str]) -> Bg {
        let mut cmd = self.migrate_cmd(job.pid, &self.token, extra);
        Bg::spawn(&mut cmd, &format!("ferry migrate {} {extra:?}", job.pid))
    }

    /// Processes on B other than the agent (a restored job, or a piece of
    /// one).
    fn others_on_b(&self) -> Vec<i32> {
        let agent = self.agent.pid();
        self.nodes
            .pids(Ns::B)
            .into_iter()
            .filter(|&p| p != agent)
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Jobs

/// A workload started on A as a detached `ferry run` job, plus every pid
/// it had on either node, so that whatever is left of it is killed.
struct MigJob {
    name: String,
    exe: PathBuf,
    dir: PathBuf,
    log_path: PathBuf,
    /// The job's main process on A (what `ferry run --detach` printed).
    pid: i32,
    /// Its init (pid 1 of its namespace), our child once `ferry run` exits.
    init: i32,
    secs: f64,
    ready_at: Instant,
    /// Pids to clean up: the source tree, then the target's.
    pids: Vec<i32>,
}

impl MigJob {
    /// Starts `name args` on node A with WORKLOAD_SECS=`secs` and waits
    /// for READY.
    fn start(nodes: &Nodes, name: &str, args: &[&str], secs: &str) -> MigJob {
        let exe = workload(name);
        let dir = fresh_dir(name);
        let log_path = dir.join("log");
        let mut cmd = nodes.exec(Ns::A, FERRY);
        cmd.arg("run")
            .arg("--detach")
            .arg("--log")
            .arg(&log_path)
            .arg("--")
            .arg("/usr/bin/env")
            .arg(format!("WORKLOAD_SECS={secs}"))
            .arg({
                let mut s = OsString::from("FERRY_TEST_TMP=");
                s.push(&dir);
                s
            })
            .arg(&exe)
            .args(args);
        let out = procs::output_with_timeout(&mut cmd, "ferry run --detach", TIMEOUT);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success(),
            "ferry run --detach {name} failed: {}\nstderr: {}",
            describe(out.status),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_no_panic(&out);
        let pid: i32 = text
            .parse()
            .unwrap_or_else(|_| panic!("ferry run --detach should print a pid, printed {text:?}"));
        let init = procs::ppid_of(pid).unwrap_or_else(|| panic!("job pid {pid} is gone"));
        let mut job = MigJob {
            name: name.to_string(),
            exe,
            dir,
            log_path,
            pid,
            init,
            secs: secs.parse().expect("WORKLOAD_SECS"),
            ready_at: Instant::now(),
            pids: vec![init, pid],
        };
        job.wait_ready();
        assert!(
            nodes.contains(Ns::A, pid),
            "job {name} (pid {pid}) is not on node A"
        );
        eprintln!("job {name}: pid {pid}, init {init}, on A");
        job
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let end = Instant::now() + TIMEOUT;
        while !self.log().lines().any(|l| l == "READY") {
            assert!(
                pid_alive(self.pid),
                "{} (pid {}) ended before READY; log:\n{}",
                self.name,
                self.pid,
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
        self.ready_at = Instant::now();
    }

    /// When the workload will print its verdict (it measures WORKLOAD_SECS
    /// from READY on CLOCK_MONOTONIC, frozen time included).
    fn natural_end(&self) -> Instant {
        self.ready_at + Duration::from_secs_f64(self.secs)
    }

    /// Whether the job still has `margin` of work ahead of it.
    fn working_for(&self, margin: Duration) -> bool {
        Instant::now() + margin < self.natural_end()
    }

    /// The source tree now: init first, then every process below it.
    fn source_tree(&mut self) -> Vec<i32> {
        let tree = procs::tree_of(self.init);
        assert!(
            tree.contains(&self.pid),
            "job pid {} is not below its init {} (tree {tree:?})",
            self.pid,
            self.init
        );
        self.remember(&tree);
        tree
    }

    fn remember(&mut self, pids: &[i32]) {
        for &p in pids {
            if !self.pids.contains(&p) {
                self.pids.push(p);
            }
        }
    }

    /// Waits (up to 60 s) for the PASS or FAIL line and returns the log.
    fn wait_verdict(&self) -> String {
        wait_log_verdict(&self.log_path, &self.name, TIMEOUT, || {
            format!(" (source pid {} alive: {})", self.pid, pid_alive(self.pid))
        })
    }

    /// The job PASSed exactly once and was READY exactly once: one copy
    /// finished, and the migration neither restarted nor duplicated it.
    fn assert_passed_once(&self) {
        let log = self.wait_verdict();
        assert_passes(&log, &self.name, 1);
        let ready = log.lines().filter(|l| *l == "READY").count();
        assert_eq!(ready, 1, "READY printed {ready} times; log:\n{log}");
    }
}

impl Drop for MigJob {
    fn drop(&mut self) {
        end_job(&self.pids, &self.exe, &self.dir, &self.name, || self.log());
    }
}

// ---------------------------------------------------------------------------
// The report of `ferry migrate --json`

#[derive(Debug)]
struct Round {
    round: u64,
    dirty_pages: u64,
    pages_sent: u64,
    duration_ms: f64,
}

#[derive(Debug)]
struct Report {
    json: Value,
    downtime_ms: f64,
    total_ms: f64,
    bytes_sent: u64,
    /// By kind: zero, raw, lz4, zstd, resent.
    pages: BTreeMap<String, u64>,
    rounds: Vec<Round>,
    controller: String,
    pattern: Option<String>,
    target_pid: i32,
}

const PAGE_KINDS: [&str; 5] = ["zero", "raw", "lz4", "zstd", "resent"];

fn field<'a>(v: &'a Value, key: &str, json: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("migrate report has no `{key}`: {json}"))
}

fn float(v: &Value, key: &str, json: &str) -> f64 {
    let x = field(v, key, json);
    x.as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number ({x}): {json}"))
}

fn uint(v: &Value, key: &str, json: &str) -> u64 {
    let x = field(v, key, json);
    x.as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a whole number >= 0 ({x}): {json}"))
}

impl Report {
    /// Parses stdout of `ferry migrate --json`: exactly one JSON object.
    fn parse(stdout: &[u8]) -> Report {
        let text = String::from_utf8_lossy(stdout);
        let json: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!("ferry migrate --json should print one JSON object, got ({e}):\n{text}")
        });
        assert!(json.is_object(), "report is not an object: {json}");
        let s = json.to_string();
        let pages_v = field(&json, "pages", &s);
        assert!(pages_v.is_object(), "`pages` is not an object: {s}");
        let pages = PAGE_KINDS
            .iter()
            .map(|k| (k.to_string(), uint(pages_v, k, &s)))
            .collect();
        let rounds = field(&json, "rounds", &s)
            .as_array()
            .unwrap_or_else(|| panic!("`rounds` is not an array: {s}"))
            .iter()
            .map(|r| Round {
                round: uint(r, "round", &s),
                dirty_pages: uint(r, "dirty_pages", &s),
                pages_sent: uint(r, "pages_sent", &s),
                duration_ms: float(r, "duration_ms", &s),
            })
            .collect();
        let controller = field(&json, "controller", &s)
            .as_str()
            .unwrap_or_else(|| panic!("`controller` is not a string: {s}"))
            .to_string();
        let pattern = match field(&json, "pattern", &s) {
            Value::Null => None,
            Value::String(p) => Some(p.clone()),
            other => panic!("`pattern` is neither a string nor null ({other}): {s}"),
        };
        let target_pid = uint(&json, "target_pid", &s);
        let target_pid = i32::try_from(target_pid)
            .unwrap_or_else(|_| panic!("`target_pid` {target_pid} is not a pid: {s}"));
        Report {
            downtime_ms: float(&json, "downtime_ms", &s),
            total_ms: float(&json, "total_ms", &s),
            bytes_sent: uint(&json, "bytes_sent", &s),
            pages,
            rounds,
            controller,
            pattern,
            target_pid,
            json,
        }
    }

    fn page(&self, kind: &str) -> u64 {
        self.pages[kind]
    }

    /// Checks every migration report must pass; `min_rounds` is 1 for a
    /// controller with a live phase.
    fn check(&self, min_rounds: usize) {
        let s = self.json.to_string();
        assert!(self.total_ms > 0.0, "total_ms must be > 0: {s}");
        assert!(
            self.downtime_ms > 0.0 && self.downtime_ms < self.total_ms,
            "want 0 < downtime_ms < total_ms: {s}"
        );
        assert!(self.bytes_sent > 0, "bytes_sent must be > 0: {s}");
        let carried = self.page("zero") + self.page("raw") + self.page("lz4") + self.page("zstd");
        assert!(carried > 0, "no page was sent at all: {s}");
        assert!(
            self.bytes_sent >= self.page("raw") * 4096,
            "bytes_sent ({}) is less than the raw pages alone ({} x 4096): {s}",
            self.bytes_sent,
            self.page("raw")
        );
        assert!(
            self.rounds.len() >= min_rounds,
            "want at least {min_rounds} round(s): {s}"
        );
        for w in self.rounds.windows(2) {
            assert!(w[1].round > w[0].round, "round numbers must increase: {s}");
        }
        let sent: u64 = self.rounds.iter().map(|r| r.pages_sent).sum();
        if min_rounds > 0 {
            assert!(sent > 0, "the rounds sent no page: {s}");
        }
        let round_ms: f64 = self.rounds.iter().map(|r| r.duration_ms).sum();
        assert!(
            self.rounds.iter().all(|r| r.duration_ms >= 0.0),
            "negative round duration: {s}"
        );
        assert!(
            round_ms <= self.total_ms * 1.05 + 5.0,
            "the rounds ({round_ms} ms) last longer than the whole migration ({} ms): {s}",
            self.total_ms
        );
        assert!(!self.controller.is_empty(), "`controller` is empty: {s}");
        assert!(
            matches!(self.pattern.as_deref(), None | Some("a" | "b" | "c")),
            "`pattern` must be \"a\", \"b\", \"c\" or null: {s}"
        );
        assert!(self.target_pid > 0, "bad target_pid: {s}");
        eprintln!(
            "migrated in {:.0} ms (downtime {:.1} ms), {} bytes, pages {:?}, {} rounds, \
             controller {}, pattern {:?}; dirty per round {:?}",
            self.total_ms,
            self.downtime_ms,
            self.bytes_sent,
            self.pages,
            self.rounds.len(),
            self.controller,
            self.pattern,
            self.rounds
                .iter()
                .map(|r| r.dirty_pages)
                .collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------------------------------
// A successful live migration

/// A workload and its arguments.
struct Wl {
    name: &'static str,
    args: &'static [&'static str],
    secs: &'static str,
    /// It forks short-lived children while it works, so its process count
    /// depends on the moment it is taken.
    forks: bool,
}

const fn wl(name: &'static str, args: &'static [&'static str], secs: &'static str) -> Wl {
    Wl {
        name,
        args,
        secs,
        forks: false,
    }
}

/// churn (tests/workloads/churn.c) with two regions of `args[0]` MiB.
const fn churn(args: &'static [&'static str], secs: &'static str) -> Wl {
    Wl {
        name: "churn",
        args,
        secs,
        forks: true,
    }
}

/// mem with an 8 MiB region (~19 MiB of memory in all), for the option
/// tests.
const MEM8: Wl = wl("mem", &["8"], MEM_SECS);

/// What the job looked like on A just before the migration.
struct Before {
    tree: Vec<i32>,
    /// Processes from the main process down (not the init).
    procs: usize,
    threads: usize,
    inner_pid: i32,
    pidns: Option<(u64, u64)>,
}

fn snapshot(job: &mut MigJob) -> Before {
    let tree = job.source_tree();
    let inside = procs::ns_pids(job.pid);
    assert!(
        inside.len() >= 2,
        "job pid {} is not in a pid namespace of its own (NSpid {inside:?})",
        job.pid
    );
    Before {
        procs: procs::tree_of(job.pid).len(),
        threads: procs::thread_count(job.pid),
        inner_pid: *inside.last().unwrap(),
        pidns: procs::ns_id(job.pid, "pid"),
        tree,
    }
}

/// Starts `w` on A, lets it work for 100-600 ms, migrates it to B with
/// `ferry migrate --json EXTRA` and checks everything a successful
/// migration implies (see the module doc). `observe` is called about every
/// millisecond while `ferry migrate` runs. Returns the report.
fn live_migrate_observed(
    fx: &mut Fixture,
    w: &Wl,
    extra: &[&str],
    min_rounds: usize,
    observe: &mut dyn FnMut(),
) -> Report {
    let mut job = MigJob::start(&fx.nodes, w.name, w.args, w.secs);
    sleep(random_delay());
    assert!(
        pid_alive(job.pid),
        "{} ended before the migration; log:\n{}",
        w.name,
        job.log()
    );
    let before = snapshot(&mut job);
    eprintln!(
        "before: tree {:?}, {} process(es) and {} thread(s) from pid {} (pid {} inside)",
        before.tree, before.procs, before.threads, job.pid, before.inner_pid
    );

    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let mut bg = fx.migrate_bg(&job, &args);
    while bg.running() {
        observe();
        if bg.elapsed() > MIGRATE_TIMEOUT {
            break;
        }
        sleep(Duration::from_millis(1));
    }
    let out = bg.wait(Duration::from_secs(1));
    if !out.status.success() {
        let agent_alive = fx.agent.alive();
        panic!(
            "ferry migrate {} failed: {}\nstderr: {}\nagent (running: {agent_alive}) \
             stderr:\n{}\njob log:\n{}",
            w.name,
            describe(out.status),
            String::from_utf8_lossy(&out.stderr),
            fx.agent.stderr(),
            job.log()
        );
    }
    assert_no_panic(&out);
    let early = job.working_for(Duration::from_millis(300));
    let rep = Report::parse(&out.stdout);
    rep.check(min_rounds);
    let target = rep.target_pid;
    job.remember(&[target]);
    if let Some(init) = procs::ppid_of(target) {
        job.remember(&[init]);
    }

    // The source copy is gone: main process, init (reaped by us) and tree.
    if let Err(e) = procs::wait_vanished(&before.tree, GONE_TIMEOUT) {
        panic!(
            "after a successful migration the source job {:?} is not gone: {e}; log:\n{}",
            before.tree,
            job.log()
        );
    }

    // The copy on B, while it still has work to do.
    let mut target_tree = vec![target];
    let fails: Vec<String> = job
        .log()
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .map(str::to_string)
        .collect();
    assert!(
        fails.is_empty(),
        "the migrated {} reported failure: {fails:?}",
        w.name
    );
    if early {
        assert!(
            pid_alive(target),
            "target_pid {target} is not running on B right after the migration; log:\n{}",
            job.log()
        );
        assert!(
            procs::runs(target, &job.exe),
            "target_pid {target} runs {:?}, not {}",
            procs::exe_of(target),
            job.exe.display()
        );
        assert!(
            fx.nodes.contains(Ns::B, target),
            "target_pid {target} is not in node B's network namespace"
        );
        let inside = procs::ns_pids(target);
        assert!(
            inside.len() >= 2 && procs::ns_id(target, "pid") != before.pidns,
            "target_pid {target} is not in a fresh pid namespace (NSpid {inside:?})"
        );
        assert_eq!(
            inside.last().copied(),
            Some(before.inner_pid),
            "inside its namespace the migrated main process should keep pid {} (NSpid now \
             {inside:?})",
            before.inner_pid
        );
        let mut up = target;
        let mut chain = vec![target];
        while up > 1 && up != fx.agent.pid() {
            up = procs::ppid_of(up).unwrap_or(0);
            chain.push(up);
        }
        assert_eq!(
            up,
            fx.agent.pid(),
            "the migrated job should run below the agent (ancestors of {target}: {chain:?})"
        );
        let init = procs::ppid_of(target).unwrap();
        target_tree = procs::tree_of(init);
        job.remember(&target_tree);
        let procs_now = procs::tree_of(target).len();
        let threads_now = procs::thread_count(target);
        if job.working_for(Duration::from_millis(200)) && !w.forks {
            assert_eq!(
                (procs_now, threads_now),
                (before.procs, before.threads),
                "(processes, threads) of the job: {:?} on A, {:?} on B",
                (before.procs, before.threads),
                (procs_now, threads_now)
            );
        }
        eprintln!("on B: tree {target_tree:?} (init first), {threads_now} thread(s) in {target}");
    } else {
        eprintln!(
            "note: the migration ended less than 300 ms before the job's natural end; \
             the copy on B is not inspected"
        );
    }

    job.assert_passed_once();
    // The agent reaps what it restored.
    if let Err(e) = procs::wait_vanished(&target_tree, GONE_TIMEOUT) {
        panic!("the job finished on B but the agent did not reap it: {e}");
    }
    fx.agent.assert_healthy("after a migration");
    rep
}

fn live_migrate(fx: &mut Fixture, w: &Wl, extra: &[&str], min_rounds: usize) -> Report {
    live_migrate_observed(fx, w, extra, min_rounds, &mut || {})
}

// ---------------------------------------------------------------------------
// 0. The infrastructure itself

fn in_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|f| f.is_file())
    })
}

/// Accepts one connection on `l` within `timeout` and reads it to EOF.
fn accept_read(l: &TcpListener, timeout: Duration) -> String {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(timeout)).unwrap();
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                return text;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "no connection within {timeout:?}");
                sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Two namespaces with the veth between them: addresses only inside,
/// traffic from A reaches B (ping when installed, TCP always, through
/// `exec` and through `in_ns`), the root namespace cannot reach B, the byte
/// counters move, link_down cuts and link_up restores the path, shaping
/// installs a qdisc, and drop kills what runs inside and deletes both.
#[test]
fn netns_infrastructure() {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    procs::become_subreaper();
    let nodes = Nodes::new();
    let names = [nodes.name(Ns::A).to_string(), nodes.name(Ns::B).to_string()];
    for n in &names {
        assert!(Path::new("/run/netns").join(n).exists(), "no netns {n}");
    }
    let (a, b) = (nodes.addr_a(), nodes.addr_b());
    let show = |ns: Ns| {
        let out = nodes
            .exec(ns, "ip")
            .args(["-4", "-o", "addr", "show"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(show(Ns::A).contains(&format!("{a}/30")), "{}", show(Ns::A));
    assert!(show(Ns::B).contains(&format!("{b}/30")), "{}", show(Ns::B));
    let root = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    let root = String::from_utf8_lossy(&root.stdout);
    assert!(
        !root.contains(&format!("{a}/")) && !root.contains(&format!("{b}/")),
        "the test addresses leaked into the root namespace:\n{root}"
    );

    if in_path("ping").is_some() {
        let out = procs::output_with_timeout(
            nodes
                .exec(Ns::A, "ping")
                .args(["-c1", "-W1", &b.to_string()]),
            "ping",
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "ping from A to {b} failed");
    } else {
        eprintln!("note: no ping installed; checking the path with TCP only");
    }

    // TCP from A (a process started with exec) to a listener on B.
    let listener = nodes.in_ns(Ns::B, || TcpListener::bind((b, 0))).unwrap();
    let port = listener.local_addr().unwrap().port();
    let tx0 = nodes.tx_bytes(Ns::A);
    let script = format!("exec 3<>/dev/tcp/{b}/{port}; echo hello-from-a >&3");
    let out = procs::output_with_timeout(
        nodes.exec(Ns::A, "bash").args(["-c", &script]),
        "bash /dev/tcp",
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "bash could not connect from A to B");
    assert_eq!(
        accept_read(&listener, Duration::from_secs(5)),
        "hello-from-a\n"
    );
    assert!(
        nodes.tx_bytes(Ns::A) > tx0,
        "A's veth counted no transmitted bytes"
    );
    // ... and from a thread of ours moved into A.
    let to: SocketAddr = (b, port).into();
    let mut s = nodes
        .connect(Ns::A, to, Duration::from_secs(2))
        .expect("connect from A");
    s.write_all(b"again").unwrap();
    drop(s);
    assert_eq!(accept_read(&listener, Duration::from_secs(5)), "again");
    // The root namespace has no path to B.
    assert!(
        TcpStream::connect_timeout(&to, Duration::from_millis(300)).is_err(),
        "the root namespace reached {to}"
    );

    // A cut link: connections time out; back up: they work again.
    nodes.link_down();
    assert!(
        nodes
            .connect(Ns::A, to, Duration::from_millis(700))
            .is_err(),
        "connected to {to} with the link down"
    );
    nodes.link_up();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match nodes.connect(Ns::A, to, Duration::from_millis(500)) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < end, "no connection after link_up: {e}"),
        }
    }
    let _ = accept_read(&listener, Duration::from_secs(5));
    drop(listener);

    nodes.shape("1gbit");
    let q = nodes.qdiscs(Ns::A);
    assert!(
        q.contains("tbf") || q.contains("netem"),
        "no shaping qdisc on A's veth: {q}"
    );
    nodes.unshape();

    // An orphan left running on A (reparented to us) is killed and reaped
    // by the teardown.
    let out = procs::output_with_timeout(
        nodes
            .exec(Ns::A, "bash")
            .args(["-c", "sleep 600 >/dev/null 2>&1 & echo $!"]),
        "bash sleep &",
        Duration::from_secs(10),
    );
    let sleeper: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(nodes.pids(Ns::A).contains(&sleeper), "sleep not seen on A");
    assert!(!nodes.pids(Ns::B).contains(&sleeper));
    drop(nodes);
    assert!(
        procs::stat_of(sleeper).is_none(),
        "pid {sleeper} survived the teardown of its namespace"
    );
    for n in &names {
        assert!(
            !Path::new("/run/netns").join(n).exists(),
            "netns {n} still exists after drop"
        );
    }
}

/// The job side of the harness, without a migration: `ferry run --detach`
/// on node A starts the workload in a pid namespace of its own on A; it
/// PASSes once; its init is reaped by us and nothing is left on either
/// node.
#[test]
fn job_on_node_a() {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    procs::become_subreaper();
    let nodes = Nodes::new();
    let mut job = MigJob::start(&nodes, "tree", &[], "1");
    let before = snapshot(&mut job);
    assert_eq!(before.procs, 4, "tree: root, A, B and the zombie C");
    assert_eq!(
        procs::ppid_of(job.init),
        Some(procs::my_pid()),
        "the detached job's init should be our child (we are its subreaper)"
    );
    for &p in &before.tree {
        assert!(
            nodes.contains(Ns::A, p) || proc_state(p) == Some('Z'),
            "pid {p} of the job is not on A"
        );
    }
    job.assert_passed_once();
    if let Err(e) = procs::wait_vanished(&before.tree, GONE_TIMEOUT) {
        panic!("the job ended but left processes: {e}");
    }
    assert!(nodes.pids(Ns::A).is_empty(), "{:?}", nodes.pids(Ns::A));
    assert!(nodes.pids(Ns::B).is_empty(), "{:?}", nodes.pids(Ns::B));
}

// ---------------------------------------------------------------------------
// 1. Every workload, default controller

macro_rules! workload_tests {
    ($($test:ident: $name:literal $args:expr, $secs:expr;)*) => {$(
        #[test]
        fn $test() {
            let Some(mut fx) = Fixture::new() else { return };
            live_migrate(&mut fx, &wl($name, $args, $secs), &[], 1);
        }
    )*};
}

workload_tests! {
    workload_mem: "mem" &["8"], MEM_SECS;
    workload_avx: "avx" &[], SECS;
    workload_signals: "signals" &[], SECS;
    workload_files: "files" &[], SECS;
    workload_blocked: "blocked" &[], SECS;
    workload_counter: "counter" &[], SECS;
    workload_threads: "threads" &[], SECS;
    workload_omp: "omp" &[], SECS;
    workload_tree: "tree" &[], SECS;
    workload_shm: "shm" &[], SECS;
}

// ---------------------------------------------------------------------------
// 2. Controllers and transfer options, on mem (8 MiB)

/// No live phase: at most the one final round, nothing sent twice.
#[test]
fn controller_stop_copy() {
    let Some(mut fx) = Fixture::new() else { return };
    let rep = live_migrate(&mut fx, &MEM8, &["--controller", "stop-copy"], 0);
    assert!(
        rep.controller.contains("stop-copy"),
        "controller {:?}",
        rep.controller
    );
    assert!(
        rep.rounds.len() <= 1,
        "stop-copy has no pre-copy rounds: {}",
        rep.json
    );
    assert_eq!(
        rep.page("resent"),
        0,
        "stop-copy resent pages: {}",
        rep.json
    );
    assert_eq!(
        rep.pattern, None,
        "a pattern without the adaptive controller"
    );
}

/// Pre-copy restores lazily by default (the job resumes before its
/// private memory is copied into place, then is filled from the pages the
/// agent holds) and eagerly with --eager-restore; both PASS on B.
#[test]
fn restore_lazy_by_default_eager_on_request() {
    let Some(mut fx) = Fixture::new() else { return };
    let rep = live_migrate(&mut fx, &wl("threads", &[], SECS), &[], 1);
    assert_eq!(
        rep.json["lazy_restore"], true,
        "pre-copy should restore lazily by default: {}",
        rep.json
    );
    let rep = live_migrate(&mut fx, &MEM8, &["--eager-restore"], 1);
    assert_eq!(
        rep.json["lazy_restore"], false,
        "--eager-restore: {}",
        rep.json
    );
}

/// The KVM rule with a 50 ms target. mem resends all its memory every
/// round, so on a slow (debug) build the estimate never drops below 50 ms
/// and only the round cap ends the live phase: --max-iterations 4 keeps
/// that short (the default cap is 30 rounds).
#[test]
fn controller_downtime_50() {
    let Some(mut fx) = Fixture::new() else { return };
    let rep = live_migrate(
        &mut fx,
        &MEM8,
        &["--controller", "downtime:50", "--max-iterations", "4"],
        1,
    );
    check_rule_controller(&rep, "downtime", 4);
}

/// A controller other than adaptive: named `name`, at most `live` live
/// rounds (+ the final one), and no memory-update pattern.
fn check_rule_controller(rep: &Report, name: &str, live: usize) {
    assert!(
        rep.controller.contains(name),
        "controller {:?}",
        rep.controller
    );
    assert!(
        rep.rounds.len() <= live + 1,
        "more than {live} live rounds: {}",
        rep.json
    );
    assert_eq!(
        rep.pattern, None,
        "a pattern without the adaptive controller"
    );
}

/// The Xen rule: at most 5 live rounds (+ the final one if it is listed).
#[test]
fn controller_iterations_5() {
    let Some(mut fx) = Fixture::new() else { return };
    let rep = live_migrate(&mut fx, &MEM8, &["--controller", "iterations:5"], 1);
    check_rule_controller(&rep, "iterations", 5);
}

/// The adaptive controller named explicitly.
#[test]
fn controller_adaptive() {
    let Some(mut fx) = Fixture::new() else { return };
    let rep = live_migrate(&mut fx, &MEM8, &["--controller", "adaptive"], 1);
    assert!(
        rep.controller.contains("adaptive"),
        "controller {:?}",
        rep.controller
    );
}

/// --max-iterations caps the live rounds (the full pass included).
#[test]
fn max_iterations_caps_rounds() {
    let Some(mut fx) = Fixture::new() else { return };
    let rep = live_migrate(
        &mut fx,
        &MEM8,
        &["--controller", "iterations:20", "--max-iterations", "2"],
        1,
    );
    assert!(
        rep.rounds.len() <= 3,
        "--max-iterations 2 but {} rounds: {}",
        rep.rounds.len(),
        rep.json
    );
}

fn compress_test(alg: &str, other: &str) {
    let Some(mut fx) = Fixture::new() else { return };
    let rep = live_migrate(&mut fx, &MEM8, &["--compress", alg], 1);
    assert!(
        rep.page(alg) > 0,
        "--compress {alg}: no page was sent compressed (libc's and the heap's pages \
         compress): {}",
        rep.json
    );
    assert_eq!(
        rep.page(other),
        0,
        "--compress {alg}: pages were compressed with {other}: {}",
        rep.json
    );
}

/// lz4 pages (and no zstd ones); the job still PASSes.
#[test]
fn compress_lz4() {
    compress_test("lz4", "zstd");
}

/// zstd pages (and no lz4 ones); the job still PASSes.
#[test]
fn compress_zstd() {
    compress_test("zstd", "lz4");
}

/// How many TCP connections to the agent's port are established now, from
/// /proc/PID/net/tcp{,6} of the agent (its network namespace's tables).
fn agent_connections(agent_pid: i32) -> usize {
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{agent_pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // 01: ESTABLISHED
            if local_port == Some(AGENT_PORT) && f[3] == "01" {
                n += 1;
            }
        }
    }
    n
}

/// --streams 3: at some moment of the migration the agent has at least
/// three connections open at once.
#[test]
fn streams_3() {
    let Some(mut fx) = Fixture::new() else { return };
    let agent = fx.agent.pid();
    let mut most = 0;
    live_migrate_observed(&mut fx, &MEM8, &["--streams", "3"], 1, &mut || {
        most = most.max(agent_connections(agent))
    });
    assert!(
        most >= 3,
        "--streams 3: the agent never had more than {most} connection(s) at once"
    );
}

/// --max-bandwidth 200M (bytes/s) with --compress none on mem 32 (~44 MiB
/// per round): everything was sent (at least the 32 MiB region once) and no
/// faster than the cap allows, with 10 % and an 8 MiB burst of slack. The
/// iterations controller sends round after round without the adaptive
/// one's idle sampling intervals, so the average rate is the sending rate.
#[test]
fn max_bandwidth_200m() {
    let Some(mut fx) = Fixture::new() else { return };
    let rep = live_migrate(
        &mut fx,
        &wl("mem", &["32"], MEM_SECS),
        &[
            "--max-bandwidth",
            "200M",
            "--compress",
            "none",
            "--controller",
            "iterations:3",
        ],
        1,
    );
    assert_eq!(
        rep.page("lz4") + rep.page("zstd"),
        0,
        "--compress none: {}",
        rep.json
    );
    assert!(
        rep.bytes_sent >= 30 << 20,
        "less than the 32 MiB region was sent: {}",
        rep.json
    );
    let allowed = 200e6 * rep.total_ms / 1000.0 * 1.10 + (8u64 << 20) as f64;
    let rate = rep.bytes_sent as f64 / (rep.total_ms / 1000.0) / 1e6;
    eprintln!("average rate {rate:.0} MB/s under a 200 MB/s cap");
    assert!(
        (rep.bytes_sent as f64) <= allowed,
        "{} bytes in {} ms ({rate:.0} MB/s) is above the 200 MB/s cap: {}",
        rep.bytes_sent,
        rep.total_ms,
        rep.json
    );
}

/// The page-hashing dirty tracker.
#[test]
fn tracker_hash() {
    let Some(mut fx) = Fixture::new() else { return };
    live_migrate(&mut fx, &MEM8, &["--tracker", "hash"], 1);
}

/// The userfaultfd write-protect dirty tracker.
#[test]
fn tracker_uffd_wp() {
    let Some(mut fx) = Fixture::new() else { return };
    live_migrate(&mut fx, &MEM8, &["--tracker", "uffd-wp"], 1);
}

// ---------------------------------------------------------------------------
// 3. Faults

/// A failed `ferry migrate`: non-zero exit status (not a signal), no panic,
/// and a reason on stderr (its last line: progress lines may precede it).
fn failure_reason(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what}: ferry migrate succeeded but should have failed; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.code().is_some(),
        "{what}: ferry migrate died from a signal: {}",
        describe(out.status)
    );
    assert_no_panic(out);
    let reason = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("{what}: ferry migrate failed without saying why"))
        .to_string();
    eprintln!("{what}: ferry migrate failed with: {reason}");
    reason
}

/// A 128 MiB mem job whose migration (no compression, 50 MB/s) spends
/// seconds in the live phase.
fn slow_job(fx: &Fixture, secs: &str) -> MigJob {
    MigJob::start(&fx.nodes, "mem", &["128"], secs)
}

const SLOW: [&str; 4] = ["--compress", "none", "--max-bandwidth", "50M"];

/// Waits until `migrate` has run 500 ms and A has sent 4 MiB more than
/// `tx0` over the veth: the live phase is under way. Panics if migrate
/// ends first or this takes more than 20 s.
fn wait_live_phase(fx: &Fixture, migrate: &mut Bg, tx0: u64) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = migrate.try_status() {
            panic!(
                "ferry migrate ended ({}) before the fault could be injected; stderr:\n{}",
                describe(st),
                migrate.stderr_text()
            );
        }
        let sent = fx.nodes.tx_bytes(Ns::A).saturating_sub(tx0);
        if migrate.elapsed() >= Duration::from_millis(500) && sent >= 4 << 20 {
            eprintln!(
                "live phase: {sent} bytes sent after {:.2?}",
                migrate.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < end,
            "ferry migrate sent only {sent} bytes in 20 s; stderr:\n{}",
            migrate.stderr_text()
        );
        sleep(Duration::from_millis(10));
    }
}

/// After a failed migration: the job runs on A as before (unless it
/// already reached its natural end), stopped by no one and traced by no
/// one; no copy of it is left on B; it PASSes exactly once; its init is
/// reaped.
fn check_source_survived(fx: &Fixture, job: &mut MigJob, tree: &[i32]) {
    if job.working_for(Duration::from_millis(300)) {
        assert!(
            pid_alive(job.pid),
            "the job died with the failed migration; log:\n{}",
            job.log()
        );
        assert!(fx.nodes.contains(Ns::A, job.pid), "the job left node A");
        // ferry has let go of it: not stopped, no tracer.
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            let state = proc_state(job.pid);
            let tracer = fs::read_to_string(format!("/proc/{}/status", job.pid))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:").map(|v| v.trim().to_string()));
            let free = !matches!(state, Some('T' | 't')) && tracer.as_deref() == Some("0");
            if free || !pid_alive(job.pid) {
                break;
            }
            assert!(
                Instant::now() < end,
                "3 s after the failed migration the job is still stopped or traced \
                 (state {state:?}, TracerPid {tracer:?})"
            );
            sleep(Duration::from_millis(20));
        }
    } else {
        eprintln!("note: the migration failed after the job's natural end");
    }
    // Nothing of the job on B (the agent may take a moment to drop a
    // partial restore).
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let left = fx.others_on_b();
        if left.is_empty() {
            break;
        }
        job.remember(&left);
        assert!(
            Instant::now() < end,
            "after a failed migration these processes are still on B: {left:?}"
        );
        sleep(Duration::from_millis(20));
    }
    job.assert_passed_once();
    if let Err(e) = procs::wait_vanished(tree, GONE_TIMEOUT) {
        panic!("the job finished on A but its processes did not all end: {e}");
    }
}

/// a. The target agent is SIGKILLed in the middle of the live phase.
#[test]
fn fault_agent_killed() {
    let Some(mut fx) = Fixture::new() else { return };
    let mut job = slow_job(&fx, "6");
    let tree = job.source_tree();
    let tx0 = fx.nodes.tx_bytes(Ns::A);
    let mut migrate = fx.migrate_bg(&job, &SLOW);
    wait_live_phase(&fx, &mut migrate, tx0);
    eprintln!("killing the agent (pid {})", fx.agent.pid());
    fx.agent.kill();
    let out = migrate.wait(TIMEOUT);
    failure_reason(&out, "agent killed");
    check_source_survived(&fx, &mut job, &tree);
}

/// b. The link is cut in the middle of the live phase: `ferry migrate`
/// must notice (a timeout is fine) and give up within 60 s.
#[test]
fn fault_link_down() {
    let Some(mut fx) = Fixture::new() else { return };
    let mut job = slow_job(&fx, "25");
    let tree = job.source_tree();
    let tx0 = fx.nodes.tx_bytes(Ns::A);
    let mut migrate = fx.migrate_bg(&job, &SLOW);
    wait_live_phase(&fx, &mut migrate, tx0);
    eprintln!("cutting the link");
    fx.nodes.link_down();
    let cut = Instant::now();
    let out = migrate.wait(TIMEOUT);
    eprintln!("ferry migrate gave up {:.1?} after the cut", cut.elapsed());
    failure_reason(&out, "link down");
    fx.nodes.link_up();
    check_source_survived(&fx, &mut job, &tree);
    fx.agent
        .assert_healthy("after a migration lost to a cut link");
}

/// c. A token other than the agent's: refused before any memory is sent
/// (less than 1 MiB crosses the link for a ~19 MiB job); the agent stays
/// up.
#[test]
fn fault_wrong_token() {
    let Some(mut fx) = Fixture::new() else { return };
    let mut job = MigJob::start(&fx.nodes, "mem", &["8"], SECS);
    let tree = job.source_tree();
    let wrong = fx.dir.join("wrong-token");
    write_token(&wrong);
    let tx0 = fx.nodes.tx_bytes(Ns::A);
    let mut cmd = fx.migrate_cmd(job.pid, &wrong, &[]);
    let out = procs::output_with_timeout(&mut cmd, "ferry migrate (wrong token)", TIMEOUT);
    let sent = fx.nodes.tx_bytes(Ns::A).saturating_sub(tx0);
    let reason = failure_reason(&out, "wrong token");
    let r = reason.to_lowercase();
    assert!(
        ["auth", "token", "refused", "denied"]
            .iter()
            .any(|w| r.contains(w)),
        "the reason should say the agent refused the token: {reason}"
    );
    assert!(
        sent < 1 << 20,
        "{sent} bytes crossed the link before the token was refused"
    );
    fx.agent.assert_healthy("after a wrong token");
    check_source_survived(&fx, &mut job, &tree);
    assert!(
        fx.nodes
            .connect(Ns::A, fx.agent.addr(), Duration::from_secs(2))
            .is_ok(),
        "the agent no longer accepts connections"
    );
}

/// Sends `bytes` to the agent from A and waits (15 s at most) for the
/// agent to close the connection; panics if it does not.
fn throw_at_agent(nodes: &Nodes, agent: SocketAddr, what: &str, bytes: &[u8]) {
    eprintln!("garbage: {what} ({} bytes)", bytes.len());
    let mut s = nodes
        .connect(Ns::A, agent, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{what}: cannot connect to the agent: {e}"));
    // The agent may close (or reset) the connection before reading it all.
    let _ = s.write_all(bytes);
    let end = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // the agent's hello, an error frame...
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the agent kept the connection open for 15 s")
            }
            Err(e) => panic!("{what}: reading from the agent: {e}"),
        }
        assert!(
            Instant::now() < end,
            "{what}: the agent kept the connection open for 15 s"
        );
    }
}

/// d. Garbage: random bytes; a well-formed frame header (magic, valid
/// checksum) announcing a 4 GiB payload; a header with a bad checksum; a
/// connection dropped at once; a frame cut short. The agent closes each
/// connection, stays up, never allocates the announced 4 GiB (peak RSS
/// under 512 MiB) and migrates a job afterwards.
#[test]
fn fault_garbage_then_migrate() {
    use ferry::wire::frame::encode_header;
    use ferry::wire::FrameType;
    let Some(mut fx) = Fixture::new() else { return };

    let mut random = vec![0u8; 4096];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .unwrap();
    random[0] = b'X'; // never the magic by chance
    throw_at_agent(&fx.nodes, fx.agent.addr(), "random bytes", &random);

    let huge = encode_header(FrameType::Hello, u32::MAX, 0);
    throw_at_agent(
        &fx.nodes,
        fx.agent.addr(),
        "a header announcing 4 GiB",
        &huge,
    );

    let mut bad_crc = encode_header(FrameType::Hello, 64, 0);
    bad_crc[16] ^= 0xff;
    throw_at_agent(
        &fx.nodes,
        fx.agent.addr(),
        "a header with a bad checksum",
        &bad_crc,
    );

    let s = fx
        .nodes
        .connect(Ns::A, fx.agent.addr(), Duration::from_secs(5))
        .expect("connect to the agent");
    drop(s);
    let mut s = fx
        .nodes
        .connect(Ns::A, fx.agent.addr(), Duration::from_secs(5))
        .expect("connect to the agent");
    let mut cut = encode_header(FrameType::Hello, 100, 0).to_vec();
    cut.extend_from_slice(&[0u8; 10]);
    let _ = s.write_all(&cut);
    drop(s);
    sleep(Duration::from_millis(200));

    fx.agent.assert_healthy("after garbage");
    if let Some(kib) = fx.agent.peak_rss_kib() {
        eprintln!("agent peak RSS {kib} KiB");
        assert!(
            kib < 512 << 10,
            "the agent's peak RSS is {kib} KiB after garbage: it allocated what a header said"
        );
    }
    live_migrate(&mut fx, &wl("counter", &[], SECS), &[], 1);
}

/// e. SIGINT (Ctrl-C) to `ferry migrate` mid live phase: exit status 130
/// or 1, the job goes on on A.
#[test]
fn fault_sigint() {
    let Some(mut fx) = Fixture::new() else { return };
    let mut job = slow_job(&fx, "6");
    let tree = job.source_tree();
    let tx0 = fx.nodes.tx_bytes(Ns::A);
    let mut migrate = fx.migrate_bg(&job, &SLOW);
    wait_live_phase(&fx, &mut migrate, tx0);
    eprintln!("SIGINT to ferry migrate (pid {})", migrate.pid());
    migrate.signal(libc::SIGINT);
    let out = migrate.wait(Duration::from_secs(30));
    failure_reason(&out, "SIGINT");
    assert!(
        matches!(out.status.code(), Some(130 | 1)),
        "ferry migrate should exit with 130 or 1 on SIGINT, not {}",
        describe(out.status)
    );
    check_source_survived(&fx, &mut job, &tree);
    fx.agent.assert_healthy("after an interrupted migration");
}

// ---------------------------------------------------------------------------
// 4. The agent's own checks

/// Without --token-file the agent refuses non-loopback addresses (B's veth
/// address, 0.0.0.0): non-zero exit, exactly one line on stderr, no panic.
/// It does listen on 127.0.0.1 without a token, and SIGTERM ends it.
#[test]
fn agent_requires_token_off_loopback() {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    procs::become_subreaper();
    let nodes = Nodes::new();
    for listen in [
        format!("{}:{AGENT_PORT}", nodes.addr_b()),
        format!("0.0.0.0:{AGENT_PORT}"),
    ] {
        match Agent::try_start(&nodes, Ns::B, &listen, None) {
            Ok(_) => panic!("ferry agent listened on {listen} without a token"),
            Err(e) => {
                eprintln!(
                    "agent --listen {listen}: {}: {}",
                    describe(e.status),
                    e.stderr
                );
                assert!(
                    e.status.code().is_some_and(|c| c != 0),
                    "ferry agent --listen {listen} without a token should exit non-zero, \
                     not {}",
                    describe(e.status)
                );
                assert!(!e.stderr.contains("panicked"), "panic:\n{}", e.stderr);
                let lines: Vec<&str> = e.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
                assert_eq!(
                    lines.len(),
                    1,
                    "want exactly one error line, got:\n{}",
                    e.stderr
                );
            }
        }
    }
    let mut agent = Agent::try_start(&nodes, Ns::B, &format!("127.0.0.1:{AGENT_PORT}"), None)
        .unwrap_or_else(|e| {
            panic!(
                "ferry agent should listen on 127.0.0.1 without a token: {}\n{}",
                describe(e.status),
                e.stderr
            )
        });
    agent.assert_healthy("on loopback");
    let st = agent.stop_with(libc::SIGTERM, Duration::from_secs(10));
    assert!(st.is_some(), "ferry agent ignored SIGTERM for 10 s");
    assert!(!agent.stderr().contains("panicked"), "{}", agent.stderr());
}

// ---------------------------------------------------------------------------
// 5. Post-copy and hybrid

/// The post-copy fields of a report: present, consistent with the rest.
fn check_postcopy_fields(rep: &Report, mode: &str) {
    let s = rep.json.to_string();
    assert_eq!(rep.json["mode"], mode, "mode: {s}");
    let resume = float(&rep.json, "resume_ms", &s);
    assert!(
        (resume - rep.downtime_ms).abs() < 1e-6,
        "resume_ms ({resume}) must be the downtime ({}): {s}",
        rep.downtime_ms
    );
    let faults = uint(&rep.json, "remote_faults", &s);
    let lat = field(&rep.json, "fault_latency_us", &s);
    let (p50, p99) = (float(lat, "p50", &s), float(lat, "p99", &s));
    if faults > 0 {
        assert!(
            p50 > 0.0 && p99 >= p50,
            "latencies p50 {p50}, p99 {p99}: {s}"
        );
    }
    let last = float(&rep.json, "last_page_ms", &s);
    assert!(last >= 0.0, "last_page_ms: {s}");
    assert!(
        rep.total_ms >= resume,
        "total_ms must cover the resume: {s}"
    );
    eprintln!(
        "{mode}: resumed after {resume:.1} ms, {faults} remote faults (p50 {p50:.0} µs, \
         p99 {p99:.0} µs), last page {last:.1} ms after the resume"
    );
}

macro_rules! postcopy_tests {
    ($($test:ident: $mode:literal $w:expr;)*) => {$(
        #[test]
        fn $test() {
            let Some(mut fx) = Fixture::new() else { return };
            let rep = live_migrate(
                &mut fx,
                &$w,
                &["--mode", $mode],
                1,
            );
            check_postcopy_fields(&rep, $mode);
        }
    )*};
}

postcopy_tests! {
    postcopy_mem: "postcopy" wl("mem", &["8"], MEM_SECS);
    postcopy_avx: "postcopy" wl("avx", &[], SECS);
    postcopy_signals: "postcopy" wl("signals", &[], SECS);
    postcopy_files: "postcopy" wl("files", &[], SECS);
    postcopy_blocked: "postcopy" wl("blocked", &[], SECS);
    postcopy_counter: "postcopy" wl("counter", &[], SECS);
    postcopy_threads: "postcopy" wl("threads", &[], SECS);
    postcopy_omp: "postcopy" wl("omp", &[], SECS);
    postcopy_tree: "postcopy" wl("tree", &[], SECS);
    postcopy_shm: "postcopy" wl("shm", &[], SECS);
    postcopy_shm_mapped: "postcopy" wl("shm", &["8", "mapped"], SECS);
    postcopy_churn: "postcopy" churn(&["16"], MEM_SECS);
    hybrid_mem: "hybrid" wl("mem", &["8"], MEM_SECS);
    hybrid_avx: "hybrid" wl("avx", &[], SECS);
    hybrid_signals: "hybrid" wl("signals", &[], SECS);
    hybrid_files: "hybrid" wl("files", &[], SECS);
    hybrid_blocked: "hybrid" wl("blocked", &[], SECS);
    hybrid_counter: "hybrid" wl("counter", &[], SECS);
    hybrid_threads: "hybrid" wl("threads", &[], SECS);
    hybrid_omp: "hybrid" wl("omp", &[], SECS);
    hybrid_tree: "hybrid" wl("tree", &[], SECS);
    hybrid_shm: "hybrid" wl("shm", &[], SECS);
    hybrid_shm_mapped: "hybrid" wl("shm", &["8", "mapped"], SECS);
    hybrid_churn: "hybrid" churn(&["16"], MEM_SECS);
}

/// madvise/mremap/munmap/fork while most pages are still on A: the
/// background stream is slowed down so the job works for seconds with
/// missing pages, and must still find every page right.
#[test]
fn postcopy_churn_slow_link() {
    let Some(mut fx) = Fixture::new() else { return };
    let w = churn(&["24"], "10");
    let rep = live_migrate(
        &mut fx,
        &w,
        &[
            "--mode",
            "postcopy",
            "--compress",
            "none",
            "--max-bandwidth",
            "15M",
        ],
        1,
    );
    check_postcopy_fields(&rep, "postcopy");
    let s = rep.json.to_string();
    assert!(
        uint(&rep.json, "remote_faults", &s) > 0,
        "a job working during a slow post-copy must fault on missing pages: {s}"
    );
    assert!(
        float(&rep.json, "last_page_ms", &s) > 1000.0,
        "48 MiB at 15 MB/s should take seconds after the resume: {s}"
    );
}

/// Shared memory goes after the resume (userfaultfd MISSING|MINOR on B,
/// pages placed through the page cache and UFFDIO_CONTINUE): shm with a
/// 32 MiB shared anonymous area and its memfd reachable through its
/// mappings only, over a slow link, so parent and child take turns for
/// seconds on shared pages still on A (its control block among them) and
/// must see every page right; helpers the parent forks meanwhile check all
/// of it through mappings that map no page yet (MINOR faults for the pages
/// already there).
#[test]
fn postcopy_shm_lazy_slow_link() {
    let Some(mut fx) = Fixture::new() else { return };
    let w = Wl {
        name: "shm",
        args: &["32", "mapped", "forks"],
        secs: "8",
        forks: true,
    };
    let rep = live_migrate(
        &mut fx,
        &w,
        &[
            "--mode",
            "postcopy",
            "--compress",
            "none",
            "--max-bandwidth",
            "5M",
        ],
        1,
    );
    check_postcopy_fields(&rep, "postcopy");
    let s = rep.json.to_string();
    let shared = uint(&rep.json, "shared_pages_after_resume", &s);
    let requested = uint(&rep.json, "shared_page_requests", &s);
    eprintln!("shared pages after the resume: {shared}, {requested} of them on request");
    for l in fx.agent.stderr().lines() {
        if l.contains("post-copy complete") || l.contains("pager done") || l.contains("forked") {
            eprintln!("agent: {l}");
        }
    }
    // Each page of the objects once: 32 MiB + 512 KiB, less pages never
    // touched.
    assert!(
        (8000..=8192 + 128).contains(&shared),
        "the shared memory (32.5 MiB) should go after the resume, once: {s}"
    );
    assert!(
        requested > 0,
        "a job working on shared memory during a slow post-copy must fault on it: {s}"
    );
    // Zero pages travel as flags: how many depends on how long the job ran
    // before the freeze, so the bound is loose.
    assert!(
        float(&rep.json, "last_page_ms", &s) > 300.0,
        "up to 32 MiB at 5 MB/s should take a while after the resume: {s}"
    );
}

/// The source side (`ferry migrate`) is SIGKILLed in the middle of the
/// post-copy phase: the copy on B must be killed, never run on with
/// missing pages, and nothing may read wrong data: churn checks every page
/// it reads (including in children it forks during post-copy) and says
/// "mismatch" or FAIL on a wrong one. The agent survives. (The frozen
/// original on A does not survive its tracer's death: post-copy's risk,
/// see the README.)
#[test]
fn fault_postcopy_source_killed() {
    let Some(mut fx) = Fixture::new() else { return };
    let mut job = MigJob::start(&fx.nodes, "churn", &["32"], "12");
    job.wait_ready();
    sleep(Duration::from_millis(300));
    let tree = job.source_tree();
    let mut migrate = fx.migrate_bg(
        &job,
        &[
            "--mode",
            "postcopy",
            "--compress",
            "none",
            "--max-bandwidth",
            "10M",
        ],
    );
    // Wait until the job runs on B (post-copy under way).
    let end = Instant::now() + Duration::from_secs(30);
    let on_b = loop {
        if let Some(st) = migrate.try_status() {
            panic!(
                "ferry migrate ended ({}) before the job ran on B; stderr:\n{}",
                describe(st),
                migrate.stderr_text()
            );
        }
        let b = fx.others_on_b();
        if !b.is_empty() {
            break b;
        }
        assert!(Instant::now() < end, "the job never ran on B");
        sleep(Duration::from_millis(5));
    };
    job.remember(&on_b);
    sleep(Duration::from_millis(700));
    if let Some(st) = migrate.try_status() {
        panic!(
            "64 MiB at 10 MB/s: post-copy should still be running, but ferry migrate ended \
             ({}); stderr:\n{}\nagent:\n{}",
            describe(st),
            migrate.stderr_text(),
            fx.agent.stderr()
        );
    }
    eprintln!(
        "job on B: {on_b:?}; killing ferry migrate (pid {})",
        migrate.pid()
    );
    migrate.kill();
    // The agent kills the restored copy.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let left = fx.others_on_b();
        if left.is_empty() {
            break;
        }
        job.remember(&left);
        assert!(
            Instant::now() < end,
            "10 s after the source died the restored job still runs on B: {left:?}; agent:\n{}",
            fx.agent.stderr()
        );
        sleep(Duration::from_millis(20));
    }
    let end = Instant::now() + Duration::from_secs(5);
    while !fx.agent.stderr().contains("killed") {
        assert!(
            Instant::now() < end,
            "the agent should report that it killed the restored job:\n{}",
            fx.agent.stderr()
        );
        sleep(Duration::from_millis(20));
    }
    fx.agent.assert_healthy("after losing a post-copy source");
    // Let whatever survived on A end, then read the log.
    let _ = procs::wait_vanished(&tree, Duration::from_secs(20));
    let bad: Vec<String> = job
        .log()
        .lines()
        .filter(|l| l.starts_with("FAIL") || l.contains("mismatch"))
        .map(str::to_string)
        .collect();
    assert!(
        bad.is_empty(),
        "some copy of the job read wrong data: {bad:?}"
    );
}
