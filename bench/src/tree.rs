//! `ferry-bench tree`: what each extra thread and each extra process costs a
//! checkpoint and a restore, on the `fanout` workload
//! (`bench/workloads/fanout.c`).
//!
//! Configurations: a thread series (1 process running 1, 2, 8, 64 threads)
//! and a tree series (3- and 16-process trees, 1 thread each), always with
//! the same total memory (64 MiB by default) split across the processes.
//! The 1-thread 1-process configuration is the baseline and always runs.
//!
//! Per configuration and repetition, as in `cr`:
//!  1. start `fanout`, wait for READY, record its tree (pids, threads per
//!     process), `ferry checkpoint --leave-running --json`: frozen time and
//!     image size; every process must still run (same tree, no FAIL); then
//!     the whole tree is killed and reaped;
//!  2. start a fresh tree, `ferry checkpoint --json` (kill mode):
//!     checkpoint, frozen and non-memory state time; ferry must kill every
//!     process of the tree (we reap them all, freeing the pids);
//!  3. `ferry restore --detach --json` from that image: restore and restore
//!     state time; the restored tree (same pids, same parents, same thread
//!     counts) must keep running without FAIL for a moment; then every
//!     process of it is killed and waited for until /proc has none of them.
//!
//! Then, per configuration, the cost of one extra thread (thread series) or
//! process (tree series) relative to the baseline: (t_N - t_1) / (N - 1) on
//! the medians, for the frozen time and the restore time. The project's goal
//! is under 1 ms per extra thread or process.

use crate::report::{self, Table};
use crate::util::{self, CheckpointJson, CommonArgs, ProcTree, RestoreJson, TempDir, Workload};
use anyhow::{bail, Context, Result};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const LONG_ABOUT: &str = "Measure what each extra thread and each extra process costs \
checkpoint and restore, on the `fanout` workload (bench/workloads/fanout.c): a root process \
that forks PROCS-1 children, every process running THREADS threads that keep rewriting a few \
pages of their share of the memory every millisecond.\n\n\
Configurations: 1 process with each of --threads threads, and trees of each of --procs \
processes with 1 thread each, all with --mib MiB in total; the 1-thread 1-process baseline \
always runs. For each configuration and repetition: (1) checkpoint a running tree with \
--leave-running (frozen time, image size; the tree must run on unchanged); (2) checkpoint a \
fresh tree in kill mode (checkpoint, frozen and non-memory state time; ferry must kill the \
whole tree); (3) restore that image with --detach (restore and restore state time; the \
restored tree must have the same pids, parents and threads and run on without FAIL), then \
kill the whole tree.\n\n\
Prints a Markdown table of medians, the cost per extra thread or process relative to the \
baseline ((t_N - t_1) / (N - 1), for the frozen time and the restore time; the goal is \
under 1 ms) and the individual values.";

/// The project's goal for the cost of one extra thread or process, in ms.
const GOAL_MS: f64 = 1.0;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Thread series: threads of a single process (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,8,64",
        value_name = "N,..."
    )]
    pub threads: Vec<u32>,
    /// Tree series: processes of a tree, 1 thread each (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "3,16",
        value_name = "N,..."
    )]
    pub procs: Vec<u32>,
    /// Memory of the whole tree in MiB, split evenly across its processes.
    #[arg(long, default_value_t = 64, value_name = "MiB")]
    pub mib: u64,
    /// Repetitions per configuration; the tables show medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub reps: u32,
    /// How long the workload runs after READY (it is killed long before).
    #[arg(long, default_value_t = 600, hide = true)]
    pub workload_secs: u64,
    /// Pause after READY before checkpointing.
    #[arg(long, default_value_t = 100, hide = true)]
    pub settle_ms: u64,
    /// How long a restored tree must run on without FAIL before it is killed.
    #[arg(long, default_value_t = 500, hide = true)]
    pub check_ms: u64,
    /// Workload: each thread rewrites --pages-per-tick pages every this many µs.
    #[arg(long, default_value_t = 1000, hide = true)]
    pub tick_us: u64,
    /// Workload: pages each thread rewrites per tick.
    #[arg(long, default_value_t = 4, hide = true)]
    pub pages_per_tick: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Most threads or processes the workload takes.
const MAX_N: u32 = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    /// Threads per process.
    threads: u32,
    /// Processes in the tree.
    procs: u32,
}

impl Config {
    const BASELINE: Config = Config {
        threads: 1,
        procs: 1,
    };

    fn label(&self) -> String {
        let plural =
            |n: u32, what: &str, s: &str| format!("{n} {what}{}", if n == 1 { "" } else { s });
        match (self.threads, self.procs) {
            (1, 1) => "1 thread, 1 process (baseline)".into(),
            (t, 1) => plural(t, "thread", "s"),
            (1, p) => plural(p, "process", "es"),
            (t, p) => format!(
                "{} × {}",
                plural(p, "process", "es"),
                plural(t, "thread", "s")
            ),
        }
    }

    fn total_threads(&self) -> u64 {
        u64::from(self.threads) * u64::from(self.procs)
    }

    /// Extra threads or processes relative to the baseline, and which.
    fn extra(&self) -> (u64, &'static str) {
        if self.procs == 1 {
            (u64::from(self.threads) - 1, "thread")
        } else {
            (u64::from(self.procs) - 1, "process")
        }
    }

    fn slug(&self) -> String {
        format!("{}t{}p", self.threads, self.procs)
    }
}

/// One repetition's measurements.
struct Sample {
    /// Step 1: --leave-running.
    lr: CheckpointJson,
    lr_image: u64,
    /// Step 2: kill mode.
    kill: CheckpointJson,
    kill_image: u64,
    kill_wall_ms: f64,
    /// Step 3.
    restore: RestoreJson,
    restore_wall_ms: f64,
}

struct Ctx<'a> {
    args: &'a Args,
    ferry: PathBuf,
    fanout: PathBuf,
    work: PathBuf,
    timeout: Duration,
}

fn configs(args: &Args) -> Vec<Config> {
    let mut out = vec![Config::BASELINE];
    let mut push = |c: Config| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    for &t in &args.threads {
        push(Config {
            threads: t,
            procs: 1,
        });
    }
    for &p in &args.procs {
        push(Config {
            threads: 1,
            procs: p,
        });
    }
    out
}

pub fn run(args: &Args) -> Result<()> {
    util::require_root()?;
    let ferry = util::resolve_ferry(args.common.ferry.as_deref())?;
    if args.mib == 0 || args.mib > 65536 {
        bail!("bad --mib {}: takes 1..=65536", args.mib);
    }
    if args.tick_us == 0 || args.pages_per_tick == 0 {
        bail!("--tick-us and --pages-per-tick must be positive");
    }
    if let Some(bad) = args
        .threads
        .iter()
        .chain(&args.procs)
        .find(|&&n| n == 0 || n > MAX_N)
    {
        bail!("bad thread or process count {bad}: the fanout workload takes 1..={MAX_N}");
    }
    let configs = configs(args);
    let pages = args.mib * 256;
    if let Some(c) = configs
        .iter()
        .find(|c| pages / u64::from(c.procs) < u64::from(c.threads))
    {
        bail!(
            "--mib {} is too small for {}: every thread needs at least one page",
            args.mib,
            c.label()
        );
    }
    let parent = args
        .common
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let work = TempDir::new(&parent, "ferry-bench-tree", args.common.keep)?;
    let fanout = util::build_bench_workload("fanout", work.path(), &[])?;
    let ctx = Ctx {
        args,
        ferry,
        fanout,
        work: work.path().to_path_buf(),
        timeout: Duration::from_secs(args.common.timeout),
    };

    let mut results: Vec<(Config, Result<Vec<Sample>>)> = Vec::new();
    for &cfg in &configs {
        let r = run_config(&ctx, cfg);
        if let Err(e) = &r {
            if e.downcast_ref::<util::Interrupted>().is_some() {
                return r.map(|_| ());
            }
            eprintln!("tree: {} FAILED: {e:#}", cfg.label());
        }
        results.push((cfg, r));
    }

    let t = tables(&results);
    println!("{}", t.summary);
    println!("Cost per extra thread or process, relative to the baseline:\n");
    println!("{}", t.per_extra);
    println!("{}\n", t.verdict);
    if !t.details.is_empty() {
        println!("Per repetition:\n\n{}", t.details);
    }
    for f in &t.failures {
        println!("{f}");
    }

    if args.common.record {
        let entry = results_entry(&ctx, work.path(), &t);
        let path = report::append_results(&entry)?;
        eprintln!("tree: appended to {}", path.display());
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if failed > 0 {
        bail!(
            "{failed} of {} configurations failed (see above)",
            results.len()
        );
    }
    Ok(())
}

fn run_config(ctx: &Ctx, cfg: Config) -> Result<Vec<Sample>> {
    if let Some(avail) = report::meminfo("MemAvailable") {
        let need = (ctx.args.mib + 64 + cfg.total_threads()) * 1024;
        if need > avail {
            bail!(
                "{} needs about {} MiB of memory, only {} MiB available",
                cfg.label(),
                need / 1024,
                avail / 1024
            );
        }
    }
    let mut samples = Vec::new();
    for rep in 1..=ctx.args.reps {
        let s =
            run_rep(ctx, cfg, rep).with_context(|| format!("{}, repetition {rep}", cfg.label()))?;
        eprintln!(
            "tree: {} rep {rep}/{}: image {}, checkpoint {} ms (frozen {} ms with \
             --leave-running), restore {} ms (wall {} ms)",
            cfg.label(),
            ctx.args.reps,
            report::bytes(s.kill_image),
            report::ms(s.kill.total_ms),
            report::ms(s.lr.frozen_ms),
            report::ms(s.restore.total_ms),
            report::ms(s.restore_wall_ms),
        );
        samples.push(s);
    }
    Ok(samples)
}

fn run_rep(ctx: &Ctx, cfg: Config, rep: u32) -> Result<Sample> {
    let dir = ctx.work.join(format!("{}-rep{rep}", cfg.slug()));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let secs = OsString::from(ctx.args.workload_secs.to_string());
    let tick = OsString::from(ctx.args.tick_us.to_string());
    let ppt = OsString::from(ctx.args.pages_per_tick.to_string());
    let env: [(&str, &OsStr); 3] = [
        ("WORKLOAD_SECS", &secs),
        ("FANOUT_TICK_US", &tick),
        ("FANOUT_PAGES_PER_TICK", &ppt),
    ];
    let wl_args = [
        cfg.threads.to_string(),
        cfg.procs.to_string(),
        ctx.args.mib.to_string(),
    ];
    let ready_timeout = Duration::from_secs(90 + 30 * ctx.args.mib.div_ceil(1024));
    let settle = Duration::from_millis(ctx.args.settle_ms);
    let fanout: &Path = &ctx.fanout;

    // 1. --leave-running. Drop order (reverse of declaration): the tree
    // guard kills every process and reaps all but the root, then the
    // Workload reaps the root.
    let mut w1 = Workload::spawn(fanout, &wl_args, &env, &dir.join("w1.log"))?;
    let mut t1 = ProcTree::new(w1.pid(), &[], &[fanout], true, "the workload tree");
    w1.wait_ready(ready_timeout)?;
    util::sleep(settle)?;
    let pids1 = record_tree(ctx, cfg, w1.pid(), w1.log())?;
    t1.add(&pids1);
    let img_lr = dir.join("img-lr");
    let root1 = w1.pid().to_string();
    let out = ferry(
        ctx,
        &dir,
        "checkpoint-lr",
        &[
            "checkpoint".as_ref(),
            root1.as_ref(),
            "-D".as_ref(),
            img_lr.as_os_str(),
            "--leave-running".as_ref(),
            "--json".as_ref(),
        ],
    )?;
    let lr: CheckpointJson = util::parse_json_line(&out.stdout, "checkpoint report")?;
    check_counts(
        cfg,
        lr.processes,
        lr.threads,
        "ferry checkpoint --leave-running",
    )?;
    w1.check_healthy("after the --leave-running checkpoint")?;
    check_tree(
        ctx,
        cfg,
        &pids1,
        w1.log(),
        "after the --leave-running checkpoint",
    )?;
    let lr_image = util::dir_size(&img_lr)?;
    t1.kill()?;
    w1.kill()?;
    util::check_log_ok(w1.log(), "after the --leave-running checkpoint")?;
    drop(t1);
    drop(w1);
    remove_image(ctx, &img_lr);

    // 2. Kill mode, on a fresh tree.
    let mut w2 = Workload::spawn(fanout, &wl_args, &env, &dir.join("w2.log"))?;
    let mut t2 = ProcTree::new(w2.pid(), &[], &[fanout], true, "the checkpointed tree");
    w2.wait_ready(ready_timeout)?;
    util::sleep(settle)?;
    let root = w2.pid();
    let pids = record_tree(ctx, cfg, root, w2.log())?;
    t2.add(&pids);
    let img = dir.join("img");
    let roots = root.to_string();
    let out = ferry(
        ctx,
        &dir,
        "checkpoint-kill",
        &[
            "checkpoint".as_ref(),
            roots.as_ref(),
            "-D".as_ref(),
            img.as_os_str(),
            "--json".as_ref(),
        ],
    )?;
    let kill: CheckpointJson = util::parse_json_line(&out.stdout, "checkpoint report")?;
    let kill_wall_ms = out.wall.as_secs_f64() * 1e3;
    check_counts(cfg, kill.processes, kill.threads, "ferry checkpoint")?;
    // ferry kills the whole tree: the root (our child) and the others
    // (orphans re-parented to us) must all die of SIGKILL.
    let st = w2
        .reap(util::REAP_TIMEOUT)
        .context("the root did not die after the kill-mode checkpoint")?;
    if st.code().is_some() {
        bail!(
            "after the kill-mode checkpoint the root exited by itself ({}) instead of being \
             killed; log:\n{}",
            util::describe_status(st),
            util::log_tail(w2.log(), 10)
        );
    }
    t2.set_root_owned(false); // reaped: the guard must not wait for it
    t2.wait_gone(util::REAP_TIMEOUT)
        .context("ferry did not kill the whole tree in kill mode")?;
    if let Some(&(pid, st)) = t2
        .reaped()
        .iter()
        .find(|&&(_, st)| !(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL))
    {
        bail!(
            "after the kill-mode checkpoint pid {pid} of the tree ended with {} instead of \
             being SIGKILLed by ferry; log:\n{}",
            util::describe_status(std::os::unix::process::ExitStatusExt::from_raw(st)),
            util::log_tail(w2.log(), 10)
        );
    }
    let log = w2.log().to_path_buf();
    drop(t2);
    drop(w2);
    let kill_image = util::dir_size(&img)?;

    // 3. Restore the kill-mode image. The guard is armed before ferry runs:
    // whatever ferry leaves behind with the tree's pids (or below them) is
    // killed and reaped, whichever way this ends.
    let mut restored = ProcTree::new(
        root,
        &pids,
        &[fanout, &ctx.ferry],
        false,
        "the restored tree",
    );
    let out = ferry(
        ctx,
        &dir,
        "restore",
        &[
            "restore".as_ref(),
            "-D".as_ref(),
            img.as_os_str(),
            "--detach".as_ref(),
            "--json".as_ref(),
        ],
    )?;
    let restore_wall_ms = out.wall.as_secs_f64() * 1e3;
    let printed = util::detached_pid(&out.stdout)?;
    if printed != root {
        bail!("ferry restore --detach printed pid {printed}, expected {root}");
    }
    let restore: RestoreJson = util::parse_json_line(&out.stderr, "restore report")?;
    check_counts(cfg, restore.processes, restore.threads, "ferry restore")?;
    util::sleep(Duration::from_millis(ctx.args.check_ms))?;
    check_tree(ctx, cfg, &pids, &log, "after restore")?;
    restored.kill()?;
    drop(restored);
    remove_image(ctx, &img);
    if !ctx.args.common.keep {
        let _ = fs::remove_dir_all(&dir);
    }

    Ok(Sample {
        lr,
        lr_image,
        kill,
        kill_image,
        kill_wall_ms,
        restore,
        restore_wall_ms,
    })
}

/// The tree of a READY workload, root first; checks its shape (number of
/// processes, all children of the root, threads per process).
fn record_tree(ctx: &Ctx, cfg: Config, root: i32, log: &Path) -> Result<Vec<i32>> {
    let pids = util::descendants(root);
    if pids.len() != cfg.procs as usize {
        bail!(
            "the workload tree of pid {root} has {} processes {pids:?}, expected {}; log:\n{}",
            pids.len(),
            cfg.procs,
            util::log_tail(log, 10)
        );
    }
    check_tree(ctx, cfg, &pids, log, "at READY")?;
    Ok(pids)
}

/// The tree rooted at `pids[0]` is exactly `pids`, every process runs the
/// workload (not a zombie), the others are children of the root, each has
/// the configured number of threads, and the log has no FAIL.
fn check_tree(ctx: &Ctx, cfg: Config, pids: &[i32], log: &Path, when: &str) -> Result<()> {
    let root = pids[0];
    let fanout = fs::canonicalize(&ctx.fanout).unwrap_or_else(|_| ctx.fanout.clone());
    let mut now = util::descendants(root);
    let mut want = pids.to_vec();
    now.sort_unstable();
    want.sort_unstable();
    let mut problems = Vec::new();
    if now != want {
        problems.push(format!(
            "the tree of pid {root} is now {now:?}, expected {want:?}"
        ));
    }
    for &pid in pids {
        match util::proc_stat(pid) {
            None => problems.push(format!("pid {pid} is gone")),
            Some((_, 'Z' | 'X')) => problems.push(format!("pid {pid} is a zombie")),
            Some((ppid, _)) => {
                if pid != root && ppid != root {
                    problems.push(format!("pid {pid} has parent {ppid}, expected {root}"));
                }
                if util::exe_of(pid).as_deref() != Some(fanout.as_path()) {
                    problems.push(format!(
                        "pid {pid} runs {:?}, expected {}",
                        util::exe_of(pid),
                        fanout.display()
                    ));
                }
                let n = util::thread_count(pid);
                if n != cfg.threads as usize {
                    problems.push(format!(
                        "pid {pid} has {n} threads, expected {}",
                        cfg.threads
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "{when}: {}; log:\n{}",
            problems.join("; "),
            util::log_tail(log, 10)
        );
    }
    util::check_log_ok(log, when)
}

/// ferry's report must cover the whole tree.
fn check_counts(cfg: Config, processes: u64, threads: u64, what: &str) -> Result<()> {
    if processes != u64::from(cfg.procs) || threads != cfg.total_threads() {
        bail!(
            "{what} reported {processes} processes and {threads} threads, expected {} and {}",
            cfg.procs,
            cfg.total_threads()
        );
    }
    Ok(())
}

fn remove_image(ctx: &Ctx, img: &Path) {
    if !ctx.args.common.keep {
        let _ = fs::remove_dir_all(img);
    }
}

fn ferry(ctx: &Ctx, scratch: &Path, label: &str, args: &[&OsStr]) -> Result<util::CmdOutput> {
    util::run_ferry(&ctx.ferry, args, ctx.timeout, scratch, label)
}

// ---- tables -------------------------------------------------------------------

struct Tables {
    summary: String,
    per_extra: String,
    verdict: String,
    details: String,
    failures: Vec<String>,
}

/// Medians of one configuration's samples.
struct Medians {
    image: f64,
    ckpt: f64,
    lr_frozen: f64,
    kill_frozen: f64,
    state: f64,
    restore: f64,
    restore_wall: f64,
    restore_state: f64,
}

impl Medians {
    fn of(samples: &[Sample]) -> Self {
        let med = |f: &dyn Fn(&Sample) -> f64| util::median(samples.iter().map(f));
        Self {
            image: med(&|s| s.kill_image as f64),
            ckpt: med(&|s| s.kill.total_ms),
            lr_frozen: med(&|s| s.lr.frozen_ms),
            kill_frozen: med(&|s| s.kill.frozen_ms),
            state: med(&|s| s.kill.state_ms),
            restore: med(&|s| s.restore.total_ms),
            restore_wall: med(&|s| s.restore_wall_ms),
            restore_state: med(&|s| s.restore.state_ms),
        }
    }
}

/// (t_N - t_1) / (N - 1).
fn per_extra(t_n: f64, t_1: f64, extra: u64) -> f64 {
    if extra == 0 {
        f64::NAN
    } else {
        (t_n - t_1) / extra as f64
    }
}

fn tables(results: &[(Config, Result<Vec<Sample>>)]) -> Tables {
    let mut summary = Table::new(&[
        "configuration",
        "processes",
        "threads",
        "image size",
        "checkpoint ms",
        "frozen ms (leave-running)",
        "frozen ms (kill mode)",
        "non-memory state ms",
        "restore ms",
        "restore wall ms",
        "restore state ms",
    ]);
    let mut extra_t = Table::new(&[
        "configuration",
        "extra",
        "frozen ms per extra (leave-running)",
        "frozen ms per extra (kill mode)",
        "state ms per extra",
        "restore ms per extra",
        "restore state ms per extra",
        "under 1 ms? (frozen LR, restore)",
    ]);
    let mut details = Table::new(&[
        "configuration",
        "rep",
        "image bytes",
        "data pages",
        "zero pages",
        "ckpt total ms",
        "ckpt frozen ms",
        "ckpt wall ms",
        "ckpt state ms",
        "LR total ms",
        "LR frozen ms",
        "LR state ms",
        "LR image bytes",
        "restore ms",
        "restore state ms",
        "restore wall ms",
        "bytes read",
    ]);
    let mut failures = Vec::new();
    let baseline = results
        .iter()
        .find(|(c, _)| *c == Config::BASELINE)
        .and_then(|(_, r)| r.as_ref().ok())
        .map(|s| Medians::of(s));
    let (mut met, mut judged) = (0, 0);
    let mut worst: Option<(f64, String)> = None;
    for (cfg, r) in results {
        let label = cfg.label();
        let samples = match r {
            Ok(s) => s,
            Err(e) => {
                summary.row(vec![
                    label.clone(),
                    cfg.procs.to_string(),
                    cfg.total_threads().to_string(),
                    "FAILED".into(),
                ]);
                if *cfg != Config::BASELINE {
                    extra_t.row(vec![label.clone(), "FAILED".into()]);
                }
                failures.push(format!(
                    "**{label} failed:**\n\n```\n{}\n```\n",
                    format!("{e:#}").trim_end()
                ));
                continue;
            }
        };
        let m = Medians::of(samples);
        summary.row(vec![
            label.clone(),
            cfg.procs.to_string(),
            cfg.total_threads().to_string(),
            report::bytes(m.image as u64),
            report::ms(m.ckpt),
            report::ms(m.lr_frozen),
            report::ms(m.kill_frozen),
            report::ms(m.state),
            report::ms(m.restore),
            report::ms(m.restore_wall),
            report::ms(m.restore_state),
        ]);
        if *cfg != Config::BASELINE {
            let (n, unit) = cfg.extra();
            let extra_label = format!("{n} {unit}{}", plural_s(n, unit));
            match &baseline {
                None => extra_t.row(vec![label.clone(), extra_label, "no baseline".into()]),
                Some(b) => {
                    let fr = per_extra(m.lr_frozen, b.lr_frozen, n);
                    let rs = per_extra(m.restore, b.restore, n);
                    let ok = fr < GOAL_MS && rs < GOAL_MS;
                    judged += 1;
                    if ok {
                        met += 1;
                    }
                    for (v, what) in [(fr, "frozen"), (rs, "restore")] {
                        if worst.as_ref().is_none_or(|(w, _)| v > *w) {
                            worst = Some((v, format!("{what} time, {label}")));
                        }
                    }
                    let verdict = match (fr < GOAL_MS, rs < GOAL_MS) {
                        (true, true) => "yes".to_string(),
                        (false, true) => "no (frozen)".into(),
                        (true, false) => "no (restore)".into(),
                        (false, false) => "no (both)".into(),
                    };
                    extra_t.row(vec![
                        label.clone(),
                        extra_label,
                        report::ms(fr),
                        report::ms(per_extra(m.kill_frozen, b.kill_frozen, n)),
                        report::ms(per_extra(m.state, b.state, n)),
                        report::ms(rs),
                        report::ms(per_extra(m.restore_state, b.restore_state, n)),
                        verdict,
                    ]);
                }
            }
        }
        for (i, s) in samples.iter().enumerate() {
            details.row(vec![
                label.clone(),
                (i + 1).to_string(),
                s.kill_image.to_string(),
                s.kill.pages.data.to_string(),
                s.kill.pages.zero.to_string(),
                report::ms(s.kill.total_ms),
                report::ms(s.kill.frozen_ms),
                report::ms(s.kill_wall_ms),
                report::ms(s.kill.state_ms),
                report::ms(s.lr.total_ms),
                report::ms(s.lr.frozen_ms),
                report::ms(s.lr.state_ms),
                s.lr_image.to_string(),
                report::ms(s.restore.total_ms),
                report::ms(s.restore.state_ms),
                report::ms(s.restore_wall_ms),
                s.restore.bytes_read.to_string(),
            ]);
        }
    }
    let verdict = if baseline.is_none() {
        "Goal (under 1 ms per extra thread or process): not judged, the baseline failed.".into()
    } else if judged == 0 {
        "Goal (under 1 ms per extra thread or process): nothing to judge.".into()
    } else {
        let worst = worst.map_or_else(String::new, |(v, w)| {
            format!("; the largest cost is {} ms ({w})", report::ms(v))
        });
        format!(
            "Goal (under 1 ms per extra thread or process, for the frozen time with \
             --leave-running and the restore time): met by {met} of {judged} \
             configurations{worst}."
        )
    };
    Tables {
        summary: summary.markdown(),
        per_extra: extra_t.markdown(),
        verdict,
        details: if details.is_empty() {
            String::new()
        } else {
            details.markdown()
        },
        failures,
    }
}

fn plural_s(n: u64, unit: &str) -> &'static str {
    match (n, unit) {
        (1, _) => "",
        (_, "process") => "es",
        _ => "s",
    }
}

fn results_entry(ctx: &Ctx, work: &Path, t: &Tables) -> String {
    let a = ctx.args;
    let mut e = report::entry_header("tree (threads and process trees)", &ctx.ferry, work);
    e += &format!(
        "- workload: bench/workloads/fanout.c, {} MiB in total split evenly across the \
         processes; every thread rewrites {} page{} of its share every {} µs\n",
        a.mib,
        a.pages_per_tick,
        if a.pages_per_tick == 1 { "" } else { "s" },
        a.tick_us
    );
    e += &format!(
        "- {} repetition{} per configuration; medians; cost per extra thread or process = \
         (t_N - t_1) / (N - 1) on the medians\n\n",
        a.reps,
        if a.reps == 1 { "" } else { "s" }
    );
    e += &t.summary;
    e += "\nCost per extra thread or process, relative to the baseline:\n\n";
    e += &t.per_extra;
    e += &format!("\n{}\n", t.verdict);
    if !t.details.is_empty() {
        e += "\n<details><summary>Per repetition</summary>\n\n";
        e += &t.details;
        e += "\n</details>\n";
    }
    for f in &t.failures {
        e += "\n";
        e += f;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = Cli::parse_from(["x", "--threads", "2,8,2", "--procs", "1,3"]);
        let got: Vec<(u32, u32)> = configs(&cli.args)
            .iter()
            .map(|c| (c.threads, c.procs))
            .collect();
        assert_eq!(got, [(1, 1), (2, 1), (8, 1), (1, 3)]);
        let cli = Cli::parse_from(["x"]);
        assert_eq!(configs(&cli.args).len(), 6);
    }

    #[test]
    fn per_extra_cost() {
        assert_eq!(per_extra(10.0, 4.0, 3), 2.0);
        assert!(per_extra(1.0, 1.0, 0).is_nan());
    }

    #[test]
    fn config_labels_and_extra() {
        let c = |threads, procs| Config { threads, procs };
        assert_eq!(c(1, 1).label(), "1 thread, 1 process (baseline)");
        assert_eq!(c(8, 1).label(), "8 threads");
        assert_eq!(c(1, 16).label(), "16 processes");
        assert_eq!(c(8, 1).extra(), (7, "thread"));
        assert_eq!(c(1, 3).extra(), (2, "process"));
        assert_eq!(c(1, 16).total_threads(), 16);
        assert_eq!(plural_s(2, "process"), "es");
        assert_eq!(plural_s(1, "thread"), "");
    }
}
