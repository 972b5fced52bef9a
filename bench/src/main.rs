//! `ferry-bench`: benchmarks for ferry, run against the real `ferry` binary
//! and self-verifying workloads (`tests/workloads`, `bench/workloads`).
//!
//! Each benchmark is a subcommand with its own module (`cr` for
//! checkpoint/restore, `tree` for threads and process trees); what they
//! share — spawning and reaping processes and process trees with bounded
//! waits, cleanup guards, JSON parsing, tables, machine facts and
//! `bench/RESULTS.md` — lives in `util` and `report`. To add one (say
//! live migration), write `src/<name>.rs` with an `Args` struct that
//! flattens [`util::CommonArgs`] and a `run(&Args) -> Result<()>`, and add a
//! variant to [`Cmd`].

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cr;
mod migrate;
mod postcopy;
mod report;
mod tree;
mod util;
mod zero;

#[derive(Parser)]
#[command(
    name = "ferry-bench",
    version,
    about = "Benchmarks for ferry (needs root and a built ferry binary)",
    long_about = "Benchmarks for ferry. Every benchmark drives the real `ferry` binary \
(default: <workspace>/target/release/ferry, so run `cargo build --release` first) against \
the workloads in tests/workloads, prints a Markdown table of medians on stdout and, with \
--record, appends it with the machine's description to bench/RESULTS.md.\n\n\
Needs root (ferry does). Every process a benchmark starts is killed and reaped on every \
exit path, including Ctrl-C; all waits are bounded.",
    after_help = "Example:\n  \
cargo build --release -p ferry-cli -p ferry-bench\n  \
sudo target/release/ferry-bench cr --sizes 16,1024 --reps 3 --record\n  \
sudo target/release/ferry-bench tree --reps 3 --record\n  \
sudo target/release/ferry-bench migrate --record\n  \
sudo target/release/ferry-bench zero --record"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Checkpoint and restore timings and throughput of the `mem` workload.
    #[command(long_about = cr::LONG_ABOUT)]
    Cr(cr::Args),
    /// Cost of extra threads and processes: checkpoint/restore of `fanout` trees.
    #[command(long_about = tree::LONG_ABOUT)]
    Tree(tree::Args),
    /// Live migration between two network namespaces: downtime, slowdown, patterns.
    #[command(long_about = migrate::LONG_ABOUT)]
    Migrate(migrate::Args),
    /// The freed-memory library: its effect on live migration, its overhead.
    #[command(long_about = zero::LONG_ABOUT)]
    Zero(zero::Args),
    /// Post-copy and hybrid beside pre-copy and stop-copy: resume time, faults, slowdown.
    #[command(long_about = postcopy::LONG_ABOUT)]
    Postcopy(postcopy::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(i) = e.downcast_ref::<util::Interrupted>() {
                eprintln!("ferry-bench: {i}; every started process was killed");
                return ExitCode::from(130);
            }
            eprintln!("ferry-bench: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    util::install_signal_handlers()?;
    util::become_subreaper()?;
    report::note_start_load();
    match cli.cmd {
        Cmd::Cr(args) => cr::run(&args),
        Cmd::Tree(args) => tree::run(&args),
        Cmd::Migrate(args) => migrate::run(&args),
        Cmd::Zero(args) => zero::run(&args),
        Cmd::Postcopy(args) => postcopy::run(&args),
    }
}
