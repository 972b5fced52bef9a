//! /proc/PID/fdinfo/FD (Documentation/filesystems/proc.rst, section 3.8).

use super::{dec_u64, oct_u32, pid_path, read_text, ProcError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The common fields of an fdinfo file plus the type-specific lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdInfo {
    /// `pos`: file offset.
    pub pos: u64,
    /// `flags`: open flags (printed in octal), including O_CLOEXEC.
    pub flags: u32,
    /// `mnt_id`: mount id, as in /proc/PID/mountinfo (0 if absent; memfd
    /// and other internal mounts show 0 too).
    pub mnt_id: u64,
    /// `ino`: inode number (0 if absent, before Linux 5.14).
    pub ino: u64,
    /// Every other line as (key, value), both trimmed and in file order:
    /// `eventfd-count`, `tfd` (epoll; the value holds further `k: v` pairs),
    /// `sigmask`, `clockid`, `inotify wd`, ... A line without ':' is kept
    /// with an empty value.
    pub extra: Vec<(String, String)>,
}

impl FdInfo {
    /// The value of the first extra line with this key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses fdinfo text; errors name the file "fdinfo".
pub fn parse_fdinfo(text: &str) -> Result<FdInfo, ProcError> {
    parse_fdinfo_at(Path::new("fdinfo"), text)
}

/// Parses fdinfo text; errors name `path`. `pos` and `flags` are required.
pub fn parse_fdinfo_at(path: &Path, text: &str) -> Result<FdInfo, ProcError> {
    let mut info = FdInfo::default();
    let (mut have_pos, mut have_flags) = (false, false);

    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (key, value) = line.split_once(':').unwrap_or((line, ""));
        let (key, value) = (key.trim(), value.trim());
        let bad = || ProcError::parse(path, i + 1, format!("bad {key}: {value:?}"));
        match key {
            "pos" => {
                info.pos = dec_u64(value).ok_or_else(bad)?;
                have_pos = true;
            }
            "flags" => {
                info.flags = oct_u32(value).ok_or_else(bad)?;
                have_flags = true;
            }
            "mnt_id" => info.mnt_id = dec_u64(value).ok_or_else(bad)?,
            "ino" => info.ino = dec_u64(value).ok_or_else(bad)?,
            _ => info.extra.push((key.to_string(), value.to_string())),
        }
    }

    if !have_pos {
        return Err(ProcError::parse(path, 0, "missing pos"));
    }
    if !have_flags {
        return Err(ProcError::parse(path, 0, "missing flags"));
    }
    Ok(info)
}

/// Reads /proc/PID/fdinfo/FD. A closed fd of a live process is an
/// [`ProcError::Io`] with ENOENT.
pub fn read_fdinfo(pid: i32, fd: i32) -> Result<FdInfo, ProcError> {
    let path = pid_path(pid, &format!("fdinfo/{fd}"));
    parse_fdinfo_at(&path, &read_text(pid, &path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;

    /// /proc/self/fdinfo/0 (stdin = /dev/null) on Linux 6.18.
    const REAL: &str = "pos:\t0\nflags:\t0100000\nmnt_id:\t24\nino:\t3\n";

    /// An eventfd and an epoll fd watching it, from the same machine.
    const EVENTFD: &str = "pos:\t0\nflags:\t02004002\nmnt_id:\t17\nino:\t18\neventfd-count:                5\neventfd-id: 1\neventfd-semaphore: 0\n";
    const EPOLL: &str = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t18\ntfd:        6 events:       19 data:               2a  pos:0 ino:12 sdev:10\n";
    const TIMERFD: &str = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t18\nclockid: 1\nticks: 0\nsettime flags: 00\nit_value: (99, 982322506)\nit_interval: (1, 0)\n";
    const INOTIFY: &str = "pos:\t0\nflags:\t00\nmnt_id:\t17\nino:\t18\ninotify wd:1 ino:3c4a7 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a7c4030000000000\n";

    #[test]
    fn real_sample() {
        let f = parse_fdinfo(REAL).unwrap();
        assert_eq!(
            f,
            FdInfo {
                pos: 0,
                // The kernel's O_LARGEFILE; libc's constant is 0 on x86_64.
                flags: 0o100000,
                mnt_id: 24,
                ino: 3,
                extra: vec![]
            }
        );
    }

    #[test]
    fn type_specific_lines() {
        let f = parse_fdinfo(EVENTFD).unwrap();
        let want = (libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_RDWR) as u32;
        assert_eq!(f.flags, want);
        assert_eq!(f.get("eventfd-count"), Some("5"));
        assert_eq!(f.extra.len(), 3);

        let f = parse_fdinfo(EPOLL).unwrap();
        let tfd = f.get("tfd").unwrap();
        assert!(tfd.starts_with("6 events:") && tfd.ends_with("sdev:10"));

        let f = parse_fdinfo(TIMERFD).unwrap();
        assert_eq!(f.get("settime flags"), Some("00"));
        assert_eq!(f.get("it_value"), Some("(99, 982322506)"));

        let f = parse_fdinfo(INOTIFY).unwrap();
        assert_eq!(f.extra[0].0, "inotify wd");
        assert!(f.extra[0].1.starts_with("1 ino:3c4a7"));

        let f = parse_fdinfo(&format!("{REAL}odd line\n")).unwrap();
        assert_eq!(f.extra, [("odd line".to_string(), String::new())]);
    }

    #[test]
    fn malformed_is_error() {
        for (bad, line) in [
            ("pos:\tx\nflags:\t0\n", 1),
            ("pos:\t0\nflags:\t08\n", 2),
            ("pos:\t0\nflags:\t0\nmnt_id:\t-1\n", 3),
            ("pos:\t0\nflags:\t0\nino:\t\n", 3),
            ("flags:\t0\n", 0),
            ("pos:\t0\n", 0),
            ("", 0),
        ] {
            match parse_fdinfo(bad) {
                Err(ProcError::Parse { line: l, .. }) => assert_eq!(l, line, "{bad:?}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn live_self() {
        let mut file = std::fs::File::open("/proc/self/status").unwrap();
        let mut buf = [0u8; 10];
        file.read_exact(&mut buf).unwrap();
        file.seek(SeekFrom::Start(7)).unwrap();
        let pid = std::process::id() as i32;
        let f = read_fdinfo(pid, file.as_raw_fd()).unwrap();
        assert_eq!(f.pos, 7);
        // std opens with O_CLOEXEC; the access mode is O_RDONLY.
        assert_ne!(f.flags & libc::O_CLOEXEC as u32, 0);
        assert_eq!(f.flags & libc::O_ACCMODE as u32, libc::O_RDONLY as u32);
        assert_ne!(f.ino, 0);
    }

    #[test]
    fn closed_fd_is_io_error() {
        let pid = std::process::id() as i32;
        assert!(matches!(
            read_fdinfo(pid, 1_000_000),
            Err(ProcError::Io { .. })
        ));
        assert!(matches!(
            read_fdinfo(i32::MAX, 0),
            Err(ProcError::Gone { .. })
        ));
    }
}
