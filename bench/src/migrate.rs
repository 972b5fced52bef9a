//! `ferry-bench migrate`: live migration between two "nodes" of this host,
//! in the spirit of Table 1 of Ibrahim et al. (SC'11): per workload and
//! convergence controller, the job's slowdown during the migration, the
//! downtime, the total time, the bytes sent, the rounds and the
//! memory-update pattern that ended the live phase, next to the downtime of
//! a pure stop-and-copy at the same moment of the job.
//!
//! The two nodes are network namespaces joined by a veth pair with a private
//! /30 ([`Nodes`]), shaped with `tc ... tbf rate 1gbit` on both ends or left
//! unshaped. `ferry agent` runs in B; the jobs (`ferry run --detach`) and
//! `ferry migrate` run in A. The job is `bench/workloads/synth.c`, which
//! writes inside a working set at a paced rate and prints a tick line with
//! its work counter every 100 ms, so the work it did during the migration
//! can be compared with an unmigrated run of the same workload over the same
//! window (its baseline).
//!
//! Per run:
//!  1. start `synth` with `ferry run --detach` in A, wait for READY and
//!     `--settle-ms`;
//!  2. `ferry migrate PID --to B --controller C --json` (the window of the
//!     migration is from just before this command to its exit);
//!  3. the job must run on the target (the reported pid runs `synth` in B
//!     and the log shows it progressing), then the harness creates the
//!     job's stop file and the job must check all its memory and print
//!     `PASS synth`;
//!  4. everything left in either namespace, except the agents, is killed
//!     and reaped.
//!
//! Then one unmigrated baseline run per workload, the goal checks, and the
//! page streaming throughput (stop-copy of a 1 GiB job with `--compress
//! none`, over loopback and over the unshaped veth).

use crate::report::{self, Table};
use crate::util::{self, CommonArgs, TempDir};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const LONG_ABOUT: &str = "Measure live migration (`ferry migrate` to a `ferry agent`) \
between two network namespaces of this host joined by a veth pair, shaped to 1 Gbit/s with \
tc tbf or unshaped, in the style of Table 1 of Ibrahim et al. (SC'11).\n\n\
Workloads (bench/workloads/synth.c, paced page writes inside a working set): the goal case \
(--mem MiB with a --wss MiB working set written at --rate MiB/s, random pages) and three jobs \
designed so that each of the adaptive controller's patterns a, b and c is the one that ends \
the live phase on the 1 Gbit/s link. Each is migrated mid-run with each controller \
(adaptive, downtime:300, iterations:30, stop-copy) over each link; the job must PASS on the \
target. Reported per run: the job's slowdown during the migration (work lost against an \
unmigrated baseline run over the same window), downtime, total time, bytes sent, rounds, \
pattern, and the downtime of the stop-copy run of the same workload and link.\n\n\
Then the goal checks: (a) adaptive downtime <= 1/20 of stop-copy's for the goal case at \
1 Gbit/s; (b) every migration finished before the job's deadline; (c) slowdown <= 10 % \
with the adaptive controller; (d) uncompressed page streaming >= 1 GB/s (stop-copy of a \
--mem MiB job with --compress none over loopback).";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Goal case: memory of the job, in MiB.
    #[arg(long, default_value_t = 1024, value_name = "MiB")]
    pub mem: u64,
    /// Goal case: writable working set, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MiB")]
    pub wss: u64,
    /// Goal case: write rate inside the working set, in MiB/s (random pages).
    #[arg(long, default_value_t = 64, value_name = "MiB/s")]
    pub rate: u64,
    /// Links: a tc rate (e.g. 1gbit: tbf on both veth ends), none (unshaped
    /// veth), or both (= 1gbit,none); comma-separated.
    #[arg(long, default_value = "both", value_name = "RATE|none|both")]
    pub link: String,
    /// Workloads: goal, a, b, c (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "goal,a,b,c",
        value_name = "NAME,..."
    )]
    pub workloads: Vec<String>,
    /// Controllers (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "adaptive,downtime:300,iterations:30,stop-copy",
        value_name = "SPEC,..."
    )]
    pub controllers: Vec<String>,
    /// Repetitions of every run; the tables show medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: u32,
    /// Length of every job (WORKLOAD_SECS): a migration still running at this
    /// many seconds after READY did not converge.
    #[arg(long, default_value_t = 90, value_name = "SECS")]
    pub job_secs: u64,
    /// Pause after READY before migrating.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    pub settle_ms: u64,
    /// How long the job must run on the target before it is told to finish.
    #[arg(long, default_value_t = 1000, hide = true)]
    pub after_ms: u64,
    /// Longest baseline run; longer windows use its mean rate beyond.
    #[arg(long, default_value_t = 90, hide = true)]
    pub max_baseline_secs: u64,
    /// Skip goal (d), the page streaming throughput runs.
    #[arg(long)]
    pub no_throughput: bool,
    /// Only goal (d): the page streaming runs (repeated --reps times, the
    /// goal judged on the median), no workload matrix and no baselines.
    #[arg(long, conflicts_with = "no_throughput")]
    pub throughput_only: bool,
    /// Dirty-page tracker passed to every `ferry migrate` (`--tracker`:
    /// auto, uffd-wp, soft-dirty, hash) [default: ferry's own default].
    #[arg(long, value_name = "NAME")]
    pub tracker: Option<String>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The issue's goal: adaptive downtime at most this fraction of stop-copy's.
const GOAL_DOWNTIME_FRACTION: f64 = 1.0 / 20.0;
/// Largest acceptable slowdown, percent.
const GOAL_SLOWDOWN_PCT: f64 = 10.0;
/// Page streaming goal, bytes per second.
const GOAL_STREAM_BPS: f64 = 1e9;
/// The tc qdisc of a shaped link (the rate is inserted).
pub(crate) const TBF: [&str; 4] = ["burst", "256kb", "latency", "50ms"];
/// Port of the agent on the veth (B) and of the loopback agent (A).
pub(crate) const PORT_VETH: u16 = 7707;
const PORT_LOOPBACK: u16 = 7708;

// ---- workloads -------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Workload {
    key: String,
    label: String,
    mem: u64,
    wss: u64,
    rate: u64,
    pattern: &'static str,
    /// The adaptive pattern it is designed to trigger on the 1 Gbit/s link.
    meant: &'static str,
    why: &'static str,
}

impl Workload {
    fn args(&self) -> Vec<String> {
        vec![
            self.mem.to_string(),
            self.wss.to_string(),
            self.rate.to_string(),
            self.pattern.to_string(),
        ]
    }

    fn describe(&self) -> String {
        format!(
            "`synth {} {} {} {}`: {} MiB, working set {} MiB written at {} MiB/s ({})",
            self.mem,
            self.wss,
            self.rate,
            self.pattern,
            self.mem,
            self.wss,
            self.rate,
            if self.pattern == "rand" {
                "random pages"
            } else {
                "sequential sweeps"
            }
        )
    }
}

fn workloads(args: &Args) -> Result<Vec<Workload>> {
    let mut out = Vec::new();
    for k in &args.workloads {
        let w = match k.as_str() {
            "goal" => Workload {
                key: "goal".into(),
                label: format!("goal: {} MiB, {} MiB WSS", args.mem, args.wss),
                mem: args.mem,
                wss: args.wss,
                rate: args.rate,
                pattern: "rand",
                meant: "b",
                why: "the issue's goal case; the pages written in one interval drain in well \
                      under one interval at 1 Gbit/s",
            },
            "a" => Workload {
                key: "a".into(),
                label: "a: random writes over 384 MiB".into(),
                mem: 512,
                wss: 384,
                rate: 160,
                pattern: "rand",
                meant: "a",
                why: "random writes over a large working set faster than the link drains: \
                      every round is send-bound, so the modified pages per interval settle at \
                      the link's rate, and only ~50-60 % of a round's pages were sent the \
                      round before",
            },
            "b" => Workload {
                key: "b".into(),
                label: "b: 16 MiB at 16 MiB/s".into(),
                mem: 512,
                wss: 16,
                rate: 16,
                pattern: "seq",
                meant: "b",
                why: "a small working set at a low rate: what one interval dirties drains in \
                      ~0.15 s",
            },
            "c" => Workload {
                key: "c".into(),
                label: "c: 192 MiB hot set, 2 sweeps/s".into(),
                mem: 512,
                wss: 192,
                rate: 384,
                pattern: "seq",
                meant: "c",
                why: "a hot set rewritten entirely twice a second, larger than what drains in \
                      one interval (~1.7 s at 1 Gbit/s): every round resends the same pages",
            },
            other => bail!("unknown workload {other:?}: expected goal, a, b or c"),
        };
        if !out.iter().any(|x: &Workload| x.key == w.key) {
            out.push(w);
        }
    }
    if out.is_empty() {
        bail!("--workloads is empty");
    }
    Ok(out)
}

// ---- links ---------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Link {
    /// tbf at this rate (tc syntax) on both veth ends.
    Shaped(String),
    Unshaped,
}

impl Link {
    pub(crate) fn label(&self) -> String {
        match self {
            Link::Shaped(r) => format!("veth, tbf {r}"),
            Link::Unshaped => "veth, unshaped".into(),
        }
    }

    pub(crate) fn slug(&self) -> String {
        match self {
            Link::Shaped(r) => r.clone(),
            Link::Unshaped => "none".into(),
        }
    }
}

pub(crate) fn links(spec: &str) -> Result<Vec<Link>> {
    let mut out = Vec::new();
    for s in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let add: Vec<Link> = match s {
            "both" => vec![Link::Shaped("1gbit".into()), Link::Unshaped],
            "none" => vec![Link::Unshaped],
            r if r.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
                && r.starts_with(|c: char| c.is_ascii_digit()) =>
            {
                vec![Link::Shaped(r.to_string())]
            }
            r => bail!("bad --link {r:?}: expected a tc rate such as 1gbit, none or both"),
        };
        for l in add {
            if !out.contains(&l) {
                out.push(l);
            }
        }
    }
    if out.is_empty() {
        bail!("--link is empty");
    }
    Ok(out)
}

// ---- the two nodes ---------------------------------------------------------------

const NETNS_DIR: &str = "/run/netns";
const NS_PREFIX: &str = "fbench-";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ns {
    A,
    B,
}

/// One network namespace of ours.
struct NetNs {
    name: String,
    /// /run/netns/NAME, open: setns(2) target for the processes we start.
    file: File,
    /// (st_dev, st_ino) of the namespace, to recognise its processes.
    id: (u64, u64),
}

/// Two "nodes": network namespaces A and B joined by a veth pair, veth-a
/// 10.251.K.1/30 in A and veth-b 10.251.K.2/30 in B (the addresses exist
/// only inside them), loopback up in both. Dropping it kills everything
/// that runs in either namespace, reaps what became our child and deletes
/// both namespaces (which destroys the veth pair).
pub(crate) struct Nodes {
    ns: Vec<NetNs>,
    subnet: String,
    scratch: PathBuf,
    shaped: Option<String>,
}

impl Nodes {
    pub(crate) fn new(scratch: &Path) -> Result<Self> {
        clean_stale_namespaces(scratch);
        let me = std::process::id();
        let k = 1 + me % 250;
        let mut nodes = Nodes {
            ns: Vec::new(),
            subnet: format!("10.251.{k}"),
            scratch: scratch.to_path_buf(),
            shaped: None,
        };
        for side in ["a", "b"] {
            let name = format!("{NS_PREFIX}{me}-{side}");
            ip(scratch, &["netns", "add", &name])?;
            let path = Path::new(NETNS_DIR).join(&name);
            let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            let m = file.metadata()?;
            nodes.ns.push(NetNs {
                name,
                file,
                id: (m.dev(), m.ino()),
            });
        }
        let (a, b) = (nodes.ns[0].name.clone(), nodes.ns[1].name.clone());
        ip(
            scratch,
            &[
                "link", "add", "veth-a", "netns", &a, "type", "veth", "peer", "name", "veth-b",
                "netns", &b,
            ],
        )?;
        ip(
            scratch,
            &[
                "-n",
                &a,
                "addr",
                "add",
                &format!("{}.1/30", nodes.subnet),
                "dev",
                "veth-a",
            ],
        )?;
        ip(
            scratch,
            &[
                "-n",
                &b,
                "addr",
                "add",
                &format!("{}.2/30", nodes.subnet),
                "dev",
                "veth-b",
            ],
        )?;
        for (ns, dev) in [(&a, "veth-a"), (&b, "veth-b")] {
            ip(scratch, &["-n", ns, "link", "set", "lo", "up"])?;
            ip(scratch, &["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(nodes)
    }

    fn get(&self, ns: Ns) -> &NetNs {
        &self.ns[match ns {
            Ns::A => 0,
            Ns::B => 1,
        }]
    }

    pub(crate) fn addr_b(&self, port: u16) -> String {
        format!("{}.2:{port}", self.subnet)
    }

    /// Shapes both veth ends with tbf at `link`'s rate, or removes the
    /// shaping.
    pub(crate) fn set_link(&mut self, link: &Link) -> Result<()> {
        for (ns, dev) in [(Ns::A, "veth-a"), (Ns::B, "veth-b")] {
            let name = self.get(ns).name.clone();
            match link {
                Link::Shaped(rate) => {
                    let mut a = vec![
                        "-n", &name, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    ];
                    a.extend(TBF);
                    tool(&self.scratch, "tc", &a)?;
                }
                Link::Unshaped => {
                    if self.shaped.is_some() {
                        tool(
                            &self.scratch,
                            "tc",
                            &["-n", &name, "qdisc", "del", "dev", dev, "root"],
                        )?;
                    }
                }
            }
        }
        self.shaped = match link {
            Link::Shaped(r) => Some(r.clone()),
            Link::Unshaped => None,
        };
        Ok(())
    }

    /// `tc qdisc show` of both veth ends, for the record.
    pub(crate) fn qdiscs(&self) -> String {
        let mut out = Vec::new();
        for (ns, dev) in [(Ns::A, "veth-a"), (Ns::B, "veth-b")] {
            let name = &self.get(ns).name;
            let mut cmd = Command::new("tc");
            cmd.args(["-n", name, "qdisc", "show", "dev", dev]);
            if let Ok(o) = util::run_command(&mut cmd, Duration::from_secs(10), &self.scratch, "tc")
            {
                out.push(format!("{dev}: {}", o.stdout.trim().replace('\n', "; ")));
            }
        }
        out.join(", ")
    }

    /// A command that runs in namespace `ns`: joins its network namespace
    /// (setns(2)) and marks every inherited descriptor above 2
    /// close-on-exec (ferry refuses to migrate jobs holding pipes or
    /// sockets to the outside).
    pub(crate) fn command(&self, ns: Ns, program: &Path) -> Command {
        let fd = self.get(ns).file.as_raw_fd();
        let mut cmd = Command::new(program);
        // SAFETY: setns and close_range are async-signal-safe syscalls; fd
        // stays open in the parent until the child has exec'd.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
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
        cmd
    }

    /// Whether `pid` runs in namespace `ns`.
    pub(crate) fn holds(&self, ns: Ns, pid: i32) -> bool {
        netns_of(pid) == Some(self.get(ns).id)
    }

    /// SIGKILLs every process in either namespace except `keep`, reaps the
    /// ones that are (or became) our children, and waits until none is
    /// left (bounded).
    pub(crate) fn kill_all(&self, keep: &[i32]) -> Result<()> {
        let ids: Vec<(u64, u64)> = self.ns.iter().map(|n| n.id).collect();
        kill_in_namespaces(&ids, keep)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all(&[]) {
            eprintln!("ferry-bench: cleanup: {e:#}");
        }
        for n in &self.ns {
            if let Err(e) = ip(&self.scratch, &["netns", "del", &n.name]) {
                eprintln!("ferry-bench: cleanup: {e:#}");
            }
        }
    }
}

/// Runs `ip ARGS`; fails with its stderr.
fn ip(scratch: &Path, args: &[&str]) -> Result<()> {
    tool(scratch, "ip", args)
}

fn tool(scratch: &Path, program: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let shown = util::show_command(&cmd);
    let out = util::run_command(&mut cmd, Duration::from_secs(20), scratch, program)
        .with_context(|| format!("running `{shown}` (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            util::describe_status(out.status),
            out.stderr.trim()
        );
    }
    Ok(())
}

/// (st_dev, st_ino) of the network namespace of `pid` (None for zombies and
/// processes that are gone).
fn netns_of(pid: i32) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Reaps every zombie child of ours except `keep` (the agents: std's
/// `Child` reaps those).
fn reap_zombie_children(keep: &[i32]) {
    let me = std::process::id() as i32;
    for pid in all_pids() {
        if keep.contains(&pid) {
            continue;
        }
        if let Some((ppid, 'Z' | 'X')) = util::proc_stat(pid) {
            if ppid == me {
                let mut st = 0;
                // SAFETY: waitpid on one specific zombie child, WNOHANG.
                unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG | libc::__WALL) };
            }
        }
    }
}

/// Sends SIGKILL to `pid` only if it (still) runs in one of `ids`: the
/// pidfd pins the process between the check and the signal, so a reused
/// pid is never signalled.
fn kill_if_in(pid: i32, ids: &[(u64, u64)]) {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return;
    }
    let fd = fd as i32;
    if netns_of(pid).is_some_and(|id| ids.contains(&id)) {
        // SAFETY: pidfd_send_signal on the pidfd we own.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd) };
}

fn kill_in_namespaces(ids: &[(u64, u64)], keep: &[i32]) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let mut left = Vec::new();
        for pid in all_pids() {
            if keep.contains(&pid) {
                continue;
            }
            if netns_of(pid).is_some_and(|id| ids.contains(&id)) {
                kill_if_in(pid, ids);
                left.push(pid);
            }
        }
        reap_zombie_children(keep);
        if left.is_empty() {
            return Ok(());
        }
        if t0.elapsed() > util::REAP_TIMEOUT {
            bail!(
                "processes {left:?} still run in the benchmark's namespaces {:?} after SIGKILL",
                util::REAP_TIMEOUT
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Removes namespaces left behind by a ferry-bench that was killed (its pid
/// is gone or runs something else), killing what still runs in them.
fn clean_stale_namespaces(scratch: &Path) {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "ferry-bench");
        if alive {
            continue;
        }
        if let Ok(m) = fs::metadata(e.path()) {
            let _ = kill_in_namespaces(&[(m.dev(), m.ino())], &[]);
        }
        match ip(scratch, &["netns", "del", &name]) {
            Ok(()) => eprintln!("migrate: removed stale namespace {name}"),
            Err(err) => eprintln!("migrate: could not remove stale namespace {name}: {err:#}"),
        }
    }
}

// ---- agents ---------------------------------------------------------------------------

/// A `ferry agent` running in one namespace; killed (with its process
/// group) and reaped on drop.
pub(crate) struct Agent {
    guard: util::ChildGuard,
    pub(crate) pid: i32,
    pub(crate) addr: String,
    log: PathBuf,
}

impl Agent {
    fn start(ctx: &Ctx, nodes: &Nodes, ns: Ns, addr: &str, name: &str) -> Result<Self> {
        Self::spawn(&ctx.ferry, &ctx.work, &ctx.token, nodes, ns, addr, name)
    }

    /// Starts `ferry agent --listen ADDR --token-file TOKEN` in `ns`, its
    /// log and work directory named after `name` under `scratch`, and
    /// waits (bounded) until it listens.
    pub(crate) fn spawn(
        ferry: &Path,
        scratch: &Path,
        token: &Path,
        nodes: &Nodes,
        ns: Ns,
        addr: &str,
        name: &str,
    ) -> Result<Self> {
        util::check_interrupted()?;
        let log = scratch.join(format!("{name}.log"));
        let work = scratch.join(name);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("create {}", log.display()))?;
        let mut cmd = nodes.command(ns, ferry);
        cmd.arg("agent")
            .arg("--listen")
            .arg(addr)
            .arg("--token-file")
            .arg(token)
            .arg("--work-dir")
            .arg(&work)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let shown = util::show_command(&cmd);
        let child = cmd.spawn().with_context(|| format!("start `{shown}`"))?;
        let pid = child.id() as i32;
        let mut agent = Agent {
            guard: util::ChildGuard::new(child, format!("ferry agent (pid {pid})")).own_group(),
            pid,
            addr: addr.to_string(),
            log,
        };
        let t0 = Instant::now();
        loop {
            util::check_interrupted()?;
            let text = fs::read_to_string(&agent.log).unwrap_or_default();
            if text.contains("ferry agent: listening on") {
                return Ok(agent);
            }
            if !agent.guard.running()? {
                bail!(
                    "`{shown}` exited ({}) before listening:\n{}",
                    agent
                        .guard
                        .exit_status()
                        .map_or_else(|| "?".into(), util::describe_status),
                    util::log_tail(&agent.log, 20)
                );
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "`{shown}` not listening after 20 s:\n{}",
                    util::log_tail(&agent.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if !self.guard.running()? {
            bail!(
                "the agent at {} exited ({}); its log:\n{}",
                self.addr,
                self.guard
                    .exit_status()
                    .map_or_else(|| "?".into(), util::describe_status),
                util::log_tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

// ---- ferry migrate's report -------------------------------------------------------

#[derive(serde::Deserialize, Debug, Clone)]
#[allow(dead_code)] // fields kept for completeness of the report format
pub(crate) struct MigrateJson {
    pub(crate) pid: i32,
    #[serde(default)]
    pub(crate) target: String,
    pub(crate) target_pid: i32,
    #[serde(default)]
    pub(crate) processes: u64,
    #[serde(default)]
    pub(crate) threads: u64,
    pub(crate) controller: String,
    pub(crate) pattern: Option<String>,
    pub(crate) stop_reason: String,
    pub(crate) downtime_ms: f64,
    pub(crate) total_ms: f64,
    #[serde(default)]
    pub(crate) restore_ms: f64,
    #[serde(default)]
    pub(crate) live_ms: f64,
    pub(crate) bytes_sent: u64,
    pub(crate) memory_bytes: u64,
    pub(crate) pages: MigPages,
    pub(crate) rounds: Vec<RoundJson>,
    #[serde(default)]
    pub(crate) compression: String,
    #[serde(default)]
    pub(crate) streams: u64,
    #[serde(default)]
    pub(crate) tracker: String,
}

#[derive(serde::Deserialize, Debug, Clone, Default)]
#[allow(dead_code)]
pub(crate) struct MigPages {
    #[serde(default)]
    pub(crate) zero: u64,
    #[serde(default)]
    pub(crate) raw: u64,
    #[serde(default)]
    pub(crate) lz4: u64,
    #[serde(default)]
    pub(crate) zstd: u64,
    #[serde(default)]
    pub(crate) absent: u64,
    #[serde(default)]
    pub(crate) resent: u64,
    #[serde(default)]
    pub(crate) total: u64,
    #[serde(default)]
    pub(crate) not_present: u64,
}

#[derive(serde::Deserialize, Debug, Clone)]
#[allow(dead_code)]
pub(crate) struct RoundJson {
    pub(crate) round: u32,
    pub(crate) dirty_pages: u64,
    pub(crate) pages_sent: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) duration_ms: f64,
    pub(crate) bandwidth: f64,
    #[serde(default)]
    pub(crate) estimated_downtime_ms: f64,
    pub(crate) frozen: bool,
}

impl MigrateJson {
    pub(crate) fn live_rounds(&self) -> usize {
        self.rounds.iter().filter(|r| !r.frozen).count()
    }

    /// The live phase ended by the safety cap of the adaptive or downtime
    /// controller (not by its own rule): it would have iterated on.
    fn hit_safety_cap(&self) -> bool {
        self.stop_reason.starts_with("round limit")
            && (self.controller == "adaptive" || self.controller.starts_with("downtime"))
    }

    pub(crate) fn short_reason(&self) -> String {
        let r = self.stop_reason.as_str();
        let s = if let Some(p) = &self.pattern {
            return format!("pattern {p}");
        } else if r.starts_with("estimated downtime") {
            "downtime < target"
        } else if r.starts_with("round limit") {
            if self.hit_safety_cap() {
                "30-round safety cap"
            } else {
                "round limit"
            }
        } else if r.starts_with("fewer than 50") {
            "< 50 pages dirty"
        } else if r.starts_with("more than 3x") {
            "> 3× memory sent"
        } else if r.starts_with("stop-and-copy without") {
            "no live phase"
        } else {
            r
        };
        s.to_string()
    }

    /// "dirty@duration" per round, the frozen one marked with *.
    fn rounds_summary(&self) -> String {
        self.rounds
            .iter()
            .map(|r| {
                if r.frozen {
                    format!("*{}@{:.2}s", r.pages_sent, r.duration_ms / 1e3)
                } else {
                    format!("{}@{:.2}s", r.dirty_pages, r.duration_ms / 1e3)
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Median measured bandwidth of the live rounds, bytes/s.
    fn live_bandwidth(&self) -> f64 {
        util::median(
            self.rounds
                .iter()
                .filter(|r| !r.frozen && r.bandwidth > 0.0)
                .map(|r| r.bandwidth),
        )
    }
}

// ---- the job's progress ---------------------------------------------------------------

/// The job's work counter over time, from its log: (realtime, page writes
/// since READY), starting with (t0, 0).
#[derive(Debug, Clone)]
pub(crate) struct Ticks {
    t0: f64,
    pts: Vec<(f64, f64)>,
}

impl Ticks {
    pub(crate) fn parse(text: &str) -> Result<Self> {
        let mut t0 = None;
        let mut pts = Vec::new();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            match it.next() {
                Some("t0") => t0 = it.next().and_then(|v| v.parse::<f64>().ok()),
                Some("tick") => {
                    let t = it.next().and_then(|v| v.parse::<f64>().ok());
                    let n = it.next().and_then(|v| v.parse::<f64>().ok());
                    if let (Some(t), Some(n)) = (t, n) {
                        pts.push((t, n));
                    }
                }
                _ => {}
            }
        }
        let t0 = t0.context("the job's log has no t0 line")?;
        pts.insert(0, (t0, 0.0));
        // Ticks are in time order unless a restored copy and an original
        // both wrote (they never run at once): sort to be safe.
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Self { t0, pts })
    }

    fn last_t(&self) -> f64 {
        self.pts.last().map_or(self.t0, |p| p.0)
    }

    /// Work counter at realtime `t`, linearly interpolated between ticks.
    pub(crate) fn count_at(&self, t: f64) -> f64 {
        let i = self.pts.partition_point(|p| p.0 <= t);
        if i == 0 {
            return 0.0;
        }
        if i == self.pts.len() {
            return self.pts[i - 1].1;
        }
        let (ta, ca) = self.pts[i - 1];
        let (tb, cb) = self.pts[i];
        if tb <= ta {
            return cb;
        }
        ca + (cb - ca) * (t - ta) / (tb - ta)
    }

    /// Page writes per second over [t0 + from, last tick].
    fn mean_rate(&self, from: f64) -> f64 {
        let a = self.t0 + from;
        let b = self.last_t();
        if b <= a {
            return f64::NAN;
        }
        (self.count_at(b) - self.count_at(a)) / (b - a)
    }

    /// Work done in [t0 + rel_a, t0 + rel_b]; beyond the last tick the mean
    /// rate (from `settle` on) stands in. Returns (work, extrapolated).
    fn work_in(&self, rel_a: f64, rel_b: f64, settle: f64) -> (f64, bool) {
        let (a, b) = (self.t0 + rel_a, self.t0 + rel_b);
        let end = self.last_t();
        if b <= end {
            return (self.count_at(b) - self.count_at(a), false);
        }
        let rate = self.mean_rate(settle);
        let covered = if a < end {
            self.count_at(end) - self.count_at(a)
        } else {
            0.0
        };
        (covered + rate * (b - a.max(end)), true)
    }
}

pub(crate) fn realtime() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// ---- runs -------------------------------------------------------------------------

struct Ctx<'a> {
    args: &'a Args,
    ferry: PathBuf,
    synth: PathBuf,
    work: PathBuf,
    token: PathBuf,
    timeout: Duration,
}

/// One migration.
struct RunSpec<'a> {
    link: &'a str,
    workload: &'a Workload,
    controller: &'a str,
    rep: u32,
    to: String,
    /// Where the agent at `to` runs (the restored job runs there too).
    target_ns: Ns,
    extra: &'a [&'a str],
}

impl RunSpec<'_> {
    fn slug(&self) -> String {
        let c: String = self
            .controller
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!(
            "{}-{}-{c}{}-rep{}",
            self.link,
            self.workload.key,
            if self.extra.is_empty() { "" } else { "-x" },
            self.rep
        )
    }
}

/// What one migration measured.
#[derive(Clone)]
struct RunResult {
    mig: MigrateJson,
    ticks: Ticks,
    /// The migration window (realtime).
    t_start: f64,
    t_end: f64,
    /// Seconds after READY at which ferry migrate returned.
    finished_at: f64,
}

impl RunResult {
    fn converged(&self, job_secs: u64) -> bool {
        self.finished_at < job_secs as f64
    }

    /// Work done during the window, and the window relative to READY.
    fn window(&self) -> (f64, f64, f64) {
        let w = self.ticks.count_at(self.t_end) - self.ticks.count_at(self.t_start);
        (w, self.t_start - self.ticks.t0, self.t_end - self.ticks.t0)
    }
}

/// Kills everything but the agents in both namespaces when dropped: no job
/// (source or restored copy) outlives its run.
pub(crate) struct RunCleanup<'a> {
    pub(crate) nodes: &'a Nodes,
    pub(crate) keep: Vec<i32>,
}

impl Drop for RunCleanup<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.nodes.kill_all(&self.keep) {
            eprintln!("ferry-bench: cleanup: {e:#}");
        }
    }
}

/// Starts the workload with `ferry run --detach` in namespace A and waits
/// for READY. Returns its pid and log.
fn start_job(ctx: &Ctx, nodes: &Nodes, w: &Workload, dir: &Path) -> Result<(i32, PathBuf)> {
    let log = dir.join("job.log");
    let stop = dir.join("stop");
    let pid = start_detached(
        nodes,
        &ctx.ferry,
        dir,
        &log,
        &[],
        &ctx.synth,
        &w.args(),
        &[
            ("WORKLOAD_SECS", ctx.args.job_secs.to_string().as_ref()),
            ("SYNTH_STOP_FILE", stop.as_os_str()),
        ],
        Duration::from_secs(60 + 30 * w.mem.div_ceil(1024)),
    )?;
    Ok((pid, log))
}

/// Settings a job must not inherit from the benchmark's environment.
pub(crate) const INHERITED_LIBRARY_ENV: [&str; 6] = [
    "LD_PRELOAD",
    "FERRY_ZERO",
    "FERRY_ZERO_MIN",
    "FERRY_ZERO_RELEASE_MIN",
    "FERRY_ZERO_REALLOC",
    "FERRY_ZERO_STATS",
];

/// Starts `ferry run --detach --log LOG RUN_OPTS.. -- PROGRAM ARGS..` in
/// namespace A with `env` (and none of the library settings of our own
/// environment) and waits until the job prints READY; returns its pid.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_detached(
    nodes: &Nodes,
    ferry: &Path,
    dir: &Path,
    log: &Path,
    run_opts: &[String],
    program: &Path,
    args: &[String],
    env: &[(&str, &std::ffi::OsStr)],
    ready_within: Duration,
) -> Result<i32> {
    let mut cmd = nodes.command(Ns::A, ferry);
    for k in INHERITED_LIBRARY_ENV {
        cmd.env_remove(k);
    }
    cmd.arg("run")
        .arg("--detach")
        .arg("--log")
        .arg(log)
        .args(run_opts)
        .arg("--")
        .arg(program)
        .args(args)
        .envs(env.iter().copied());
    let shown = util::show_command(&cmd);
    let out = util::run_command(&mut cmd, Duration::from_secs(30), dir, "ferry-run")
        .with_context(|| format!("running `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{}",
            util::describe_status(out.status),
            util::indent(out.stderr.trim_end())
        );
    }
    let pid = util::detached_pid(&out.stdout)?;
    util::wait_line(log, "READY", Some(pid), ready_within, "before READY")?;
    Ok(pid)
}

/// `ferry migrate PID --to TO --token-file TOKEN ARGS.. --json`, run in
/// namespace A.
pub(crate) struct Migration {
    /// The report (one JSON object).
    pub(crate) stdout: String,
    /// Realtime just before it started, and how long it ran.
    pub(crate) t_start: f64,
    pub(crate) wall: Duration,
    pub(crate) shown: String,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn migrate_job(
    nodes: &Nodes,
    ferry: &Path,
    dir: &Path,
    pid: i32,
    to: &str,
    token: &Path,
    args: &[&str],
    timeout: Duration,
    log: &Path,
) -> Result<Migration> {
    let mut cmd = nodes.command(Ns::A, ferry);
    cmd.arg("migrate")
        .arg(pid.to_string())
        .arg("--to")
        .arg(to)
        .arg("--token-file")
        .arg(token)
        .args(args)
        .arg("--json");
    let shown = util::show_command(&cmd);
    let t_start = realtime();
    let out = util::run_command(&mut cmd, timeout, dir, "migrate")
        .with_context(|| format!("running `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}) after {:.1} s; stderr:\n{}\nstdout:\n{}\njob log:\n{}",
            util::describe_status(out.status),
            out.wall.as_secs_f64(),
            util::indent(out.stderr.trim_end()),
            util::indent(out.stdout.trim_end()),
            util::log_tail(log, 5)
        );
    }
    Ok(Migration {
        stdout: out.stdout,
        t_start,
        wall: out.wall,
        shown,
    })
}

/// Tells the job to finish (stop file) and waits for its verdict.
fn finish_job(w: &Workload, dir: &Path, log: &Path, where_: &str) -> Result<()> {
    fs::write(dir.join("stop"), b"").context("create the stop file")?;
    let limit = Duration::from_secs(60 + 30 * w.mem.div_ceil(1024));
    let t0 = Instant::now();
    loop {
        util::check_interrupted()?;
        let text = fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("FAIL")) {
            bail!("the job failed {where_}: {l}");
        }
        if text.lines().any(|l| l == "PASS synth") {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!(
                "the job printed no PASS {limit:?} after its stop file was created \
                 ({where_}); log:\n{}",
                util::log_tail(log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_one(ctx: &Ctx, nodes: &Nodes, keep: &[i32], spec: &RunSpec) -> Result<RunResult> {
    let dir = ctx.work.join(spec.slug());
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let _cleanup = RunCleanup {
        nodes,
        keep: keep.to_vec(),
    };
    let w = spec.workload;
    let (pid, log) = start_job(ctx, nodes, w, &dir)?;
    util::sleep(Duration::from_millis(ctx.args.settle_ms))?;
    util::check_log_ok(&log, "before the migration")?;

    let mut args = vec!["--controller", spec.controller];
    args.extend(spec.extra.iter().copied());
    if let Some(t) = ctx.args.tracker.as_deref() {
        args.extend(["--tracker", t]);
    }
    let m = migrate_job(
        nodes,
        &ctx.ferry,
        &dir,
        pid,
        &spec.to,
        &ctx.token,
        &args,
        ctx.timeout,
        &log,
    )?;
    let (t_start, shown) = (m.t_start, m.shown);
    let t_end = t_start + m.wall.as_secs_f64();
    let mig: MigrateJson = util::parse_json_line(&m.stdout, "migration report")
        .with_context(|| format!("`{shown}`"))?;

    // The job must now run on the target, in B, and make progress there.
    let tp = mig.target_pid;
    let synth = fs::canonicalize(&ctx.synth).unwrap_or_else(|_| ctx.synth.clone());
    if util::exe_of(tp).as_deref() != Some(synth.as_path()) || !nodes.holds(spec.target_ns, tp) {
        bail!(
            "after `{shown}` the target pid {tp} is not the job running in the target's \
             namespace {:?} (exe {:?}); report: {}; job log:\n{}",
            spec.target_ns,
            util::exe_of(tp),
            m.stdout.trim(),
            util::log_tail(&log, 5)
        );
    }
    util::sleep(Duration::from_millis(ctx.args.after_ms))?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let ticks = Ticks::parse(&text)?;
    if ticks.last_t() <= t_end {
        bail!(
            "the job shows no progress on the target {} ms after `{shown}` returned; log:\n{}",
            ctx.args.after_ms,
            util::log_tail(&log, 5)
        );
    }
    util::check_log_ok(&log, "on the target")?;
    finish_job(w, &dir, &log, "on the target")?;
    let finished_at = t_end - ticks.t0;
    if !ctx.args.common.keep {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(RunResult {
        mig,
        ticks,
        t_start,
        t_end,
        finished_at,
    })
}

/// An unmigrated run of `w` in namespace A, long enough to cover `secs`
/// seconds after READY (capped): its work counter is the baseline.
fn run_baseline(ctx: &Ctx, nodes: &Nodes, keep: &[i32], w: &Workload, secs: f64) -> Result<Ticks> {
    let dir = ctx.work.join(format!("baseline-{}", w.key));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let _cleanup = RunCleanup {
        nodes,
        keep: keep.to_vec(),
    };
    let (_pid, log) = start_job(ctx, nodes, w, &dir)?;
    let t_ready = realtime();
    let want = secs.min(ctx.args.max_baseline_secs as f64).max(5.0);
    let text = fs::read_to_string(&log).unwrap_or_default();
    let t0 = Ticks::parse(&text).map_or(t_ready, |t| t.t0);
    let left = (t0 + want + 0.3 - realtime()).max(0.0);
    util::sleep(Duration::from_secs_f64(left))?;
    util::check_log_ok(&log, "during the baseline run")?;
    finish_job(w, &dir, &log, "in the baseline run")?;
    let ticks = Ticks::parse(&fs::read_to_string(&log).unwrap_or_default())?;
    if !ctx.args.common.keep {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(ticks)
}

// ---- the benchmark -----------------------------------------------------------------

type Key = (String, String, String); // (link slug, workload key, controller)

struct Outcome {
    links: Vec<Link>,
    workloads: Vec<Workload>,
    runs: BTreeMap<Key, Vec<Result<RunResult>>>,
    baselines: BTreeMap<String, Result<Ticks>>,
    throughput: Vec<(String, Result<RunResult>)>,
    qdisc: String,
}

pub fn run(args: &Args) -> Result<()> {
    util::require_root()?;
    let ferry = util::resolve_ferry(args.common.ferry.as_deref())?;
    let (links, wls) = if args.throughput_only {
        (Vec::new(), Vec::new())
    } else {
        (links(&args.link)?, workloads(args)?)
    };
    if args.controllers.is_empty() {
        bail!("--controllers is empty");
    }
    if args.mem == 0 || args.wss == 0 || args.wss > args.mem || args.mem > 65536 {
        bail!("--mem and --wss: need 1 <= wss <= mem <= 65536 MiB");
    }
    if args.job_secs < 10 {
        bail!("--job-secs must be at least 10");
    }
    if let Some(avail) = report::meminfo("MemAvailable") {
        // Source job + the agent's copy of its pages + the restored job.
        let need = (3 * wls.iter().map(|w| w.mem).max().unwrap_or(args.mem) + 256) * 1024;
        if need > avail {
            bail!(
                "the largest job needs about {} MiB of memory (source, agent, target), only {} \
                 MiB available",
                need / 1024,
                avail / 1024
            );
        }
    }
    let parent = args
        .common
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let work = TempDir::new(&parent, "ferry-bench-migrate", args.common.keep)?;
    let synth = util::build_bench_workload("synth", work.path(), &[])?;
    let token = work.path().join("token");
    write_token(&token)?;
    let ctx = Ctx {
        args,
        ferry,
        synth,
        work: work.path().to_path_buf(),
        token,
        timeout: Duration::from_secs(args.common.timeout),
    };

    let built = report::file_mtime(&ctx.ferry);
    let outcome = benchmark(&ctx, links, wls)?;
    let mut t = tables(&ctx, &outcome);
    let now = report::file_mtime(&ctx.ferry);
    if now != built {
        t.text += &format!(
            "\n**Warning:** the ferry binary was rebuilt during the run (modified {built} at the \
             start, {now} at the end): the runs may not all have used the same build.\n"
        );
    }
    println!("{}", t.text);
    if args.common.record {
        let entry = results_entry(&ctx, work.path(), &outcome, &t);
        let path = report::append_results(&entry)?;
        eprintln!("migrate: appended to {}", path.display());
    }
    if t.failed > 0 {
        bail!("{} run(s) failed (see above)", t.failed);
    }
    Ok(())
}

pub(crate) fn write_token(path: &Path) -> Result<()> {
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("read /dev/urandom")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    std::io::Write::write_all(&mut f, hex.as_bytes())?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn benchmark(ctx: &Ctx, links: Vec<Link>, wls: Vec<Workload>) -> Result<Outcome> {
    let args = ctx.args;
    // Declared before the agents: dropped after them (the agents are our
    // children, reaped by their guards, before the namespaces are swept).
    let mut nodes = Nodes::new(&ctx.work)?;
    let mut agent = Agent::start(ctx, &nodes, Ns::B, &nodes.addr_b(PORT_VETH), "agent-b")?;
    let mut out = Outcome {
        links: links.clone(),
        workloads: wls.clone(),
        runs: BTreeMap::new(),
        baselines: BTreeMap::new(),
        throughput: Vec::new(),
        qdisc: String::new(),
    };
    let total = links.len() * wls.len() * args.controllers.len() * args.reps as usize;
    let mut n = 0;
    for link in &links {
        nodes.set_link(link)?;
        if let Link::Shaped(_) = link {
            out.qdisc = nodes.qdiscs();
        }
        for w in &wls {
            for rep in 1..=args.reps {
                for c in &args.controllers {
                    n += 1;
                    agent.check_alive()?;
                    let ls = link.slug();
                    let spec = RunSpec {
                        link: &ls,
                        workload: w,
                        controller: c,
                        rep,
                        to: agent.addr.clone(),
                        target_ns: Ns::B,
                        extra: &[],
                    };
                    let r = interruptible(run_one(ctx, &nodes, &[agent.pid], &spec))?;
                    log_run(n, total, link, w, c, rep, &r);
                    out.runs
                        .entry((ls, w.key.clone(), c.clone()))
                        .or_default()
                        .push(r);
                }
            }
        }
    }

    // Baselines: one unmigrated run per workload, covering the longest
    // migration window of that workload.
    for w in &wls {
        let need = out
            .runs
            .iter()
            .filter(|((_, k, _), _)| *k == w.key)
            .flat_map(|(_, v)| v.iter().filter_map(|r| r.as_ref().ok()))
            .map(|r| r.window().2)
            .fold(0.0, f64::max)
            + 0.5;
        agent.check_alive()?;
        eprintln!(
            "migrate: baseline of {} ({:.0} s after READY, unmigrated)",
            w.label,
            need.min(args.max_baseline_secs as f64)
        );
        let b = interruptible(run_baseline(ctx, &nodes, &[agent.pid], w, need))?;
        if let Err(e) = &b {
            eprintln!("migrate: baseline of {} FAILED: {e:#}", w.label);
        }
        out.baselines.insert(w.key.clone(), b);
    }

    // Goal (d): uncompressed page streaming of a mostly non-zero job.
    if !args.no_throughput {
        nodes.set_link(&Link::Unshaped)?;
        let lo = Agent::start(
            ctx,
            &nodes,
            Ns::A,
            &format!("127.0.0.1:{PORT_LOOPBACK}"),
            "agent-lo",
        )?;
        let big = Workload {
            key: "stream".into(),
            label: format!("{} MiB, nearly idle", args.mem),
            mem: args.mem,
            wss: 1,
            rate: 1,
            pattern: "seq",
            meant: "-",
            why: "",
        };
        let keep = [agent.pid, lo.pid];
        for (label, to, target_ns) in [
            ("loopback", lo.addr.clone(), Ns::A),
            ("veth, unshaped", agent.addr.clone(), Ns::B),
        ] {
            for (c, extra) in [
                ("stop-copy", &["--compress", "none"][..]),
                ("iterations:1", &["--compress", "none"][..]),
            ] {
                for rep in 1..=(if args.throughput_only { args.reps } else { 1 }) {
                    agent.check_alive()?;
                    let spec = RunSpec {
                        link: if label == "loopback" { "lo" } else { "none" },
                        workload: &big,
                        controller: c,
                        rep,
                        to: to.clone(),
                        target_ns,
                        extra,
                    };
                    let r = interruptible(run_one(ctx, &nodes, &keep, &spec))?;
                    match &r {
                        Ok(x) => eprintln!(
                            "migrate: streaming over {label}, {c} --compress none: {}",
                            stream_summary(&x.mig)
                        ),
                        Err(e) => eprintln!("migrate: streaming over {label}, {c} FAILED: {e:#}"),
                    }
                    out.throughput.push((format!("{label}, {c}"), r));
                }
            }
        }
        drop(lo);
    }
    drop(agent);
    drop(nodes);
    Ok(out)
}

/// Passes a run's result on, except an interruption (Ctrl-C), which ends
/// the benchmark.
pub(crate) fn interruptible<T>(r: Result<T>) -> Result<Result<T>> {
    match r {
        Err(e) if e.downcast_ref::<util::Interrupted>().is_some() => Err(e),
        r => Ok(r),
    }
}

fn log_run(
    n: usize,
    total: usize,
    link: &Link,
    w: &Workload,
    c: &str,
    rep: u32,
    r: &Result<RunResult>,
) {
    match r {
        Ok(x) => eprintln!(
            "migrate: [{n}/{total}] {} | {} | {c} rep {rep}: {} ({}), downtime {} ms (restore {} \
             ms), total {:.1} s, {} sent, {} live rounds, PASS on the target",
            link.label(),
            w.label,
            x.mig.short_reason(),
            x.mig.pattern.as_deref().unwrap_or("-"),
            report::ms(x.mig.downtime_ms),
            report::ms(x.mig.restore_ms),
            x.mig.total_ms / 1e3,
            report::bytes(x.mig.bytes_sent),
            x.mig.live_rounds(),
        ),
        Err(e) => eprintln!(
            "migrate: [{n}/{total}] {} | {} | {c} rep {rep} FAILED: {e:#}",
            link.label(),
            w.label
        ),
    }
}

/// Rates of a streaming run: (stop-copy round bytes/s, round 0 bytes/s,
/// memory bytes / downtime).
fn stream_rates(m: &MigrateJson) -> (f64, f64, f64) {
    let last = m.rounds.iter().rev().find(|r| r.frozen);
    let frozen = last.map_or(f64::NAN, |r| {
        r.bytes_sent as f64 / (r.duration_ms / 1e3).max(1e-9)
    });
    let live0 = m
        .rounds
        .iter()
        .find(|r| !r.frozen && r.round == 0)
        .map_or(f64::NAN, |r| {
            r.bytes_sent as f64 / (r.duration_ms / 1e3).max(1e-9)
        });
    let e2e = m.memory_bytes as f64 / (m.downtime_ms / 1e3).max(1e-9);
    (frozen, live0, e2e)
}

fn gbs(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{:.2}", v / 1e9)
    }
}

fn stream_summary(m: &MigrateJson) -> String {
    let (frozen, live0, e2e) = stream_rates(m);
    let rate = if m.live_rounds() == 0 {
        format!("stop-copy round {} GB/s", gbs(frozen))
    } else {
        format!("round 0 {} GB/s", gbs(live0))
    };
    format!(
        "{rate}, memory/downtime {} GB/s (downtime {} ms, restore {} ms)",
        gbs(e2e),
        report::ms(m.downtime_ms),
        report::ms(m.restore_ms)
    )
}

// ---- tables ---------------------------------------------------------------------------

struct Tables {
    /// Everything printed (Markdown).
    text: String,
    failed: usize,
}

/// Slowdown of one run against its workload's baseline: percent of the
/// baseline's work in the same window that the migrated job did not do.
fn slowdown(r: &RunResult, base: Option<&Ticks>, settle: f64) -> Option<(f64, bool)> {
    let base = base?;
    let (w, a, b) = r.window();
    let (wb, extrapolated) = base.work_in(a, b, settle);
    (wb > 0.0).then(|| ((1.0 - w / wb) * 100.0, extrapolated))
}

/// The same lost work as a share of a whole job of `job_secs` seconds at
/// the baseline's rate: the end-to-end slowdown of such a job, the measure
/// of Ibrahim et al.'s Table 1.
fn end_to_end(r: &RunResult, base: Option<&Ticks>, settle: f64, job_secs: u64) -> Option<f64> {
    let base = base?;
    let (w, a, b) = r.window();
    let (wb, _) = base.work_in(a, b, settle);
    let total = base.mean_rate(settle) * job_secs as f64;
    (total > 0.0).then(|| (wb - w) / total * 100.0)
}

fn pct(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.1}")
    }
}

/// What the goal checks need, collected while the tables are built.
#[derive(Default)]
struct Checks {
    runs_ok: usize,
    /// Runs whose migration ended after the job's deadline.
    not_converged: Vec<String>,
    /// Runs ended by the adaptive or downtime controller's safety cap.
    capped: Vec<String>,
    /// Adaptive runs: (name, window slowdown %).
    slow: Vec<(String, f64)>,
    /// Adaptive runs: end-to-end slowdown %.
    e2e: Vec<f64>,
    goal_a: Option<String>,
    goal_d: Option<String>,
    failures: Vec<String>,
}

impl Checks {
    fn fail(&mut self, what: &str, e: &anyhow::Error) {
        self.failures.push(format!(
            "**{what} failed:**\n\n```\n{}\n```\n",
            format!("{e:#}").trim_end()
        ));
    }
}

/// Median of `f` over the successful runs.
fn med_of(runs: &[&RunResult], f: impl Fn(&RunResult) -> f64) -> f64 {
    util::median(runs.iter().map(|r| f(r)))
}

fn ok_runs(v: &[Result<RunResult>]) -> Vec<&RunResult> {
    v.iter().filter_map(|r| r.as_ref().ok()).collect()
}

fn tables(ctx: &Ctx, o: &Outcome) -> Tables {
    let mut checks = Checks::default();
    let mut details = Table::new(&[
        "link",
        "workload",
        "controller",
        "rep",
        "pattern / stop",
        "downtime ms",
        "restore ms",
        "total s",
        "live s",
        "bytes sent",
        "memory bytes",
        "resent pages",
        "live MB/s",
        "window s (after READY)",
        "work (migrated / baseline)",
        "slowdown %",
        "rounds: dirty pages @ duration (*frozen: pages sent)",
    ]);
    let mut text = String::new();
    for link in &o.links {
        let t = link_table(ctx, o, link, &mut checks, &mut details);
        text += &format!("### {}\n\n{t}\n", link.label());
    }
    if !ctx.args.throughput_only {
        text += &baseline_table(ctx, o, &mut checks);
    }
    text += &stream_table(ctx, o, &mut checks);
    text += &goal_checks(ctx, &checks);
    text += "\n";
    if !details.is_empty() {
        text += &format!("\nPer run:\n\n{}\n", details.markdown());
    }
    for f in &checks.failures {
        text += &format!("\n{f}");
    }
    Tables {
        text,
        failed: checks.failures.len(),
    }
}

/// The Table 1-style table of one link (medians over the repetitions), and
/// the per-run rows of `details`.
fn link_table(
    ctx: &Ctx,
    o: &Outcome,
    link: &Link,
    checks: &mut Checks,
    details: &mut Table,
) -> String {
    let args = ctx.args;
    let settle = args.settle_ms as f64 / 1e3;
    let ls = link.slug();
    let e2e_header = format!("slowdown % ({} s job)", args.job_secs);
    let mut t = Table::new(&[
        "workload",
        "controller",
        "pattern",
        "slowdown % (window)",
        &e2e_header,
        "downtime ms",
        "restore ms",
        "stop-copy downtime ms",
        "stop-copy ÷ downtime",
        "total s",
        "bytes sent",
        "live rounds",
        "stop reason",
        "done at s (of job)",
    ]);
    for w in &o.workloads {
        let base = o.baselines.get(&w.key).and_then(|b| b.as_ref().ok());
        let sc = o
            .runs
            .get(&(ls.clone(), w.key.clone(), "stop-copy".to_string()))
            .map(|v| ok_runs(v))
            .filter(|v| !v.is_empty());
        let sc_down = sc.as_ref().map(|v| med_of(v, |r| r.mig.downtime_ms));
        for c in &args.controllers {
            let Some(v) = o.runs.get(&(ls.clone(), w.key.clone(), c.clone())) else {
                continue;
            };
            for (i, r) in v.iter().enumerate() {
                let name = format!("{} | {} | {c} | rep {}", link.label(), w.label, i + 1);
                match r {
                    Err(e) => checks.fail(&name, e),
                    Ok(x) => {
                        checks.runs_ok += 1;
                        if !x.converged(args.job_secs) {
                            checks
                                .not_converged
                                .push(format!("{name}: done {:.1} s after READY", x.finished_at));
                        }
                        if x.mig.hit_safety_cap() {
                            checks.capped.push(name.clone());
                        }
                        let sd = slowdown(x, base, settle);
                        if c == "adaptive" {
                            checks.slow.push((name, sd.map_or(f64::NAN, |s| s.0)));
                            checks
                                .e2e
                                .extend(end_to_end(x, base, settle, args.job_secs));
                        }
                        details.row(detail_row(x, &ls, w, c, i + 1, base, settle));
                    }
                }
            }
            let ok = ok_runs(v);
            if ok.is_empty() {
                let mut row = vec![w.label.clone(), c.clone(), "FAILED".into()];
                row.resize(14, "–".into());
                t.row(row);
                continue;
            }
            let down = med_of(&ok, |r| r.mig.downtime_ms);
            let slow = util::median(
                ok.iter()
                    .filter_map(|r| slowdown(r, base, settle).map(|s| s.0)),
            );
            let e2e = util::median(
                ok.iter()
                    .filter_map(|r| end_to_end(r, base, settle, args.job_secs)),
            );
            let mut patterns: Vec<String> = ok
                .iter()
                .map(|r| r.mig.pattern.clone().unwrap_or_else(|| "–".into()))
                .collect();
            patterns.dedup();
            let mut reasons: Vec<String> = ok.iter().map(|r| r.mig.short_reason()).collect();
            reasons.dedup();
            let ratio = sc_down.map_or(f64::NAN, |s| s / down);
            let fails = v.len() - ok.len();
            t.row(vec![
                w.label.clone(),
                if fails > 0 {
                    format!("{c} ({fails} of {} FAILED)", v.len())
                } else {
                    c.clone()
                },
                patterns.join(", "),
                pct(slow),
                pct(e2e),
                report::ms(down),
                report::ms(med_of(&ok, |r| r.mig.restore_ms)),
                sc_down.map_or("–".into(), report::ms),
                if ratio.is_nan() {
                    "–".into()
                } else {
                    format!("{ratio:.1}×")
                },
                format!("{:.1}", med_of(&ok, |r| r.mig.total_ms) / 1e3),
                report::bytes(med_of(&ok, |r| r.mig.bytes_sent as f64) as u64),
                format!("{}", med_of(&ok, |r| r.mig.live_rounds() as f64)),
                reasons.join(", "),
                format!("{:.1} of {}", med_of(&ok, |r| r.finished_at), args.job_secs),
            ]);
            if w.key == "goal"
                && c == "adaptive"
                && matches!(link, Link::Shaped(_))
                && checks.goal_a.is_none()
            {
                checks.goal_a = Some(goal_a_text(link, w, &ok, sc.as_deref()));
            }
        }
    }
    t.markdown()
}

fn detail_row(
    x: &RunResult,
    link: &str,
    w: &Workload,
    c: &str,
    rep: usize,
    base: Option<&Ticks>,
    settle: f64,
) -> Vec<String> {
    let (wm, a, b) = x.window();
    let bw = x.mig.live_bandwidth();
    vec![
        link.to_string(),
        w.key.clone(),
        c.to_string(),
        rep.to_string(),
        x.mig.short_reason(),
        report::ms(x.mig.downtime_ms),
        report::ms(x.mig.restore_ms),
        format!("{:.2}", x.mig.total_ms / 1e3),
        format!("{:.2}", x.mig.live_ms / 1e3),
        x.mig.bytes_sent.to_string(),
        x.mig.memory_bytes.to_string(),
        x.mig.pages.resent.to_string(),
        if bw.is_nan() {
            "–".into()
        } else {
            format!("{:.1}", bw / 1e6)
        },
        format!("{a:.2}–{b:.2}"),
        match base.map(|bt| bt.work_in(a, b, settle)) {
            Some((wb, ex)) => format!(
                "{wm:.0} / {wb:.0}{}",
                if ex { " (extrapolated)" } else { "" }
            ),
            None => format!("{wm:.0} / –"),
        },
        slowdown(x, base, settle).map_or("–".into(), |s| pct(s.0)),
        x.mig.rounds_summary(),
    ]
}

/// Goal (a): adaptive downtime at most 1/20 of stop-copy's, goal case,
/// shaped link.
fn goal_a_text(link: &Link, w: &Workload, ada: &[&RunResult], sc: Option<&[&RunResult]>) -> String {
    let Some(sc) = sc else {
        return "(a) not judged: the stop-copy run of the goal case failed".into();
    };
    let down = med_of(ada, |r| r.mig.downtime_ms);
    let restore = med_of(ada, |r| r.mig.restore_ms);
    let s = med_of(sc, |r| r.mig.downtime_ms);
    let s_restore = med_of(sc, |r| r.mig.restore_ms);
    format!(
        "(a) {}: adaptive downtime {} ms vs stop-copy {} ms = 1/{:.1} of it (goal: at most \
         1/20, {} ms) over {} for {}. Of these, the target's restore took {} ms (adaptive) and \
         {} ms (stop-copy); without it the ratio would be 1/{:.1}.",
        if down <= s * GOAL_DOWNTIME_FRACTION {
            "MET"
        } else {
            "NOT MET"
        },
        report::ms(down),
        report::ms(s),
        s / down,
        report::ms(s * GOAL_DOWNTIME_FRACTION),
        link.label(),
        w.label,
        report::ms(restore),
        report::ms(s_restore),
        (s - s_restore) / (down - restore)
    )
}

fn baseline_table(ctx: &Ctx, o: &Outcome, checks: &mut Checks) -> String {
    let settle = ctx.args.settle_ms as f64 / 1e3;
    let mut bt = Table::new(&[
        "workload",
        "baseline run s",
        "page writes/s (after settle)",
        "configured page writes/s",
    ]);
    for w in &o.workloads {
        match o.baselines.get(&w.key) {
            Some(Ok(b)) => bt.row(vec![
                w.label.clone(),
                format!("{:.1}", b.last_t() - b.t0),
                format!("{:.0}", b.mean_rate(settle)),
                if w.rate == 0 {
                    "unpaced".into()
                } else {
                    (w.rate * 256).to_string()
                },
            ]),
            Some(Err(e)) => {
                bt.row(vec![w.label.clone(), "FAILED".into()]);
                checks.fail(&format!("baseline of {}", w.label), e);
            }
            None => {}
        }
    }
    format!("Baselines (unmigrated runs):\n\n{}\n", bt.markdown())
}

/// Goal (d): the page streaming runs.
fn stream_table(ctx: &Ctx, o: &Outcome, checks: &mut Checks) -> String {
    if o.throughput.is_empty() {
        return String::new();
    }
    let mem = ctx.args.mem;
    let mut st = Table::new(&[
        "link, controller (--compress none)",
        "stop-copy round GB/s",
        "round 0 GB/s",
        "round 0 send-time GB/s",
        "memory / downtime GB/s",
        "memory",
        "downtime ms",
        "restore ms",
    ]);
    let mut lo_rates = Vec::new();
    for (label, r) in &o.throughput {
        let x = match r {
            Ok(x) => x,
            Err(e) => {
                st.row(vec![label.clone(), "FAILED".into()]);
                checks.fail(&format!("streaming run {label}"), e);
                continue;
            }
        };
        let (frozen, live0, e2e) = stream_rates(&x.mig);
        let bw0 = x
            .mig
            .rounds
            .iter()
            .find(|r| !r.frozen && r.round == 0)
            .map_or(f64::NAN, |r| r.bandwidth);
        let stop_copy = x.mig.live_rounds() == 0;
        if label.starts_with("loopback") && stop_copy && !frozen.is_nan() {
            lo_rates.push(frozen);
        }
        st.row(vec![
            label.clone(),
            if stop_copy { gbs(frozen) } else { "–".into() },
            gbs(live0),
            gbs(bw0),
            gbs(e2e),
            report::bytes(x.mig.memory_bytes),
            report::ms(x.mig.downtime_ms),
            report::ms(x.mig.restore_ms),
        ]);
    }
    let n = lo_rates.len();
    let lo_rate = (n > 0).then(|| util::median(lo_rates.iter().copied()));
    checks.goal_d = Some(match lo_rate {
        Some(v) if !v.is_nan() => format!(
            "(d) {}: the stop-copy round streamed {} GB/s over loopback uncompressed{} (goal: \
             at least 1 GB/s; pages sent × 4096 / the round's duration, which includes \
             freezing the job and capturing its state).",
            if v >= GOAL_STREAM_BPS {
                "MET"
            } else {
                "NOT MET"
            },
            gbs(v),
            if n > 1 {
                format!(" (median of {n} runs)")
            } else {
                String::new()
            }
        ),
        _ => "(d) not judged: the loopback stop-copy run failed".into(),
    });
    format!(
        "Page streaming, a {mem} MiB job of non-zero incompressible pages (synth {mem} 1 1 seq), \
         --compress none; `round 0` is the full pass of a live migration (iterations:1), its \
         send-time figure the rate ferry measured while sending:\n\n{}\n",
        st.markdown()
    )
}

fn goal_checks(ctx: &Ctx, c: &Checks) -> String {
    let args = ctx.args;
    let met = |ok: bool| if ok { "MET" } else { "NOT MET" };
    let mut g = String::from("Goal checks:\n\n");
    if args.throughput_only {
        g += "- (a), (b), (c) not measured (--throughput-only)\n";
        g += &format!(
            "- {}\n",
            c.goal_d
                .clone()
                .unwrap_or_else(|| "(d) not measured".into())
        );
        return g;
    }
    g += &format!(
        "- {}\n",
        c.goal_a.clone().unwrap_or_else(|| {
            "(a) not judged: no adaptive run of the goal case over a shaped link".into()
        })
    );
    let failed_runs = c
        .failures
        .iter()
        .filter(|f| !f.starts_with("**baseline") && !f.starts_with("**streaming"))
        .count();
    g += &format!(
        "- (b) {}: {} of {} migrations finished before the job's deadline ({} s after \
         READY){}{}.{}\n",
        met(c.not_converged.is_empty() && failed_runs == 0 && c.runs_ok > 0),
        c.runs_ok - c.not_converged.len(),
        c.runs_ok + failed_runs,
        args.job_secs,
        if failed_runs > 0 {
            format!("; {failed_runs} failed (see below)")
        } else {
            String::new()
        },
        if c.not_converged.is_empty() {
            String::new()
        } else {
            format!("; not converged: {}", c.not_converged.join("; "))
        },
        if c.capped.is_empty() {
            String::new()
        } else {
            format!(
                " {} run(s) ended only because of the controller's 30-round safety cap (without \
                 it they would have iterated on): {}.",
                c.capped.len(),
                c.capped.join("; ")
            )
        }
    );
    let over: Vec<String> = c
        .slow
        .iter()
        .filter(|(_, s)| s.is_nan() || *s > GOAL_SLOWDOWN_PCT)
        .map(|(n, s)| format!("{n}: {} %", pct(*s)))
        .collect();
    let worst = c
        .slow
        .iter()
        .map(|(_, s)| *s)
        .filter(|s| !s.is_nan())
        .fold(f64::NAN, f64::max);
    let worst_e2e = c.e2e.iter().copied().fold(f64::NAN, f64::max);
    g += &format!(
        "- (c) {}: slowdown during the migration window with the adaptive controller at most \
         {GOAL_SLOWDOWN_PCT} % in {} of {} runs (largest {} %){}. As end-to-end slowdown of a \
         {} s job (the lost work over the whole job, as in the paper's Table 1) the largest is \
         {} %.\n",
        met(over.is_empty() && !c.slow.is_empty()),
        c.slow.len() - over.len(),
        c.slow.len(),
        pct(worst),
        if over.is_empty() {
            String::new()
        } else {
            format!("; above: {}", over.join("; "))
        },
        args.job_secs,
        pct(worst_e2e)
    );
    g += &format!(
        "- {}\n",
        c.goal_d
            .clone()
            .unwrap_or_else(|| "(d) not measured (--no-throughput)".into())
    );
    g
}

fn results_entry(ctx: &Ctx, work: &Path, o: &Outcome, t: &Tables) -> String {
    let a = ctx.args;
    let storage = format!(
        "job logs and the agents' --work-dir under {} ({}); the agents keep received pages \
         in memory",
        work.parent().unwrap_or(work).display(),
        report::fs_type(work)
    );
    let mut e = report::entry_header_with("migrate (live migration)", &ctx.ferry, work, &storage);
    e += "- nodes: two network namespaces joined by a veth pair (private /30); `ferry agent` \
          in B, `ferry run` jobs and `ferry migrate` in A; one host, so both share CPUs, memory \
          and the page cache\n";
    for l in &o.links {
        match l {
            Link::Shaped(r) => {
                e += &format!(
                    "- link `{r}`: `tc qdisc replace dev <veth> root tbf rate {r} burst 256kb \
                 latency 50ms` on both ends ({})\n",
                    if o.qdisc.is_empty() { "?" } else { &o.qdisc }
                )
            }
            Link::Unshaped => e += "- link `none`: the veth pair without a qdisc\n",
        }
    }
    e += &format!(
        "- jobs: bench/workloads/synth.c under `ferry run --detach`, WORKLOAD_SECS={} (the \
         deadline for (b)), migrated {} ms after READY; after the migration the job must run \
         in B for {} ms, then a stop file makes it check all its memory and print PASS\n",
        a.job_secs, a.settle_ms, a.after_ms
    );
    for w in &o.workloads {
        e += &format!(
            "  - {} — {}; meant to trigger pattern {} at 1 Gbit/s: {}\n",
            w.label,
            w.describe(),
            w.meant,
            w.why
        );
    }
    if a.throughput_only {
        e += &format!(
            "- --throughput-only: only the page streaming runs (goal d), {} repetition(s) \
             each, the goal judged on the median of the loopback stop-copy runs\n",
            a.reps
        );
    }
    e += &format!(
        "- controllers: {}, ferry's defaults otherwise (adaptive: 1 s interval; lz4; no extra \
         streams; tracker {}); {} repetition{} per run, medians\n",
        a.controllers.join(", "),
        a.tracker.as_deref().unwrap_or("auto"),
        a.reps,
        if a.reps == 1 { "" } else { "s" }
    );
    e += "- slowdown = work the job did not do during the migration (from just before `ferry \
          migrate` to its exit), relative to an unmigrated run of the same workload over the same \
          window after READY: 1 − W_migrated / W_baseline, in %; the work is the job's page-write \
          counter (it prints it every 100 ms); a stop-copy run is ~100 % by construction (the job \
          is frozen for the whole window). The end-to-end column is the same lost work \
          (W_baseline − W_migrated) over the work of a whole job of WORKLOAD_SECS at the \
          baseline's rate\n\n";
    e += &t.text;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs() {
        assert_eq!(
            links("both").unwrap(),
            vec![Link::Shaped("1gbit".into()), Link::Unshaped]
        );
        assert_eq!(links("none").unwrap(), vec![Link::Unshaped]);
        assert_eq!(
            links("500mbit,none,none").unwrap(),
            vec![Link::Shaped("500mbit".into()), Link::Unshaped]
        );
        assert!(links("rm -rf").is_err());
        assert!(links("").is_err());
    }

    #[test]
    fn ticks_interpolate() {
        let t = Ticks::parse("x\nt0 100.0\nREADY\ntick 101.0 10\ntick 102.0 30\n").unwrap();
        assert_eq!(t.count_at(99.0), 0.0);
        assert_eq!(t.count_at(100.5), 5.0);
        assert_eq!(t.count_at(101.5), 20.0);
        assert_eq!(t.count_at(105.0), 30.0);
        assert_eq!(t.work_in(1.0, 2.0, 0.0), (20.0, false));
        // Beyond the last tick: the mean rate (15/s from 0) stands in.
        assert_eq!(t.work_in(1.0, 4.0, 0.0), (50.0, true));
        assert!(Ticks::parse("tick 1 2\n").is_err());
    }

    #[test]
    fn workload_selection() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = Cli::parse_from(["x", "--workloads", "c,goal,c", "--mem", "256"]);
        let w = workloads(&cli.args).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].key, "c");
        assert_eq!(w[1].mem, 256);
        let cli = Cli::parse_from(["x", "--workloads", "d"]);
        assert!(workloads(&cli.args).is_err());
    }
}
