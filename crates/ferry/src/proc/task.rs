//! Small per-process /proc entries: threads, fds, links, comm, auxv,
//! personality, children.

use super::{hex_u64, pid_path, read_bytes, read_text, ProcError};
use std::fs;
use std::path::{Path, PathBuf};

/// Whether /proc/PID exists (a zombie still does). Thread ids also
/// "exist": /proc/TID is reachable though not listed.
pub fn exists(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// The thread ids of the process, sorted, from /proc/PID/task. Threads
/// come and go unless the process is frozen, so this is a snapshot.
pub fn list_tids(pid: i32) -> Result<Vec<i32>, ProcError> {
    list_numeric_dir(pid, &pid_path(pid, "task"))
}

/// The open fd numbers of the process, sorted, from /proc/PID/fd.
pub fn list_fds(pid: i32) -> Result<Vec<i32>, ProcError> {
    list_numeric_dir(pid, &pid_path(pid, "fd"))
}

/// What /proc/PID/fd/FD points to: a path (maybe with " (deleted)"), or
/// `pipe:[INO]`, `socket:[INO]`, `anon_inode:[eventfd]`, ... Non-UTF-8
/// bytes are replaced.
pub fn fd_target(pid: i32, fd: i32) -> Result<String, ProcError> {
    let target = read_link(pid, &format!("fd/{fd}"))?;
    Ok(target.to_string_lossy().into_owned())
}

/// /proc/PID/exe: the executable (ENOENT, as `Io`, for kernel threads).
pub fn exe(pid: i32) -> Result<PathBuf, ProcError> {
    read_link(pid, "exe")
}

/// /proc/PID/cwd: the working directory.
pub fn cwd(pid: i32) -> Result<PathBuf, ProcError> {
    read_link(pid, "cwd")
}

/// /proc/PID/root: the root directory (differs from "/" after chroot).
pub fn root(pid: i32) -> Result<PathBuf, ProcError> {
    read_link(pid, "root")
}

/// The raw auxiliary vector, /proc/PID/auxv: (u64 type, u64 value) pairs
/// in native byte order, ending with AT_NULL.
pub fn read_auxv(pid: i32) -> Result<Vec<u8>, ProcError> {
    read_bytes(pid, &pid_path(pid, "auxv"))
}

/// /proc/PID/comm without its trailing newline (the comm itself may end
/// with spaces, so nothing else is trimmed).
pub fn read_comm(pid: i32) -> Result<String, ProcError> {
    let text = read_text(pid, &pid_path(pid, "comm"))?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

/// The execution domain flags, /proc/PID/personality (printed in hex);
/// e.g. ADDR_NO_RANDOMIZE = 0x0040000.
pub fn read_personality(pid: i32) -> Result<u32, ProcError> {
    let path = pid_path(pid, "personality");
    let text = read_text(pid, &path)?;
    let value = text.trim();
    hex_u64(value)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| ProcError::parse(&path, 1, format!("bad personality {value:?}")))
}

/// The pids of the process's children, sorted: the union of
/// /proc/PID/task/*/children, because a child belongs to the thread that
/// forked it.
pub fn children(pid: i32) -> Result<Vec<i32>, ProcError> {
    let mut out = Vec::new();
    for tid in list_tids(pid)? {
        let path = pid_path(pid, &format!("task/{tid}/children"));
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            // That thread exited after it was listed: it has no children
            // left to report (they were reparented).
            Err(e) if is_vanished(&e) && exists(pid) => continue,
            Err(e) => return Err(ProcError::from_io(pid, &path, e)),
        };
        for word in text.split_ascii_whitespace() {
            let child = word
                .parse()
                .map_err(|_| ProcError::parse(&path, 1, format!("bad pid {word:?}")))?;
            out.push(child);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn is_vanished(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn read_link(pid: i32, rel: &str) -> Result<PathBuf, ProcError> {
    let path = pid_path(pid, rel);
    fs::read_link(&path).map_err(|e| ProcError::from_io(pid, &path, e))
}

fn list_numeric_dir(pid: i32, dir: &Path) -> Result<Vec<i32>, ProcError> {
    let io_err = |e| ProcError::from_io(pid, dir, e);
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        if let Some(n) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn me() -> i32 {
        std::process::id() as i32
    }

    fn my_tid() -> i32 {
        let link = fs::read_link("/proc/thread-self").unwrap();
        link.to_str()
            .and_then(|s| s.rsplit('/').next())
            .and_then(|s| s.parse().ok())
            .unwrap()
    }

    #[test]
    fn existence() {
        assert!(exists(me()) && exists(1));
        assert!(!exists(0) && !exists(-1) && !exists(i32::MAX));
    }

    #[test]
    fn tids_include_self_and_are_sorted() {
        let handle = std::thread::spawn(my_tid);
        let other = handle.join().unwrap();
        let tids = list_tids(me()).unwrap();
        assert!(tids.contains(&me()) && tids.contains(&my_tid()));
        assert!(!tids.contains(&other), "joined thread {other} still listed");
        assert!(tids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn fds_and_targets() {
        let file = fs::File::open("/proc/self/cmdline").unwrap();
        let fd = file.as_raw_fd();
        let fds = list_fds(me()).unwrap();
        assert!(fds.contains(&fd) && fds.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            fd_target(me(), fd).unwrap(),
            format!("/proc/{}/cmdline", me())
        );

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let target = fd_target(me(), a.as_raw_fd()).unwrap();
        assert!(
            target.starts_with("socket:[") && target.ends_with(']'),
            "{target}"
        );

        assert!(matches!(
            fd_target(me(), 1_000_000),
            Err(ProcError::Io { .. })
        ));
    }

    #[test]
    fn links() {
        assert_eq!(exe(me()).unwrap(), std::env::current_exe().unwrap());
        assert_eq!(cwd(me()).unwrap(), std::env::current_dir().unwrap());
        assert_eq!(root(me()).unwrap(), Path::new("/"));
    }

    #[test]
    fn auxv_comm_personality() {
        let auxv = read_auxv(me()).unwrap();
        assert!(auxv.len() >= 32 && auxv.len() % 16 == 0);
        assert!(
            auxv[auxv.len() - 16..].iter().all(|b| *b == 0),
            "AT_NULL last"
        );

        let comm = read_comm(me()).unwrap();
        assert!(!comm.is_empty() && comm.len() <= 15 && !comm.ends_with('\n'));
        assert_eq!(comm, super::super::read_stat(me()).unwrap().comm);

        // Nothing sets a personality on test binaries; only the domain
        // (PER_LINUX = 0) in the low byte is certain.
        assert_eq!(read_personality(me()).unwrap() & 0xff, 0);
    }

    #[test]
    fn children_of_any_thread() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let kids = children(me());
        let _ = child.kill();
        let _ = child.wait();
        let kids = kids.unwrap();
        assert!(kids.contains(&(child.id() as i32)), "{kids:?}");
        assert!(kids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn gone() {
        for r in [
            list_tids(i32::MAX).err(),
            list_fds(i32::MAX).err(),
            exe(i32::MAX).err(),
            read_comm(i32::MAX).err(),
            read_personality(i32::MAX).err(),
            children(i32::MAX).err(),
        ] {
            assert!(
                matches!(r, Some(ProcError::Gone { pid: i32::MAX })),
                "{r:?}"
            );
        }
    }
}
