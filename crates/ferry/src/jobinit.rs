//! Jobs in their own PID namespace (`ferry run`): a minimal init as pid 1
//! that reaps every orphan and forwards job-control signals to the job's
//! main process, and exits with the main process's status. Because the
//! namespace is the job's alone, every pid it uses is free again when it is
//! restored into a fresh namespace.

use crate::sys::{self, WaitStatus};
use std::ffi::OsString;
use std::process::{Child, Command};

/// Signals init forwards to the job's main process.
const FORWARDED: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn mask(sigs: &[i32]) -> u64 {
    sigs.iter().fold(0, |m, &s| m | (1u64 << (s - 1)))
}

/// What init runs: a new command, or (after a restore) a main process
/// that ferry is recreating with the given pid.
pub enum Main {
    Spawn(Vec<OsString>),
    Adopt(i32),
    /// Adopt the pid written to stdin (a [`PreInit`]): init starts before
    /// the image that names it has arrived.
    AdoptFromStdin,
}

/// The body of pid 1. Returns the exit code to leave with.
pub fn run_init(main: Main) -> i32 {
    let all = mask(&FORWARDED) | mask(&[libc::SIGCHLD]);
    if let Err(e) = sys::block_signals(all) {
        eprintln!("ferry init: cannot block signals: {e}");
        return 127;
    }
    let main_pid = match main {
        Main::Adopt(pid) => pid,
        Main::AdoptFromStdin => {
            let mut line = String::new();
            match std::io::stdin().read_line(&mut line) {
                Ok(_) => match line.trim().parse::<i32>() {
                    Ok(pid) if pid > 0 => pid,
                    // The restore was given up before it began.
                    _ => return 127,
                },
                Err(_) => return 127,
            }
        }
        Main::Spawn(argv) => {
            let Some((prog, args)) = argv.split_first() else {
                return 127;
            };
            let mut cmd = Command::new(prog);
            cmd.args(args);
            sys::reset_signals_on_spawn(&mut cmd);
            match cmd.spawn() {
                Ok(child) => child.id() as i32,
                Err(e) => {
                    eprintln!("ferry run: cannot start {}: {e}", prog.to_string_lossy());
                    return 127;
                }
            }
        }
    };
    loop {
        let sig = match sys::sigwait(all) {
            Ok(s) => s,
            Err(_) => continue,
        };
        if sig != libc::SIGCHLD {
            let _ = sys::kill(main_pid, sig);
            continue;
        }
        // Reap everything: orphans of the job end up here.
        while let Ok(Some((pid, status))) = sys::waitpid(-1, libc::WNOHANG | libc::__WALL) {
            if pid == main_pid {
                return match status {
                    WaitStatus::Exited(c) => c,
                    WaitStatus::Signaled(s) => 128 + s,
                    _ => continue,
                };
            }
        }
    }
}

/// Starts pid 1 of a new namespace: ferry's own binary in its hidden
/// `__init` mode, with the given arguments after it.
/// Where init (and a job it starts) gets stdin/stdout/stderr.
pub enum InitIo {
    /// The caller's own.
    Inherit,
    /// stdout and stderr appended to a file, stdin /dev/null.
    Log(std::fs::File),
    /// All /dev/null: a restored job brings its own descriptors, and init
    /// must not hold the caller's (a shell's `$(...)` would wait for it).
    Null,
    /// stdin from this pipe, stdout and stderr /dev/null.
    Pipe(std::os::fd::OwnedFd),
}

/// An init started ahead of a restore (the agent starts one when a
/// migration begins): spawning a process costs milliseconds that would
/// otherwise fall in the migration's downtime. It learns its main pid
/// through a pipe; dropped unused, it is killed and reaped.
#[derive(Debug)]
pub struct PreInit {
    child: Option<Child>,
    tx: Option<std::fs::File>,
}

impl PreInit {
    pub fn spawn() -> std::io::Result<PreInit> {
        let (rx, tx) = sys::pipe()?;
        let child = spawn_init(&["--adopt-stdin".into()], InitIo::Pipe(rx))?;
        Ok(PreInit {
            child: Some(child),
            tx: Some(std::fs::File::from(tx)),
        })
    }

    /// Tells init the pid of the job's main process (created next, in
    /// init's namespace) and hands init over.
    pub fn adopt(mut self, main: i32) -> std::io::Result<Child> {
        use std::io::Write;
        let mut tx = self
            .tx
            .take()
            .ok_or_else(|| std::io::Error::other("init already used"))?;
        tx.write_all(format!("{main}\n").as_bytes())?;
        self.child
            .take()
            .ok_or_else(|| std::io::Error::other("init already used"))
    }
}

impl Drop for PreInit {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn spawn_init(init_args: &[OsString], io: InitIo) -> std::io::Result<Child> {
    // unshare(CLONE_NEWPID) changes the namespace of the calling thread's
    // future children for good, and such a thread can no longer create
    // threads (clone3 EINVAL): do it on a thread of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            sys::unshare_pidns()?;
            spawn_init_here(init_args, io)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("init spawner panicked")))
    })
}

fn spawn_init_here(init_args: &[OsString], io: InitIo) -> std::io::Result<Child> {
    use std::process::Stdio;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("__init").args(init_args);
    match io {
        InitIo::Inherit => {}
        InitIo::Log(f) => {
            cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        }
        InitIo::Null => {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        InitIo::Pipe(fd) => {
            cmd.stdin(Stdio::from(fd))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
    }
    sys::close_extra_fds_on_spawn(&mut cmd);
    cmd.spawn()
}

/// The pid (as the caller sees it) of the first child of `init`, waiting
/// up to `timeout` for it to appear.
pub fn first_child(init: i32, timeout: std::time::Duration) -> Option<i32> {
    let t = std::time::Instant::now();
    while t.elapsed() < timeout {
        if let Ok(c) = crate::proc::children(init) {
            if let Some(&c) = c.first() {
                return Some(c);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    None
}
