//! The one error type of the `proc` module.

use std::io;
use std::path::{Path, PathBuf};

/// Why reading or parsing a /proc file failed.
#[derive(thiserror::Error, Debug)]
pub enum ProcError {
    /// The file could not be read, but the process still exists (EACCES,
    /// a closed fd, a kernel thread without an exe, ...).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The /proc file that failed.
        path: PathBuf,
        /// The underlying error, carrying the errno.
        source: io::Error,
    },
    /// The file was read but its contents do not have the expected format.
    /// `line` is 1-based; 0 means "the file as a whole" (a missing field).
    #[error("cannot parse {}:{line}: {what}", path.display())]
    Parse {
        /// The /proc file (or caller-supplied name) that was parsed.
        path: PathBuf,
        /// 1-based line number, or 0 for the whole file.
        line: usize,
        /// What was wrong.
        what: String,
    },
    /// The process no longer exists.
    #[error("process {pid} is gone")]
    Gone {
        /// The pid that was asked for.
        pid: i32,
    },
}

impl ProcError {
    /// Classifies an I/O error on a file under /proc/PID. ENOENT is ambiguous
    /// (the fd or the process may be what vanished), so it only means `Gone`
    /// when /proc/PID itself is absent; ESRCH always means the task died
    /// while we were reading.
    pub(crate) fn from_io(pid: i32, path: &Path, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ESRCH) => ProcError::Gone { pid },
            Some(libc::ENOENT) if !super::exists(pid) => ProcError::Gone { pid },
            _ => ProcError::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }

    /// A parse error at `line` of `path`.
    pub(crate) fn parse(path: &Path, line: usize, what: impl Into<String>) -> Self {
        ProcError::Parse {
            path: path.to_path_buf(),
            line,
            what: what.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_file() {
        let e = ProcError::Io {
            path: PathBuf::from("/proc/123/maps"),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot read /proc/123/maps: Permission denied"),
            "{msg}"
        );

        let e = ProcError::parse(Path::new("/proc/1/stat"), 1, "no ')'");
        assert_eq!(e.to_string(), "cannot parse /proc/1/stat:1: no ')'");

        assert_eq!(ProcError::Gone { pid: 7 }.to_string(), "process 7 is gone");
    }

    #[test]
    fn enoent_on_missing_process_is_gone() {
        let e = ProcError::from_io(
            i32::MAX,
            Path::new("/proc/2147483647/maps"),
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(matches!(e, ProcError::Gone { pid: i32::MAX }), "{e:?}");
    }

    #[test]
    fn enoent_on_live_process_is_io() {
        let pid = std::process::id() as i32;
        let e = ProcError::from_io(
            pid,
            Path::new("/proc/self/fdinfo/99999"),
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(matches!(e, ProcError::Io { .. }), "{e:?}");
    }
}
