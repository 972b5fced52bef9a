//! Presenting results: Markdown tables, number formatting, the machine's
//! description, and appending runs to bench/RESULTS.md.

use crate::util;
use anyhow::{Context, Result};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A Markdown table; the first column is left-aligned, the others (numbers)
/// right-aligned, and cells are padded so it also reads well as plain text.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn markdown(&self) -> String {
        let n = self.headers.len();
        let width: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.headers[i].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, c) in cells.iter().enumerate() {
                let pad = width[i] - c.chars().count();
                if i == 0 {
                    s += &format!(" {c}{} |", " ".repeat(pad));
                } else {
                    s += &format!(" {}{c} |", " ".repeat(pad));
                }
            }
            s + "\n"
        };
        let mut out = line(&self.headers);
        out += "|";
        for (i, w) in width.iter().enumerate() {
            if i == 0 {
                out += &format!(" {} |", "-".repeat(*w));
            } else {
                out += &format!(" {}: |", "-".repeat(w - 1));
            }
        }
        out += "\n";
        for r in &self.rows {
            out += &line(r);
        }
        out
    }
}

/// Bytes as MiB/GiB with one decimal.
pub fn bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let v = n as f64;
    if v >= 1024.0 * MIB {
        format!("{:.2} GiB", v / (1024.0 * MIB))
    } else if v >= MIB / 10.0 {
        format!("{:.1} MiB", v / MIB)
    } else {
        format!("{:.1} KiB", v / 1024.0)
    }
}

/// Milliseconds with a precision that suits the magnitude.
pub fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// GB/s (10^9 bytes per second) from bytes and milliseconds.
pub fn gbps(bytes: u64, ms: f64) -> f64 {
    if ms > 0.0 {
        bytes as f64 / (ms / 1e3) / 1e9
    } else {
        f64::NAN
    }
}

pub fn rate(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.2}")
    }
}

// ---- the machine ---------------------------------------------------------------

pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub nproc: usize,
    pub mem_total_kib: u64,
}

impl Machine {
    pub fn collect() -> Self {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into());
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        Self {
            kernel,
            cpu,
            nproc,
            mem_total_kib: meminfo("MemTotal").unwrap_or(0),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "Linux {}, {}, nproc {}, MemTotal {:.1} GiB",
            self.kernel,
            self.cpu,
            self.nproc,
            self.mem_total_kib as f64 / (1024.0 * 1024.0)
        )
    }
}

/// A /proc/meminfo field, in KiB.
pub fn meminfo(field: &str) -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Filesystem type of `path`, for the record (images on tmpfs or on disk
/// make a difference).
pub fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "?".into();
    };
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "?".into();
    }
    match st.f_type as i64 {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6969 => "nfs".into(),
        t => format!("fs magic {t:#x}"),
    }
}

/// How the ferry binary was built, judged from where cargo put it.
pub fn ferry_build_kind(ferry: &Path) -> &'static str {
    match ferry
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
    {
        Some("release") => "release build",
        Some("debug") => "DEBUG build (timings not representative)",
        _ => "build profile unknown (not in a cargo target/{release,debug} directory)",
    }
}

/// `ferry --version`, or "?".
pub fn ferry_version(ferry: &Path, scratch: &Path) -> String {
    let mut cmd = Command::new(ferry);
    cmd.arg("--version");
    match util::run_command(&mut cmd, Duration::from_secs(10), scratch, "ferry-version") {
        Ok(o) if o.status.success() => o.stdout.trim().to_string(),
        _ => "?".into(),
    }
}

/// The workspace's git commit, marked when the tree has uncommitted changes.
pub fn git_describe(scratch: &Path) -> Option<String> {
    let root = util::workspace_root();
    let git = |args: &[&str], label: &str| -> Option<String> {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(&root).args(args);
        let o = util::run_command(&mut cmd, Duration::from_secs(10), scratch, label).ok()?;
        o.status.success().then(|| o.stdout.trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"], "git-head")?;
    let dirty = git(
        &["status", "--porcelain", "--untracked-files=no"],
        "git-status",
    )
    .is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{head} + uncommitted changes")
    } else {
        head
    })
}

/// This process's command line, shell-quoted.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| util::shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Current UTC time as "YYYY-MM-DD HH:MM UTC".
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_string(secs)
}

fn utc_string(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// The common start of a RESULTS.md entry: the `##` heading (UTC date and
/// `title`), the exact command line, the machine, the ferry build and git
/// commit, and where the images were written. `work` is the scratch
/// directory (inside the images' parent directory).
pub fn entry_header(title: &str, ferry: &Path, work: &Path) -> String {
    let storage = format!(
        "images written to {} ({}); restore reads them back from the page cache",
        work.parent().unwrap_or(work).display(),
        fs_type(work)
    );
    entry_header_with(title, ferry, work, &storage)
}

/// [`entry_header`] with another line about where the files went
/// (`storage`, without the leading "- ").
pub fn entry_header_with(title: &str, ferry: &Path, work: &Path, storage: &str) -> String {
    let machine = Machine::collect();
    let git = git_describe(work).unwrap_or_else(|| "?".into());
    let mut e = format!("## {} — {title}\n\n", utc_now());
    e += &format!("- command: `{}`\n", command_line());
    e += &format!("- machine: {}\n", machine.describe());
    e += &format!(
        "- ferry: `{}` ({}, built {}), {}, workspace at git {git}\n",
        ferry.display(),
        ferry_build_kind(ferry),
        file_mtime(ferry),
        ferry_version(ferry, work),
    );
    e += &format!("- {storage}\n");
    e += &format!(
        "- load average (1, 5, 15 min): {} at the start, {} at the end (other work \
         running at the same time makes the numbers vary)\n",
        START_LOAD.get().map_or("?", String::as_str),
        loadavg().unwrap_or_else(|| "?".into())
    );
    e
}

static START_LOAD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Remembers the load average at the start of the run, for the record.
pub fn note_start_load() {
    if let Some(l) = loadavg() {
        let _ = START_LOAD.set(l);
    }
}

/// The 1, 5 and 15 minute load averages from /proc/loadavg.
pub fn loadavg() -> Option<String> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    let v: Vec<&str> = text.split_whitespace().take(3).collect();
    (v.len() == 3).then(|| v.join(" "))
}

/// A file's modification time as "YYYY-MM-DD HH:MM UTC" (for a binary: when
/// it was built, which tells whether it can match the workspace's sources).
pub fn file_mtime(path: &Path) -> String {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(|| "?".into(), |d| utc_string(d.as_secs()))
}

// ---- RESULTS.md ----------------------------------------------------------------

const RESULTS_INTRO: &str = "# ferry benchmark results

Runs recorded with `ferry-bench <benchmark> --record`, oldest first. Each entry
gives the date, the exact command, the machine and the ferry build, then the
table that `ferry-bench` printed (medians over the repetitions). See
[README.md](README.md) for what each benchmark does and what the columns mean.
Numbers from different machines, or from a machine that was busy with other
work, are not comparable.
";

pub fn results_path() -> PathBuf {
    util::bench_dir().join("RESULTS.md")
}

/// Appends one entry (Markdown, starting with its own `##` heading) to
/// bench/RESULTS.md, creating the file with an intro if needed.
pub fn append_results(entry: &str) -> Result<PathBuf> {
    let path = results_path();
    let exists = path.exists();
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut text = String::new();
    if !exists {
        text += RESULTS_INTRO;
    }
    text += "\n";
    text += entry.trim_end();
    text += "\n";
    f.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_string(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_string(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_string(1_763_793_000), "2025-11-22 06:30 UTC");
    }

    #[test]
    fn table() {
        let mut t = Table::new(&["a", "bb"]);
        t.row(vec!["x".into(), "1".into()]);
        assert_eq!(
            t.markdown(),
            "| a   |  bb |\n| --- | --: |\n| x   |   1 |\n"
        );
    }

    #[test]
    fn rates() {
        assert_eq!(rate(gbps(2_000_000_000, 1000.0)), "2.00");
        assert!(gbps(1, 0.0).is_nan());
        assert_eq!(bytes(1024 * 1024 * 16), "16.0 MiB");
    }
}
