//! `ferry-bench postcopy`: post-copy and hybrid migration beside pre-copy
//! and stop-copy, on synthetic jobs of growing size and on one that writes
//! faster than the shaped link drains.

use crate::migrate::{self, Agent, Link, MigrateJson, Nodes, Ns, RunCleanup, Ticks};
use crate::report::{self, Table};
use crate::util::{self, CommonArgs, TempDir};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

pub const LONG_ABOUT: &str = "Compare migration modes on bench/workloads/synth.c jobs \
between two network namespaces (veth shaped to 1 Gbit/s with tc tbf, and unshaped): \
stop-copy, pre-copy with the adaptive controller, post-copy and hybrid (adaptive, then \
post-copy). Jobs: --sizes MiB each with a --wss MiB working set rewritten at --rate MiB/s, \
plus --fast (MEM:WSS:RATE), a job that writes faster than 1 Gbit/s drains.\n\n\
Reported per run: downtime (freeze -> running on the target; for post-copy the resume \
time), total time, bytes sent, time from the resume to the last page, remote faults and \
their service latency (median, p99), and the job's slowdown during the migration (work \
done, from its progress ticks, against the second before). Every job must PASS on the \
target.\n\nGoals: post-copy resume under 10 ms and flat as memory grows; fault service \
median under 100 us on the unshaped link.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Job sizes in MiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub sizes: Vec<u64>,
    /// Working set of the sized jobs, MiB.
    #[arg(long, default_value_t = 64)]
    pub wss: u64,
    /// Write rate of the sized jobs, MiB/s.
    #[arg(long, default_value_t = 64)]
    pub rate: u64,
    /// The fast writer: MEM:WSS:RATE (MiB, MiB, MiB/s); "none" to skip.
    #[arg(long, default_value = "1024:512:400")]
    pub fast: String,
    /// Links: a tc rate (e.g. 1gbit), none (unshaped) or both; comma-separated.
    #[arg(long, default_value = "both", value_name = "RATE|none|both")]
    pub link: String,
    /// Modes (comma-separated): stop-copy, precopy, postcopy, hybrid.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "stop-copy,precopy,postcopy,hybrid"
    )]
    pub modes: Vec<String>,
    /// Largest job run over the shaped link (MiB): bigger ones only unshaped.
    #[arg(long, default_value_t = 1024)]
    pub shaped_max: u64,
    /// Pause after READY before migrating.
    #[arg(long, default_value_t = 1500, value_name = "MS")]
    pub settle_ms: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Clone, Debug)]
struct Job {
    mem: u64,
    wss: u64,
    rate: u64,
    fast: bool,
}

impl Job {
    fn label(&self) -> String {
        format!(
            "{} MiB, wss {} MiB @ {} MiB/s{}",
            self.mem,
            self.wss,
            self.rate,
            if self.fast { " (fast)" } else { "" }
        )
    }
}

/// Post-copy fields of the report (absent for pre-copy).
#[derive(serde::Deserialize, Debug, Clone, Default)]
struct PostFields {
    resume_ms: Option<f64>,
    remote_faults: Option<u64>,
    fault_latency_us: Option<Latency>,
    last_page_ms: Option<f64>,
}

#[derive(serde::Deserialize, Debug, Clone, Default)]
struct Latency {
    p50: f64,
    p99: f64,
}

struct Run {
    link: String,
    job: String,
    mode: String,
    mig: MigrateJson,
    post: PostFields,
    /// Work lost during the migration window, percent.
    slowdown: Option<f64>,
}

struct Ctx<'a> {
    args: &'a Args,
    ferry: PathBuf,
    synth: PathBuf,
    work: PathBuf,
    token: PathBuf,
    timeout: Duration,
}

pub fn run(args: &Args) -> Result<()> {
    util::require_root()?;
    let ferry = util::resolve_ferry(args.common.ferry.as_deref())?;
    let links = migrate::links(&args.link)?;
    for m in &args.modes {
        if !["stop-copy", "precopy", "postcopy", "hybrid"].contains(&m.as_str()) {
            bail!("unknown mode {m:?} (stop-copy, precopy, postcopy, hybrid)");
        }
    }
    let mut jobs: Vec<Job> = args
        .sizes
        .iter()
        .map(|&mem| Job {
            mem,
            wss: args.wss.min(mem),
            rate: args.rate,
            fast: false,
        })
        .collect();
    if args.fast != "none" {
        let v: Vec<u64> = args
            .fast
            .split(':')
            .map(|x| x.parse::<u64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--fast {:?}: want MEM:WSS:RATE", args.fast))?;
        if v.len() != 3 || v[1] > v[0] {
            bail!("--fast {:?}: want MEM:WSS:RATE with WSS <= MEM", args.fast);
        }
        jobs.push(Job {
            mem: v[0],
            wss: v[1],
            rate: v[2],
            fast: true,
        });
    }
    let biggest = jobs.iter().map(|j| j.mem).max().unwrap_or(0);
    if let Some(avail) = report::meminfo("MemAvailable") {
        let need = (3 * biggest + 512) * 1024;
        if need > avail {
            bail!(
                "a {biggest} MiB job needs about {} MiB (source, agent, target); {} MiB available",
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
    let work = TempDir::new(&parent, "ferry-bench-postcopy", args.common.keep)?;
    let synth = util::build_bench_workload("synth", work.path(), &[])?;
    let token = work.path().join("token");
    migrate::write_token(&token)?;
    let ctx = Ctx {
        args,
        ferry,
        synth,
        work: work.path().to_path_buf(),
        token,
        timeout: Duration::from_secs(args.common.timeout.max(300)),
    };
    let mut nodes = Nodes::new(work.path())?;
    let agent = Agent::spawn(
        &ctx.ferry,
        work.path(),
        &ctx.token,
        &nodes,
        Ns::B,
        &nodes.addr_b(migrate::PORT_VETH),
        "agent-b",
    )?;
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for link in &links {
        nodes.set_link(link)?;
        for job in &jobs {
            if matches!(link, Link::Shaped(_)) && job.mem > args.shaped_max && !job.fast {
                continue;
            }
            for mode in &args.modes {
                eprintln!("postcopy: {} / {} / {mode}", link.label(), job.label());
                match migrate::interruptible(run_one(&ctx, &nodes, &agent, link, job, mode))? {
                    Ok(r) => runs.push(r),
                    Err(e) => {
                        eprintln!("postcopy: run failed: {e:#}");
                        failures.push(format!(
                            "{} / {} / {mode}: {}",
                            link.label(),
                            job.label(),
                            format!("{e:#}").lines().next().unwrap_or_default()
                        ));
                    }
                }
            }
        }
    }
    let text = tables(&runs, &failures);
    println!("{text}");
    if args.common.record {
        let mut entry = report::entry_header("postcopy (migration modes)", &ctx.ferry, &ctx.work);
        entry.push_str(&format!(
            "- links: {}; tc tbf {}\n- jobs: synth (4 KiB pages, incompressible data)\n\n",
            links.iter().map(Link::label).collect::<Vec<_>>().join(", "),
            migrate::TBF.join(" ")
        ));
        entry.push_str(&text);
        let path = report::append_results(&entry)?;
        eprintln!("postcopy: appended to {}", path.display());
    }
    if !failures.is_empty() {
        bail!("{} run(s) failed (see above)", failures.len());
    }
    Ok(())
}

fn mode_args(mode: &str) -> Vec<&'static str> {
    match mode {
        "stop-copy" => vec!["--controller", "stop-copy"],
        "precopy" => vec!["--controller", "adaptive"],
        "postcopy" => vec!["--mode", "postcopy"],
        _ => vec!["--mode", "hybrid", "--controller", "adaptive"],
    }
}

fn run_one(
    ctx: &Ctx,
    nodes: &Nodes,
    agent: &Agent,
    link: &Link,
    job: &Job,
    mode: &str,
) -> Result<Run> {
    let dir = ctx.work.join(format!(
        "run-{}-{}-{}-{mode}",
        link.slug(),
        job.mem,
        job.fast
    ));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let _cleanup = RunCleanup {
        nodes,
        keep: vec![agent.pid],
    };
    let log = dir.join("job.log");
    let stop = dir.join("stop");
    let pid = migrate::start_detached(
        nodes,
        &ctx.ferry,
        &dir,
        &log,
        &[],
        &ctx.synth,
        &[
            job.mem.to_string(),
            job.wss.to_string(),
            job.rate.to_string(),
        ],
        &[
            ("WORKLOAD_SECS", "900".as_ref()),
            ("SYNTH_STOP_FILE", stop.as_os_str()),
        ],
        Duration::from_secs(300),
    )?;
    util::sleep(Duration::from_millis(ctx.args.settle_ms))?;
    let m = migrate::migrate_job(
        nodes,
        &ctx.ferry,
        &dir,
        pid,
        &agent.addr,
        &ctx.token,
        &mode_args(mode),
        ctx.timeout,
        &log,
    )?;
    let t_start = m.t_start;
    let mig: MigrateJson = util::parse_json_line(&m.stdout, "migration report")?;
    let post: PostFields = util::parse_json_line(&m.stdout, "migration report")?;
    util::sleep(Duration::from_millis(1500))?;
    util::check_log_ok(&log, "on the target")?;
    fs::write(&stop, b"").context("create the stop file")?;
    util::wait_line(
        &log,
        "PASS synth",
        None,
        Duration::from_secs(300),
        "after its stop file",
    )?;
    // Work lost over the migration window (for post-copy up to the last
    // page), against the rate of the second before it.
    let text = fs::read_to_string(&log).unwrap_or_default();
    let slowdown = Ticks::parse(&text).ok().and_then(|t| {
        let base = t.count_at(t_start) - t.count_at(t_start - 1.0);
        let end =
            t_start + (mig.live_ms + mig.downtime_ms + post.last_page_ms.unwrap_or(0.0)) / 1e3;
        let len = end - t_start;
        (base > 0.0 && len > 0.0).then(|| {
            let done = t.count_at(end) - t.count_at(t_start);
            (1.0 - done / (base * len)) * 100.0
        })
    });
    if !ctx.args.common.keep {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(Run {
        link: link.label(),
        job: job.label(),
        mode: mode.to_string(),
        mig,
        post,
        slowdown,
    })
}

fn tables(runs: &[Run], failures: &[String]) -> String {
    let mut t = Table::new(&[
        "link",
        "job",
        "mode",
        "downtime ms",
        "total s",
        "sent",
        "rounds",
        "resume → last page ms",
        "remote faults",
        "fault p50 µs",
        "fault p99 µs",
        "slowdown",
    ]);
    for r in runs {
        let opt = |v: Option<f64>, d: usize| v.map_or("–".into(), |x| format!("{x:.d$}"));
        t.row(vec![
            r.link.clone(),
            r.job.clone(),
            r.mode.clone(),
            format!("{:.1}", r.mig.downtime_ms),
            format!("{:.2}", r.mig.total_ms / 1e3),
            report::bytes(r.mig.bytes_sent),
            r.mig.rounds.len().to_string(),
            opt(r.post.last_page_ms, 0),
            r.post.remote_faults.map_or("–".into(), |v| v.to_string()),
            opt(r.post.fault_latency_us.as_ref().map(|l| l.p50), 0),
            opt(r.post.fault_latency_us.as_ref().map(|l| l.p99), 0),
            r.slowdown
                .map_or("–".into(), |v| format!("{:.1} %", v.max(0.0))),
        ]);
    }
    let mut s = t.markdown();
    let post: Vec<&Run> = runs.iter().filter(|r| r.mode == "postcopy").collect();
    if !post.is_empty() {
        let worst = post
            .iter()
            .map(|r| r.post.resume_ms.unwrap_or(r.mig.downtime_ms))
            .fold(0.0f64, f64::max);
        s.push_str(&format!(
            "\nGoal: post-copy resume < 10 ms and flat as memory grows: worst {worst:.1} ms \
             ({}).\n",
            if worst < 10.0 { "met" } else { "NOT met" }
        ));
        let lat: Vec<f64> = post
            .iter()
            .filter(|r| r.link.contains("unshaped"))
            .filter_map(|r| r.post.fault_latency_us.as_ref().map(|l| l.p50))
            .filter(|&v| v > 0.0)
            .collect();
        if let Some(m) = lat.iter().copied().reduce(f64::max) {
            s.push_str(&format!(
                "Goal: fault service median < 100 µs (unshaped veth): worst median {m:.0} µs \
                 ({}).\n",
                if m < 100.0 { "met" } else { "NOT met" }
            ));
        }
    }
    for f in failures {
        s.push_str(&format!("\nFAILED: {f}\n"));
    }
    s
}
