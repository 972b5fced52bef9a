//! End-to-end tests of `libferry_zero.so`: C and C++ programs run with and
//! without `LD_PRELOAD` in each mode.
//!
//! * the workloads `tests/workloads/zero_alloc.c` and `zero_cpp.cc` must
//!   PASS everywhere, and the library's statistics must show it worked;
//! * `tests/c/zero_probe.c` inspects freed chunks from inside (pagemap and
//!   `/proc/self/mem`): stale without the library, zero in `zero` mode,
//!   zero and absent in `release` mode;
//! * `tests/c/zero_doublefree.c`: glibc still catches a double free;
//! * `tests/c/zero_bench.c`: timings with and without the library, printed
//!   only (`cargo test -p ferry-zero --release bench -- --nocapture`;
//!   `FERRY_ZERO_BENCH_OPS` sets the operation count, default 2M, and
//!   `FERRY_ZERO_BENCH_RUNS` the runs per configuration, best kept).
//!
//! The library is `target/<profile>/libferry_zero.so`, built on first use
//! (see [`library`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Tests hold it shared; the benchmark holds it exclusively, so that its
/// timings are not disturbed by the other tests.
static BENCH: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    BENCH.read().unwrap_or_else(PoisonError::into_inner)
}

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// `target/<profile>/libferry_zero.so`, next to this test binary's
/// directory (`target/<profile>/deps/preload-<hash>`). `cargo test` does
/// not build a cdylib (only linkable libraries are built for integration
/// tests), so the first call runs `cargo build -p ferry-zero` for the same
/// profile; Cargo has released its build lock by the time tests run, and
/// the build is a no-op when the library is fresh.
fn library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary in target/<profile>/deps");
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let profile = if profile == "debug" { "dev" } else { profile };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let res = Command::new(&cargo)
            .args(["build", "--lib", "--profile", profile, "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
        assert!(
            res.status.success(),
            "cargo build of ferry-zero failed:\n{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let lib = dir.join("libferry_zero.so");
        assert!(lib.exists(), "{} missing after cargo build", lib.display());
        lib
    })
    .clone()
}

/// Compiles a C or C++ source (once per test binary, and only when the
/// source is newer than the binary) into the target's temporary directory.
fn build(src: &Path, flags: &[&str]) -> PathBuf {
    static BUILT: Mutex<BTreeMap<PathBuf, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(b) = built.get(src) {
        return b.clone();
    }
    let name = src.file_stem().unwrap().to_str().unwrap();
    let cxx = src.extension().is_some_and(|e| e == "cc");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ferry-zero");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(name);
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let header = workspace_root().join("tests/workloads/common.h");
    let newest = [mtime(src), mtime(&header)].into_iter().flatten().max();
    if !matches!((mtime(&out), newest), (Some(b), Some(s)) if b >= s) {
        let cc = if cxx {
            std::env::var("CXX").unwrap_or_else(|_| "g++".into())
        } else {
            std::env::var("CC").unwrap_or_else(|_| "gcc".into())
        };
        let tmp = out_dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let res = Command::new(&cc)
            .args(flags)
            .arg("-o")
            .arg(&tmp)
            .arg(src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
        assert!(
            res.status.success(),
            "building {} failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&res.stderr)
        );
        std::fs::rename(&tmp, &out).unwrap();
    }
    built.insert(src.to_path_buf(), out.clone());
    out
}

fn workload(name: &str) -> PathBuf {
    let dir = workspace_root().join("tests/workloads");
    let src = [
        dir.join(format!("{name}.c")),
        dir.join(format!("{name}.cc")),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("no workload {name}"));
    build(&src, &["-O2", "-g", "-pthread"])
}

fn helper(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/c/{name}.c"));
    build(&src, &["-O2", "-pthread"])
}

struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn passed(&self, name: &str) -> bool {
        self.code == Some(0) && self.stdout.lines().any(|l| l == format!("PASS {name}"))
    }

    /// The `ferry-zero: k=v ...` statistics line, as a map.
    fn stats(&self) -> BTreeMap<String, String> {
        let line = self
            .stdout
            .lines()
            .chain(self.stderr.lines())
            .find(|l| l.starts_with("ferry-zero: mode="))
            .unwrap_or_else(|| panic!("no statistics line in\n{}\n{}", self.stdout, self.stderr));
        line["ferry-zero: ".len()..]
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "exit {:?} signal {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.signal, self.stdout, self.stderr
        )
    }
}

fn num(stats: &BTreeMap<String, String>, key: &str) -> u64 {
    stats
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no counter {key} in {stats:?}"))
}

/// Runs `bin args` with `LD_PRELOAD` of the library when `preload`, the
/// given environment on top of a clean one (no inherited FERRY_ZERO*,
/// MALLOC_*, LD_PRELOAD), and a 120 s deadline.
fn run(bin: &Path, args: &[&str], preload: bool, env: &[(&str, &str)]) -> Run {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("FERRY_ZERO") || k.starts_with("MALLOC_") || k == "LD_PRELOAD" {
            cmd.env_remove(k);
        }
    }
    cmd.env("WORKLOAD_SECS", "1.5");
    if preload {
        cmd.env("LD_PRELOAD", library());
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{} {args:?} timed out", bin.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        signal: status.signal(),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

// ---------------------------------------------------------------------------
// Workloads

const WORKLOADS: [&str; 2] = ["zero_alloc", "zero_cpp"];

/// Extra environment of a run.
type Env = &'static [(&'static str, &'static str)];

#[test]
fn workloads_pass_without_the_library() {
    let _g = shared();
    for name in WORKLOADS {
        let r = run(&workload(name), &[], false, &[]);
        assert!(r.passed(name), "{name}: {}", r.describe());
        assert!(
            !r.stdout.contains("ferry-zero:"),
            "{name}: library seen without preload"
        );
    }
}

#[test]
fn workloads_pass_in_zero_mode() {
    let _g = shared();
    for name in WORKLOADS {
        let r = run(
            &workload(name),
            &[],
            true,
            &[("FERRY_ZERO", "zero"), ("FERRY_ZERO_STATS", "1")],
        );
        assert!(r.passed(name), "{name}: {}", r.describe());
        let s = r.stats();
        assert_eq!(s["mode"], "zero");
        assert_eq!(s["active"], "1", "{name}: glibc malloc not recognised");
        assert!(num(&s, "chunks") > 1000, "{name}: {s:?}");
        assert!(num(&s, "bytes_zeroed") > 1 << 20, "{name}: {s:?}");
        assert_eq!(num(&s, "pages_released"), 0);
        assert_eq!(num(&s, "bootstrap_leaks"), 0, "{name}: {s:?}");
        if name == "zero_alloc" {
            assert!(
                num(&s, "realloc_moves") > 0 && num(&s, "realloc_tails") > 0,
                "{s:?}"
            );
            assert!(num(&s, "skipped_mmapped") > 0, "{s:?}");
        } else {
            assert!(
                num(&s, "deletes") > 1000,
                "{name}: delete not interposed: {s:?}"
            );
        }
    }
}

#[test]
fn workloads_pass_in_release_mode() {
    let _g = shared();
    for name in WORKLOADS {
        // Default mode: no FERRY_ZERO.
        let r = run(&workload(name), &[], true, &[("FERRY_ZERO_STATS", "1")]);
        assert!(r.passed(name), "{name}: {}", r.describe());
        let s = r.stats();
        assert_eq!(s["mode"], "release");
        assert_eq!(s["min"], "4096");
        assert_eq!(s["release_min"], "65536");
        assert_eq!(s["active"], "1");
        assert!(num(&s, "pages_released") > 1000, "{name}: {s:?}");
        assert!(num(&s, "skipped_small") > 0, "{name}: {s:?}");
        assert_eq!(num(&s, "madvise_failures"), 0, "{name}: {s:?}");
        assert_eq!(num(&s, "bootstrap_leaks"), 0, "{name}: {s:?}");
    }
}

#[test]
fn workloads_pass_in_other_configurations() {
    let _g = shared();
    let configs: [Env; 3] = [
        &[("FERRY_ZERO", "release"), ("FERRY_ZERO_MIN", "0")],
        &[
            ("FERRY_ZERO", "zero"),
            ("FERRY_ZERO_MIN", "0"),
            ("FERRY_ZERO_REALLOC", "native"),
        ],
        &[("FERRY_ZERO", "off")],
    ];
    for env in configs {
        for name in WORKLOADS {
            let mut env = env.to_vec();
            env.push(("FERRY_ZERO_STATS", "1"));
            let r = run(&workload(name), &[], true, &env);
            assert!(r.passed(name), "{name} {env:?}: {}", r.describe());
            let s = r.stats();
            if env[0].1 == "off" {
                assert_eq!(s["active"], "0");
                assert_eq!(num(&s, "chunks"), 0);
            } else {
                assert_eq!(s["min"], "0");
                assert!(num(&s, "chunks") > 1000, "{name} {env:?}: {s:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// What is left of freed memory

/// `CASE -> (pages, present, bytes, nonzero)` from zero_probe's output.
type Probe = BTreeMap<String, [u64; 4]>;

fn probe(preload: bool, env: &[(&str, &str)]) -> Probe {
    probe_run(preload, env).0
}

fn probe_run(preload: bool, env: &[(&str, &str)]) -> (Probe, Run) {
    let r = run(&helper("zero_probe"), &[], preload, env);
    assert_eq!(r.code, Some(0), "zero_probe {env:?}: {}", r.describe());
    let mut m = BTreeMap::new();
    for line in r.stdout.lines() {
        let mut it = line.split_whitespace();
        let Some(case) = it.next() else { continue };
        let v: Vec<u64> = it
            .filter_map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse().ok()))
            .collect();
        assert_eq!(v.len(), 4, "bad zero_probe line {line:?}");
        m.insert(case.to_string(), [v[0], v[1], v[2], v[3]]);
    }
    assert_eq!(m.len(), 5, "zero_probe output:\n{}", r.stdout);
    (m, r)
}

#[test]
fn freed_memory_is_stale_without_the_library() {
    let _g = shared();
    for (case, [pages, present, bytes, nonzero]) in probe(false, &[]) {
        assert!(bytes > 0);
        assert_eq!(nonzero, bytes, "{case}: glibc should leave the old data");
        assert_eq!(present, pages, "{case}");
    }
}

#[test]
fn freed_memory_reads_back_as_zero_in_zero_mode() {
    let _g = shared();
    let m = probe(true, &[("FERRY_ZERO", "zero")]);
    for (case, [pages, present, bytes, nonzero]) in &m {
        if case.starts_with("free-3k") || case.starts_with("free-200") {
            // Below FERRY_ZERO_MIN (4096 by default): passed straight to free.
            assert_eq!(nonzero, bytes, "{case}: {m:?}");
        } else {
            assert_eq!(*nonzero, 0, "{case}: {m:?}");
        }
        // Zeroed, not released: the pages stay resident.
        assert_eq!(present, pages, "{case}: {m:?}");
    }
    assert!(m["free-1m"][0] >= 250, "{m:?}");
    // With no minimum, every chunk is zeroed.
    let m = probe(true, &[("FERRY_ZERO", "zero"), ("FERRY_ZERO_MIN", "0")]);
    for (case, [_, _, _, nonzero]) in &m {
        assert_eq!(*nonzero, 0, "{case}: {m:?}");
    }

    // FERRY_ZERO_REALLOC=native: a block moved by glibc's realloc is freed
    // inside glibc and stays stale (documented limitation).
    let m = probe(
        true,
        &[("FERRY_ZERO", "zero"), ("FERRY_ZERO_REALLOC", "native")],
    );
    let [_, _, bytes, nonzero] = m["realloc-move"];
    assert_eq!(nonzero, bytes, "{m:?}");
    assert_eq!(m["free-1m"][3], 0, "{m:?}");
}

#[test]
fn freed_pages_are_absent_in_release_mode() {
    let _g = shared();
    let m = probe(true, &[]);
    for case in ["free-1m", "realloc-move", "realloc-shrink"] {
        let [pages, present, _, nonzero] = m[case];
        assert!(pages > 100, "{case}: {m:?}");
        assert_eq!(present, 0, "{case}: pages still present: {m:?}");
        assert_eq!(nonzero, 0, "{case}: {m:?}");
    }
    // Below FERRY_ZERO_MIN (4096 by default): passed straight to free.
    for case in ["free-3k", "free-200"] {
        let [_, _, bytes, nonzero] = m[case];
        assert_eq!(nonzero, bytes, "{case}: {m:?}");
    }
    // With no minimum, chunks without a whole page are zeroed.
    let m = probe(true, &[("FERRY_ZERO", "release"), ("FERRY_ZERO_MIN", "0")]);
    for (case, [_, present, _, nonzero]) in &m {
        assert_eq!(*nonzero, 0, "{case}: {m:?}");
        assert_eq!(*present, 0, "{case}: {m:?}");
    }
    // Below FERRY_ZERO_RELEASE_MIN (here 4 MiB): zeroed, not released.
    let m = probe(
        true,
        &[
            ("FERRY_ZERO", "release"),
            ("FERRY_ZERO_RELEASE_MIN", "4194304"),
        ],
    );
    for case in ["free-1m", "realloc-move", "realloc-shrink"] {
        let [pages, present, _, nonzero] = m[case];
        assert!(pages > 100, "{case}: {m:?}");
        assert_eq!(present, pages, "{case}: released anyway: {m:?}");
        assert_eq!(nonzero, 0, "{case}: {m:?}");
    }
}

#[test]
fn off_and_unknown_modes() {
    let _g = shared();
    let m = probe(true, &[("FERRY_ZERO", "off")]);
    assert!(m.values().all(|[_, _, b, nz]| nz == b), "{m:?}");

    // An unknown mode is reported and falls back to release.
    let (m, r) = probe_run(true, &[("FERRY_ZERO", "bogus")]);
    assert!(r.stderr.contains("unknown FERRY_ZERO"), "{}", r.describe());
    let [pages, present, _, nonzero] = m["free-1m"];
    assert!(pages > 100 && present == 0 && nonzero == 0, "{m:?}");
}

#[test]
fn double_free_is_still_detected_by_glibc() {
    let _g = shared();
    let bin = helper("zero_doublefree");
    let configs: [(bool, Env); 3] = [
        (false, &[]),
        (true, &[("FERRY_ZERO", "zero")]),
        (true, &[("FERRY_ZERO", "release"), ("FERRY_ZERO_MIN", "0")]),
    ];
    for (preload, env) in configs {
        let r = run(&bin, &[], preload, env);
        assert_eq!(r.signal, Some(SIGABRT), "{env:?}: {}", r.describe());
        assert!(
            r.stderr.contains("double free"),
            "{env:?}: {}",
            r.describe()
        );
    }
}

const SIGABRT: i32 = 6;

#[test]
fn exported_symbols() {
    let _g = shared();
    let out = match Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(library())
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            eprintln!("skipping: nm not available");
            return;
        }
    };
    let defined: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let expected = [
        "free",
        "cfree",
        "realloc",
        "ferry_zero_stats",
        "_ZdlPv",
        "_ZdaPv",
        "_ZdlPvm",
        "_ZdaPvm",
        "_ZdlPvSt11align_val_t",
        "_ZdaPvSt11align_val_t",
        "_ZdlPvmSt11align_val_t",
        "_ZdaPvmSt11align_val_t",
        "_ZdlPvRKSt9nothrow_t",
        "_ZdaPvRKSt9nothrow_t",
        "_ZdlPvSt11align_val_tRKSt9nothrow_t",
        "_ZdaPvSt11align_val_tRKSt9nothrow_t",
    ];
    for sym in expected {
        assert!(defined.contains(&sym), "{sym} not exported:\n{out}");
    }
    // Nothing else (no Rust symbols, no malloc/calloc).
    let extra: Vec<_> = defined.iter().filter(|s| !expected.contains(s)).collect();
    assert!(extra.is_empty(), "unexpected exports: {extra:?}");
}

// ---------------------------------------------------------------------------
// Benchmark (printed, not asserted)

#[test]
fn bench_malloc_heavy() {
    let _g = BENCH.write().unwrap_or_else(PoisonError::into_inner);
    let ops = std::env::var("FERRY_ZERO_BENCH_OPS").unwrap_or_else(|_| "2000000".into());
    let runs: usize = std::env::var("FERRY_ZERO_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let bin = helper("zero_bench");
    let configs: [(&str, bool, Env); 6] = [
        ("no library", false, &[]),
        ("off (interposition only)", true, &[("FERRY_ZERO", "off")]),
        ("zero", true, &[("FERRY_ZERO", "zero")]),
        (
            "zero, min 64 (old default)",
            true,
            &[("FERRY_ZERO", "zero"), ("FERRY_ZERO_MIN", "64")],
        ),
        ("release", true, &[("FERRY_ZERO", "release")]),
        (
            "release, min 64 KiB",
            true,
            &[("FERRY_ZERO", "release"), ("FERRY_ZERO_MIN", "65536")],
        ),
    ];
    let secs = |r: &Run| -> f64 {
        r.stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("secs="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad bench output: {}", r.describe()))
    };
    println!(
        "ferry-zero benchmark ({ops} ops, best of {runs}, library {})",
        library().display()
    );
    for (workload, args) in [
        (
            "mixed malloc/free, 2 threads",
            vec!["mixed", ops.as_str(), "2"],
        ),
        ("realloc +4 KiB steps to 4 MiB x20", vec!["realloc", "20"]),
    ] {
        println!("  {workload}:");
        let mut base = None;
        for (label, preload, env) in configs {
            let s = (0..runs)
                .map(|_| {
                    let r = run(&bin, &args, preload, env);
                    assert_eq!(r.code, Some(0), "{label}: {}", r.describe());
                    secs(&r)
                })
                .fold(f64::INFINITY, f64::min);
            let b = *base.get_or_insert(s);
            println!("    {label:<28} {s:>8.3} s  {:>6.2}x", s / b);
        }
    }
}
