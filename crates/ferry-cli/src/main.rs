//! `ferry`: checkpoint, restore and live-migrate running Linux
//! processes. A thin layer over the `ferry` library: parse, call, report.
#![deny(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod fmt;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Checkpoint, restore and live-migrate running Linux process trees",
    long_about = "ferry freezes a running, unmodified Linux process, captures its whole state \
(memory, registers with the full AVX/AVX-512 state, signals, timers, files, pipes) and \
rebuilds it later with the same PID, on this node or another with the same kernel.\n\n\
It needs root (ptrace of other processes, clone3 with set_tid, PR_SET_MM_MAP).\n\n\
Environment: FERRY_LOG sets the log filter (e.g. FERRY_LOG=debug); logs go to stderr.",
    after_help = "Examples:\n  \
ferry checkpoint 4242 -D /var/lib/ferry/job1            # image the job, then kill it\n  \
ferry checkpoint 4242 -D img --leave-running            # image it and let it run on\n  \
ferry restore -D /var/lib/ferry/job1 && echo finished   # run it again, wait for its exit\n  \
pid=$(ferry restore -D img --detach)                    # run it again in the background"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Freeze a process and write its image to a directory.
    #[command(
        long_about = "Freeze PID and all its descendants (every thread of every \
process, at once) with ptrace, write their complete state into DIR (created if needed), \
then kill them — or, with --leave-running, let them continue exactly as before. Given \
the PID of a job started with `ferry run`, takes the whole job (its PID namespace).\n\n\
Prints how long the process was frozen and how much was written. If the process holds \
something ferry cannot capture yet (a socket, a terminal, SysV IPC, memory shared with \
a process outside the checkpoint, ...), nothing is written, the process keeps running \
untouched, and ferry exits non-zero with one line naming the descriptor or address \
range.\n\n\
What is captured: all memory areas (anonymous, heap, stack, private and shared file \
mappings, PROT_NONE and guard regions, madvise flags; pages never touched are not \
stored, zero pages are stored as a flag), registers including the full xstate, signal \
handlers, masks, pending signals, sigaltstack, interval timers, rseq, TID address and \
robust list, regular files with offsets and flags, deleted-but-open files (their \
contents go into the image), /dev/null and similar devices, shared open files (dup), \
pipes with their buffered data, cwd, umask, rlimits, personality, comm, the mm fields \
and /proc/PID/exe.\n\n\
Threads keep their TIDs, processes their PIDs and parent links; zombies, sessions and \
process groups inside the tree, pipes between its processes and shared memory are \
restored. Refused in this version: POSIX timers (timer_create), sockets, terminals, \
eventfd/epoll/signalfd/timerfd/inotify, SysV IPC."
    )]
    Checkpoint {
        /// Process to checkpoint.
        pid: i32,
        /// Image directory to write (created if missing).
        #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
        dir: PathBuf,
        /// Let the process continue after the image is written.
        #[arg(long)]
        leave_running: bool,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a process from an image and let it run.
    #[command(
        long_about = "Rebuild the process tree imaged in DIR, with its original PIDs and \
TIDs — the root as a child of ferry, every other process as a child of its original \
parent — and let it continue where it stopped. A job started with `ferry run` is \
restored into a fresh PID namespace with a new init (same PIDs inside).\n\n\
Without --detach, ferry waits for the process and exits with its exit status (128+N if \
it was killed by signal N), so `ferry restore -D img && echo ok` works. With --detach it \
prints the restored PID on stdout and returns once the process runs.\n\n\
Outside a `ferry run` namespace the PIDs must be free: if another process holds one, \
restore fails with a clear message and changes nothing. The files the processes had \
open must exist at their paths (deleted files are recreated from the image). A corrupt \
or truncated image is refused.\n\n\
A tree whose session or process-group leader is outside it joins the session and \
process group of `ferry restore`."
    )]
    Restore {
        /// Image directory written by `ferry checkpoint`.
        #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
        dir: PathBuf,
        /// Print the PID and return instead of waiting for the process.
        #[arg(long)]
        detach: bool,
        /// Print the restore report as JSON on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Run a command as a job that ferry can always restore: in its own PID namespace.
    #[command(
        long_about = "Start CMD in a new PID namespace whose pid 1 is a minimal init \
(it reaps orphans and forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the \
job). Because the namespace belongs to the job alone, its PIDs are always free when the \
job is restored: `ferry checkpoint` given the job's PID takes the whole job, and `ferry \
restore` recreates the namespace with the same PIDs inside.\n\n\
In the foreground, waits for the job and exits with its status. With --detach, prints the \
PID of the job's main process as the caller sees it and returns. The job inherits stdin, \
stdout and stderr; redirect them to files to checkpoint it (ferry refuses terminals and \
pipes to processes outside the job)."
    )]
    Run {
        /// Print the job's PID and return instead of waiting.
        #[arg(long)]
        detach: bool,
        /// Append the job's stdout and stderr to FILE (stdin: /dev/null).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// Run the job with ferry's freed-memory library (LD_PRELOAD): memory
        /// it frees is zeroed (`zero`) or given back to the kernel
        /// (`release`, the default), so migrations do not copy stale data.
        #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "release",
              value_parser = ["zero", "release"])]
        zero_freed: Option<String>,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        cmd: Vec<std::ffi::OsString>,
    },
    /// Print the path of libferry_zero.so, the freed-memory library.
    #[command(
        long_about = "Print the path of libferry_zero.so, the LD_PRELOAD library that \
zeroes (FERRY_ZERO=zero) or releases to the kernel (FERRY_ZERO=release, the default) the \
memory a job frees, so that live migration sends zero flags instead of stale data. Use it \
for jobs not started with `ferry run --zero-freed`:\n\n  \
LD_PRELOAD=$(ferry zero-lib-path) FERRY_ZERO=zero ./job\n\n\
FERRY_ZERO_MIN sets the smallest freed chunk the library bothers with (bytes)."
    )]
    ZeroLibPath,
    /// pid 1 of a job's namespace (internal).
    #[command(name = "__init", hide = true)]
    Init {
        /// Wait for this (restored) pid instead of starting a command.
        #[arg(long)]
        adopt: Option<i32>,
        /// Read the pid to wait for from stdin (an init started early).
        #[arg(long, conflicts_with = "adopt")]
        adopt_stdin: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<std::ffi::OsString>,
    },
    /// Receive migrations on this node: the per-node agent.
    #[command(
        long_about = "Listen for live migrations (`ferry migrate ... --to ADDR:PORT`), \
receive each job's memory while it still runs on its source node, and restore it here when \
the source commits. Restored jobs run in a fresh PID namespace of their own (so their PIDs \
are always free) and are reaped by the agent.\n\n\
Peers must prove they hold the secret in --token-file (HMAC challenge-response in both \
directions; the token never crosses the network). Without a token file the agent only \
listens on a loopback address. The file must not be readable by other users (chmod 600).\n\n\
Runs until SIGINT or SIGTERM. A bad peer (garbage, wrong token, dropped link) only ends \
its own session. Logs go to stderr (FERRY_LOG=info for one line per migration)."
    )]
    Agent {
        /// Address and port to listen on.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7707")]
        listen: String,
        /// File holding the shared secret (required for non-loopback addresses).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Where incoming jobs' staged files go during a restore.
        #[arg(long, value_name = "DIR", default_value = "/var/tmp/ferry-agent")]
        work_dir: PathBuf,
    },
    /// Live-migrate a running job to another node's agent.
    #[command(
        long_about = "Move the running job PID (and all its descendants) to the agent at \
ADDR:PORT while it keeps running: its memory is copied while it runs, the pages it writes \
are tracked (userfaultfd write-protect; --tracker) and sent again, and when the convergence \
controller says so the job is frozen, the rest of its memory and all other state are sent, \
and the target restores it. The job is killed here only once the target reports that it \
runs; if anything fails before that (link down, target gone or refusing, restore failure, \
Ctrl-C) the job keeps running here exactly as before and ferry exits non-zero.\n\n\
Controllers (when to stop the live phase):\n  \
adaptive        (default) the memory-update patterns of Ibrahim et al. (SC'11), sampled \
every --interval after a first full pass: a = modified pages per interval stable, b = all \
dirty pages sent in less than one interval, c = >= 90% of the pages sent were already sent \
the round before\n  \
downtime:<ms>   stop when remaining bytes / measured bandwidth < <ms> (the KVM rule)\n  \
iterations:<n>  stop after n rounds, when < 50 pages are dirty, or after sending 3x the \
memory (the Xen rule)\n  \
stop-copy       no live phase: freeze and copy everything (checkpoint/restart)\n\n\
Jobs to migrate between two nodes of one host should be started with `ferry run`. Files \
the job has open must exist on the target at the same paths (shared storage). A progress \
line per round goes to stderr; the report goes to stdout (--json: one JSON object)."
    )]
    Migrate {
        /// Job to migrate (e.g. the PID printed by `ferry run --detach`).
        pid: i32,
        /// The target agent.
        #[arg(long, value_name = "ADDR:PORT")]
        to: String,
        /// File holding the shared secret (as given to the agent).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// precopy, postcopy or hybrid (see above).
        #[arg(long, default_value = "precopy")]
        mode: String,
        /// When to stop the live phase: adaptive, downtime:<ms>, iterations:<n>, stop-copy.
        #[arg(long, default_value = "adaptive")]
        controller: String,
        /// Upper bound on live rounds (any controller).
        #[arg(long)]
        max_iterations: Option<u32>,
        /// Sampling interval of the adaptive controller.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        interval_ms: u64,
        /// Cap on the total sending rate, e.g. 1G, 500M, 100MiB/s, 1gbit.
        #[arg(long, value_name = "RATE")]
        max_bandwidth: Option<String>,
        /// Page compression on the wire: none, lz4, zstd, zstd:<level>.
        #[arg(long, default_value = "lz4")]
        compress: String,
        /// Extra TCP connections for pages (0: pages on the control connection).
        #[arg(long, default_value_t = 0)]
        streams: u16,
        /// Dirty-page tracker: auto, uffd-wp, soft-dirty, hash.
        #[arg(long, default_value = "auto")]
        tracker: String,
        /// Seconds to wait for a connection or a reply before giving up.
        #[arg(long, default_value_t = 20)]
        timeout: u64,
        /// Pre-copy: have the target copy all of the job's memory into place
        /// before resuming it. By default the target resumes the job at once
        /// and fills its private memory from the pages it already holds,
        /// faulted pages first (the downtime no longer includes that copy;
        /// if the target agent dies in that fraction of a second, the job
        /// dies with it).
        #[arg(long)]
        eager_restore: bool,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print an image's metadata (processes, areas, files, signals) as JSON.
    #[command(
        long_about = "Validate the image in DIR (checksums, bounds, references) and \
print its inventory as pretty JSON on stdout: the machine it came from, every process \
with its threads and registers, memory areas with their page runs, descriptors, pipes \
and blobs. Page contents are not printed. Exits non-zero if the image is corrupt."
    )]
    Inspect {
        /// Image directory.
        #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The error chain on one line, without repeating a cause that a message
/// already ends with (library errors carry their source in the message).
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.ends_with(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out.replace('\n', " ")
}

/// libferry_zero.so: next to the ferry binary (a cargo build), or in the
/// usual install locations.
fn zero_lib_path() -> Result<PathBuf> {
    const NAME: &str = "libferry_zero.so";
    let exe = std::env::current_exe().context("cannot find ferry's own path")?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join(NAME));
        candidates.push(dir.join("../lib/ferry").join(NAME));
    }
    candidates.push(PathBuf::from("/usr/local/lib/ferry").join(NAME));
    candidates.push(PathBuf::from("/usr/lib/ferry").join(NAME));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or(p))
        .with_context(|| {
            format!(
                "{NAME} not found next to {} (build it: cargo build --release -p ferry-zero)",
                exe.display()
            )
        })
}

fn exit_code_of(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(s)) => ExitCode::from(128 + s as u8),
        _ => ExitCode::from(1),
    }
}

fn require_root() -> Result<()> {
    if ferry::sys::geteuid() != 0 {
        bail!("ferry needs root (ptrace, clone3 set_tid, PR_SET_MM_MAP); run it with sudo");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Checkpoint {
            pid,
            dir,
            leave_running,
            json,
        } => {
            require_root()?;
            let opts = ferry::checkpoint::Options { leave_running };
            let rep = ferry::checkpoint::checkpoint(pid, &dir, &opts)
                .with_context(|| format!("checkpoint of pid {pid} failed"))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&fmt::checkpoint_json(&rep, &dir))?
                );
            } else {
                println!("{}", fmt::checkpoint_line(&rep, &dir));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ZeroLibPath => {
            println!("{}", zero_lib_path()?.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            detach,
            log,
            zero_freed,
            cmd,
        } => {
            require_root()?;
            if let Some(mode) = &zero_freed {
                // Inherited by init and from it by the job.
                let lib = zero_lib_path()?;
                std::env::set_var("LD_PRELOAD", lib);
                std::env::set_var("FERRY_ZERO", mode);
            }
            let mut args = vec![std::ffi::OsString::from("--")];
            args.extend(cmd);
            let io = match log {
                Some(p) => ferry::jobinit::InitIo::Log(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)
                        .with_context(|| format!("cannot open log file {}", p.display()))?,
                ),
                None => ferry::jobinit::InitIo::Inherit,
            };
            let mut init = ferry::jobinit::spawn_init(&args, io)
                .context("cannot start the job's namespace")?;
            if detach {
                let pid = ferry::jobinit::first_child(
                    init.id() as i32,
                    std::time::Duration::from_secs(10),
                )
                .context("the job did not start")?;
                println!("{pid}");
                return Ok(ExitCode::SUCCESS);
            }
            ferry::sys::ignore_interactive_signals();
            let status = init.wait().context("waiting for the job")?;
            Ok(exit_code_of(status))
        }
        Cmd::Init {
            adopt,
            adopt_stdin,
            cmd,
        } => {
            let main = match adopt {
                Some(pid) => ferry::jobinit::Main::Adopt(pid),
                None if adopt_stdin => ferry::jobinit::Main::AdoptFromStdin,
                None => ferry::jobinit::Main::Spawn(cmd),
            };
            Ok(ExitCode::from(ferry::jobinit::run_init(main) as u8))
        }
        Cmd::Agent {
            listen,
            token_file,
            work_dir,
        } => {
            require_root()?;
            let addr: std::net::SocketAddr = listen
                .parse()
                .with_context(|| format!("--listen {listen}: expected ADDR:PORT"))?;
            let token = match &token_file {
                Some(f) => ferry::wire::load_token(f)?,
                None if addr.ip().is_loopback() => {
                    ferry::wire::AuthToken::new(ferry::migrate::agent::LOOPBACK_TOKEN)?
                }
                None => bail!("--listen {addr} is not a loopback address: give --token-file so peers must authenticate"),
            };
            let stop = ferry::sys::stop_flag_on_signals();
            let cfg = ferry::migrate::agent::AgentConfig {
                listen: addr,
                token,
                work_dir,
            };
            ferry::migrate::agent::run(cfg, stop, |a| eprintln!("ferry agent: listening on {a}"))?;
            eprintln!("ferry agent: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Migrate {
            pid,
            to,
            token_file,
            mode,
            controller,
            max_iterations,
            interval_ms,
            max_bandwidth,
            compress,
            streams,
            tracker,
            timeout,
            eager_restore,
            json,
        } => {
            require_root()?;
            let mut copts = ferry::migrate::controller::ControllerOptions {
                max_iterations,
                ..Default::default()
            };
            copts.adaptive.interval = std::time::Duration::from_millis(interval_ms.max(1));
            let controller = ferry::migrate::controller::parse(&controller, &copts)?;
            let mode: ferry::wire::MigrationMode =
                mode.parse().map_err(|e| anyhow::anyhow!("--mode: {e}"))?;
            let compression: ferry::wire::Compression = compress
                .parse()
                .map_err(|e| anyhow::anyhow!("--compress {compress}: {e}"))?;
            let max_bandwidth = max_bandwidth
                .map(|b| {
                    ferry::wire::parse_bandwidth(&b)
                        .map_err(|e| anyhow::anyhow!("--max-bandwidth {b}: {e}"))
                })
                .transpose()?;
            let token = match &token_file {
                Some(f) => ferry::wire::load_token(f)?,
                None => ferry::wire::AuthToken::new(ferry::migrate::agent::LOOPBACK_TOKEN)?,
            };
            let opts = ferry::migrate::source::Options {
                to: to.clone(),
                token,
                controller,
                compression,
                streams,
                max_bandwidth,
                tracker,
                timeout: std::time::Duration::from_secs(timeout.max(1)),
                mode,
                lazy_restore: !eager_restore,
            };
            let stop = ferry::sys::stop_flag_on_signals();
            let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let c2 = cancel.clone();
            std::thread::spawn(move || loop {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c2.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            });
            let mut progress =
                |p: &ferry::migrate::source::Progress| eprintln!("{}", fmt::progress_line(p));
            match ferry::migrate::source::migrate(pid, opts, cancel, &mut progress) {
                Ok(rep) => {
                    if json {
                        println!("{}", serde_json::to_string(&rep)?);
                    } else {
                        println!("{}", fmt::migration_summary(&rep));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(ferry::migrate::MigrateError::Cancelled) => {
                    eprintln!(
                        "ferry: migration of pid {pid} cancelled; the job keeps running here"
                    );
                    Ok(ExitCode::from(130))
                }
                Err(e) => Err(anyhow::Error::new(e).context(format!(
                    "migration of pid {pid} to {to} failed; the job keeps running here"
                ))),
            }
        }
        Cmd::Inspect { dir } => {
            let img = ferry::image::ImageDir::new(&dir, false)?;
            let inv = img.read_inventory()?;
            println!("{}", serde_json::to_string_pretty(&inv)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore { dir, detach, json } => {
            require_root()?;
            let rep = ferry::restore::restore(&dir)
                .with_context(|| format!("restore from {} failed", dir.display()))?;
            if json {
                eprintln!("{}", serde_json::to_string(&fmt::restore_json(&rep))?);
            }
            if detach {
                println!("{}", rep.pid);
                return Ok(ExitCode::SUCCESS);
            }
            tracing::info!("{}", fmt::restore_line(&rep));
            ferry::sys::ignore_interactive_signals();
            let status = ferry::sys::waitpid(rep.wait_pid, 0)
                .with_context(|| format!("waiting for pid {}", rep.wait_pid))?;
            Ok(match status {
                Some((_, ferry::sys::WaitStatus::Exited(c))) => ExitCode::from(c as u8),
                Some((_, ferry::sys::WaitStatus::Signaled(s))) => ExitCode::from(128 + s as u8),
                _ => ExitCode::from(1),
            })
        }
    }
}
