//! End-to-end tests of `ferry checkpoint` and `ferry restore` on the
//! self-verifying workloads in `tests/workloads/` (see the README there).
//!
//! Every workload is run three ways:
//! - checkpoint (kills it) then restore in the foreground;
//! - checkpoint with --leave-running: the original finishes, then the image
//!   is restored as well (two PASS lines);
//! - checkpoint then restore --detach.
//!
//! plus refusals (a socket, stdout piped to us), a restore while the pid is
//! taken, and corrupted images.
//!
//! Needs root (skips otherwise). Tests run one at a time under
//! [`ptrace_lock`]; the whole file takes about a minute.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::thread::sleep;
use std::time::Duration;

/// Starts `name` and waits for READY.
fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Job {
    let mut job = Job::start(name, args, env);
    job.wait_ready(TIMEOUT);
    job
}

/// Checkpoints `job` into `img` (killing it unless `leave_running`) and
/// asserts success.
fn checkpoint(job: &Job, img: &std::path::Path, leave_running: bool) {
    let pid = job.pid().to_string();
    let mut args = vec!["checkpoint", pid.as_str(), "-D", img.to_str().unwrap()];
    if leave_running {
        args.push("--leave-running");
    }
    let out = ferry(&args);
    assert_ferry_ok(&out, "ferry checkpoint", job);
}

/// Reaps the original after a killing checkpoint: it must have died from
/// SIGKILL (not exited by itself, which would mean it was never frozen).
fn reap_killed(job: &mut Job) {
    let st = job.reap();
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "the checkpointed original should have been SIGKILLed, but it ended with {}; log:\n{}",
        describe(st),
        job.log()
    );
}

/// Foreground restore: ferry waits and exits with the workload's status.
fn restore_foreground(job: &Job, img: &std::path::Path) {
    let out = ferry(&["restore", "-D", img.to_str().unwrap()]);
    assert_ferry_ok(&out, "ferry restore", job);
    assert!(
        wait_gone(job.pid(), Duration::from_secs(10)),
        "pid {} still running after a foreground restore returned",
        job.pid()
    );
}

/// a) checkpoint (kill), restore in the foreground.
fn kill_restore(name: &str, args: &[&str]) {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    let mut job = start(name, args, &[]);
    sleep(random_delay());
    let img = job.path("img");
    checkpoint(&job, &img, false);
    reap_killed(&mut job);
    restore_foreground(&job, &img);
    assert_passes(&job.log(), name, 1);
}

/// b) checkpoint --leave-running: the original finishes and PASSes, then
/// the image is restored once its pid is free and PASSes too.
fn leave_running(name: &str, args: &[&str]) {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    let mut job = start(name, args, &[]);
    sleep(random_delay());
    let img = job.path("img");
    checkpoint(&job, &img, true);
    assert!(
        job.running(),
        "the original died after checkpoint --leave-running; log:\n{}",
        job.log()
    );
    let st = job.wait_exit(TIMEOUT);
    assert!(
        st.success(),
        "the original ended with {} after --leave-running; log:\n{}",
        describe(st),
        job.log()
    );
    assert_passes(&job.log(), name, 1);
    restore_foreground(&job, &img);
    assert_passes(&job.log(), name, 2);
}

/// c) restore --detach: prints the (original) pid and returns; the restored
/// process is not our child, so watch /proc until it is gone.
fn detach(name: &str, args: &[&str]) {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    let mut job = start(name, args, &[]);
    sleep(random_delay());
    let img = job.path("img");
    checkpoint(&job, &img, false);
    reap_killed(&mut job);
    let out = ferry(&["restore", "-D", img.to_str().unwrap(), "--detach"]);
    assert_ferry_ok(&out, "ferry restore --detach", &job);
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        printed.parse::<i32>().ok(),
        Some(job.pid()),
        "restore --detach should print the restored pid {}, printed {printed:?}",
        job.pid()
    );
    assert!(
        wait_gone(job.pid(), TIMEOUT),
        "detached restored {name} (pid {}) still running after {TIMEOUT:?}; log:\n{}",
        job.pid(),
        job.log()
    );
    assert_passes(&job.log(), name, 1);
}

macro_rules! workload_tests {
    ($($module:ident: $name:literal $(, $arg:literal)*;)*) => {$(
        mod $module {
            #[test]
            fn checkpoint_kill_restore() {
                super::kill_restore($name, &[$($arg),*]);
            }
            #[test]
            fn checkpoint_leave_running_then_restore() {
                super::leave_running($name, &[$($arg),*]);
            }
            #[test]
            fn restore_detach() {
                super::detach($name, &[$($arg),*]);
            }
        }
    )*};
}

workload_tests! {
    mem: "mem", "16";
    avx: "avx";
    signals: "signals";
    files: "files";
    blocked: "blocked";
    counter: "counter";
}

// ---------------------------------------------------------------------------
// d) refusals: the process must keep running, untouched, and still PASS.

/// Checkpoint of `job` must be refused naming `fd`; the process must go on.
fn expect_refusal(job: &mut Job, fd: i64, why: &str) {
    let img = job.path("img");
    let pid = job.pid().to_string();
    let out = ferry(&["checkpoint", pid.as_str(), "-D", img.to_str().unwrap()]);
    let line = assert_ferry_refused(&out, &format!("checkpoint of a process with {why}"));
    assert!(
        mentions_number(&line, fd),
        "the error should name fd {fd} ({why}): {line:?}"
    );
    assert!(
        job.running(),
        "{} died after a refused checkpoint; log:\n{}",
        job.name(),
        job.log()
    );
    // Not left frozen: 't' is a ptrace stop, 'T' a job-control stop.
    let state = proc_state(job.pid());
    assert!(
        !matches!(state, Some('t') | Some('T')),
        "{} left stopped (state {state:?}) after a refused checkpoint",
        job.name()
    );
    let st = job.wait_exit(TIMEOUT);
    assert!(
        st.success(),
        "{} ended with {} after a refused checkpoint; log:\n{}",
        job.name(),
        describe(st),
        job.log()
    );
    assert_passes(&job.log(), job.name(), 1);
}

#[test]
fn refuses_tcp_socket() {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    let mut job = start("socket", &[], &[]);
    assert!(
        job.log().contains("socket fd 42 "),
        "socket workload did not report its fd:\n{}",
        job.log()
    );
    sleep(random_delay());
    expect_refusal(&mut job, 42, "a listening TCP socket");
}

#[test]
fn refuses_stdout_pipe_to_outside() {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    let mut job = Job::start_piped("counter", &[], &[]);
    job.wait_ready(TIMEOUT);
    sleep(random_delay());
    expect_refusal(&mut job, 1, "stdout piped to another process");
}

// ---------------------------------------------------------------------------
// e) restoring while the pid is taken fails, and leaves the owner alone.

#[test]
fn restore_fails_while_pid_taken() {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    // Long enough that the original surely still runs during the restore.
    let mut job = start("counter", &[], &[("WORKLOAD_SECS", "6")]);
    sleep(Duration::from_millis(200));
    let img = job.path("img");
    checkpoint(&job, &img, true);
    assert!(
        job.running(),
        "original died after checkpoint --leave-running"
    );
    let out = ferry(&["restore", "-D", img.to_str().unwrap()]);
    let line = assert_ferry_refused(&out, "restore while the pid is in use");
    assert!(
        mentions_number(&line, job.pid() as i64),
        "the error should name pid {}: {line:?}",
        job.pid()
    );
    assert!(
        job.running(),
        "the original died when a restore onto its pid was attempted; log:\n{}",
        job.log()
    );
    let st = job.wait_exit(TIMEOUT);
    assert!(
        st.success(),
        "original ended with {}; log:\n{}",
        describe(st),
        job.log()
    );
    assert_passes(&job.log(), "counter", 1);
}

// ---------------------------------------------------------------------------
// f) corrupt images are rejected cleanly.

/// One way of damaging a file of an image.
type Mutation = Box<dyn Fn(&std::path::Path)>;

#[test]
fn corrupt_image_is_rejected() {
    if skip_unless_root() {
        return;
    }
    let _lock = ptrace_lock();
    let mut job = start("counter", &[], &[]);
    sleep(Duration::from_millis(200));
    let img = job.path("img");
    checkpoint(&job, &img, false);
    reap_killed(&mut job);
    let pid = job.pid();

    let files = files_below(&img);
    assert!(
        !files.is_empty(),
        "checkpoint wrote no files into {}",
        img.display()
    );
    let mut problems = Vec::new();
    let mut n = 0;
    for rel in &files {
        let len = std::fs::metadata(img.join(rel)).unwrap().len();
        let mut mutations: Vec<(String, Mutation)> = Vec::new();
        if len > 0 {
            mutations.push(("flip byte 0".into(), Box::new(|p| flip_byte(p, 0))));
            mutations.push((
                format!("flip byte {}", len / 2),
                Box::new(move |p| flip_byte(p, len / 2)),
            ));
            mutations.push((
                format!("truncate to {}", len / 2),
                Box::new(move |p| truncate(p, len / 2)),
            ));
        }
        for (what, mutate) in mutations {
            n += 1;
            let copy = job.path(&format!("corrupt-{n}"));
            copy_dir(&img, &copy);
            mutate(&copy.join(rel));
            let case = format!("{} with {what}", rel.display());
            let out = ferry(&["restore", "-D", copy.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
            if out.status.success() {
                problems.push(format!("{case}: restore succeeded"));
            } else if out.status.code().is_none() {
                problems.push(format!("{case}: ferry died: {}", describe(out.status)));
            } else if stderr.contains("panicked") {
                problems.push(format!("{case}: ferry panicked: {stderr}"));
            } else if lines != 1 {
                problems.push(format!(
                    "{case}: want one error line, got {lines}: {stderr}"
                ));
            }
            if !wait_gone(pid, Duration::from_secs(10)) {
                problems.push(format!("{case}: left pid {pid} behind"));
                job.kill();
            }
            let _ = std::fs::remove_dir_all(&copy);
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {n} corrupted images were not rejected cleanly:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(
        count_pass(&job.log(), "counter"),
        0,
        "a corrupted image ran to PASS:\n{}",
        job.log()
    );

    // The pristine image still restores: the failures above were the
    // corruption's doing.
    restore_foreground(&job, &img);
    assert_passes(&job.log(), "counter", 1);
}
