//! Dirty-page trackers against a live workload (tests/workloads/dirty.c).
//! Root is needed (ptrace, userfaultfd in another process); without it the
//! tests say so and pass. Timings for a 1 GiB region are printed by
//! `harvest_cost_1gib` (run with `--release -- --nocapture`).

use ferry::checkpoint::Frozen;
use ferry::proc::{Pagemap, PagemapEntry};
use ferry::track::{
    self, read_areas, Area, DirtyRange, HarvestStats, HashTracker, NewAreaReport, Tracker,
    UffdWpTracker,
};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const PG: u64 = 4096;

/// ptrace and child management: one test at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn root() -> bool {
    if ferry::sys::geteuid() == 0 {
        return true;
    }
    eprintln!("skipped: needs root (ptrace and userfaultfd in another process)");
    false
}

fn dirty_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/workloads/dirty.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dirty");
        let st = Command::new("gcc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("run gcc");
        assert!(st.success(), "gcc failed on {}", src.display());
        out
    })
}

/// A running dirty.c, driven over its stdin/stdout.
struct Dirty {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: i32,
    region: u64,
    npages: u64,
}

impl Dirty {
    fn spawn(npages: u64) -> Dirty {
        Dirty::spawn_as(npages, None).unwrap()
    }

    /// Runs it as user `uid` when given (None if that cannot be done here).
    fn spawn_as(npages: u64, uid: Option<u32>) -> Option<Dirty> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(dirty_bin());
        if let Some(u) = uid {
            cmd.uid(u).gid(u);
        }
        let mut child = match cmd
            .arg(npages.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if uid.is_some() => {
                eprintln!("skipped: cannot run dirty as uid {uid:?}: {e}");
                return None;
            }
            Err(e) => panic!("spawn dirty: {e}"),
        };
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.first(), Some(&"READY"), "{line:?}");
        let region = u64::from_str_radix(f[1], 16).unwrap();
        Some(Dirty {
            pid: child.id() as i32,
            child,
            stdin,
            stdout,
            region,
            npages: f[2].parse().unwrap(),
        })
    }

    /// Sends one command; returns the words after "ok".
    fn cmd(&mut self, c: &str) -> Vec<String> {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let mut w = line.split_whitespace().map(str::to_string);
        assert_eq!(w.next().as_deref(), Some("ok"), "{c:?} -> {line:?}");
        w.collect()
    }

    /// Waits until the job is blocked reading its next command, so that it
    /// writes nothing until it gets one.
    fn settle(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            let sc = std::fs::read_to_string(format!("/proc/{}/syscall", self.pid));
            // "0 0x0 ...": in read(0, ...).
            if sc.is_ok_and(|s| s.starts_with("0 0x0 ")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("dirty never blocked in read(0)");
    }

    fn hex(&mut self, c: &str) -> u64 {
        u64::from_str_radix(&self.cmd(c)[0], 16).unwrap()
    }

    fn areas(&self) -> Vec<Area> {
        read_areas(self.pid).unwrap()
    }
}

impl Drop for Dirty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Page indexes in `[base, base + n pages)` covered by `out`.
fn pages_in(out: &[DirtyRange], base: u64, n: u64) -> Vec<u64> {
    let mut v = Vec::new();
    for r in out {
        for p in 0..r.npages {
            let a = r.start + p * PG;
            if a >= base && a < base + n * PG {
                v.push((a - base) / PG);
            }
        }
    }
    v
}

fn count_in(out: &[DirtyRange], base: u64, n: u64) -> u64 {
    let end = base + n * PG;
    out.iter()
        .map(|r| {
            let s = r.start.max(base);
            let e = r.end().min(end);
            e.saturating_sub(s) / PG
        })
        .sum()
}

fn harvest(t: &mut dyn Tracker, d: &Dirty) -> (Vec<DirtyRange>, HarvestStats) {
    let mut out = vec![DirtyRange {
        start: 1,
        npages: 1,
    }]; // must be replaced
    let st = t.harvest(&d.areas(), &mut out).unwrap();
    assert!(
        out.windows(2).all(|w| w[0].end() < w[1].start),
        "sorted, merged: {out:?}"
    );
    assert!(out.iter().all(|r| r.start % PG == 0 && r.npages > 0));
    assert_eq!(st.pages, out.iter().map(|r| r.npages).sum::<u64>());
    (out, st)
}

fn uffd_tracker(d: &Dirty) -> UffdWpTracker {
    let f = Frozen::freeze(d.pid, 0).unwrap();
    let t = UffdWpTracker::create(d.pid, d.pid);
    f.thaw().unwrap();
    t.unwrap()
}

fn all(n: u64) -> Vec<u64> {
    (0..n).collect()
}

/// No VMA registered, no page write-protected: the job is as before.
fn assert_untouched(pid: i32, base: u64, n: u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw")),
        "a VMA is still registered"
    );
    let mut e = Vec::new();
    Pagemap::open(pid)
        .unwrap()
        .read(base, n as usize, &mut e)
        .unwrap();
    assert!(e
        .iter()
        .all(|&x| !PagemapEntry(x).uffd_wp() && !PagemapEntry(x).swapped()));
}

#[test]
fn uffd_wp_tracks_writes_new_moved_and_zapped_pages() {
    if !root() {
        return;
    }
    let _g = serial();
    let mut d = Dirty::spawn(64);
    let mut t = uffd_tracker(&d);
    eprintln!(
        "features {:#x} user-mode-only {}",
        t.features(),
        t.user_mode_only()
    );
    t.start(&d.areas()).unwrap();

    let (out, st) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), all(64), "first harvest");
    eprintln!(
        "first harvest: {} pages in {} ranges, {st:?}",
        st.pages, st.ranges
    );

    // Idle: nothing at all once the job is blocked in read().
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), Vec::<u64>::new());
    d.settle();
    let _ = harvest(&mut t, &d);
    let (out, _) = harvest(&mut t, &d);
    assert!(out.is_empty(), "idle harvest: {out:?}");

    d.cmd("w 5 17 40 41");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![5, 17, 40, 41]);

    // A write made by the kernel (read() into the page).
    d.cmd("k 20");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![20]);

    // Reads are not writes.
    d.cmd("R 30");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), Vec::<u64>::new());

    // Zapped pages are reported (they now read as zeros).
    d.cmd("d 10 2");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![10, 11]);

    // A new area is reported wholly, then only what is written in it.
    let a = d.hex("m 8");
    let (out, st) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, a, 8), all(8));
    assert!(st.new_areas >= 1 && st.reset.iter().any(|&(s, e)| s <= a && a + 8 * PG <= e));
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, a, 8), Vec::<u64>::new());

    // A moved area: reported wholly at its new address, tracked there.
    let old = d.region;
    d.region = d.hex("r");
    assert_ne!(old, d.region);
    let (out, st) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), all(64), "{st:?}");
    assert_eq!(pages_in(&out, old, 64), Vec::<u64>::new());
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), Vec::<u64>::new());
    d.cmd("w 3 63");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![3, 63]);

    // Half unmapped: no error, nothing reported there.
    assert_eq!(d.cmd("u")[0], "32");
    d.npages = 32;
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), Vec::<u64>::new());
    d.cmd("w 1");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![1]);

    // Every page still holds what the job wrote.
    let sum = d.cmd("s");
    t.stop().unwrap();
    assert_untouched(d.pid, d.region, d.npages);
    d.cmd("w 2 7");
    assert_ne!(d.cmd("s"), sum);
    // Harvesting a stopped tracker is an error, not a panic.
    let mut out = Vec::new();
    assert!(t.harvest(&d.areas(), &mut out).is_err());
}

#[test]
fn uffd_wp_unprivileged_target_user_mode_only() {
    // With vm.unprivileged_userfaultfd=0 a uid-65534 job may only create a
    // UFFD_USER_MODE_ONLY uffd; writes by the kernel are still reported.
    if !root() {
        return;
    }
    let _g = serial();
    let Some(mut d) = Dirty::spawn_as(32, Some(65534)) else {
        return;
    };
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut t = uffd_tracker(&d);
    eprintln!(
        "unprivileged_userfaultfd={sysctl}: user-mode-only {}",
        t.user_mode_only()
    );
    if sysctl == "0" {
        assert!(t.user_mode_only());
    }
    t.start(&d.areas()).unwrap();
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 32), all(32));
    d.cmd("w 4");
    d.cmd("k 9");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 32), vec![4, 9]);
    t.stop().unwrap();
    d.cmd("s");
}

#[test]
fn uffd_wp_follows_protection_changes() {
    if !root() {
        return;
    }
    let _g = serial();
    let mut d = Dirty::spawn(16);
    let mut t = uffd_tracker(&d);
    t.start(&d.areas()).unwrap();
    let _ = harvest(&mut t, &d);
    // A new PROT_NONE reservation: nothing to send, but listed as reset.
    let n = d.hex("n 8");
    let (out, st) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, n, 8), Vec::<u64>::new());
    assert!(st.reset.iter().any(|&(s, e)| s <= n && n + 8 * PG <= e));
    // Made writable and written: a changed area, reported wholly, then
    // tracked.
    d.cmd(&format!("P {n:x} 8 3"));
    d.cmd(&format!("y {:x}", n + 2 * PG));
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, n, 8), all(8));
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, n, 8), Vec::<u64>::new());
    d.cmd(&format!("y {:x}", n + 3 * PG));
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, n, 8), vec![3]);
    // W^X-style flips of tracked memory between two harvests are seen.
    let r = d.region;
    d.cmd(&format!("P {r:x} 4 1"));
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, r, 16), Vec::<u64>::new());
    d.cmd(&format!("P {r:x} 4 3"));
    d.cmd("w 1");
    d.cmd(&format!("P {r:x} 4 1"));
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, r, 16), vec![1]);
    d.cmd(&format!("P {:x} 2 0", r + 8 * PG));
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, r, 16), Vec::<u64>::new());
    d.cmd(&format!("P {:x} 2 3", r + 8 * PG));
    d.cmd(&format!("P {r:x} 4 3"));
    d.cmd("w 9 2");
    let (out, st) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, r, 16), vec![2, 9]);
    assert_eq!((st.reregistered, st.untracked_areas), (0, 0));
    d.cmd("s");
}

#[test]
fn uffd_wp_sees_a_zapped_2mib_chunk() {
    // MADV_DONTNEED of a whole aligned 2 MiB range frees its page table
    // (CONFIG_PT_RECLAIM); the pages must still be reported.
    if !root() {
        return;
    }
    let _g = serial();
    let mut d = Dirty::spawn(1024);
    let mut t = uffd_tracker(&d);
    t.start(&d.areas()).unwrap();
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(count_in(&out, d.region, 1024), 1024);
    let first = (d.region.div_ceil(2 << 20) * (2 << 20) - d.region) / PG;
    assert!(first + 512 <= 1024);
    d.cmd(&format!("d {first} 512"));
    let other = if first > 0 { 0 } else { 1000 };
    d.cmd(&format!("w {other}"));
    let (out, _) = harvest(&mut t, &d);
    let mut want: Vec<u64> = (first..first + 512).collect();
    want.push(other);
    want.sort();
    assert_eq!(pages_in(&out, d.region, 1024), want);
    let (out, _) = harvest(&mut t, &d);
    assert!(pages_in(&out, d.region, 1024).is_empty());
    d.cmd("s");
    drop(t); // closing the uffd releases everything
    assert_untouched(d.pid, d.region, 1024);
    d.cmd("w 3");
    d.cmd("s");
}

#[test]
fn uffd_wp_populated_policy_and_partial_population() {
    if !root() {
        return;
    }
    let _g = serial();
    let mut d = Dirty::spawn(16);
    let mut t = uffd_tracker(&d);
    t.set_new_area_report(NewAreaReport::Populated);
    t.start(&d.areas()).unwrap();
    let _ = harvest(&mut t, &d);
    // "m 8" writes one byte in each page: all populated.
    let a = d.hex("m 8");
    let (out, st) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, a, 8), all(8));
    assert!(st.reset.iter().any(|&(s, e)| s <= a && a + 8 * PG <= e));
    // Zap some of the region and move it: only populated pages come back.
    d.cmd("d 4 4");
    d.region = d.hex("r");
    let (out, _) = harvest(&mut t, &d);
    let mut want: Vec<u64> = (0..4).collect();
    want.extend(8..16);
    assert_eq!(pages_in(&out, d.region, 16), want);
    d.cmd("s");
}

#[test]
fn hash_tracks_writes_new_moved_and_zapped_pages() {
    if !root() {
        return;
    }
    let _g = serial();
    let mut d = Dirty::spawn(64);
    let mut t = HashTracker::new(d.pid).unwrap();
    t.start(&d.areas()).unwrap();
    let (out, st) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), all(64));
    eprintln!("hash first harvest: {} pages, {:?}", st.pages, st.elapsed);
    d.settle();
    let _ = harvest(&mut t, &d);
    let (out, _) = harvest(&mut t, &d);
    assert!(out.is_empty(), "idle: {out:?}");
    d.cmd("w 5 17 40 41");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![5, 17, 40, 41]);
    // The kernel rewrote the same bytes: no change, nothing to send.
    d.cmd("k 20");
    d.cmd("R 30");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), Vec::<u64>::new());
    d.cmd("d 10 2");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![10, 11]);
    let a = d.hex("m 8");
    let (out, st) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, a, 8), all(8));
    assert!(st.new_areas >= 1);
    d.region = d.hex("r");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), all(64));
    d.cmd("w 3 63");
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![3, 63]);
    // note_sent: the reference becomes what was sent.
    let mut page = vec![0u8; PG as usize];
    ferry::sys::process_vm_readv(
        d.pid,
        &mut page,
        &[ferry::sys::RemoteRange {
            addr: d.region + 9 * PG,
            len: PG as usize,
        }],
    )
    .unwrap();
    page[100] ^= 0xff; // pretend an older version was sent
    t.note_sent(d.region + 9 * PG, &page);
    let (out, _) = harvest(&mut t, &d);
    assert_eq!(pages_in(&out, d.region, 64), vec![9]);
    d.cmd("s");
    t.stop().unwrap();
    d.cmd("w 2");
    d.cmd("s");
}

#[test]
fn auto_and_by_name() {
    if !root() {
        return;
    }
    let _g = serial();
    let d = Dirty::spawn(8);
    let f = Frozen::freeze(d.pid, 0).unwrap();
    let a = track::auto(d.pid, d.pid);
    let u = track::by_name("uffd-wp", d.pid, d.pid);
    f.thaw().unwrap();
    assert_eq!(a.unwrap().name(), "uffd-wp");
    assert_eq!(u.unwrap().name(), "uffd-wp");
    assert_eq!(track::by_name("hash", d.pid, 0).unwrap().name(), "hash");
    let e = track::by_name("soft-dirty", d.pid, 0).err().unwrap();
    assert!(e.is_unsupported());
    eprintln!("soft-dirty: {e}");
    assert!(track::by_name("bogus", d.pid, 0).is_err());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
fn harvest_cost_1gib() {
    if !root() {
        return;
    }
    let _g = serial();
    const N: u64 = 262_144; // 1 GiB
    const DIRTY: u64 = 26_214;
    let mut d = Dirty::spawn(16);
    let t0 = Instant::now();
    let big = d.hex(&format!("b {N}"));
    eprintln!("[cost] populate 1 GiB: {:.0} ms", ms(t0.elapsed()));
    let only_big = |d: &Dirty| -> Vec<Area> {
        d.areas()
            .into_iter()
            .filter(|a| a.start <= big && big < a.end)
            .collect()
    };

    let mut t = uffd_tracker(&d);
    let areas = only_big(&d);
    let t0 = Instant::now();
    t.start(&areas).unwrap();
    let reg = t0.elapsed();
    let mut out = Vec::new();
    let st = t.harvest(&areas, &mut out).unwrap();
    assert_eq!(count_in(&out, big, N), N);
    eprintln!(
        "[cost] uffd-wp: register {:.3} ms, first harvest (arm) {:.2} ms, {} calls",
        ms(reg),
        ms(st.elapsed),
        st.calls
    );
    for _ in 0..3 {
        let st = t.harvest(&areas, &mut out).unwrap();
        assert_eq!(count_in(&out, big, N), 0);
        eprintln!("[cost] uffd-wp: empty harvest {:.3} ms", ms(st.elapsed));
    }
    for _ in 0..3 {
        let w = d.cmd(&format!("W {DIRTY}"));
        let st = t.harvest(&areas, &mut out).unwrap();
        assert_eq!(count_in(&out, big, N), DIRTY);
        eprintln!(
            "[cost] uffd-wp: job wrote {DIRTY} pages in {} us; harvest {:.3} ms -> {} ranges, {} pages",
            w[0],
            ms(st.elapsed),
            st.ranges,
            st.pages
        );
    }
    t.stop().unwrap();

    if cfg!(debug_assertions) {
        eprintln!("[cost] hash: measured in release builds only");
        return;
    }
    let mut h = HashTracker::new(d.pid).unwrap();
    h.start(&areas).unwrap();
    let st = h.harvest(&areas, &mut out).unwrap();
    assert_eq!(count_in(&out, big, N), N);
    eprintln!("[cost] hash: first harvest {:.1} ms", ms(st.elapsed));
    let st = h.harvest(&areas, &mut out).unwrap();
    assert_eq!(count_in(&out, big, N), 0);
    eprintln!("[cost] hash: empty harvest {:.1} ms", ms(st.elapsed));
    let w = d.cmd(&format!("W {DIRTY}"));
    let st = h.harvest(&areas, &mut out).unwrap();
    assert_eq!(count_in(&out, big, N), DIRTY);
    eprintln!(
        "[cost] hash: job wrote {DIRTY} pages in {} us; harvest {:.1} ms",
        w[0],
        ms(st.elapsed)
    );
    let t0 = Instant::now();
    let mut v = vec![0u8; PG as usize];
    let mut acc = 0u64;
    for i in 0..N {
        v[0] = i as u8;
        acc ^= track::page_hash(&v);
    }
    std::hint::black_box(acc);
    eprintln!(
        "[cost] page_hash: {:.2} GB/s",
        (N * PG) as f64 / t0.elapsed().as_secs_f64() / 1e9
    );
}
