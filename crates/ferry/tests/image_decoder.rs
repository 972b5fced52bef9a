//! Robustness of the image decoder: a realistic image directory round-trips,
//! and every corruption — random byte flips, truncation, trailing garbage,
//! hand-crafted semantic lies behind valid checksums — is refused with an
//! error, never a panic or an allocation sized by the corrupt input.

use ferry::image::format::{self, FileKindTag, HEADER_LEN, MAX_INVENTORY};
use ferry::image::*;
use ferry::sys::{ItimerVal, KernelSigaction, RseqConfig, StackT, UserRegs, PAGE_SIZE};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

const PAGE: u64 = PAGE_SIZE as u64;
const XSTATE: u32 = 2688;
const ROOT: i32 = 4242;
const CHILD: i32 = 4243;
const CASES: u32 = 256;

// ---------------------------------------------------------------------------
// Allocation tracking: the largest single allocation made by this thread
// while tracking is on. Other test threads are unaffected.

struct Tracking;

thread_local! {
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if let Some(m) = c.get() {
            c.set(Some(m.max(size)));
        }
    });
}

// SAFETY: forwards every call unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f`, returning its result and the largest single allocation it made.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(Some(0)));
    let r = f();
    let m = LARGEST.with(|c| c.replace(None)).unwrap_or(0);
    (r, m)
}

// ---------------------------------------------------------------------------
// Fixture: a realistic image directory.

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-image-decoder-{}-{name}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One data run as written, for checking reads.
#[derive(Debug, Clone)]
struct StoredRun {
    pages_file: String,
    offset: u64,
    crc: u32,
    bytes: Vec<u8>,
}

struct Fixture {
    _tmp: TempDir,
    img: ImageDir,
    inv: Inventory,
    runs: Vec<StoredRun>,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.img.path(name)
    }
    fn inventory_bytes(&self) -> Vec<u8> {
        std::fs::read(self.path(INVENTORY)).unwrap()
    }
    fn store(&self, pid: i32) -> PathBuf {
        self.path(&format!("pages-{pid}.img"))
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Builds areas of one process and writes their data runs to its store.
struct AreaBuilder {
    pages_file: String,
    store: PageStoreWriter,
    runs: Vec<StoredRun>,
    seed: u64,
}

impl AreaBuilder {
    fn new(img: &ImageDir, pid: i32) -> Self {
        let pages_file = format!("pages-{pid}.img");
        Self {
            store: PageStoreWriter::create(&img.path(&pages_file)).unwrap(),
            pages_file,
            runs: Vec::new(),
            seed: pid as u64,
        }
    }

    /// An area of `npages` at `start`; `layout` is (first page, pages, data?).
    #[allow(clippy::too_many_arguments)]
    fn vma(
        &mut self,
        start: u64,
        npages: u64,
        prot: u32,
        shared: bool,
        kind: VmaKind,
        advice: Advice,
        layout: &[(u64, u32, bool)],
        guards: Vec<(u64, u64)>,
    ) -> Vma {
        let mut pages = Vec::new();
        for &(first, n, data) in layout {
            let addr = start + first * PAGE;
            let kind = if data {
                self.seed += 1;
                let bytes = noise(self.seed, n as usize * PAGE_SIZE);
                let offset = self.store.append(&bytes).unwrap();
                let crc = crc32c::crc32c(&bytes);
                self.runs.push(StoredRun {
                    pages_file: self.pages_file.clone(),
                    offset,
                    crc,
                    bytes,
                });
                PageKind::Data { offset, crc }
            } else {
                PageKind::Zero
            };
            pages.push(PageRun {
                addr,
                npages: n,
                kind,
            });
        }
        Vma {
            start,
            end: start + npages * PAGE,
            prot,
            shared,
            kind,
            advice,
            pages,
            guards,
        }
    }

    fn finish(self) -> Vec<StoredRun> {
        self.store.finish().unwrap();
        self.runs
    }
}

const R: u32 = libc::PROT_READ as u32;
const RW: u32 = (libc::PROT_READ | libc::PROT_WRITE) as u32;
const RX: u32 = (libc::PROT_READ | libc::PROT_EXEC) as u32;
const X: u32 = libc::PROT_EXEC as u32;

fn anon(name: Option<&str>, heap: bool, stack: bool) -> VmaKind {
    VmaKind::Anon {
        name: name.map(str::to_string),
        heap,
        stack,
    }
}

fn file(path: &str, offset: u64, blob: Option<u32>) -> VmaKind {
    VmaKind::File {
        path: path.into(),
        offset,
        blob,
    }
}

fn thread(tid: i32, with_rseq: bool, pending: usize) -> ThreadImage {
    ThreadImage {
        tid,
        regs: UserRegs {
            rip: 0x401000 + tid as u64,
            rsp: 0x7ffd_0000_7f00,
            rax: (-512i64) as u64,
            orig_rax: 202,
            cs: 0x33,
            ss: 0x2b,
            eflags: 0x246,
            fs_base: 0x7f00_0000_1000 + tid as u64 * 0x100,
            ..UserRegs::default()
        },
        xstate: noise(tid as u64 * 7, XSTATE as usize),
        sigmask: 1 << (libc::SIGUSR1 - 1),
        sigaltstack: StackT {
            ss_sp: 0,
            ss_flags: libc::SS_DISABLE,
            pad: 0,
            ss_size: 0,
        },
        rseq: with_rseq.then_some(RseqConfig {
            rseq_abi_pointer: 0x7f00_0000_1fe0,
            rseq_abi_size: 32,
            signature: 0x5305_3053,
            flags: 0,
            pad: 0,
        }),
        tid_address: 0x7f00_0000_19d0,
        robust_list: (0x7f00_0000_19e0, 24),
        pending: (0..pending)
            .map(|k| noise(tid as u64 + k as u64, 128))
            .collect(),
    }
}

fn sigactions() -> Vec<KernelSigaction> {
    (1..=64u64)
        .map(|sig| match sig {
            10 | 12 | 17 => KernelSigaction {
                handler: 0x401200 + sig,
                flags: (libc::SA_RESTART | libc::SA_SIGINFO) as u64 | 0x0400_0000,
                restorer: 0x7f00_0000_3000,
                mask: 1 << (sig - 1),
            },
            13 => KernelSigaction {
                handler: 1, // SIG_IGN
                ..KernelSigaction::default()
            },
            _ => KernelSigaction::default(),
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn process(
    pid: i32,
    ppid: i32,
    vmas: Vec<Vma>,
    threads: Vec<ThreadImage>,
    fds: Vec<FdImage>,
) -> ProcessImage {
    ProcessImage {
        pid,
        zombie: None,
        ppid,
        pgid: ROOT,
        sid: ROOT,
        comm: format!("worker-{pid}"),
        exe: "/usr/bin/ferry-test".into(),
        cwd: "/srv/app".into(),
        umask: 0o022,
        personality: 0,
        rlimits: (0..16u32).map(|r| (r, 1 << (r + 10), u64::MAX)).collect(),
        mm: MmFields {
            start_code: 0x400000,
            end_code: 0x403000,
            start_data: 0x404000,
            end_data: 0x407000,
            start_brk: 0x600000,
            brk: 0x610000,
            start_stack: 0x7ffd_0000_7ff0,
            arg_start: 0x7ffd_0000_7f10,
            arg_end: 0x7ffd_0000_7f40,
            env_start: 0x7ffd_0000_7f40,
            env_end: 0x7ffd_0000_7fe0,
        },
        auxv: noise(pid as u64 + 99, 368),
        vmas,
        threads,
        sigactions: sigactions(),
        shared_pending: vec![noise(pid as u64 + 5, 128)],
        itimers: [
            ItimerVal {
                interval_sec: 1,
                interval_usec: 0,
                value_sec: 0,
                value_usec: 250_000,
            },
            ItimerVal::default(),
            ItimerVal {
                interval_sec: -1, // nonsense, but a valid i64: zigzag
                interval_usec: 999_999,
                value_sec: i64::MAX,
                value_usec: i64::MIN,
            },
        ],
        fds,
        pages_file: format!("pages-{pid}.img"),
    }
}

fn fd(fd: i32, file: u32, cloexec: bool) -> FdImage {
    FdImage { fd, cloexec, file }
}

/// Writes a complete image directory and returns it with its model.
fn fixture(name: &str) -> Fixture {
    let tmp = TempDir::new(name);
    let img = ImageDir::new(&tmp.0, true).unwrap();

    let blob0 = img
        .write_blob("blob-0.img", "/tmp/scratch", &noise(1000, 10_000))
        .unwrap();
    let blob1 = img
        .write_blob("blob-1.img", "/opt/lib/libgone.so", &noise(1001, 8192))
        .unwrap();

    // Root process: every kind of area.
    let mut b = AreaBuilder::new(&img, ROOT);
    let exe = "/usr/bin/ferry-test";
    let mut vmas = vec![
        b.vma(
            0x400000,
            3,
            RX,
            false,
            file(exe, 0, None),
            Advice::default(),
            &[(1, 1, true)],
            vec![],
        ),
        b.vma(
            0x404000,
            3,
            RW,
            false,
            file(exe, 0x4000, None),
            Advice::default(),
            &[(0, 2, true), (2, 1, false)],
            vec![],
        ),
        b.vma(
            0x600000,
            16,
            RW,
            false,
            anon(None, true, false),
            Advice {
                hugepage: true,
                ..Advice::default()
            },
            &[(0, 4, true), (4, 3, false), (8, 2, true)],
            vec![],
        ),
        b.vma(
            0x7f00_0000_0000,
            8,
            RW,
            false,
            anon(Some("[anon:arena]"), false, false),
            Advice {
                dontdump: true,
                mergeable: true,
                ..Advice::default()
            },
            &[(0, 8, false)],
            vec![],
        ),
        b.vma(
            0x7f00_0001_0000,
            4,
            RX,
            false,
            file("/opt/lib/libgone.so", 0, Some(1)),
            Advice::default(),
            &[(0, 1, true)],
            vec![],
        ),
        b.vma(
            0x7f00_0002_0000,
            4,
            R,
            true,
            file("/etc/hosts", 0, None),
            Advice::default(),
            &[],
            vec![],
        ),
        b.vma(
            0x7f00_0003_0000,
            8,
            RW,
            true,
            VmaKind::Shmem {
                name: "/dev/zero (deleted)".into(),
                offset: 0,
                size: 8 * PAGE,
                id: 77,
            },
            Advice {
                dontfork: true,
                ..Advice::default()
            },
            &[(0, 3, true), (5, 3, true)],
            vec![],
        ),
        b.vma(
            0x7f00_0004_0000,
            4,
            R,
            true,
            VmaKind::Shmem {
                name: "/memfd:buf (deleted)".into(),
                offset: PAGE,
                size: 5 * PAGE,
                id: 78,
            },
            Advice::default(),
            &[(1, 2, true)],
            vec![],
        ),
        b.vma(
            0x7f00_0005_0000,
            8,
            RW,
            false,
            anon(None, false, false),
            Advice {
                wipeonfork: true,
                locked: true,
                ..Advice::default()
            },
            &[(1, 2, true), (3, 1, false)],
            vec![(0x7f00_0005_0000, 1), (0x7f00_0005_6000, 2)],
        ),
        b.vma(
            0x7ffd_0000_0000,
            8,
            RW,
            false,
            anon(Some("[stack]"), false, true),
            Advice {
                growsdown: true,
                ..Advice::default()
            },
            &[(5, 3, true)],
            vec![],
        ),
    ];
    let special = 0x7ffd_1000_0000;
    vmas.push(b.vma(
        special,
        4,
        R,
        false,
        VmaKind::Vvar,
        Advice::default(),
        &[],
        vec![],
    ));
    vmas.push(b.vma(
        special + 4 * PAGE,
        3,
        R,
        false,
        VmaKind::VvarVclock,
        Advice::default(),
        &[],
        vec![],
    ));
    vmas.push(b.vma(
        special + 7 * PAGE,
        2,
        RX,
        false,
        VmaKind::Vdso,
        Advice::default(),
        &[],
        vec![],
    ));
    vmas.push(b.vma(
        0xffff_ffff_ff60_0000,
        1,
        X,
        false,
        VmaKind::Vsyscall,
        Advice::default(),
        &[],
        vec![],
    ));
    let mut runs = b.finish();
    let root = process(
        ROOT,
        1,
        vmas,
        vec![
            thread(ROOT, true, 0),
            thread(4244, true, 1),
            thread(4245, false, 2),
        ],
        vec![
            fd(0, 0, false),
            fd(1, 1, false),
            fd(2, 1, false),
            fd(3, 2, true),
            fd(4, 3, true),
            fd(5, 4, false),
            fd(6, 5, false),
            fd(7, 6, true),
        ],
    );

    // A child with a smaller address space.
    let mut b = AreaBuilder::new(&img, CHILD);
    let vmas = vec![
        b.vma(
            0x400000,
            3,
            RX,
            false,
            file(exe, 0, None),
            Advice::default(),
            &[],
            vec![],
        ),
        b.vma(
            0x600000,
            4,
            RW,
            false,
            anon(None, true, false),
            Advice::default(),
            &[(0, 1, true), (1, 1, false), (2, 2, true)],
            vec![],
        ),
        b.vma(
            0x7ffd_1000_0000,
            2,
            RX,
            false,
            VmaKind::Vdso,
            Advice::default(),
            &[],
            vec![],
        ),
    ];
    runs.extend(b.finish());
    let child = process(
        CHILD,
        ROOT,
        vmas,
        vec![thread(CHILD, false, 0)],
        vec![fd(0, 0, false), fd(1, 4, false)],
    );

    let inv = Inventory {
        pidns: None,
        machine: MachineInfo {
            kernel_release: "6.18.0-ferry-test".into(),
            hostname: "builder".into(),
            page_size: PAGE_SIZE as u32,
            xstate_size: XSTATE,
            xcr0: 0x2e7,
            vdso_layout: vec![
                ("[vvar]".into(), 4 * PAGE),
                ("[vvar_vclock]".into(), 3 * PAGE),
                ("[vdso]".into(), 2 * PAGE),
            ],
        },
        root_pid: ROOT,
        processes: vec![root, child],
        files: vec![
            FileImage {
                flags: libc::O_RDWR as u32,
                pos: 0,
                kind: FileKind::CharDev {
                    path: "/dev/null".into(),
                    rdev: 0x103,
                },
            },
            FileImage {
                flags: libc::O_WRONLY as u32,
                pos: 0,
                kind: FileKind::Pipe {
                    pipe: 0,
                    write_end: true,
                },
            },
            FileImage {
                flags: (libc::O_WRONLY | libc::O_APPEND) as u32,
                pos: 1234,
                kind: FileKind::Path {
                    path: "/var/log/app.log".into(),
                    blob: None,
                    size: 1234,
                },
            },
            FileImage {
                flags: libc::O_RDWR as u32,
                pos: 77,
                kind: FileKind::Path {
                    path: "/tmp/scratch".into(),
                    blob: Some(0),
                    size: 10_000,
                },
            },
            FileImage {
                flags: (libc::O_RDONLY | libc::O_NONBLOCK) as u32,
                pos: 0,
                kind: FileKind::Pipe {
                    pipe: 1,
                    write_end: false,
                },
            },
            FileImage {
                flags: libc::O_WRONLY as u32,
                pos: 0,
                kind: FileKind::Pipe {
                    pipe: 1,
                    write_end: true,
                },
            },
            FileImage {
                flags: (libc::O_RDONLY | libc::O_DIRECTORY) as u32,
                pos: 0,
                kind: FileKind::Path {
                    path: "/home".into(),
                    blob: None,
                    size: 4096,
                },
            },
        ],
        pipes: vec![
            PipeImage {
                ino: 1001,
                capacity: 65536,
                data: b"hello, pipe\n".repeat(10),
            },
            PipeImage {
                ino: 1002,
                capacity: 16 * 4096,
                data: noise(1002, 3000),
            },
        ],
        blobs: vec![blob0, blob1],
        created_ns: 1_750_000_000_123_456_789,
    };
    img.write_inventory(&inv).unwrap();
    Fixture {
        _tmp: tmp,
        img,
        inv,
        runs,
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn why(e: &ImageError) -> Option<&str> {
    match e {
        ImageError::Corrupt { why, .. } => Some(why),
        _ => None,
    }
}

/// `read_inventory` must fail with `Corrupt`.
fn expect_corrupt(img: &ImageDir) -> Result<(), TestCaseError> {
    match img.read_inventory() {
        Ok(_) => Err(TestCaseError::fail("corruption accepted")),
        Err(ImageError::Corrupt { .. }) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!("wrong error: {e}"))),
    }
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Rewrites `path` as `bytes` with a fresh header CRC over bytes 0..24.
fn reseal_header(bytes: &mut [u8]) {
    let crc = crc32c::crc32c(&bytes[0..24]);
    bytes[24..28].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes the payload CRC of a metadata file.
fn reseal_payload(bytes: &mut [u8]) {
    let crc = crc32c::crc32c(&bytes[HEADER_LEN..]);
    bytes[28..32].copy_from_slice(&crc.to_le_bytes());
}

// ---------------------------------------------------------------------------
// Round trip.

#[test]
fn round_trip() {
    let fx = fixture("roundtrip");
    let back = fx.img.read_inventory().unwrap();
    assert_eq!(back, fx.inv);

    // The layout promised by the format: header, then the postcard payload.
    let bytes = fx.inventory_bytes();
    assert_eq!(&bytes[0..8], b"FERRYIMG");
    assert_eq!(
        u16::from_le_bytes([bytes[8], bytes[9]]),
        format::FORMAT_MAJOR
    );
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 1);
    assert_eq!(
        u64::from_le_bytes(bytes[16..24].try_into().unwrap()),
        (bytes.len() - HEADER_LEN) as u64
    );
    assert_eq!(
        &bytes[HEADER_LEN..],
        &postcard::to_stdvec(&fx.inv).unwrap()[..]
    );

    assert_eq!(fx.runs.len(), 12);
    for run in &fx.runs {
        let store = PageStoreReader::open(&fx.path(&run.pages_file)).unwrap();
        let mut buf = vec![0u8; run.bytes.len()];
        store.read_run(run.offset, run.crc, &mut buf).unwrap();
        assert_eq!(buf, run.bytes);
        let e = store
            .read_run(run.offset, run.crc ^ 1, &mut buf)
            .unwrap_err();
        assert!(why(&e).unwrap().contains("checksum"), "{e}");
    }

    // Runs outside the store are refused before reading.
    let store = PageStoreReader::open(&fx.store(ROOT)).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    for off in [
        store.payload_len,
        store.payload_len - 1,
        u64::MAX,
        u64::MAX - 10,
    ] {
        let e = store.read_run(off, 0, &mut page).unwrap_err();
        assert!(why(&e).unwrap().contains("outside"), "{e}");
    }

    for b in &fx.inv.blobs {
        let data = fx.img.read_blob(b).unwrap();
        assert_eq!(data.len() as u64, b.len);
        assert_eq!(crc32c::crc32c(&data), b.crc);
    }
    assert_eq!(
        fx.img.read_blob(&fx.inv.blobs[0]).unwrap(),
        noise(1000, 10_000)
    );
}

#[test]
fn newer_minor_is_accepted() {
    let fx = fixture("minor");
    let mut bytes = fx.inventory_bytes();
    bytes[10..12].copy_from_slice(&(format::FORMAT_MINOR + 3).to_le_bytes());
    reseal_header(&mut bytes);
    std::fs::write(fx.path(INVENTORY), &bytes).unwrap();
    assert_eq!(fx.img.read_inventory().unwrap(), fx.inv);
}

// ---------------------------------------------------------------------------
// Random damage to the inventory file.

#[test]
fn inventory_byte_flip() {
    let fx = fixture("inv-flip");
    let orig = fx.inventory_bytes();
    let path = fx.path(INVENTORY);
    runner()
        .run(&(any::<Index>(), 1u8..=255), |(pos, mask)| {
            let mut b = orig.clone();
            b[pos.index(orig.len())] ^= mask;
            std::fs::write(&path, &b).unwrap();
            expect_corrupt(&fx.img)
        })
        .unwrap();
    // Also every header byte, with every single-bit flip.
    for pos in 0..HEADER_LEN {
        for bit in 0..8 {
            let mut b = orig.clone();
            b[pos] ^= 1 << bit;
            std::fs::write(&path, &b).unwrap();
            expect_corrupt(&fx.img).unwrap();
        }
    }
}

#[test]
fn inventory_truncated() {
    let fx = fixture("inv-trunc");
    let orig = fx.inventory_bytes();
    let path = fx.path(INVENTORY);
    runner()
        .run(&any::<Index>(), |len| {
            std::fs::write(&path, &orig[..len.index(orig.len())]).unwrap();
            expect_corrupt(&fx.img)
        })
        .unwrap();
    for len in 0..=HEADER_LEN {
        std::fs::write(&path, &orig[..len]).unwrap();
        expect_corrupt(&fx.img).unwrap();
    }
}

#[test]
fn inventory_appended() {
    let fx = fixture("inv-append");
    let orig = fx.inventory_bytes();
    let path = fx.path(INVENTORY);
    runner()
        .run(&prop::collection::vec(any::<u8>(), 1..256), |tail| {
            let mut b = orig.clone();
            b.extend_from_slice(&tail);
            std::fs::write(&path, &b).unwrap();
            expect_corrupt(&fx.img)?;
            // Even with the header and payload CRC recomputed to cover the
            // garbage, postcard leaves it unread: trailing bytes.
            let n = b.len() - HEADER_LEN;
            b[16..24].copy_from_slice(&(n as u64).to_le_bytes());
            reseal_header(&mut b);
            reseal_payload(&mut b);
            std::fs::write(&path, &b).unwrap();
            expect_corrupt(&fx.img)
        })
        .unwrap();
}

/// Damage behind valid checksums: the postcard decoder and the semantic
/// checks must cope with anything (success is allowed, a panic is not).
#[test]
fn inventory_resealed_payload_never_panics() {
    let fx = fixture("inv-reseal");
    let orig = fx.inventory_bytes();
    let path = fx.path(INVENTORY);
    let accepted = Cell::new(0u32);
    runner()
        .run(
            &prop::collection::vec((any::<Index>(), 1u8..=255), 1..4),
            |flips| {
                let mut b = orig.clone();
                for (pos, mask) in flips {
                    b[HEADER_LEN + pos.index(orig.len() - HEADER_LEN)] ^= mask;
                }
                reseal_payload(&mut b);
                std::fs::write(&path, &b).unwrap();
                if let Ok(inv) = fx.img.read_inventory() {
                    accepted.set(accepted.get() + 1);
                    // Whatever was accepted still satisfies the invariants.
                    prop_assert!(inv.process(inv.root_pid).is_some());
                }
                Ok(())
            },
        )
        .unwrap();
    // Most flips land in xstate, page data CRCs and other opaque bytes.
    assert!(accepted.get() > 0);

    // Random payloads of any length.
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..4096), |payload| {
            let mut b = format::header(FileKindTag::Inventory, payload.len() as u64, 0).to_vec();
            b.extend_from_slice(&payload);
            reseal_payload(&mut b);
            std::fs::write(&path, &b).unwrap();
            prop_assert!(fx.img.read_inventory().is_err());
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------
// Page stores.

#[test]
fn page_store_header_byte_flip() {
    let fx = fixture("pages-hdr");
    let path = fx.store(ROOT);
    let orig = std::fs::read(&path).unwrap();
    runner()
        .run(&(0..HEADER_LEN, 1u8..=255), |(pos, mask)| {
            let mut b = orig.clone();
            b[pos] ^= mask;
            std::fs::write(&path, &b).unwrap();
            expect_corrupt(&fx.img)?;
            prop_assert!(PageStoreReader::open(&path).is_err());
            Ok(())
        })
        .unwrap();
    std::fs::write(&path, &orig).unwrap();
    fx.img.read_inventory().unwrap();
}

#[test]
fn page_store_truncated() {
    let fx = fixture("pages-trunc");
    let path = fx.store(CHILD);
    let orig = std::fs::read(&path).unwrap();
    runner()
        .run(&any::<Index>(), |len| {
            std::fs::write(&path, &orig[..len.index(orig.len())]).unwrap();
            expect_corrupt(&fx.img)
        })
        .unwrap();

    // A store whose header is resealed to the shorter length passes the
    // header check; the runs now lie beyond its end.
    let mut b = orig[..orig.len() - PAGE_SIZE].to_vec();
    let n = (b.len() - HEADER_LEN) as u64;
    b[16..24].copy_from_slice(&n.to_le_bytes());
    reseal_header(&mut b);
    std::fs::write(&path, &b).unwrap();
    let e = fx.img.read_inventory().unwrap_err();
    assert!(why(&e).unwrap().contains("beyond the end"), "{e}");
}

#[test]
fn page_data_byte_flip() {
    let fx = fixture("pages-data");
    let mut orig = std::collections::HashMap::new();
    for r in &fx.runs {
        orig.entry(r.pages_file.clone())
            .or_insert_with(|| std::fs::read(fx.path(&r.pages_file)).unwrap());
    }
    runner()
        .run(
            &(any::<Index>(), any::<Index>(), 1u8..=255),
            |(which, pos, mask)| {
                let run = &fx.runs[which.index(fx.runs.len())];
                let path = fx.path(&run.pages_file);
                let mut b = orig[&run.pages_file].clone();
                let at = HEADER_LEN + run.offset as usize + pos.index(run.bytes.len());
                b[at] ^= mask;
                std::fs::write(&path, &b).unwrap();
                // Page data is checked per run, when it is read.
                prop_assert!(fx.img.read_inventory().is_ok());
                let store = PageStoreReader::open(&path).unwrap();
                let mut buf = vec![0u8; run.bytes.len()];
                let e = store.read_run(run.offset, run.crc, &mut buf).unwrap_err();
                prop_assert!(why(&e).is_some_and(|w| w.contains("checksum")), "{}", e);
                // Every other run of the store still reads.
                for other in fx.runs.iter().filter(|o| o.pages_file == run.pages_file) {
                    if other.offset != run.offset {
                        let mut buf = vec![0u8; other.bytes.len()];
                        store.read_run(other.offset, other.crc, &mut buf).unwrap();
                        prop_assert_eq!(&buf, &other.bytes);
                    }
                }
                std::fs::write(&path, &orig[&run.pages_file]).unwrap();
                Ok(())
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------
// Blobs.

#[test]
fn blob_damage() {
    let fx = fixture("blob");
    let blob = fx.inv.blobs[1].clone();
    let path = fx.path(&blob.file);
    let orig = std::fs::read(&path).unwrap();
    runner()
        .run(&(any::<Index>(), 1u8..=255), |(pos, mask)| {
            let mut b = orig.clone();
            b[pos.index(orig.len())] ^= mask;
            std::fs::write(&path, &b).unwrap();
            let r = fx.img.read_blob(&blob);
            prop_assert!(
                matches!(r, Err(ImageError::Corrupt { .. })),
                "{:?}",
                r.map(|_| ())
            );
            Ok(())
        })
        .unwrap();
    runner()
        .run(&any::<Index>(), |len| {
            std::fs::write(&path, &orig[..len.index(orig.len())]).unwrap();
            let r = fx.img.read_blob(&blob);
            prop_assert!(
                matches!(r, Err(ImageError::Corrupt { .. })),
                "{:?}",
                r.map(|_| ())
            );
            Ok(())
        })
        .unwrap();
    // A blob replaced by another valid blob does not match its reference.
    std::fs::write(
        &path,
        std::fs::read(fx.path(&fx.inv.blobs[0].file)).unwrap(),
    )
    .unwrap();
    assert!(fx.img.read_blob(&blob).is_err());
    std::fs::write(&path, &orig).unwrap();
    fx.img.read_blob(&blob).unwrap();
}

// ---------------------------------------------------------------------------
// Semantic corruptions behind valid checksums.

/// Re-encodes a modified inventory and expects `Corrupt` mentioning `needle`.
fn expect_semantic(fx: &Fixture, needle: &str, f: impl FnOnce(&mut Inventory)) {
    let mut inv = fx.inv.clone();
    f(&mut inv);
    let bytes = format::encode(FileKindTag::Inventory, &inv).unwrap();
    std::fs::write(fx.path(INVENTORY), bytes).unwrap();
    match fx.img.read_inventory() {
        Err(ImageError::Corrupt { why, .. }) => {
            assert!(why.contains(needle), "expected {needle:?}, got {why:?}")
        }
        Err(e) => panic!("expected Corrupt ({needle}), got {e}"),
        Ok(_) => panic!("accepted an image with {needle:?}"),
    }
}

fn root(inv: &mut Inventory) -> &mut ProcessImage {
    &mut inv.processes[0]
}

#[test]
fn semantic_memory() {
    let fx = fixture("sem-mem");
    expect_semantic(&fx, "bad area", |i| {
        // Overlapping areas.
        let v = &mut root(i).vmas;
        v[1].start = v[0].end - PAGE;
        v[1].pages.clear();
    });
    expect_semantic(&fx, "bad area", |i| root(i).vmas.swap(2, 3));
    expect_semantic(&fx, "bad area", |i| root(i).vmas[2].end += 1);
    expect_semantic(&fx, "bad area", |i| root(i).vmas[2].start -= 0x800);
    expect_semantic(&fx, "bad area", |i| {
        let v = &mut root(i).vmas[2];
        v.end = v.start;
        v.pages.clear();
    });
    expect_semantic(&fx, "bad area", |i| {
        // Beyond the user address space, and not the vsyscall page.
        let v = root(i)
            .vmas
            .iter_mut()
            .find(|v| v.kind == VmaKind::Vdso)
            .unwrap();
        v.start = 0xffff_8000_0000_0000;
        v.end = v.start + 2 * PAGE;
    });
    expect_semantic(&fx, "outside area", |i| {
        // A run past the end of its area.
        let v = &mut root(i).vmas[2];
        v.pages.last_mut().unwrap().npages += 7;
    });
    expect_semantic(&fx, "outside area", |i| {
        let v = &mut root(i).vmas[2];
        v.pages[0].addr = v.start - PAGE;
    });
    expect_semantic(&fx, "outside area", |i| {
        // Overlapping runs.
        let v = &mut root(i).vmas[2];
        v.pages[1].addr -= PAGE;
    });
    expect_semantic(&fx, "outside area", |i| root(i).vmas[2].pages[1].npages = 0);
    expect_semantic(&fx, "outside area", |i| root(i).vmas[2].pages[1].addr += 8);
    expect_semantic(&fx, "overflows", |i| {
        let v = root(i).vmas.last_mut().unwrap();
        assert_eq!(v.kind, VmaKind::Vsyscall);
        v.pages.push(PageRun {
            addr: v.start,
            npages: u32::MAX,
            kind: PageKind::Zero,
        });
    });
    expect_semantic(&fx, "beyond the end of the store", |i| {
        let r = &mut root(i).vmas[2].pages[0];
        r.kind = PageKind::Data {
            offset: u64::MAX - 100,
            crc: 0,
        };
    });
    expect_semantic(&fx, "beyond the end of the store", |i| {
        let r = &mut i.processes[1].vmas[1].pages[2];
        let PageKind::Data { offset, .. } = &mut r.kind else {
            panic!("fixture changed")
        };
        *offset += PAGE;
    });
    expect_semantic(&fx, "refers to blob", |i| {
        root(i).vmas[4].kind = file("/opt/lib/libgone.so", 0, Some(2));
    });
    expect_semantic(&fx, "guard", |i| {
        let v = &mut root(i).vmas[8];
        v.guards.push((v.end, 1));
    });
    expect_semantic(&fx, "guard", |i| {
        let v = &mut root(i).vmas[8];
        v.guards.push((v.start, 9));
    });
    expect_semantic(&fx, "guard", |i| {
        let v = &mut root(i).vmas[8];
        v.guards.push((v.start + 1, 1));
    });
    expect_semantic(&fx, "guard", |i| {
        let v = &mut root(i).vmas[8];
        v.guards.push((v.start, 0));
    });
    expect_semantic(&fx, "guard", |i| {
        let v = &mut root(i).vmas[8];
        v.guards.push((v.start, u64::MAX / 2));
    });
    expect_semantic(&fx, "guard", |i| {
        let v = &mut root(i).vmas[8];
        v.guards.push((v.start - PAGE, 1));
    });
}

#[test]
fn semantic_objects() {
    let fx = fixture("sem-obj");
    expect_semantic(&fx, "refers to file", |i| root(i).fds[3].file = 7);
    expect_semantic(&fx, "refers to file", |i| {
        root(i).fds.push(fd(9, u32::MAX, false))
    });
    expect_semantic(&fx, "refers to file", |i| root(i).fds[0].fd = -1);
    expect_semantic(&fx, "refers to pipe", |i| {
        i.files[1].kind = FileKind::Pipe {
            pipe: 2,
            write_end: true,
        }
    });
    expect_semantic(&fx, "refers to pipe", |i| {
        i.pipes.clear();
    });
    expect_semantic(&fx, "refers to blob", |i| {
        i.files[3].kind = FileKind::Path {
            path: "/tmp/scratch".into(),
            blob: Some(2),
            size: 0,
        }
    });
    expect_semantic(&fx, "refers to blob", |i| {
        i.blobs.pop();
    });
    expect_semantic(&fx, "pipe", |i| i.pipes[1].data = vec![0; (1 << 20) + 1]);
    expect_semantic(&fx, "pipe", |i| i.pipes[1].capacity = 100 << 20);
    // More bytes than the pipe can hold would block the restore forever.
    expect_semantic(&fx, "pipe", |i| i.pipes[1].capacity = 2048);
    expect_semantic(&fx, "blob name", |i| {
        i.blobs[0].file = "../blob-0.img".into()
    });
    expect_semantic(&fx, "blob name", |i| i.blobs[0].file = "/etc/shadow".into());
    expect_semantic(&fx, "blob name", |i| i.blobs[0].file = "..".into());
    expect_semantic(&fx, "blob name", |i| i.blobs[0].file = String::new());
}

#[test]
fn semantic_processes() {
    let fx = fixture("sem-proc");
    expect_semantic(&fx, "xstate", |i| {
        root(i).threads[1].xstate.pop();
    });
    expect_semantic(&fx, "xstate", |i| i.processes[1].threads[0].xstate.push(0));
    expect_semantic(&fx, "xstate size", |i| {
        i.machine.xstate_size = 64;
        for p in &mut i.processes {
            for t in &mut p.threads {
                t.xstate.truncate(64);
            }
        }
    });
    expect_semantic(&fx, "xstate size", |i| i.machine.xstate_size = u32::MAX);
    expect_semantic(&fx, "page size", |i| i.machine.page_size = 16384);
    expect_semantic(&fx, "root pid", |i| i.root_pid = 1);
    expect_semantic(&fx, "root pid", |i| i.processes.clear());
    expect_semantic(&fx, "duplicate", |i| i.processes[1].pid = ROOT);
    expect_semantic(&fx, "duplicate or invalid", |i| {
        i.processes[1].pid = -5;
        i.processes[1].threads[0].tid = -5;
    });
    expect_semantic(&fx, "page store name", |i| {
        root(i).pages_file = "../pages-4242.img".into()
    });
    expect_semantic(&fx, "page store name", |i| {
        root(i).pages_file = "/tmp/x.img".into()
    });
    expect_semantic(&fx, "page store name", |i| {
        root(i).pages_file = String::new()
    });
    expect_semantic(&fx, "page store name", |i| root(i).pages_file = "..".into());
    expect_semantic(&fx, "no threads", |i| root(i).threads.clear());
    expect_semantic(&fx, "leader", |i| root(i).threads.swap(0, 1));
    expect_semantic(&fx, "siginfo", |i| root(i).threads[2].pending[0].push(0));
    expect_semantic(&fx, "signal state", |i| {
        root(i).shared_pending.push(vec![0; 127])
    });
    expect_semantic(&fx, "signal state", |i| {
        root(i).sigactions.push(KernelSigaction::default())
    });

    // A page store that is another kind of file, or missing.
    let mut inv = fx.inv.clone();
    root(&mut inv).pages_file = "blob-0.img".into();
    std::fs::write(
        fx.path(INVENTORY),
        format::encode(FileKindTag::Inventory, &inv).unwrap(),
    )
    .unwrap();
    let e = fx.img.read_inventory().unwrap_err();
    assert!(why(&e).unwrap().contains("file kind"), "{e}");
    root(&mut inv).pages_file = "pages-1.img".into();
    std::fs::write(
        fx.path(INVENTORY),
        format::encode(FileKindTag::Inventory, &inv).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        fx.img.read_inventory(),
        Err(ImageError::Io { .. })
    ));
}

#[test]
fn header_lies() {
    let fx = fixture("hdr");
    let orig = fx.inventory_bytes();
    let path = fx.path(INVENTORY);
    let write = |b: &[u8]| std::fs::write(&path, b).unwrap();

    // Huge declared payload length, header CRC recomputed.
    for len in [
        u64::MAX,
        1 << 40,
        MAX_INVENTORY + 1,
        (orig.len() - HEADER_LEN) as u64 + 1,
    ] {
        let mut b = orig.clone();
        b[16..24].copy_from_slice(&len.to_le_bytes());
        reseal_header(&mut b);
        write(&b);
        let e = fx.img.read_inventory().unwrap_err();
        assert!(
            why(&e).unwrap().contains("does not match the file size"),
            "{e}"
        );
    }

    // Major version bump.
    let mut b = orig.clone();
    b[8..10].copy_from_slice(&(format::FORMAT_MAJOR + 1).to_le_bytes());
    reseal_header(&mut b);
    write(&b);
    assert!(matches!(
        fx.img.read_inventory(),
        Err(ImageError::Version { found, supported, .. })
            if found == format::FORMAT_MAJOR + 1 && supported == format::FORMAT_MAJOR
    ));
    b[8..10].copy_from_slice(&0u16.to_le_bytes());
    reseal_header(&mut b);
    write(&b);
    assert!(matches!(
        fx.img.read_inventory(),
        Err(ImageError::Version { found: 0, .. })
    ));

    // Wrong kind: a blob header around an inventory payload.
    let mut b = orig.clone();
    b[12..16].copy_from_slice(&(FileKindTag::Blob as u32).to_le_bytes());
    reseal_header(&mut b);
    write(&b);
    assert!(why(&fx.img.read_inventory().unwrap_err())
        .unwrap()
        .contains("file kind"));

    // Page store header with a payload CRC (page stores carry none).
    write(&orig);
    let store = fx.store(ROOT);
    let pages = std::fs::read(&store).unwrap();
    let mut b = pages.clone();
    b[28] = 1;
    std::fs::write(&store, &b).unwrap();
    expect_corrupt(&fx.img).unwrap();
    std::fs::write(&store, &pages).unwrap();

    // Page store header claiming a huge payload.
    let mut b = pages.clone();
    b[16..24].copy_from_slice(&(1u64 << 50).to_le_bytes());
    reseal_header(&mut b);
    std::fs::write(&store, &b).unwrap();
    expect_corrupt(&fx.img).unwrap();
    assert!(PageStoreReader::open(&store).is_err());
    std::fs::write(&store, &pages).unwrap();
    fx.img.read_inventory().unwrap();
}

// ---------------------------------------------------------------------------
// Lengths are checked before anything is allocated.

#[test]
fn no_allocation_from_declared_lengths() {
    let tmp = TempDir::new("alloc");
    let img = ImageDir::new(&tmp.0, false).unwrap();
    let path = img.path(INVENTORY);

    // A bare header claiming a huge payload.
    for len in [u64::MAX, 1 << 40, MAX_INVENTORY, 100] {
        let h = format::header(FileKindTag::Inventory, len, 0);
        let (r, largest) = largest_alloc(|| {
            format::decode::<Inventory>(&path, FileKindTag::Inventory, &h, MAX_INVENTORY)
        });
        assert!(matches!(r, Err(ImageError::Corrupt { .. })));
        assert!(largest < 4096, "decode allocated {largest} bytes");

        std::fs::write(&path, h).unwrap();
        let (r, largest) = largest_alloc(|| img.read_inventory());
        assert!(matches!(r, Err(ImageError::Corrupt { .. })));
        assert!(
            largest < 64 << 10,
            "read_inventory allocated {largest} bytes"
        );
    }

    // A (sparse) file beyond the cap is refused before it is read.
    let big = MAX_INVENTORY + HEADER_LEN as u64 + 1;
    let mut h = format::header(FileKindTag::Inventory, big - HEADER_LEN as u64, 0).to_vec();
    h.resize(PAGE_SIZE, 0);
    std::fs::write(&path, &h).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(big)
        .unwrap();
    let (r, largest) = largest_alloc(|| img.read_inventory());
    let e = r.unwrap_err();
    assert!(
        why(&e).unwrap().contains("larger than any ferry writes"),
        "{e}"
    );
    assert!(
        largest < 64 << 10,
        "read_inventory allocated {largest} bytes"
    );
    // The cap also holds for a header that matches the file size.
    let mut b = format::header(FileKindTag::Inventory, 100, 0).to_vec();
    b.resize(HEADER_LEN + 100, 0);
    reseal_payload(&mut b);
    let (r, largest) =
        largest_alloc(|| format::decode::<Inventory>(&path, FileKindTag::Inventory, &b, 99));
    assert!(why(&r.unwrap_err()).unwrap().contains("exceeds the cap"));
    assert!(largest < 4096, "decode allocated {largest} bytes");

    // A page store header claiming more than the file holds.
    let store = img.path("pages-1.img");
    std::fs::write(&store, format::header(FileKindTag::Pages, 1 << 45, 0)).unwrap();
    let (r, largest) = largest_alloc(|| PageStoreReader::open(&store).map(|_| ()));
    assert!(matches!(r, Err(ImageError::Corrupt { .. })));
    assert!(largest < 4096, "open allocated {largest} bytes");

    // A valid header and payload CRC around a payload whose sequence
    // lengths claim far more elements than there are bytes.
    let machine = MachineInfo {
        kernel_release: "6.18".into(),
        hostname: "h".into(),
        page_size: 4096,
        xstate_size: XSTATE,
        xcr0: 7,
        vdso_layout: vec![],
    };
    let mut payload = postcard::to_stdvec(&machine).unwrap();
    payload.extend_from_slice(&postcard::to_stdvec(&ROOT).unwrap());
    payload.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]); // 2^56-1 processes
    payload.extend_from_slice(&[0u8; 64]);
    let mut b = format::header(FileKindTag::Inventory, payload.len() as u64, 0).to_vec();
    b.extend_from_slice(&payload);
    reseal_payload(&mut b);
    let (r, largest) = largest_alloc(|| {
        format::decode::<Inventory>(&path, FileKindTag::Inventory, &b, MAX_INVENTORY)
    });
    assert!(why(&r.unwrap_err()).unwrap().contains("cannot decode"));
    assert!(largest <= 1 << 20, "decode allocated {largest} bytes");

    // A string whose length runs past the payload.
    let mut payload = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
    payload.extend_from_slice(b"6.18");
    let mut b = format::header(FileKindTag::Inventory, payload.len() as u64, 0).to_vec();
    b.extend_from_slice(&payload);
    reseal_payload(&mut b);
    let (r, largest) = largest_alloc(|| {
        format::decode::<Inventory>(&path, FileKindTag::Inventory, &b, MAX_INVENTORY)
    });
    assert!(why(&r.unwrap_err()).unwrap().contains("cannot decode"));
    assert!(largest < 4096, "decode allocated {largest} bytes");
}
