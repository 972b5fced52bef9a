//! Installing descriptors: the process receives every open file it uses
//! from ferry's [`FileTable`], parks them above the highest wanted number
//! (so they cannot collide with a target number), then dup3s each to its
//! fd with its close-on-exec flag.

use super::filetable::FileTable;
use super::stub::Stub;
use super::RestoreError;
use crate::image::ProcessImage;
use crate::sys;

pub fn restore(st: &mut Stub, table: &FileTable, p: &ProcessImage) -> Result<(), RestoreError> {
    if p.fds.is_empty() {
        return Ok(());
    }
    let mut files: Vec<u32> = p.fds.iter().map(|f| f.file).collect();
    files.sort_unstable();
    files.dedup();
    let max_fd = p.fds.iter().map(|f| f.fd).max().unwrap_or(0) as u64;
    // Received descriptors take the lowest free numbers (0..n); parking
    // starts above them and above every target.
    let park = max_fd.max(files.len() as u64) + 1;
    let need = park + files.len() as u64 + 16;
    let (cur, max) = sys::prlimit(st.pid, libc::RLIMIT_NOFILE, None).unwrap_or((1024, 1024));
    if cur < need {
        let _ = sys::prlimit(st.pid, libc::RLIMIT_NOFILE, Some((need, max.max(need))));
    }
    let local: Vec<i32> = files.iter().map(|&i| table.file(i)).collect();
    let got = st.receive_fds(&local)?;
    for (k, &fd) in got.iter().enumerate() {
        st.call("dup3", libc::SYS_dup3, &[fd, park + k as u64, 0])?;
        st.call("close", libc::SYS_close, &[fd])?;
    }
    for f in &p.fds {
        let k = files.binary_search(&f.file).unwrap_or(0) as u64;
        let flags = if f.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        st.call("dup3", libc::SYS_dup3, &[park + k, f.fd as u64, flags])?;
    }
    for k in 0..files.len() as u64 {
        st.call("close", libc::SYS_close, &[park + k])?;
    }
    Ok(())
}
