//! `ferry-bench zero`: what ferry's freed-memory library
//! (`crates/ferry-zero`, `ferry run --zero-freed`) buys a live migration,
//! and what it costs the job.
//!
//! The job is `bench/workloads/phases.c`, a solver-like program: it keeps
//! `--live` MiB of state, and every phase assembles a system from `--work`
//! MiB of temporary 8 MiB arrays (non-zero, incompressible values), frees
//! the temporaries, iterates `--iters` sweeps over the system (a quarter of
//! their size), checks the result and frees the system. While it solves,
//! the freed temporaries lie in glibc's heap with their old contents.
//!
//! 1. Migration: the job runs under `ferry run --detach` in namespace A
//!    without the library, with `--zero-freed=zero` and with
//!    `--zero-freed=release`, and is migrated `--settle-ms` after READY to
//!    an agent in namespace B (the veth pair and tc shaping of
//!    `ferry-bench migrate`), with the default adaptive controller and with
//!    `stop-copy`, over each link. Reported: total time, downtime, bytes
//!    sent, pages by kind; the job must run on B (with the library still
//!    loaded) and PASS there.
//! 2. Overhead on the job: `phases` run directly (no ferry), without the
//!    library and with `LD_PRELOAD=libferry_zero.so FERRY_ZERO=zero|release`,
//!    `--overhead-phases` phases after its warm-up, `--overhead-reps`
//!    times, the configurations interleaved; the wall and CPU time of the
//!    phases after READY are compared.
//! 3. Overhead on a malloc microbenchmark: `bench/workloads/churn.c`
//!    (`--churn-threads` threads, random sizes 16 B-64 KiB), blocks fully
//!    written or only touched, under each configuration.

use crate::migrate::{self, Agent, Link, MigrateJson, Nodes, Ns, RunCleanup};
use crate::report::{self, Table};
use crate::util::{self, CommonArgs, TempDir};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const LONG_ABOUT: &str = "Measure ferry's freed-memory library (libferry_zero.so, \
`ferry run --zero-freed`): its effect on live migration and its overhead.\n\n\
Migration: bench/workloads/phases.c (a solver-like job: --live MiB of state; every phase \
assembles a system from --work MiB of temporary 8 MiB arrays, frees them and iterates \
--iters sweeps over the system) runs under `ferry run --detach` without the library, with \
--zero-freed=zero and with --zero-freed=release, and is migrated between two network \
namespaces (veth, shaped to 1 Gbit/s with tc tbf and unshaped, as in `ferry-bench migrate`) \
with the adaptive controller and with stop-copy. Reported: total time, downtime, bytes \
sent, pages by kind; the job must PASS on the target.\n\n\
Overhead: the same job run directly (LD_PRELOAD, no ferry) for --overhead-phases phases \
in each configuration, and the malloc microbenchmark bench/workloads/churn.c \
(--churn-threads threads, random sizes 16 B-64 KiB, blocks fully written or only touched).\n\n\
Goals: >= 19 % less migration time with the library (adaptive controller), < 2 % overhead \
on the job.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The job's live state, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MiB")]
    pub live: u64,
    /// Temporaries per phase, in MiB (8 MiB arrays; the system is a quarter).
    #[arg(long, default_value_t = 256, value_name = "MiB")]
    pub work: u64,
    /// Sweeps over the system per phase.
    #[arg(long, default_value_t = 300)]
    pub iters: u64,
    /// Links: a tc rate (e.g. 1gbit), none (unshaped veth) or both (=
    /// 1gbit,none); comma-separated.
    #[arg(long, default_value = "both", value_name = "RATE|none|both")]
    pub link: String,
    /// Controllers of the migration runs (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "adaptive,stop-copy",
        value_name = "SPEC,..."
    )]
    pub controllers: Vec<String>,
    /// Repetitions of every migration run (tables show medians).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub reps: u32,
    /// Pause after READY before migrating.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub settle_ms: u64,
    /// WORKLOAD_SECS of the migrated jobs (a bound; they are stopped early).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub job_secs: u64,
    /// Phases timed per overhead run (after the warm-up phase).
    #[arg(long, default_value_t = 2)]
    pub overhead_phases: u64,
    /// Runs per configuration for the overhead measurements (medians).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub overhead_reps: u32,
    /// Threads of the malloc microbenchmark.
    #[arg(long, default_value_t = 4)]
    pub churn_threads: u32,
    /// Operations per thread of the malloc microbenchmark.
    #[arg(long, default_value_t = 500_000)]
    pub churn_ops: u64,
    /// Skip the migration runs.
    #[arg(long)]
    pub no_migrate: bool,
    /// Skip the overhead runs.
    #[arg(long)]
    pub no_overhead: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Goal: migration time reduction with the library, percent.
const GOAL_TIME_PCT: f64 = 19.0;
/// Goal: overhead on the job, percent.
const GOAL_OVERHEAD_PCT: f64 = 2.0;
/// How long the job may take to get READY or to finish after its stop file.
const JOB_STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the job must run on the target before it is told to finish.
const AFTER_MIGRATE: Duration = Duration::from_millis(500);
const LIB_NAME: &str = "libferry_zero.so";

/// The library settings compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Lib {
    None,
    Zero,
    Release,
}

const LIBS: [Lib; 3] = [Lib::None, Lib::Zero, Lib::Release];

impl Lib {
    fn label(self) -> &'static str {
        match self {
            Lib::None => "no library",
            Lib::Zero => "zero",
            Lib::Release => "release",
        }
    }

    fn mode(self) -> Option<&'static str> {
        match self {
            Lib::None => None,
            Lib::Zero => Some("zero"),
            Lib::Release => Some("release"),
        }
    }
}

struct Ctx<'a> {
    args: &'a Args,
    ferry: PathBuf,
    lib: PathBuf,
    phases: PathBuf,
    churn: PathBuf,
    work: PathBuf,
    token: PathBuf,
    timeout: Duration,
}

/// A command without any library settings inherited from our environment.
fn clean(mut cmd: Command) -> Command {
    for k in migrate::INHERITED_LIBRARY_ENV {
        cmd.env_remove(k);
    }
    cmd
}

fn maps_library(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains(LIB_NAME))
}

// ---- the job's log --------------------------------------------------------------

/// One "phase P STEP REALTIME cpu=CPU" line.
#[derive(Clone, Debug, PartialEq)]
struct Step {
    phase: u64,
    step: String,
    t: f64,
    cpu: f64,
}

fn steps(log: &str) -> Vec<Step> {
    log.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            if it.next()? != "phase" {
                return None;
            }
            let phase = it.next()?.parse().ok()?;
            let step = it.next()?.to_string();
            let t = it.next()?.parse().ok()?;
            let cpu = it.next()?.strip_prefix("cpu=")?.parse().ok()?;
            Some(Step {
                phase,
                step,
                t,
                cpu,
            })
        })
        .collect()
}

/// Wall and CPU seconds of the complete phases from phase 2 on (phase 1 is
/// the warm-up before READY), and their number.
fn timed_phases(steps: &[Step]) -> (f64, f64, u64) {
    let (mut wall, mut cpu, mut n) = (0.0, 0.0, 0);
    for a in steps
        .iter()
        .filter(|s| s.step == "assemble" && s.phase >= 2)
    {
        if let Some(d) = steps
            .iter()
            .find(|s| s.step == "done" && s.phase == a.phase)
        {
            wall += d.t - a.t;
            cpu += d.cpu - a.cpu;
            n += 1;
        }
    }
    (wall, cpu, n)
}

/// Where the job was at realtime `t`: "phase P STEP +S s".
fn position_at(steps: &[Step], t: f64) -> String {
    match steps.iter().rev().find(|s| s.t <= t) {
        Some(s) => format!("phase {} {} +{:.1} s", s.phase, s.step, t - s.t),
        None => "before phase 1".into(),
    }
}

// ---- migration runs ----------------------------------------------------------------

#[derive(Clone)]
struct MigRun {
    mig: MigrateJson,
    /// Where in its phase cycle the job was when the migration started.
    at: String,
}

type MigKey = (String, Lib, String); // (link slug, library, controller)

fn migrate_one(
    ctx: &Ctx,
    nodes: &Nodes,
    agent: &Agent,
    link: &Link,
    lib: Lib,
    controller: &str,
    rep: u32,
) -> Result<MigRun> {
    let a = ctx.args;
    let c: String = controller
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let dir = ctx.work.join(format!(
        "mig-{}-{}-{c}-rep{rep}",
        link.slug(),
        lib.label().replace(' ', "-")
    ));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let _cleanup = RunCleanup {
        nodes,
        keep: vec![agent.pid],
    };
    let log = dir.join("job.log");
    let stop = dir.join("stop");
    let run_opts: Vec<String> = lib
        .mode()
        .map(|m| format!("--zero-freed={m}"))
        .into_iter()
        .collect();
    let pid = migrate::start_detached(
        nodes,
        &ctx.ferry,
        &dir,
        &log,
        &run_opts,
        &ctx.phases,
        &[
            a.live.to_string(),
            a.work.to_string(),
            a.iters.to_string(),
            "0".into(),
        ],
        &[
            ("WORKLOAD_SECS", a.job_secs.to_string().as_ref()),
            ("PHASES_STOP_FILE", stop.as_os_str()),
        ],
        JOB_STEP_TIMEOUT,
    )?;
    if maps_library(pid) != lib.mode().is_some() {
        bail!(
            "the job (pid {pid}, {}) {} {LIB_NAME}",
            lib.label(),
            if maps_library(pid) {
                "maps"
            } else {
                "does not map"
            }
        );
    }
    util::sleep(Duration::from_millis(a.settle_ms))?;
    util::check_log_ok(&log, "before the migration")?;

    let m = migrate::migrate_job(
        nodes,
        &ctx.ferry,
        &dir,
        pid,
        &agent.addr,
        &ctx.token,
        &["--controller", controller],
        ctx.timeout,
        &log,
    )?;
    let (t_start, shown) = (m.t_start, m.shown);
    let mig: MigrateJson = util::parse_json_line(&m.stdout, "migration report")
        .with_context(|| format!("`{shown}`"))?;
    let tp = mig.target_pid;
    let exe = fs::canonicalize(&ctx.phases).unwrap_or_else(|_| ctx.phases.clone());
    if util::exe_of(tp).as_deref() != Some(exe.as_path()) || !nodes.holds(Ns::B, tp) {
        bail!(
            "after `{shown}` the target pid {tp} is not the job running in B (exe {:?}); job \
             log:\n{}",
            util::exe_of(tp),
            util::log_tail(&log, 5)
        );
    }
    if maps_library(tp) != lib.mode().is_some() {
        bail!(
            "the migrated job (pid {tp}, {}) {} {LIB_NAME}",
            lib.label(),
            if maps_library(tp) {
                "maps"
            } else {
                "no longer maps"
            }
        );
    }
    util::sleep(AFTER_MIGRATE)?;
    util::check_log_ok(&log, "on the target")?;
    fs::write(&stop, b"").context("create the stop file")?;
    util::wait_line(
        &log,
        "PASS phases",
        None,
        JOB_STEP_TIMEOUT,
        "on the target after its stop file",
    )?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let at = position_at(&steps(&text), t_start);
    if !a.common.keep {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(MigRun { mig, at })
}

// ---- overhead runs ------------------------------------------------------------------

/// One direct (no ferry) run of `program ARGS` with `lib` preloaded, and
/// extra environment; returns its stdout (it must print `pass`) and stderr.
fn direct_run(
    ctx: &Ctx,
    program: &Path,
    args: &[String],
    lib: Lib,
    env: &[(&str, &str)],
    label: &str,
    pass: &str,
) -> Result<(String, String)> {
    let mut cmd = clean(Command::new(program));
    cmd.args(args);
    if let Some(m) = lib.mode() {
        cmd.env("LD_PRELOAD", &ctx.lib).env("FERRY_ZERO", m);
    }
    cmd.envs(env.iter().copied());
    let shown = util::show_command(&cmd);
    let out = util::run_command(&mut cmd, ctx.timeout, &ctx.work, label)
        .with_context(|| format!("running `{shown}`"))?;
    if !out.status.success() || !out.stdout.lines().any(|l| l == pass) {
        bail!(
            "`{shown}` ({}) failed ({}); stdout:\n{}\nstderr:\n{}",
            lib.label(),
            util::describe_status(out.status),
            util::indent(out.stdout.trim_end()),
            util::indent(out.stderr.trim_end())
        );
    }
    Ok((out.stdout, out.stderr))
}

#[derive(Clone, Copy, Debug)]
struct Timing {
    wall: f64,
    cpu: f64,
}

fn phases_timing(ctx: &Ctx, lib: Lib, rep: u32) -> Result<Timing> {
    let a = ctx.args;
    let args = [
        a.live.to_string(),
        a.work.to_string(),
        a.iters.to_string(),
        (a.overhead_phases + 1).to_string(),
    ];
    let (out, _) = direct_run(
        ctx,
        &ctx.phases,
        &args,
        lib,
        &[("WORKLOAD_SECS", "100000")],
        &format!("phases-{}-{rep}", lib.label().replace(' ', "-")),
        "PASS phases",
    )?;
    let (wall, cpu, n) = timed_phases(&steps(&out));
    if n != a.overhead_phases {
        bail!(
            "phases ({}) completed {n} timed phases, expected {}",
            lib.label(),
            a.overhead_phases
        );
    }
    Ok(Timing { wall, cpu })
}

/// What the library did in one run of the job (FERRY_ZERO_STATS=1).
#[derive(Clone, Debug)]
struct LibWork {
    chunks: u64,
    bytes_zeroed: u64,
    pages_released: u64,
    scrub_ns: u64,
    /// The job's own run time up to the end of its last phase.
    run_secs: f64,
}

/// `KEY=N` from a whitespace-separated line.
fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// One run of the job with FERRY_ZERO_STATS=1: the library's counters,
/// among them the time it spent scrubbing (immune to other work on the
/// machine, unlike the comparison of run times).
fn lib_work(ctx: &Ctx, lib: Lib) -> Result<LibWork> {
    let a = ctx.args;
    let args = [
        a.live.to_string(),
        a.work.to_string(),
        a.iters.to_string(),
        (a.overhead_phases + 1).to_string(),
    ];
    let (out, err) = direct_run(
        ctx,
        &ctx.phases,
        &args,
        lib,
        &[("WORKLOAD_SECS", "100000"), ("FERRY_ZERO_STATS", "1")],
        &format!("phases-stats-{}", lib.label()),
        "PASS phases",
    )?;
    let stats = err
        .lines()
        .find(|l| l.starts_with("ferry-zero: mode="))
        .with_context(|| format!("no ferry-zero statistics line on stderr: {:?}", err.trim()))?;
    let get = |k: &str| -> Result<u64> {
        field(stats, k).with_context(|| format!("no {k} in {stats:?}"))
    };
    let done = out
        .lines()
        .find(|l| l.starts_with("done phases="))
        .context("no `done` line from phases")?;
    Ok(LibWork {
        chunks: get("chunks")?,
        bytes_zeroed: get("bytes_zeroed")?,
        pages_released: get("pages_released")?,
        scrub_ns: get("scrub_ns")?,
        run_secs: field(done, "secs").context("no secs= in the done line")?,
    })
}

/// A microbenchmark configuration: label, library, extra environment.
type ChurnConfig = (&'static str, Lib, &'static [(&'static str, &'static str)]);

const CHURN_CONFIGS: [ChurnConfig; 6] = [
    ("no library", Lib::None, &[]),
    // The library loaded with FERRY_ZERO=off (overrides the mode).
    (
        "off (interposition only)",
        Lib::Zero,
        &[("FERRY_ZERO", "off")],
    ),
    ("zero", Lib::Zero, &[]),
    ("release", Lib::Release, &[]),
    (
        "zero, FERRY_ZERO_MIN=0",
        Lib::Zero,
        &[("FERRY_ZERO_MIN", "0")],
    ),
    (
        "zero, FERRY_ZERO_MIN=65536",
        Lib::Zero,
        &[("FERRY_ZERO_MIN", "65536")],
    ),
];

fn churn_timing(ctx: &Ctx, config: usize, variant: &str, rep: u32) -> Result<Timing> {
    let (_, lib, env) = CHURN_CONFIGS[config];
    let args = [
        ctx.args.churn_threads.to_string(),
        ctx.args.churn_ops.to_string(),
        variant.to_string(),
    ];
    let (out, _) = direct_run(
        ctx,
        &ctx.churn,
        &args,
        lib,
        env,
        &format!("churn-{config}-{variant}-{rep}"),
        "PASS churn",
    )?;
    let field = |k: &str| -> Result<f64> {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {k} in churn's output: {:?}", out.trim()))
    };
    Ok(Timing {
        wall: field("secs=")?,
        cpu: field("cpu=")?,
    })
}

// ---- the benchmark --------------------------------------------------------------------

#[derive(Default)]
struct Outcome {
    links: Vec<Link>,
    qdisc: String,
    migrations: BTreeMap<MigKey, Vec<Result<MigRun>>>,
    phases: BTreeMap<Lib, Vec<Result<Timing>>>,
    /// (config index, variant) -> runs
    churn: BTreeMap<(usize, String), Vec<Result<Timing>>>,
    lib_work: BTreeMap<Lib, Result<LibWork>>,
}

pub fn run(args: &Args) -> Result<()> {
    util::require_root()?;
    let ferry = util::resolve_ferry(args.common.ferry.as_deref())?;
    let links = migrate::links(&args.link)?;
    if args.controllers.is_empty() {
        bail!("--controllers is empty");
    }
    if args.live == 0 || args.live > 65536 || args.work < 32 || args.work > 65536 {
        bail!("--live must be 1..65536 MiB and --work 32..65536 MiB");
    }
    if args.iters == 0 || args.overhead_phases == 0 || args.churn_threads == 0 {
        bail!("--iters, --overhead-phases and --churn-threads must be at least 1");
    }
    if args.churn_threads > 256 || args.churn_ops == 0 {
        bail!("--churn-threads must be 1..256 and --churn-ops at least 1");
    }
    if let Some(avail) = report::meminfo("MemAvailable") {
        // Source job (live + temporaries + system) + the agent's copy + the
        // restored job.
        let job = args.live + args.work + args.work / 4;
        let need = (3 * job + 256) * 1024;
        if need > avail {
            bail!(
                "the job needs about {} MiB of memory (source, agent, target), only {} MiB \
                 available",
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
    let work = TempDir::new(&parent, "ferry-bench-zero", args.common.keep)?;
    let lib_out = util::run_ferry(
        &ferry,
        &["zero-lib-path".as_ref()],
        Duration::from_secs(10),
        work.path(),
        "zero-lib-path",
    )?;
    let lib = PathBuf::from(lib_out.stdout.trim());
    if !lib.is_file() {
        bail!(
            "`ferry zero-lib-path` printed {}, not a file",
            lib.display()
        );
    }
    let phases = util::build_bench_workload("phases", work.path(), &[])?;
    let churn = util::build_bench_workload("churn", work.path(), &[])?;
    let token = work.path().join("token");
    migrate::write_token(&token)?;
    let ctx = Ctx {
        args,
        ferry,
        lib,
        phases,
        churn,
        work: work.path().to_path_buf(),
        token,
        timeout: Duration::from_secs(args.common.timeout),
    };
    let built = (report::file_mtime(&ctx.ferry), report::file_mtime(&ctx.lib));
    let mut o = Outcome {
        links,
        ..Outcome::default()
    };
    if !args.no_overhead {
        overhead(&ctx, &mut o)?;
    }
    if !args.no_migrate {
        migrations(&ctx, &mut o)?;
    }
    let (mut text, failed) = tables(&ctx, &o);
    let now = (report::file_mtime(&ctx.ferry), report::file_mtime(&ctx.lib));
    if now != built {
        text += "\n**Warning:** ferry or libferry_zero.so was rebuilt during the run: the runs \
                 may not all have used the same build.\n";
    }
    println!("{text}");
    if args.common.record {
        let entry = results_entry(&ctx, work.path(), &o, &text);
        let path = report::append_results(&entry)?;
        eprintln!("zero: appended to {}", path.display());
    }
    if failed > 0 {
        bail!("{failed} run(s) failed (see above)");
    }
    Ok(())
}

fn overhead(ctx: &Ctx, o: &mut Outcome) -> Result<()> {
    let a = ctx.args;
    for rep in 1..=a.overhead_reps {
        for lib in LIBS {
            let r = migrate::interruptible(phases_timing(ctx, lib, rep))?;
            match &r {
                Ok(t) => eprintln!(
                    "zero: phases, {} rep {rep}: {} phases in {:.2} s ({:.2} s CPU)",
                    lib.label(),
                    a.overhead_phases,
                    t.wall,
                    t.cpu
                ),
                Err(e) => eprintln!("zero: phases, {} rep {rep} FAILED: {e:#}", lib.label()),
            }
            o.phases.entry(lib).or_default().push(r);
        }
    }
    for lib in [Lib::Zero, Lib::Release] {
        let r = migrate::interruptible(lib_work(ctx, lib))?;
        if let Err(e) = &r {
            eprintln!(
                "zero: phases with FERRY_ZERO_STATS, {} FAILED: {e:#}",
                lib.label()
            );
        }
        o.lib_work.insert(lib, r);
    }
    for variant in ["full", "touch"] {
        for rep in 1..=a.overhead_reps {
            for (i, (label, _, _)) in CHURN_CONFIGS.iter().enumerate() {
                let r = migrate::interruptible(churn_timing(ctx, i, variant, rep))?;
                if let Err(e) = &r {
                    eprintln!("zero: churn {variant}, {label} rep {rep} FAILED: {e:#}");
                }
                o.churn.entry((i, variant.to_string())).or_default().push(r);
            }
        }
        eprintln!("zero: churn {variant} done");
    }
    Ok(())
}

fn migrations(ctx: &Ctx, o: &mut Outcome) -> Result<()> {
    let a = ctx.args;
    // Declared before the agent: dropped after it.
    let mut nodes = Nodes::new(&ctx.work)?;
    let mut agent = Agent::spawn(
        &ctx.ferry,
        &ctx.work,
        &ctx.token,
        &nodes,
        Ns::B,
        &nodes.addr_b(migrate::PORT_VETH),
        "agent-b",
    )?;
    let total = o.links.len() * LIBS.len() * a.controllers.len() * a.reps as usize;
    let mut n = 0;
    for link in o.links.clone() {
        nodes.set_link(&link)?;
        if let Link::Shaped(_) = link {
            o.qdisc = nodes.qdiscs();
        }
        for rep in 1..=a.reps {
            for c in &a.controllers {
                for lib in LIBS {
                    n += 1;
                    agent.check_alive()?;
                    let r = migrate::interruptible(migrate_one(
                        ctx, &nodes, &agent, &link, lib, c, rep,
                    ))?;
                    match &r {
                        Ok(x) => eprintln!(
                            "zero: [{n}/{total}] {} | {} | {c} rep {rep}: total {:.2} s, \
                             downtime {} ms, {} sent, {} live rounds, {} (at {}), PASS on the \
                             target",
                            link.label(),
                            lib.label(),
                            x.mig.total_ms / 1e3,
                            report::ms(x.mig.downtime_ms),
                            report::bytes(x.mig.bytes_sent),
                            x.mig.live_rounds(),
                            x.mig.short_reason(),
                            x.at
                        ),
                        Err(e) => eprintln!(
                            "zero: [{n}/{total}] {} | {} | {c} rep {rep} FAILED: {e:#}",
                            link.label(),
                            lib.label()
                        ),
                    }
                    o.migrations
                        .entry((link.slug(), lib, c.clone()))
                        .or_default()
                        .push(r);
                }
            }
        }
    }
    drop(agent);
    drop(nodes);
    Ok(())
}

// ---- tables -------------------------------------------------------------------------

fn ok<T>(v: &[Result<T>]) -> Vec<&T> {
    v.iter().filter_map(|r| r.as_ref().ok()).collect()
}

fn pct_change(v: f64, base: f64) -> f64 {
    (v / base - 1.0) * 100.0
}

fn signed_pct(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:+.1} %")
    }
}

fn mib(pages: f64) -> String {
    format!("{:.0}", pages * 4096.0 / (1024.0 * 1024.0))
}

/// Failures, as Markdown blocks.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn add(&mut self, what: &str, e: &anyhow::Error) {
        self.0.push(format!(
            "**{what} failed:**\n\n```\n{}\n```\n",
            format!("{e:#}").trim_end()
        ));
    }
}

fn tables(ctx: &Ctx, o: &Outcome) -> (String, usize) {
    let mut f = Failures::default();
    let mut text = String::new();
    let mut goals = Vec::new();
    if !o.migrations.is_empty() {
        text += &migration_tables(ctx, o, &mut f, &mut goals);
    }
    if !o.phases.is_empty() {
        text += &phases_table(ctx, o, &mut f, &mut goals);
        text += &churn_table(ctx, o, &mut f);
    }
    if !goals.is_empty() {
        text += "Goal checks:\n\n";
        for g in &goals {
            text += &format!("- {g}\n");
        }
        text += "\n";
    }
    for x in &f.0 {
        text += &format!("\n{x}");
    }
    (text, f.0.len())
}

fn migration_tables(ctx: &Ctx, o: &Outcome, f: &mut Failures, goals: &mut Vec<String>) -> String {
    let a = ctx.args;
    let mut text = String::new();
    let mut details = Table::new(&[
        "link",
        "library",
        "controller",
        "rep",
        "started at (job's phase)",
        "total s",
        "downtime ms",
        "bytes sent",
        "zero",
        "raw",
        "lz4",
        "not present",
        "absent",
        "resent",
        "rounds: dirty pages @ duration (*frozen: pages sent)",
    ]);
    for link in &o.links {
        let ls = link.slug();
        let mut t = Table::new(&[
            "library",
            "controller",
            "total s",
            "vs no library",
            "downtime ms",
            "bytes sent",
            "vs no library ",
            "zero pages MiB",
            "data pages MiB (raw + lz4)",
            "not present MiB",
            "resent MiB",
            "live rounds",
            "stop reason",
        ]);
        for c in &a.controllers {
            let base = o
                .migrations
                .get(&(ls.clone(), Lib::None, c.clone()))
                .map(|v| ok(v))
                .filter(|v| !v.is_empty());
            let base_total = base
                .as_ref()
                .map_or(f64::NAN, |v| util::median(v.iter().map(|r| r.mig.total_ms)));
            let base_bytes = base.as_ref().map_or(f64::NAN, |v| {
                util::median(v.iter().map(|r| r.mig.bytes_sent as f64))
            });
            for lib in LIBS {
                let Some(v) = o.migrations.get(&(ls.clone(), lib, c.clone())) else {
                    continue;
                };
                for (i, r) in v.iter().enumerate() {
                    let name = format!("{} | {} | {c} | rep {}", link.label(), lib.label(), i + 1);
                    match r {
                        Err(e) => f.add(&name, e),
                        Ok(x) => {
                            let p = &x.mig.pages;
                            details.row(vec![
                                ls.clone(),
                                lib.label().into(),
                                c.clone(),
                                (i + 1).to_string(),
                                x.at.clone(),
                                format!("{:.2}", x.mig.total_ms / 1e3),
                                report::ms(x.mig.downtime_ms),
                                x.mig.bytes_sent.to_string(),
                                p.zero.to_string(),
                                p.raw.to_string(),
                                p.lz4.to_string(),
                                p.not_present.to_string(),
                                p.absent.to_string(),
                                p.resent.to_string(),
                                rounds_summary(&x.mig),
                            ]);
                        }
                    }
                }
                let runs = ok(v);
                if runs.is_empty() {
                    t.row(vec![lib.label().into(), c.clone(), "FAILED".into()]);
                    continue;
                }
                let med = |g: &dyn Fn(&MigRun) -> f64| util::median(runs.iter().map(|r| g(r)));
                let total = med(&|r| r.mig.total_ms);
                let bytes = med(&|r| r.mig.bytes_sent as f64);
                let mut reasons: Vec<String> = runs.iter().map(|r| r.mig.short_reason()).collect();
                reasons.dedup();
                t.row(vec![
                    lib.label().into(),
                    c.clone(),
                    format!("{:.2}", total / 1e3),
                    if lib == Lib::None {
                        "–".into()
                    } else {
                        signed_pct(pct_change(total, base_total))
                    },
                    report::ms(med(&|r| r.mig.downtime_ms)),
                    report::bytes(bytes as u64),
                    if lib == Lib::None {
                        "–".into()
                    } else {
                        signed_pct(pct_change(bytes, base_bytes))
                    },
                    mib(med(&|r| r.mig.pages.zero as f64)),
                    mib(med(&|r| (r.mig.pages.raw + r.mig.pages.lz4) as f64)),
                    mib(med(&|r| r.mig.pages.not_present as f64)),
                    mib(med(&|r| r.mig.pages.resent as f64)),
                    format!("{}", med(&|r| r.mig.live_rounds() as f64)),
                    reasons.join(", "),
                ]);
                if lib != Lib::None && c == "adaptive" {
                    let cut = -pct_change(total, base_total);
                    goals.push(format!(
                        "migration time, {}, {}, adaptive: {} — {:.2} s vs {:.2} s without the \
                         library, {} less (goal: at least {GOAL_TIME_PCT} % less)",
                        link.label(),
                        lib.label(),
                        if cut.is_nan() {
                            "not judged"
                        } else if cut >= GOAL_TIME_PCT {
                            "MET"
                        } else {
                            "NOT MET"
                        },
                        total / 1e3,
                        base_total / 1e3,
                        if cut.is_nan() {
                            "–".into()
                        } else {
                            format!("{cut:.1} %")
                        }
                    ));
                }
            }
        }
        text += &format!("### Migration, {}\n\n{}\n", link.label(), t.markdown());
    }
    if !details.is_empty() {
        text += &format!(
            "Per migration (pages are counts of 4 KiB pages):\n\n{}\n",
            details.markdown()
        );
    }
    text
}

fn rounds_summary(m: &MigrateJson) -> String {
    m.rounds
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

fn phases_table(ctx: &Ctx, o: &Outcome, f: &mut Failures, goals: &mut Vec<String>) -> String {
    let a = ctx.args;
    let mut t = Table::new(&[
        "library",
        "phases wall s (median)",
        "overhead (median wall)",
        "phases wall s (min)",
        "overhead (min wall)",
        "phases CPU s (median)",
        "overhead (median CPU)",
        "wall s per run",
    ]);
    let stat = |lib: Lib, g: fn(&Timing) -> f64, best: bool| {
        o.phases.get(&lib).map_or(f64::NAN, |v| {
            let x = ok(v).into_iter().map(g);
            if best {
                x.fold(f64::NAN, f64::min)
            } else {
                util::median(x)
            }
        })
    };
    let base = (
        stat(Lib::None, |t| t.wall, false),
        stat(Lib::None, |t| t.wall, true),
        stat(Lib::None, |t| t.cpu, false),
    );
    // The spread of the runs without the library: what noise alone does.
    let spread = o.phases.get(&Lib::None).map_or(f64::NAN, |v| {
        let w: Vec<f64> = ok(v).into_iter().map(|t| t.wall).collect();
        let max = w.iter().copied().fold(f64::NAN, f64::max);
        let min = w.iter().copied().fold(f64::NAN, f64::min);
        (max - min) / base.0 * 100.0
    });
    let vs = |lib: Lib, v: f64, b: f64| {
        if lib == Lib::None {
            "–".into()
        } else {
            signed_pct(pct_change(v, b))
        }
    };
    for lib in LIBS {
        let Some(v) = o.phases.get(&lib) else {
            continue;
        };
        for (i, r) in v.iter().enumerate() {
            if let Err(e) = r {
                f.add(&format!("phases, {}, rep {}", lib.label(), i + 1), e);
            }
        }
        let (w, wmin, c) = (
            stat(lib, |t| t.wall, false),
            stat(lib, |t| t.wall, true),
            stat(lib, |t| t.cpu, false),
        );
        let runs: Vec<String> = v
            .iter()
            .map(|r| {
                r.as_ref()
                    .map_or("FAILED".into(), |t| format!("{:.2}", t.wall))
            })
            .collect();
        t.row(vec![
            lib.label().into(),
            format!("{w:.2}"),
            vs(lib, w, base.0),
            format!("{wmin:.2}"),
            vs(lib, wmin, base.1),
            format!("{c:.2}"),
            vs(lib, c, base.2),
            runs.join(", "),
        ]);
        if lib != Lib::None {
            let ow = pct_change(w, base.0);
            goals.push(format!(
                "overhead on the job, {}: {} — {} (median wall time of {} runs; best runs {}, \
                 median CPU time {}; the runs without the library alone spread over {:.1} % \
                 of their median) (goal: under {GOAL_OVERHEAD_PCT} %)",
                lib.label(),
                if ow.is_nan() {
                    "not judged"
                } else if ow < GOAL_OVERHEAD_PCT {
                    "MET"
                } else {
                    "NOT MET"
                },
                signed_pct(ow),
                a.overhead_reps,
                signed_pct(pct_change(wmin, base.1)),
                signed_pct(pct_change(c, base.2)),
                spread
            ));
        }
    }
    let mut w = Table::new(&[
        "library",
        "chunks scrubbed",
        "zeroed",
        "released",
        "time scrubbing s",
        "run s",
        "scrubbing ÷ run",
    ]);
    for (lib, r) in &o.lib_work {
        match r {
            Err(e) => {
                w.row(vec![lib.label().into(), "FAILED".into()]);
                f.add(&format!("phases with FERRY_ZERO_STATS, {}", lib.label()), e);
            }
            Ok(x) => {
                let share = x.scrub_ns as f64 / 1e9 / x.run_secs * 100.0;
                w.row(vec![
                    lib.label().into(),
                    x.chunks.to_string(),
                    report::bytes(x.bytes_zeroed),
                    report::bytes(x.pages_released * 4096),
                    format!("{:.3}", x.scrub_ns as f64 / 1e9),
                    format!("{:.2}", x.run_secs),
                    format!("{share:.2} %"),
                ]);
                goals.push(format!(
                    "time the library spent scrubbing in the job, {}: {share:.2} % of the run \
                     (FERRY_ZERO_STATS; {})",
                    lib.label(),
                    if *lib == Lib::Release {
                        "the page faults on released pages that glibc hands out again come on \
                         top; in this job the heap is trimmed after every phase, so the next \
                         phase faults its arrays in with or without the library"
                    } else {
                        "memset of every freed chunk of 4 KiB or more"
                    }
                ));
            }
        }
    }
    format!(
        "### Overhead on the job\n\n`phases {} {} {} {}` run directly (no ferry), {} runs per \
         configuration, interleaved; time of phases 2..{} (after the warm-up phase and READY, \
         without setup and the final check):\n\n{}\n\
         What the library did in one more run of each mode with FERRY_ZERO_STATS=1 (whole run: \
         setup, warm-up and {} phases; run s = the job's time to the end of its last phase; \
         time scrubbing = the clock around every chunk's zeroing and madvise):\n\n{}\n",
        a.live,
        a.work,
        a.iters,
        a.overhead_phases + 1,
        a.overhead_reps,
        a.overhead_phases + 1,
        t.markdown(),
        a.overhead_phases,
        w.markdown()
    )
}

fn churn_table(ctx: &Ctx, o: &Outcome, f: &mut Failures) -> String {
    let a = ctx.args;
    let mut t = Table::new(&[
        "configuration",
        "blocks",
        "wall s (median)",
        "ns per op",
        "× no library (wall)",
        "CPU s (median)",
        "× no library (CPU)",
    ]);
    let ops = (a.churn_ops * u64::from(a.churn_threads)) as f64;
    for variant in ["full", "touch"] {
        let med = |i: usize, g: fn(&Timing) -> f64| {
            o.churn
                .get(&(i, variant.to_string()))
                .map_or(f64::NAN, |v| util::median(ok(v).into_iter().map(g)))
        };
        let (bw, bc) = (med(0, |t| t.wall), med(0, |t| t.cpu));
        for (i, (label, _, _)) in CHURN_CONFIGS.iter().enumerate() {
            let Some(v) = o.churn.get(&(i, variant.to_string())) else {
                continue;
            };
            for (k, r) in v.iter().enumerate() {
                if let Err(e) = r {
                    f.add(&format!("churn {variant}, {label}, rep {}", k + 1), e);
                }
            }
            let (w, c) = (med(i, |t| t.wall), med(i, |t| t.cpu));
            t.row(vec![
                label.to_string(),
                if variant == "full" {
                    "fully written".into()
                } else {
                    "touched".into()
                },
                format!("{w:.3}"),
                format!("{:.0}", w * 1e9 / ops),
                format!("{:.2}", w / bw),
                format!("{c:.3}"),
                format!("{:.2}", c / bc),
            ]);
        }
    }
    format!(
        "### Overhead on a malloc microbenchmark\n\n`churn {} {} full|touch`: {} threads × {} \
         malloc/free pairs on 1024-slot tables, sizes 16 B–64 KiB log-uniform (a third of them \
         4 KiB or more, holding most of the bytes), blocks fully written (`full`) or only their \
         first 64 B and one byte per page (`touch`, the worst case for scrubbing); medians of {} \
         runs; ns per op = wall time / all operations:\n\n{}\n",
        a.churn_threads,
        a.churn_ops,
        a.churn_threads,
        a.churn_ops,
        a.overhead_reps,
        t.markdown()
    )
}

fn results_entry(ctx: &Ctx, work: &Path, o: &Outcome, text: &str) -> String {
    let a = ctx.args;
    let storage = format!(
        "job logs and the agent's --work-dir under {} ({}); library {} (built {})",
        work.parent().unwrap_or(work).display(),
        report::fs_type(work),
        ctx.lib.display(),
        report::file_mtime(&ctx.lib)
    );
    let mut e = report::entry_header_with(
        "zero (freed-memory library: migration and overhead)",
        &ctx.ferry,
        work,
        &storage,
    );
    e += &format!(
        "- job: bench/workloads/phases.c, `phases {} {} {}`: {} MiB live state; every phase \
         {} MiB of temporaries (8 MiB arrays) summed into a {} MiB system, temporaries freed, \
         {} sweeps over the system, system freed; library defaults (FERRY_ZERO_MIN 4096, \
         FERRY_ZERO_RELEASE_MIN 65536)\n",
        a.live,
        a.work,
        a.iters,
        a.live,
        a.work,
        a.work / 4,
        a.iters
    );
    if !o.migrations.is_empty() {
        e += &format!(
            "- migrations: `ferry run --detach [--zero-freed=zero|release]` in namespace A, \
             `ferry migrate --controller C` {} ms after READY (READY follows a warm-up phase) \
             to `ferry agent` in namespace B over a veth pair; controllers {}; ferry's defaults \
             otherwise (lz4); {} repetition(s), medians; the job must run in B with the \
             library still mapped and PASS after a stop file\n",
            a.settle_ms,
            a.controllers.join(", "),
            a.reps
        );
        for l in &o.links {
            match l {
                Link::Shaped(r) => {
                    e += &format!(
                        "- link `{r}`: `tc qdisc replace dev <veth> root tbf rate {r} {}` on \
                         both ends ({})\n",
                        migrate::TBF.join(" "),
                        if o.qdisc.is_empty() { "?" } else { &o.qdisc }
                    )
                }
                Link::Unshaped => e += "- link `none`: the veth pair without a qdisc\n",
            }
        }
    }
    e += "\n";
    e += text;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "phase 1 assemble 100.0 cpu=0.5\nphase 1 solve 101.0 cpu=1.5\n\
phase 1 done 103.0 cpu=3.5 sweeps=10\nREADY\nphase 2 assemble 103.0 cpu=3.5\n\
phase 2 solve 104.0 cpu=4.4\nphase 2 done 106.5 cpu=6.9 sweeps=10\n\
phase 3 assemble 106.5 cpu=6.9\nphase 3 solve 107.0 cpu=7.5\nphase 3 done 110.0 cpu=10.0 \
sweeps=10\ndone phases=3 secs=11.0\nPASS phases\n";

    #[test]
    fn phase_times() {
        let s = steps(LOG);
        assert_eq!(s.len(), 9);
        let (w, c, n) = timed_phases(&s);
        assert_eq!(n, 2);
        assert!((w - 7.0).abs() < 1e-9 && (c - 6.5).abs() < 1e-9, "{w} {c}");
        assert_eq!(position_at(&s, 105.0), "phase 2 solve +1.0 s");
        assert_eq!(position_at(&s, 99.0), "before phase 1");
    }

    #[test]
    fn percentages() {
        assert_eq!(signed_pct(pct_change(81.0, 100.0)), "-19.0 %");
        assert_eq!(signed_pct(f64::NAN), "–");
        assert_eq!(mib(256.0), "1");
    }
}
