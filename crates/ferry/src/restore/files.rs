//! Installing descriptors: the process receives every open file it uses
//! from ferry's [`FileTable`] (they land on the lowest free numbers), then
//! each goes to its numbers with its close-on-exec flag. Only what is in
//! the way moves: a received descriptor that sits on a number another file
//! wants is parked above every number in play first; one already on its
//! own number stays there (a flag change at most); the rest are dup3'd,
//! and what is left over is closed. In the common case (files received on
//! the numbers they had) that is a handful of remote calls, not 3 per file
//! and one per descriptor.

use super::filetable::FileTable;
use super::stub::Stub;
use super::RestoreError;
use crate::image::ProcessImage;
use crate::sys;

/// A remote step of installing descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// dup3(from, to, flags).
    Dup3 {
        from: u64,
        to: u64,
        cloexec: bool,
    },
    /// fcntl(fd, F_SETFD, FD_CLOEXEC).
    SetCloexec(u64),
    Close(u64),
}

/// The steps that put file `k`, received on `got[k]` (without
/// close-on-exec), on every `(fd, k, cloexec)` of `wanted`.
fn plan(got: &[u64], wanted: &[(u64, usize, bool)]) -> Vec<Op> {
    let mut ops = Vec::new();
    let want_at = |fd: u64| wanted.iter().find(|w| w.0 == fd).map(|w| w.1);
    let top = got
        .iter()
        .copied()
        .chain(wanted.iter().map(|w| w.0))
        .max()
        .unwrap_or(0);
    let mut at: Vec<u64> = got.to_vec();
    // 1. Out of the way: sources on a number that another file wants.
    for (k, a) in at.iter_mut().enumerate() {
        if want_at(*a).is_some_and(|wk| wk != k) {
            let park = top + 1 + k as u64;
            ops.push(Op::Dup3 {
                from: *a,
                to: park,
                cloexec: false,
            });
            ops.push(Op::Close(*a));
            *a = park;
        }
    }
    // 2. Every wanted number. No source sits on a number wanted by
    //    another file any more, so a dup3 overwrites nothing still needed.
    for &(fd, k, cloexec) in wanted {
        if at[k] == fd {
            if cloexec {
                ops.push(Op::SetCloexec(fd));
            }
        } else {
            ops.push(Op::Dup3 {
                from: at[k],
                to: fd,
                cloexec,
            });
        }
    }
    // 3. Sources not on one of their own numbers.
    for (k, &a) in at.iter().enumerate() {
        if !wanted.iter().any(|w| w.0 == a && w.1 == k) {
            ops.push(Op::Close(a));
        }
    }
    ops
}

pub fn restore(st: &mut Stub, table: &FileTable, p: &ProcessImage) -> Result<(), RestoreError> {
    if p.fds.is_empty() {
        return Ok(());
    }
    let mut files: Vec<u32> = p.fds.iter().map(|f| f.file).collect();
    files.sort_unstable();
    files.dedup();
    let max_fd = p.fds.iter().map(|f| f.fd).max().unwrap_or(0) as u64;
    // Parking goes above the received numbers (0..n and the transfer
    // socket) and every target.
    let need = max_fd.max(files.len() as u64 + 2) + files.len() as u64 + 16;
    let (cur, max) = sys::prlimit(st.pid, libc::RLIMIT_NOFILE, None).unwrap_or((1024, 1024));
    if cur < need {
        let _ = sys::prlimit(st.pid, libc::RLIMIT_NOFILE, Some((need, max.max(need))));
    }
    let local: Vec<i32> = files.iter().map(|&i| table.file(i)).collect();
    let got = st.receive_fds(&local)?;
    let wanted: Vec<(u64, usize, bool)> = p
        .fds
        .iter()
        .map(|f| {
            let k = files.binary_search(&f.file).unwrap_or(0);
            (f.fd as u64, k, f.cloexec)
        })
        .collect();
    for op in plan(&got, &wanted) {
        match op {
            Op::Dup3 { from, to, cloexec } => {
                let flags = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
                st.call("dup3", libc::SYS_dup3, &[from, to, flags])?
            }
            Op::SetCloexec(fd) => st.call(
                "fcntl(F_SETFD)",
                libc::SYS_fcntl,
                &[fd, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64],
            )?,
            Op::Close(fd) => st.call("close", libc::SYS_close, &[fd])?,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Runs a plan on a model descriptor table: fd -> (file, cloexec).
    fn run(got: &[u64], wanted: &[(u64, usize, bool)]) -> (HashMap<u64, (usize, bool)>, usize) {
        let mut t: HashMap<u64, (usize, bool)> = got
            .iter()
            .enumerate()
            .map(|(k, &fd)| (fd, (k, false)))
            .collect();
        let ops = plan(got, wanted);
        for op in &ops {
            match *op {
                Op::Dup3 { from, to, cloexec } => {
                    assert_ne!(from, to, "dup3 onto itself is EINVAL");
                    let (k, _) = *t.get(&from).expect("dup3 from a closed fd");
                    t.insert(to, (k, cloexec));
                }
                Op::SetCloexec(fd) => t.get_mut(&fd).expect("fcntl on a closed fd").1 = true,
                Op::Close(fd) => {
                    t.remove(&fd).expect("close of a closed fd");
                }
            }
        }
        (t, ops.len())
    }

    fn check(got: &[u64], wanted: &[(u64, usize, bool)]) -> usize {
        let (t, n) = run(got, wanted);
        let want: HashMap<u64, (usize, bool)> =
            wanted.iter().map(|&(fd, k, c)| (fd, (k, c))).collect();
        assert_eq!(t, want, "got {got:?} wanted {wanted:?}");
        n
    }

    #[test]
    fn files_already_in_place_cost_nothing() {
        // stdin/stdout/stderr received on 0, 2, 3 (1 was the socket).
        assert_eq!(
            check(&[0, 1, 2], &[(0, 0, false), (1, 1, false), (2, 2, false)]),
            0
        );
        // One flag to set, one extra number, one leftover to close.
        let n = check(
            &[0, 2, 3],
            &[(0, 0, false), (1, 1, false), (2, 1, true), (5, 2, true)],
        );
        assert!(n <= 4, "{n} steps");
    }

    #[test]
    fn crossed_and_chained_numbers_are_parked() {
        check(&[0, 1], &[(1, 0, false), (0, 1, true)]);
        check(&[0, 1, 2], &[(1, 0, false), (2, 1, false), (0, 2, false)]);
        check(
            &[0, 2, 3, 4],
            &[
                (4, 0, true),
                (3, 1, false),
                (2, 2, false),
                (0, 3, false),
                (9, 3, true),
            ],
        );
        // A file wanted on several numbers, one of them where it arrived.
        check(
            &[0, 1],
            &[(0, 0, false), (7, 0, true), (1, 1, false), (3, 1, false)],
        );
        // Nothing wanted where things arrived.
        check(&[0, 1, 2], &[(10, 2, false), (11, 0, true), (12, 1, false)]);
    }
}
