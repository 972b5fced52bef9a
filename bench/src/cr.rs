//! `ferry-bench cr`: checkpoint and restore of the `mem` workload.
//!
//! Per size and repetition:
//!  1. start `mem <size>`, wait for READY, `ferry checkpoint --leave-running
//!     --json`: how long the process was frozen while it kept running, and
//!     the image size; the workload must still be running and healthy;
//!     then kill and reap it;
//!  2. start a fresh instance, `ferry checkpoint --json` (kill mode): the
//!     checkpoint time, frozen time and non-memory state time; ferry kills
//!     it, we reap it, freeing its pid;
//!  3. `ferry restore --detach --json` from the kill-mode image: restore
//!     time (ferry's own and the command's wall time); the restored process
//!     must keep running without reporting FAIL for a moment; then it is
//!     killed and waited for until /proc/PID is gone.

use crate::report::{self, Table};
use crate::util::{self, CheckpointJson, CommonArgs, RestoreJson, TempDir, Workload};
use anyhow::{bail, Context, Result};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const LONG_ABOUT: &str = "Measure checkpoint and restore of the `mem` workload \
(tests/workloads/mem.c), which keeps rewriting all of its memory.\n\n\
For each size and repetition: (1) checkpoint a running instance with --leave-running \
(frozen time, image size); (2) checkpoint a fresh instance in kill mode (checkpoint time, \
frozen time, non-memory state time); (3) restore that image with --detach (restore time \
reported by ferry and wall time of the command), check that the restored process runs \
on without reporting FAIL, then kill it.\n\n\
Prints a Markdown table of medians over the repetitions (and the individual values), \
with throughputs image bytes / checkpoint time and bytes read / restore time in \
GB/s (10^9 bytes/s).";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Touched anonymous memory of the workload, in MiB (comma-separated).
    /// The process's total footprint is ~12 MiB larger (heap, stack, files).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "16,1024",
        value_name = "MiB,..."
    )]
    pub sizes: Vec<u64>,
    /// Repetitions per size; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub reps: u32,
    /// How long the workload runs after READY (it is killed long before).
    #[arg(long, default_value_t = 600, hide = true)]
    pub workload_secs: u64,
    /// Pause after READY before checkpointing, so the workload is in its
    /// steady rewrite loop.
    #[arg(long, default_value_t = 100, hide = true)]
    pub settle_ms: u64,
    /// How long a restored process must run on without FAIL before it is
    /// killed.
    #[arg(long, default_value_t = 500, hide = true)]
    pub check_ms: u64,
    #[command(flatten)]
    pub common: CommonArgs,
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

impl Sample {
    fn write_gbps(&self) -> f64 {
        report::gbps(self.kill_image, self.kill.total_ms)
    }
    fn read_gbps(&self) -> f64 {
        report::gbps(self.restore.bytes_read, self.restore.total_ms)
    }
}

struct Ctx<'a> {
    args: &'a Args,
    ferry: PathBuf,
    mem: PathBuf,
    work: PathBuf,
    timeout: Duration,
}

pub fn run(args: &Args) -> Result<()> {
    util::require_root()?;
    let ferry = util::resolve_ferry(args.common.ferry.as_deref())?;
    if args.sizes.is_empty() {
        bail!("--sizes is empty");
    }
    if let Some(bad) = args.sizes.iter().find(|&&s| s == 0 || s > 65536) {
        bail!("bad size {bad} MiB: the mem workload takes 1..=65536");
    }
    let parent = args
        .common
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let work = TempDir::new(&parent, "ferry-bench-cr", args.common.keep)?;
    let mem = util::build_workload("mem", work.path(), &[])?;
    let ctx = Ctx {
        args,
        ferry: ferry.clone(),
        mem,
        work: work.path().to_path_buf(),
        timeout: Duration::from_secs(args.common.timeout),
    };

    let mut results: Vec<(u64, Result<Vec<Sample>>)> = Vec::new();
    for &size in &args.sizes {
        let r = run_size(&ctx, size);
        if let Err(e) = &r {
            if e.downcast_ref::<util::Interrupted>().is_some() {
                return r.map(|_| ());
            }
            eprintln!("cr: {size} MiB FAILED: {e:#}");
        }
        results.push((size, r));
    }

    let (summary, details, failures) = tables(&results);
    println!("{summary}");
    if !details.is_empty() {
        println!("Per repetition:\n\n{details}");
    }
    for f in &failures {
        println!("{f}");
    }

    if args.common.record {
        let entry = results_entry(&ctx, work.path(), &summary, &details, &failures);
        let path = report::append_results(&entry)?;
        eprintln!("cr: appended to {}", path.display());
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} sizes failed (see above)", results.len());
    }
    Ok(())
}

fn run_size(ctx: &Ctx, size: u64) -> Result<Vec<Sample>> {
    // One workload (plus an image, which is reclaimable page cache) at a time.
    if let Some(avail) = report::meminfo("MemAvailable") {
        let need = (size + 64) * 1024;
        if need > avail {
            bail!(
                "{size} MiB needs about {} MiB of memory, only {} MiB available",
                need / 1024,
                avail / 1024
            );
        }
    }
    let mut samples = Vec::new();
    for rep in 1..=ctx.args.reps {
        let s = run_rep(ctx, size, rep).with_context(|| format!("{size} MiB, repetition {rep}"))?;
        eprintln!(
            "cr: {size} MiB rep {rep}/{}: image {}, checkpoint {} ms (frozen {} ms with \
             --leave-running), restore {} ms (wall {} ms)",
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

fn run_rep(ctx: &Ctx, size: u64, rep: u32) -> Result<Sample> {
    let dir = ctx.work.join(format!("{size}m-rep{rep}"));
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let secs = OsString::from(ctx.args.workload_secs.to_string());
    let env: [(&str, &OsStr); 2] = [
        ("FERRY_TEST_TMP", tmp.as_os_str()),
        ("WORKLOAD_SECS", &secs),
    ];
    let ready_timeout = Duration::from_secs(60 + 30 * size.div_ceil(1024));
    let settle = Duration::from_millis(ctx.args.settle_ms);
    let size_arg = [size.to_string()];

    // 1. --leave-running.
    let mut w1 = Workload::spawn(&ctx.mem, &size_arg, &env, &dir.join("w1.log"))?;
    w1.wait_ready(ready_timeout)?;
    util::sleep(settle)?;
    let img_lr = dir.join("img-lr");
    let pid1 = w1.pid().to_string();
    let out = ferry(
        ctx,
        &dir,
        "checkpoint-lr",
        &[
            "checkpoint".as_ref(),
            pid1.as_ref(),
            "-D".as_ref(),
            img_lr.as_os_str(),
            "--leave-running".as_ref(),
            "--json".as_ref(),
        ],
    )?;
    let lr: CheckpointJson = util::parse_json_line(&out.stdout, "checkpoint report")?;
    w1.check_healthy("after the --leave-running checkpoint")?;
    let lr_image = util::dir_size(&img_lr)?;
    w1.kill()?;
    util::check_log_ok(w1.log(), "after the --leave-running checkpoint")?;
    drop(w1);
    remove_image(ctx, &img_lr);

    // 2. Kill mode, on a fresh instance.
    let mut w2 = Workload::spawn(&ctx.mem, &size_arg, &env, &dir.join("w2.log"))?;
    w2.wait_ready(ready_timeout)?;
    util::sleep(settle)?;
    let img = dir.join("img");
    let pid2 = w2.pid();
    let pid2s = pid2.to_string();
    let out = ferry(
        ctx,
        &dir,
        "checkpoint-kill",
        &[
            "checkpoint".as_ref(),
            pid2s.as_ref(),
            "-D".as_ref(),
            img.as_os_str(),
            "--json".as_ref(),
        ],
    )?;
    let kill: CheckpointJson = util::parse_json_line(&out.stdout, "checkpoint report")?;
    let kill_wall_ms = out.wall.as_secs_f64() * 1e3;
    let st = w2
        .reap(util::REAP_TIMEOUT)
        .context("the workload did not die after the kill-mode checkpoint")?;
    if st.code().is_some() {
        bail!(
            "after the kill-mode checkpoint the workload exited by itself ({}) instead of \
             being killed; log:\n{}",
            util::describe_status(st),
            util::log_tail(w2.log(), 10)
        );
    }
    let w2_log = w2.log().to_path_buf();
    drop(w2);
    let kill_image = util::dir_size(&img)?;

    // 3. Restore the kill-mode image. The guard is armed before ferry runs:
    // whatever ferry leaves behind with that pid becomes our child.
    let mut restored = util::Adopted::new(pid2);
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
    if printed != pid2 {
        bail!("ferry restore --detach printed pid {printed}, expected {pid2}");
    }
    let restore: RestoreJson = util::parse_json_line(&out.stderr, "restore report")?;
    util::sleep(Duration::from_millis(ctx.args.check_ms))?;
    if !restored.running() {
        bail!(
            "the restored process {pid2} is gone {} ms after restore; log:\n{}",
            ctx.args.check_ms,
            util::log_tail(&w2_log, 10)
        );
    }
    util::check_log_ok(&w2_log, "after restore")?;
    restored.kill()?;
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

fn remove_image(ctx: &Ctx, img: &Path) {
    if !ctx.args.common.keep {
        let _ = fs::remove_dir_all(img);
    }
}

/// Runs ferry with `args`; a non-zero exit is an error quoting the command
/// and its stderr.
fn ferry(ctx: &Ctx, scratch: &Path, label: &str, args: &[&OsStr]) -> Result<util::CmdOutput> {
    util::run_ferry(&ctx.ferry, args, ctx.timeout, scratch, label)
}

/// The summary table (medians), the per-repetition table and failure notes.
fn tables(results: &[(u64, Result<Vec<Sample>>)]) -> (String, String, Vec<String>) {
    let mut summary = Table::new(&[
        "memory",
        "image size",
        "checkpoint ms",
        "frozen ms (leave-running)",
        "non-memory state ms",
        "restore ms",
        "restore wall ms",
        "restore state ms",
        "write GB/s",
        "read GB/s",
    ]);
    let mut details = Table::new(&[
        "memory",
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
        "LR image bytes",
        "restore ms",
        "restore state ms",
        "restore wall ms",
        "bytes read",
    ]);
    let mut failures = Vec::new();
    for (size, r) in results {
        let label = format!("{size} MiB");
        let samples = match r {
            Ok(s) => s,
            Err(e) => {
                let mut row = vec![label.clone(), "FAILED".into()];
                row.resize(10, "–".into());
                summary.row(row);
                failures.push(format!(
                    "**{label} failed:**\n\n```\n{}\n```\n",
                    format!("{e:#}").trim_end()
                ));
                continue;
            }
        };
        let med = |f: &dyn Fn(&Sample) -> f64| util::median(samples.iter().map(f));
        summary.row(vec![
            label.clone(),
            report::bytes(med(&|s| s.kill_image as f64) as u64),
            report::ms(med(&|s| s.kill.total_ms)),
            report::ms(med(&|s| s.lr.frozen_ms)),
            report::ms(med(&|s| s.kill.state_ms)),
            report::ms(med(&|s| s.restore.total_ms)),
            report::ms(med(&|s| s.restore_wall_ms)),
            report::ms(med(&|s| s.restore.state_ms)),
            report::rate(med(&|s| s.write_gbps())),
            report::rate(med(&|s| s.read_gbps())),
        ]);
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
                s.lr_image.to_string(),
                report::ms(s.restore.total_ms),
                report::ms(s.restore.state_ms),
                report::ms(s.restore_wall_ms),
                s.restore.bytes_read.to_string(),
            ]);
        }
    }
    let details = if details.is_empty() {
        String::new()
    } else {
        details.markdown()
    };
    (summary.markdown(), details, failures)
}

fn results_entry(
    ctx: &Ctx,
    work: &Path,
    summary: &str,
    details: &str,
    failures: &[String],
) -> String {
    let mut e = report::entry_header("cr (checkpoint/restore)", &ctx.ferry, work);
    e += &format!(
        "- {} repetition{} per size; medians\n\n",
        ctx.args.reps,
        if ctx.args.reps == 1 { "" } else { "s" }
    );
    e += summary;
    if !details.is_empty() {
        e += "\n<details><summary>Per repetition</summary>\n\n";
        e += details;
        e += "\n</details>\n";
    }
    for f in failures {
        e += "\n";
        e += f;
    }
    e
}
