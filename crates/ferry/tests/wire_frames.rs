//! The wire protocol end to end: message and batch round trips, corrupt
//! input of every kind (never a panic, always an error where the frame is
//! damaged), the receiver's state table, authentication over TCP, a full
//! multi-stream migration over loopback, throttling, and (ignored by
//! default) a throughput benchmark.

use ferry::image::*;
use ferry::sys::{ItimerVal, KernelSigaction, RseqConfig, StackT, UserRegs};
use ferry::wire::auth::{AuthContext, AuthToken, SessionId};
use ferry::wire::frame::{
    decode_frame, encode_frame_into, FrameReader, FrameType, FrameWriter, Limits, OwnedFrame,
};
use ferry::wire::messages::*;
use ferry::wire::pages::{BatchDecoder, BatchEncoder, BatchView, EntryKind, Page, WireStats};
use ferry::wire::receiver::{Action, Event, Receiver, ReceiverConfig, State};
use ferry::wire::sink::{MemorySink, PageContent, PageSink, SinkError};
use ferry::wire::source::{stream_for, Outcome, SourceSession};
use ferry::wire::throttle::{parse_bandwidth, RateLimiter, Throttled};
use ferry::wire::{WireError, PAGE_SIZE};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &[u8] = b"ferry-test-token-0123456789abcdef";

// ---------------------------------------------------------------------------
// Data

fn noise(seed: u64) -> [u8; PAGE_SIZE] {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut p = [0u8; PAGE_SIZE];
    for w in p.chunks_exact_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        w.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    p
}

/// English-like text: compresses roughly 2-4x.
fn text(seed: u64) -> [u8; PAGE_SIZE] {
    const WORDS: [&str; 16] = [
        "the ",
        "process ",
        "migrates ",
        "while ",
        "it ",
        "keeps ",
        "running ",
        "and ",
        "pages ",
        "are ",
        "copied ",
        "again ",
        "until ",
        "downtime ",
        "is ",
        "small. ",
    ];
    let mut p = [0u8; PAGE_SIZE];
    let mut i = 0;
    let mut x = seed | 1;
    while i < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % 16) as usize].as_bytes();
        let n = w.len().min(PAGE_SIZE - i);
        p[i..i + n].copy_from_slice(&w[..n]);
        i += n;
        if x % 7 == 0 && i + 8 < PAGE_SIZE {
            p[i..i + 8].copy_from_slice(&x.to_le_bytes());
            i += 8;
        }
    }
    p
}

fn machine() -> MachineInfo {
    MachineInfo {
        kernel_release: "6.18.0-ferry".into(),
        hostname: "node-a".into(),
        page_size: PAGE_SIZE as u32,
        xstate_size: 2696,
        xcr0: 0x2e7,
        vdso_layout: vec![
            ("[vvar]".into(), 16384),
            ("[vvar_vclock]".into(), 12288),
            ("[vdso]".into(), 8192),
        ],
    }
}

/// A realistic inventory: two processes, threads with xstate, areas with
/// page runs, files, a pipe with data.
fn inventory() -> Inventory {
    let thread = |tid: i32| ThreadImage {
        tid,
        regs: UserRegs {
            rip: 0x40_1000,
            rsp: 0x7ffd_0000_1000,
            ..UserRegs::default()
        },
        xstate: noise(tid as u64)[..2696 % PAGE_SIZE].to_vec(),
        sigmask: 0,
        sigaltstack: StackT::default(),
        rseq: Some(RseqConfig::default()),
        tid_address: 0x7f00_0000_0000,
        robust_list: (0x7f00_0000_1000, 24),
        pending: vec![vec![0u8; 128]],
    };
    let vma = |start: u64, n: u64, kind: VmaKind| Vma {
        start,
        end: start + n * PAGE_SIZE as u64,
        prot: 3,
        shared: false,
        kind,
        advice: Advice::default(),
        pages: (0..n)
            .step_by(3)
            .map(|i| PageRun {
                addr: start + i * PAGE_SIZE as u64,
                npages: 2,
                kind: if i % 2 == 0 {
                    PageKind::Zero
                } else {
                    PageKind::Data {
                        offset: i * 8192,
                        crc: i as u32,
                    }
                },
            })
            .collect(),
        guards: vec![],
    };
    let process = |pid: i32, ppid: i32| ProcessImage {
        pid,
        zombie: None,
        ppid,
        pgid: 100,
        sid: 100,
        comm: "solver".into(),
        exe: "/usr/bin/solver".into(),
        cwd: "/home/job".into(),
        umask: 0o022,
        personality: 0,
        rlimits: (0..16).map(|r| (r, u64::MAX, u64::MAX)).collect(),
        mm: MmFields::default(),
        auxv: vec![7u8; 368],
        vmas: vec![
            vma(
                0x40_0000,
                30,
                VmaKind::File {
                    path: "/usr/bin/solver".into(),
                    offset: 0,
                    blob: None,
                },
            ),
            vma(
                0x7f00_0000_0000,
                3000,
                VmaKind::Anon {
                    name: None,
                    heap: true,
                    stack: false,
                },
            ),
            vma(0x7ffd_1000_0000, 2, VmaKind::Vdso),
        ],
        threads: vec![thread(pid), thread(pid + 1000)],
        sigactions: vec![KernelSigaction::default(); 64],
        shared_pending: vec![],
        itimers: [ItimerVal::default(); 3],
        fds: vec![FdImage {
            fd: 0,
            cloexec: false,
            file: 0,
        }],
        pages_file: format!("pages-{pid}.img"),
    };
    Inventory {
        machine: machine(),
        root_pid: 100,
        processes: vec![process(100, 1), process(101, 100)],
        files: vec![FileImage {
            flags: 2,
            pos: 0,
            kind: FileKind::Pipe {
                pipe: 0,
                write_end: true,
            },
        }],
        pipes: vec![PipeImage {
            ino: 5,
            capacity: 65536,
            data: b"buffered".repeat(50),
        }],
        blobs: vec![],
        created_ns: 1_750_000_000_000_000_000,
        pidns: Some(PidNsImage { main: 2 }),
    }
}

fn start_msg(streams: u16, compression: Compression) -> MigrationStart {
    MigrationStart {
        job: "solver-42".into(),
        description: "a test job".into(),
        mode: MigrationMode::PreCopy,
        compression,
        streams,
        total_pages: 12345,
        processes: 2,
        machine: machine(),
    }
}

fn every_message() -> Vec<Message> {
    let sid = SessionId([0xab; 16]);
    vec![
        Message::Hello(Hello::new(Role::Source, sid, Features::ours(8))),
        Message::Hello(Hello::new(Role::Target, sid, Features::ours(0))),
        Message::AuthChallenge(AuthChallenge { nonce: [1; 32] }),
        Message::AuthResponse(AuthResponse {
            mac: [2; 32],
            nonce: [3; 32],
        }),
        Message::AuthOk(AuthOk { mac: [4; 32] }),
        Message::Blob(ferry::wire::messages::BlobChunk {
            index: 0,
            offset: 0,
            data: vec![7; 10],
        }),
        Message::AuthFail {
            reason: "wrong token".into(),
        },
        Message::StreamJoin(StreamJoin {
            session: sid,
            index: 3,
            mac: [5; 32],
        }),
        Message::MigrationStart(Box::new(start_msg(2, Compression::Zstd(3)))),
        Message::RoundEnd(RoundEnd {
            round: 7,
            pages_sent: 1 << 30,
            dirty_count: 12,
            last: false,
            batches: vec![0, 10, 11],
        }),
        Message::FinalState(Box::new(inventory())),
        Message::Commit,
        Message::Restored(Restored {
            pid: 100,
            restore_ms: 42,
        }),
        Message::RestoreFailed {
            reason: "pid 100 is taken".into(),
        },
        Message::Ack,
        Message::Abort {
            reason: "operator".into(),
        },
        Message::Error {
            message: "PageBatch frame in state AwaitHello".into(),
        },
        Message::Ping { seq: 1 },
        Message::Pong { seq: 1 },
        Message::PageRequest(PageRequest {
            pid: 100,
            addr: 0x7f00_0000_0000,
            npages: 1,
        }),
        Message::PostcopyPlan(PostcopyPlan {
            pid: 100,
            runs: vec![PlanRun {
                addr: 0x7f00_0000_0000,
                npages: 4,
            }],
        }),
        Message::PostcopyDone(PostcopyDone {
            remote_faults: 1,
            local_faults: 0,
            fault_latency_p50_us: 50.0,
            fault_latency_p99_us: 90.0,
            fault_latency_max_us: 90.0,
            last_page_ms: 3.0,
            pages_placed: 4,
            job_ended: false,
        }),
    ]
}

// ---------------------------------------------------------------------------
// Round trips

#[test]
fn every_message_round_trips_through_frames() {
    let msgs = every_message();
    let mut w = FrameWriter::new(Vec::new());
    for m in &msgs {
        w.send(m).unwrap();
    }
    let (frames, bytes) = w.counters();
    assert_eq!(frames as usize, msgs.len());
    let buf = w.into_inner();
    assert_eq!(buf.len() as u64, bytes);
    let mut r = FrameReader::new(Cursor::new(buf));
    for m in &msgs {
        let f = r.read_frame().unwrap();
        assert_eq!(f.ty, m.frame_type());
        assert_eq!(&Message::decode(&f).unwrap(), m);
    }
    assert!(matches!(r.read_frame(), Err(WireError::Closed { .. })));
}

#[test]
fn final_state_may_exceed_the_general_cap() {
    let m = Message::FinalState(Box::new(inventory()));
    let len = m.encode().unwrap().len() as u32;
    let lim = Limits {
        max_payload: len / 2,
        max_final_state: len,
    };
    let mut w = FrameWriter::with_limits(Vec::new(), lim);
    w.send(&m).unwrap();
    assert!(w
        .send(&Message::Error {
            message: "x".repeat(len as usize)
        })
        .is_err());
    let mut r = FrameReader::with_limits(Cursor::new(w.into_inner()), lim);
    assert_eq!(Message::decode(&r.read_frame().unwrap()).unwrap(), m);
}

struct PageSet {
    pages: Vec<(i32, u64, [u8; PAGE_SIZE])>,
}

fn mixed_pages(n: usize) -> PageSet {
    let mut pages = Vec::new();
    let mut addr = 0x7f12_0000_0000u64;
    for i in 0..n {
        let p = match i % 5 {
            0 | 3 => [0u8; PAGE_SIZE],
            1 => noise(i as u64),
            2 => text(i as u64),
            _ => {
                let mut p = [0u8; PAGE_SIZE];
                p[i % PAGE_SIZE] = 1;
                p
            }
        };
        pages.push((100 + (i / 700) as i32, addr, p));
        addr += PAGE_SIZE as u64 * if i % 11 == 0 { 5 } else { 1 };
    }
    PageSet { pages }
}

/// Encodes `set` as batches (a new batch per pid or when full) into frames.
fn encode_set(set: &PageSet, mode: Compression, round: u32) -> (Vec<u8>, WireStats, u64) {
    let mut enc = BatchEncoder::with_sizes(mode, 128 << 10, 1 << 20).unwrap();
    let mut w = FrameWriter::new(Vec::new());
    let mut cur = None;
    for (pid, addr, p) in &set.pages {
        if cur != Some(*pid) {
            if cur.is_some() && !enc.is_empty() {
                w.write_batch(&mut enc).unwrap();
            }
            enc.begin(*pid, round);
            cur = Some(*pid);
        }
        enc.push(*addr, p).unwrap();
        if enc.is_full() {
            w.write_batch(&mut enc).unwrap();
        }
    }
    if !enc.is_empty() {
        w.write_batch(&mut enc).unwrap();
    }
    let frames = w.counters().0;
    (w.into_inner(), *enc.stats(), frames)
}

#[test]
fn page_batches_round_trip_in_every_mode() {
    let set = mixed_pages(3000);
    for mode in [
        Compression::None,
        Compression::Lz4,
        Compression::Zstd(1),
        Compression::Zstd(3),
        Compression::Zstd(19),
    ] {
        let (bytes, sent, frames) = encode_set(&set, mode, 1);
        let mut r = FrameReader::new(Cursor::new(bytes));
        let mut dec = BatchDecoder::new().unwrap();
        let mut sink = MemorySink::new();
        for _ in 0..frames {
            let f = r.read_frame().unwrap();
            assert_eq!(f.ty, FrameType::PageBatch);
            dec.decode_to(f.payload, &mut sink).unwrap();
        }
        assert!(matches!(r.read_frame(), Err(WireError::Closed { .. })));
        for (pid, addr, p) in &set.pages {
            let got = sink.get(*pid, *addr).unwrap();
            if p.iter().all(|b| *b == 0) {
                assert_eq!(got, PageContent::Zero);
            } else {
                assert_eq!(got, PageContent::Data(p), "{mode:?} page {addr:#x}");
            }
        }
        assert_eq!(sink.len(), set.pages.len());
        // Both ends count the same.
        assert_eq!(dec.stats(), &sent, "{mode:?}");
        assert_eq!(sent.pages(), set.pages.len() as u64);
        assert_eq!(sent.zero_pages, 1200);
        match mode {
            Compression::None => assert_eq!(sent.raw_pages, 1800),
            Compression::Lz4 => assert!(sent.lz4_pages >= 1200, "{sent:?}"),
            Compression::Zstd(_) => assert!(sent.zstd_pages >= 1200, "{sent:?}"),
        }
        // Random pages never compress.
        assert!(sent.raw_pages >= 600);
    }
}

#[test]
fn batch_entries_expose_kinds_and_raw_data() {
    let mut enc = BatchEncoder::new(Compression::Zstd(3)).unwrap();
    enc.begin(7, 2);
    enc.push(0x1000, &text(1)).unwrap();
    enc.push(0x2000, &noise(2)).unwrap();
    enc.push_absent(0x5000, 4).unwrap();
    let payload = enc.finish().unwrap().to_vec();
    let view = BatchView::parse(&payload).unwrap();
    assert_eq!(
        (view.header.pid, view.header.round, view.header.entries),
        (7, 2, 3)
    );
    let kinds: Vec<_> = view.entries().map(|e| e.unwrap().kind).collect();
    assert_eq!(kinds, [EntryKind::Zstd, EntryKind::Raw, EntryKind::Absent]);
    let mut dec = BatchDecoder::new().unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    let e = view.entries().next().unwrap().unwrap();
    assert_eq!(dec.page_data(7, &e, &mut buf).unwrap(), &text(1));
    let mut seen = Vec::new();
    dec.decode(&payload, |_, p| {
        seen.push(match p {
            Page::Data { addr, .. } => (addr, 1),
            Page::Zero { addr, npages } | Page::Absent { addr, npages } => (addr, npages),
        });
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [(0x1000, 1), (0x2000, 1), (0x5000, 4)]);
}

// ---------------------------------------------------------------------------
// Corruption: never a panic; damaged frames are always errors.

fn sample_frames() -> Vec<u8> {
    let mut out = Vec::new();
    for m in every_message() {
        if !matches!(m, Message::FinalState(_)) {
            encode_frame_into(m.frame_type(), &m.encode().unwrap(), &mut out);
        }
    }
    let mut enc = BatchEncoder::new(Compression::Lz4).unwrap();
    enc.begin(1, 1);
    enc.push(0x1000, &text(3)).unwrap();
    enc.push(0x2000, &[0; PAGE_SIZE]).unwrap();
    enc.push(0x3000, &noise(3)).unwrap();
    encode_frame_into(
        FrameType::PageBatch,
        &enc.finish().unwrap().to_vec(),
        &mut out,
    );
    out
}

fn read_all(bytes: Vec<u8>, limits: Limits) -> Result<usize, WireError> {
    let mut r = FrameReader::with_limits(Cursor::new(bytes), limits);
    let mut n = 0;
    loop {
        match r.read_frame() {
            Ok(_) => n += 1,
            Err(WireError::Closed {
                context: "between frames",
            }) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
}

fn small_limits() -> Limits {
    Limits {
        max_payload: 1 << 20,
        max_final_state: 1 << 20,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_frame_reader(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = read_all(bytes.clone(), small_limits());
        let _ = decode_frame(&bytes, &small_limits());
    }

    #[test]
    fn random_bytes_after_a_valid_header_are_rejected(ty in 0usize..20, payload in proptest::collection::vec(any::<u8>(), 0..2048), bad_crc in any::<u32>()) {
        let ty = FrameType::ALL[ty];
        let mut b = Vec::new();
        encode_frame_into(ty, &payload, &mut b);
        let good_crc = crc32c::crc32c(&payload);
        prop_assume!(bad_crc != good_crc);
        // Same header except a wrong payload CRC, resealed.
        b[12..16].copy_from_slice(&bad_crc.to_le_bytes());
        let c = crc32c::crc32c(&b[..16]);
        b[16..20].copy_from_slice(&c.to_le_bytes());
        let is_payload_crc_err = matches!(read_all(b, small_limits()), Err(WireError::PayloadChecksum { .. }));
        prop_assert!(is_payload_crc_err);
    }

    #[test]
    fn any_bit_flip_in_a_valid_stream_is_an_error(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut b = sample_frames();
        let i = pos.index(b.len());
        b[i] ^= 1 << bit;
        prop_assert!(read_all(b, small_limits()).is_err(), "flip at byte {} bit {} accepted", i, bit);
    }

    #[test]
    fn any_truncation_of_a_valid_stream_is_an_error(cut in any::<prop::sample::Index>()) {
        let b = sample_frames();
        let n = cut.index(b.len());
        let r = read_all(b[..n].to_vec(), small_limits());
        // Cutting exactly at a frame boundary is a clean end; anything else errors.
        match r {
            Ok(_) => {
                let mut off = 0;
                let mut boundaries = vec![0];
                while off < b.len() {
                    let (_, used) = decode_frame(&b[off..], &small_limits()).unwrap();
                    off += used;
                    boundaries.push(off);
                }
                prop_assert!(boundaries.contains(&n));
            }
            Err(e) => prop_assert!(matches!(e, WireError::Closed { .. }), "{}", e),
        }
    }

    #[test]
    fn random_bytes_never_panic_the_batch_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
        let mut dec = BatchDecoder::new().unwrap();
        let mut sink = MemorySink::with_max_pages(1 << 16);
        let _ = dec.decode_to(&bytes, &mut sink);
        if let Ok(v) = BatchView::parse(&bytes) {
            for e in v.entries() { let _ = e; }
        }
    }

    #[test]
    fn mutated_batches_never_panic_the_decoder(pos in proptest::collection::vec(any::<prop::sample::Index>(), 1..6), vals in proptest::collection::vec(any::<u8>(), 6), cut in any::<prop::sample::Index>()) {
        let mut enc = BatchEncoder::new(Compression::Lz4).unwrap();
        enc.begin(1, 1);
        enc.push(0x1000, &text(3)).unwrap();
        enc.push(0x2000, &[0; PAGE_SIZE]).unwrap();
        enc.push_zero(0x3000, 300).unwrap();
        enc.push(0x200000, &noise(3)).unwrap();
        let mut z = BatchEncoder::new(Compression::Zstd(3)).unwrap();
        z.begin(2, 1);
        z.push(0x1000, &text(4)).unwrap();
        z.push_absent(0x2000, 3).unwrap();
        for good in [enc.finish().unwrap().to_vec(), z.finish().unwrap().to_vec()] {
            let mut b = good.clone();
            for (p, v) in pos.iter().zip(&vals) {
                let i = p.index(b.len());
                b[i] ^= v | 1;
            }
            let mut dec = BatchDecoder::new().unwrap();
            let mut sink = MemorySink::with_max_pages(1 << 16);
            let _ = dec.decode_to(&b, &mut sink);
            let n = cut.index(good.len());
            prop_assert!(dec.decode_to(&good[..n], &mut sink).is_err(), "truncated batch accepted");
        }
    }

    #[test]
    fn random_frames_never_panic_the_receiver(frames in proptest::collection::vec((0usize..20, proptest::collection::vec(any::<u8>(), 0..300)), 1..12), upto in 0usize..9) {
        let (mut rx, _ctx) = drive_to(STATES[upto]);
        for (ty, payload) in frames {
            let f = OwnedFrame::new(FrameType::ALL[ty], payload);
            let _ = rx.on_frame(&f.as_frame());
            let _ = rx.on_stream_frame(1, &f.as_frame());
            let _ = rx.on_stream_join(&f.as_frame());
        }
    }

    #[test]
    fn byte_streams_into_the_receiver_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), upto in 0usize..9) {
        let (mut rx, _ctx) = drive_to(STATES[upto]);
        let mut stream = sample_frames();
        stream.extend_from_slice(&bytes);
        let mut r = FrameReader::with_limits(Cursor::new(stream), small_limits());
        while let Ok(f) = r.read_frame() {
            let _ = rx.on_frame(&f);
        }
    }
}

// ---------------------------------------------------------------------------
// Receiver state table

const STATES: [State; 10] = [
    State::AwaitHello,
    State::AwaitAuth,
    State::AwaitStart,
    State::ReceivingPages,
    State::AwaitFinalState,
    State::AwaitCommit,
    State::AwaitStreams,
    State::Restoring,
    State::Done,
    State::Failed,
];

fn frame_of(m: &Message) -> OwnedFrame {
    OwnedFrame::new(m.frame_type(), m.encode().unwrap())
}

fn batch_frame(pid: i32, round: u32, pages: &[(u64, [u8; PAGE_SIZE])]) -> OwnedFrame {
    let mut enc = BatchEncoder::new(Compression::Lz4).unwrap();
    enc.begin(pid, round);
    for (a, p) in pages {
        enc.push(*a, p).unwrap();
    }
    OwnedFrame::new(FrameType::PageBatch, enc.finish().unwrap().to_vec())
}

fn token() -> AuthToken {
    AuthToken::new(TOKEN).unwrap()
}

fn expect_ok(rx: &mut Receiver<MemorySink>, f: &OwnedFrame) -> Action {
    rx.on_frame(&f.as_frame())
        .unwrap_or_else(|e| panic!("{} in {}: {e}", f.ty, rx.state()))
}

/// A receiver (one page stream) driven to `target`, and the source's auth
/// context.
fn drive_to(target: State) -> (Receiver<MemorySink>, Option<AuthContext>) {
    let mut cfg = ReceiverConfig::new(token());
    cfg.machine = Some(machine());
    let mut rx = Receiver::new(cfg, MemorySink::new()).unwrap();
    if target == State::AwaitHello {
        return (rx, None);
    }
    let sid = SessionId([0x5a; 16]);
    let a = expect_ok(
        &mut rx,
        &frame_of(&Message::Hello(Hello::new(
            Role::Source,
            sid,
            Features::ours(4),
        ))),
    );
    if target == State::AwaitAuth {
        return (rx, None);
    }
    let Message::AuthChallenge(c) = &a.send[1] else {
        panic!("{a:?}")
    };
    let ctx = AuthContext {
        session: sid,
        target_nonce: c.nonce,
        source_nonce: [0x77; 32],
    };
    if target == State::Failed {
        let _ = rx.abort("test");
        return (rx, Some(ctx));
    }
    let _ = expect_ok(
        &mut rx,
        &frame_of(&Message::AuthResponse(AuthResponse {
            mac: token().source_proof(&ctx),
            nonce: ctx.source_nonce,
        })),
    );
    if target == State::AwaitStart {
        return (rx, Some(ctx));
    }
    let _ = expect_ok(
        &mut rx,
        &frame_of(&Message::MigrationStart(Box::new(start_msg(
            1,
            Compression::Lz4,
        )))),
    );
    let join = frame_of(&Message::StreamJoin(StreamJoin {
        session: sid,
        index: 1,
        mac: token().join_proof(&ctx, 1),
    }));
    let _ = rx.on_stream_join(&join.as_frame()).unwrap();
    let _ = expect_ok(&mut rx, &batch_frame(100, 1, &[(0x1000, noise(1))]));
    if target == State::ReceivingPages {
        return (rx, Some(ctx));
    }
    let _ = expect_ok(
        &mut rx,
        &frame_of(&Message::RoundEnd(RoundEnd {
            round: 1,
            pages_sent: 2,
            dirty_count: 0,
            last: true,
            batches: vec![1, 1],
        })),
    );
    if target == State::AwaitFinalState {
        return (rx, Some(ctx));
    }
    let _ = expect_ok(
        &mut rx,
        &frame_of(&Message::FinalState(Box::new(inventory()))),
    );
    if target == State::AwaitCommit {
        return (rx, Some(ctx));
    }
    let _ = expect_ok(&mut rx, &frame_of(&Message::Commit));
    assert_eq!(rx.state(), State::AwaitStreams);
    if target == State::AwaitStreams {
        return (rx, Some(ctx));
    }
    let a = rx
        .on_stream_frame(1, &batch_frame(100, 1, &[(0x100000, text(2))]).as_frame())
        .unwrap();
    assert!(matches!(a.event, Event::Restore(_)));
    if target == State::Restoring {
        return (rx, Some(ctx));
    }
    let _ = rx
        .restore_finished(Ok(Restored {
            pid: 100,
            restore_ms: 1,
        }))
        .unwrap();
    assert_eq!(target, State::Done);
    (rx, Some(ctx))
}

/// A well-formed frame of every type.
fn sample_of(ty: FrameType) -> OwnedFrame {
    match ty {
        FrameType::PageBatch | FrameType::PageReply => {
            let mut f = batch_frame(100, 1, &[(0x3000, noise(5))]);
            f.ty = ty;
            f
        }
        _ => {
            let m = every_message()
                .into_iter()
                .find(|m| m.frame_type() == ty)
                .unwrap();
            frame_of(&m)
        }
    }
}

#[test]
fn driver_reaches_every_state() {
    for s in STATES {
        assert_eq!(drive_to(s).0.state(), s);
    }
}

#[test]
fn receiver_rejects_out_of_order_frames_in_every_state() {
    let mut checked = 0;
    for state in STATES {
        for ty in FrameType::ALL {
            if state.allowed().contains(&ty) {
                continue;
            }
            let (mut rx, _) = drive_to(state);
            match rx.on_frame(&sample_of(ty).as_frame()) {
                Err(WireError::UnexpectedFrame { frame, state: s }) => {
                    assert_eq!((frame, s), (ty, state));
                }
                other => panic!("{ty} in {state}: {other:?}"),
            }
            assert_eq!(rx.state(), State::Failed, "{ty} in {state}");
            checked += 1;
        }
    }
    assert!(checked > 150, "{checked}");
    let (mut rx, _) = drive_to(State::AwaitHello);
    let e = rx
        .on_frame(&sample_of(FrameType::PageBatch).as_frame())
        .unwrap_err();
    assert_eq!(e.to_string(), "PageBatch frame in state AwaitHello");
}

#[test]
fn page_streams_carry_only_batches_and_only_while_pages_flow() {
    for ty in FrameType::ALL {
        if ty == FrameType::PageBatch {
            continue;
        }
        let (mut rx, _) = drive_to(State::ReceivingPages);
        assert!(
            rx.on_stream_frame(1, &sample_of(ty).as_frame()).is_err(),
            "{ty}"
        );
        assert_eq!(rx.state(), State::Failed);
    }
    for state in [State::AwaitStart, State::Restoring, State::Done] {
        let (mut rx, _) = drive_to(state);
        assert!(
            rx.on_stream_frame(1, &sample_of(FrameType::PageBatch).as_frame())
                .is_err(),
            "{state}"
        );
    }
    // A stream that never joined.
    let (mut rx, _) = drive_to(State::ReceivingPages);
    assert!(rx
        .on_stream_frame(2, &sample_of(FrameType::PageBatch).as_frame())
        .is_err());
}

// ---------------------------------------------------------------------------
// Over TCP: authentication and a whole migration

fn listener() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

type Shared = Arc<Mutex<Receiver<MemorySink>>>;
type MainWriter = Arc<Mutex<FrameWriter<TcpStream>>>;

fn send_all(w: &MainWriter, msgs: &[Message]) {
    let mut w = w.lock().unwrap();
    for m in msgs {
        w.send(m).unwrap();
    }
    w.flush().unwrap();
}

/// What a target agent does with an event (restore = check and report).
fn handle_event(
    rx: &Shared,
    main: &MainWriter,
    ev: Event,
    restored: &Mutex<Option<Box<Inventory>>>,
) {
    if let Event::Restore(inv) = ev {
        *restored.lock().unwrap() = Some(inv);
        let a = rx
            .lock()
            .unwrap()
            .restore_finished(Ok(Restored {
                pid: 100,
                restore_ms: 3,
            }))
            .unwrap();
        send_all(main, &a.send);
    }
}

struct TargetResult {
    rx: Receiver<MemorySink>,
    restored: Option<Box<Inventory>>,
}

/// A minimal target agent: the main connection in this thread, each page
/// stream in its own.
fn run_target(l: TcpListener, cfg: ReceiverConfig) -> TargetResult {
    let (main, _) = l.accept().unwrap();
    main.set_nodelay(true).unwrap();
    let mut reader = FrameReader::new(main.try_clone().unwrap());
    let writer: MainWriter = Arc::new(Mutex::new(FrameWriter::new(main)));
    let rx: Shared = Arc::new(Mutex::new(Receiver::new(cfg, MemorySink::new()).unwrap()));
    let restored = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    let l = Arc::new(l);
    loop {
        let f = match reader.read_frame() {
            Ok(f) => f,
            Err(e) if e.is_disconnect() => {
                let _ = rx.lock().unwrap().on_main_closed();
                break;
            }
            Err(e) => panic!("target: {e}"),
        };
        let a = rx.lock().unwrap().on_frame(&f);
        let a = match a {
            Ok(a) => a,
            Err(e) => {
                send_all(&writer, &[ferry::wire::error_message(&e)]);
                break;
            }
        };
        send_all(&writer, &a.send);
        match a.event {
            Event::Started(s) => {
                for _ in 0..s.streams {
                    let (l, rx, writer, restored) =
                        (l.clone(), rx.clone(), writer.clone(), restored.clone());
                    threads.push(std::thread::spawn(move || {
                        let (c, _) = l.accept().unwrap();
                        let mut r = FrameReader::new(c.try_clone().unwrap());
                        let mut w = FrameWriter::new(c);
                        let f = r.read_frame().unwrap();
                        let (idx, a) = rx.lock().unwrap().on_stream_join(&f).unwrap();
                        for m in &a.send {
                            w.send(m).unwrap();
                        }
                        loop {
                            match r.read_frame() {
                                Ok(f) => {
                                    let a = rx.lock().unwrap().on_stream_frame(idx, &f).unwrap();
                                    handle_event(&rx, &writer, a.event, &restored);
                                }
                                Err(_) => {
                                    let _ = rx.lock().unwrap().on_stream_closed(idx).unwrap();
                                    return;
                                }
                            }
                        }
                    }));
                }
            }
            Event::Close { .. } | Event::Aborted { .. } | Event::Released => break,
            ev => handle_event(&rx, &writer, ev, &restored),
        }
    }
    for t in threads {
        t.join().unwrap();
    }
    let rx = Arc::try_unwrap(rx).ok().unwrap().into_inner().unwrap();
    let restored = restored.lock().unwrap().take();
    TargetResult { rx, restored }
}

fn connect(addr: std::net::SocketAddr) -> (FrameReader<TcpStream>, FrameWriter<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    (
        FrameReader::new(s.try_clone().unwrap()),
        FrameWriter::new(s),
    )
}

#[test]
fn auth_succeeds_with_the_same_token_and_fails_with_another() {
    // Same token: both sides prove themselves.
    let (l, addr) = listener();
    let t = std::thread::spawn(move || run_target(l, ReceiverConfig::new(token())));
    let (mut r, mut w) = connect(addr);
    let s = SourceSession::handshake(&mut r, &mut w, &token(), Features::ours(2)).unwrap();
    assert_eq!(s.peer.role, Role::Target);
    assert_eq!(s.negotiated.max_streams, 2);
    w.send(&Message::Abort {
        reason: "done testing".into(),
    })
    .unwrap();
    let res = t.join().unwrap();
    assert_eq!(res.rx.state(), State::Failed);
    assert!(res.rx.failure().unwrap().contains("done testing"));

    // Different token: the target refuses; the token never crossed the wire.
    let (l, addr) = listener();
    let t = std::thread::spawn(move || run_target(l, ReceiverConfig::new(token())));
    let (mut r, mut w) = connect(addr);
    let other = AuthToken::new(b"some-other-token-entirely").unwrap();
    let e = SourceSession::handshake(&mut r, &mut w, &other, Features::ours(2)).unwrap_err();
    assert!(matches!(e, WireError::Auth(_)), "{e}");
    let res = t.join().unwrap();
    assert_eq!(res.rx.state(), State::Failed);

    // A fake target that does not know the token cannot pass the source's
    // check of AuthOk.
    let (l, addr) = listener();
    let t = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut r = FrameReader::new(c.try_clone().unwrap());
        let mut w = FrameWriter::new(c);
        let Message::Hello(h) = Message::decode(&r.read_frame().unwrap()).unwrap() else {
            panic!()
        };
        w.send(&Message::Hello(Hello::new(
            Role::Target,
            h.session,
            Features::ours(1),
        )))
        .unwrap();
        w.send(&Message::AuthChallenge(AuthChallenge { nonce: [9; 32] }))
            .unwrap();
        let _ = r.read_frame().unwrap();
        w.send(&Message::AuthOk(AuthOk { mac: [0; 32] })).unwrap();
        // The source says why it leaves.
        matches!(
            Message::decode(&r.read_frame().unwrap()),
            Ok(Message::Abort { .. })
        )
    });
    let (mut r, mut w) = connect(addr);
    let e = SourceSession::handshake(&mut r, &mut w, &token(), Features::ours(1)).unwrap_err();
    assert!(e.to_string().contains("could not prove"), "{e}");
    assert!(t.join().unwrap());
}

#[test]
fn full_migration_over_loopback_with_two_streams() {
    const STREAMS: u16 = 2;
    let (l, addr) = listener();
    let mut cfg = ReceiverConfig::new(token());
    cfg.machine = Some(machine());
    let target = std::thread::spawn(move || run_target(l, cfg));

    let (mut r, mut w) = connect(addr);
    let s = SourceSession::handshake(&mut r, &mut w, &token(), Features::ours(STREAMS)).unwrap();
    s.start(&mut r, &mut w, &start_msg(STREAMS, Compression::Lz4))
        .unwrap();
    let mut streams: Vec<(FrameReader<TcpStream>, FrameWriter<TcpStream>)> = Vec::new();
    for i in 1..=STREAMS {
        let (mut sr, mut sw) = connect(addr);
        s.join_stream(&mut sr, &mut sw, i).unwrap();
        streams.push((sr, sw));
    }

    // Memory of two processes; each round rewrites some pages.
    let mut memory: BTreeMap<(i32, u64), [u8; PAGE_SIZE]> = BTreeMap::new();
    for pid in [100, 101] {
        for i in 0..600u64 {
            let addr = 0x7f00_0000_0000 + i * PAGE_SIZE as u64;
            memory.insert(
                (pid, addr),
                match i % 3 {
                    0 => [0; PAGE_SIZE],
                    1 => noise(i + pid as u64 * 1000),
                    _ => text(i),
                },
            );
        }
    }
    let mut encoders: Vec<BatchEncoder> = (0..=STREAMS)
        .map(|_| BatchEncoder::with_sizes(Compression::Lz4, 64 << 10, 1 << 20).unwrap())
        .collect();
    let mut batches = vec![0u64; 1 + STREAMS as usize];
    let mut dirty: Vec<(i32, u64)> = memory.keys().copied().collect();
    let rounds = 4u32;
    for round in 1..=rounds {
        let last = round == rounds;
        // Write this round's dirty pages, per connection, per pid.
        for conn in 1..=STREAMS {
            let enc = &mut encoders[conn as usize];
            let w = &mut streams[conn as usize - 1].1;
            let mut cur = None;
            for &(pid, addr) in dirty
                .iter()
                .filter(|(p, a)| stream_for(*p, *a, STREAMS) == conn)
            {
                if cur != Some(pid) {
                    if !enc.is_empty() {
                        w.write_batch(enc).unwrap();
                        batches[conn as usize] += 1;
                    }
                    enc.begin(pid, round);
                    cur = Some(pid);
                }
                enc.push(addr, &memory[&(pid, addr)]).unwrap();
                if enc.is_full() {
                    w.write_batch(enc).unwrap();
                    batches[conn as usize] += 1;
                }
            }
            if !enc.is_empty() {
                w.write_batch(enc).unwrap();
                batches[conn as usize] += 1;
            }
            w.flush().unwrap();
        }
        // The job writes: some pages change (the last round sends them frozen).
        let sent = dirty.len() as u64;
        dirty = memory
            .keys()
            .copied()
            .filter(|(_, a)| (a >> 12) % (round as u64 + 3) == 0)
            .collect();
        if !last {
            for k in &dirty {
                memory.insert(*k, noise(k.1 ^ round as u64));
            }
        }
        w.send(&Message::RoundEnd(RoundEnd {
            round,
            pages_sent: sent,
            dirty_count: dirty.len() as u64,
            last,
            batches: batches.clone(),
        }))
        .unwrap();
    }
    w.send(&Message::FinalState(Box::new(inventory()))).unwrap();
    w.send(&Message::Commit).unwrap();
    w.flush().unwrap();
    drop(streams);
    let outcome = s.await_outcome(&mut r, &mut w).unwrap();
    assert_eq!(
        outcome,
        Outcome::Restored(Restored {
            pid: 100,
            restore_ms: 3
        })
    );
    w.send(&Message::Ack).unwrap();
    let res = target.join().unwrap();

    assert_eq!(res.rx.state(), State::Done);
    assert!(res.rx.released());
    assert_eq!(*res.restored.unwrap(), inventory());
    let sink = res.rx.sink();
    for ((pid, addr), p) in &memory {
        let got = sink.get(*pid, *addr).unwrap();
        if p.iter().all(|b| *b == 0) {
            assert_eq!(got, PageContent::Zero, "{pid} {addr:#x}");
        } else {
            assert_eq!(got, PageContent::Data(p), "{pid} {addr:#x}");
        }
    }
    assert_eq!(sink.stale(), 0, "a page overtook its newer version");
    assert_eq!(res.rx.rounds().len(), rounds as usize);
    let mut sent = WireStats::default();
    for e in &encoders {
        sent += e.stats();
    }
    assert_eq!(res.rx.stats(), &sent);
}

// ---------------------------------------------------------------------------
// Throttle

#[test]
fn bandwidth_parsing() {
    assert_eq!(parse_bandwidth("1G").unwrap(), 1_000_000_000);
    assert_eq!(parse_bandwidth("500M").unwrap(), 500_000_000);
    assert_eq!(parse_bandwidth("100MiB/s").unwrap(), 100 * 1024 * 1024);
    assert_eq!(parse_bandwidth("1gbit").unwrap(), 125_000_000);
    assert!(parse_bandwidth("lots").is_err());
}

#[test]
fn limiter_paces_a_burst_within_twenty_percent() {
    let rate = 40_000_000u64;
    let burst = 64 << 10;
    let limiter = Arc::new(RateLimiter::with_burst(rate, burst));
    let mut w = FrameWriter::new(Throttled::new(std::io::sink(), limiter));
    let payload = vec![0xa5u8; 256 << 10];
    let t = Instant::now();
    for _ in 0..40 {
        w.write_frame(FrameType::PageBatch, &payload).unwrap();
    }
    let elapsed = t.elapsed().as_secs_f64();
    let total = w.counters().1;
    let expected = (total - burst) as f64 / rate as f64;
    let ratio = elapsed / expected;
    println!("paced {total} bytes in {elapsed:.3} s, expected {expected:.3} s (x{ratio:.3})");
    assert!((0.8..=1.2).contains(&ratio), "ratio {ratio}");
}

// ---------------------------------------------------------------------------
// Benchmark (ignored by default): cargo test --release -p ferry --test
// wire_frames -- --ignored --nocapture

struct NullSink(u64);

impl PageSink for NullSink {
    fn page(
        &mut self,
        _pid: i32,
        _round: u32,
        _addr: u64,
        data: &[u8; PAGE_SIZE],
    ) -> Result<(), SinkError> {
        self.0 ^= u64::from_ne_bytes(data[..8].try_into().unwrap_or([0; 8]));
        Ok(())
    }
    fn zero(&mut self, _: i32, _: u32, _: u64, n: u32) -> Result<(), SinkError> {
        self.0 += n as u64;
        Ok(())
    }
    fn absent(&mut self, _: i32, _: u32, _: u64, _: u32) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Streams `total` bytes of pages from `pool` over `conns` loopback
/// connections; returns (seconds, wire bytes, sender stats).
fn stream_pages(
    pool: Arc<Vec<[u8; PAGE_SIZE]>>,
    total: usize,
    mode: Compression,
    conns: usize,
) -> (f64, u64, WireStats) {
    let (l, addr) = listener();
    let pages = total / PAGE_SIZE / conns;
    let mut pairs = Vec::new();
    for _ in 0..conns {
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = l.accept().unwrap();
        client.set_nodelay(true).unwrap();
        pairs.push((client, server));
    }
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for (i, (client, server)) in pairs.into_iter().enumerate() {
        let pool = pool.clone();
        let send = std::thread::spawn(move || {
            let mut enc = BatchEncoder::new(mode).unwrap();
            let mut w = FrameWriter::new(client);
            enc.begin(1000 + i as i32, 1);
            for k in 0..pages {
                let addr = 0x10_0000_0000 + (k as u64) * PAGE_SIZE as u64;
                enc.push(addr, &pool[k % pool.len()]).unwrap();
                if enc.is_full() {
                    w.write_batch(&mut enc).unwrap();
                }
            }
            if !enc.is_empty() {
                w.write_batch(&mut enc).unwrap();
            }
            w.send(&Message::Commit).unwrap();
            (*enc.stats(), w.counters().1)
        });
        let recv = std::thread::spawn(move || {
            let mut r = FrameReader::new(server);
            let mut dec = BatchDecoder::new().unwrap();
            let mut sink = NullSink(0);
            loop {
                let f = r.read_frame().unwrap();
                if f.ty == FrameType::Commit {
                    break;
                }
                dec.decode_to(f.payload, &mut sink).unwrap();
            }
            (*dec.stats(), sink.0)
        });
        handles.push((send, recv));
    }
    let mut stats = WireStats::default();
    let mut wire = 0;
    for (s, r) in handles {
        let (st, bytes) = s.join().unwrap();
        let (rs, _) = r.join().unwrap();
        assert_eq!(rs.pages(), st.pages());
        stats += &st;
        wire += bytes;
    }
    (t0.elapsed().as_secs_f64(), wire, stats)
}

#[test]
#[ignore]
fn throughput_benchmark() {
    const TOTAL: usize = 256 << 20;
    const POOL: usize = 8192; // 32 MiB of distinct pages per data set
    const REPEAT: usize = 3;
    let sets: Vec<(&str, Arc<Vec<[u8; PAGE_SIZE]>>)> = vec![
        ("random", Arc::new((0..POOL as u64).map(noise).collect())),
        ("zero", Arc::new(vec![[0u8; PAGE_SIZE]; POOL])),
        ("text", Arc::new((0..POOL as u64).map(text).collect())),
        (
            "mixed",
            Arc::new(
                (0..POOL as u64)
                    .map(|i| match i % 3 {
                        0 => noise(i),
                        1 => [0; PAGE_SIZE],
                        _ => text(i),
                    })
                    .collect(),
            ),
        ),
    ];
    println!();
    println!("256 MiB of pages over loopback TCP, encode + send + receive + decode");
    println!("(best and median of {REPEAT} runs, MB/s of page memory; wire = bytes on the wire)");
    println!(
        "{:<8} {:<8} {:>5} {:>10} {:>10} {:>10} {:>7}",
        "data", "mode", "conns", "best", "median", "wire best", "ratio"
    );
    let runs: Vec<(Compression, usize)> = vec![
        (Compression::None, 1),
        (Compression::Lz4, 1),
        (Compression::Zstd(1), 1),
        (Compression::Zstd(3), 1),
        (Compression::None, 4),
        (Compression::Lz4, 4),
    ];
    // Warm up (page faults in the pools and buffers, TCP autotuning).
    let _ = stream_pages(sets[0].1.clone(), TOTAL / 4, Compression::None, 1);
    for (name, pool) in &sets {
        for &(mode, conns) in &runs {
            let mut rates = Vec::new();
            let mut wire_rate = 0f64;
            let mut ratio = 0f64;
            for _ in 0..REPEAT {
                let (secs, wire, stats) = stream_pages(pool.clone(), TOTAL, mode, conns);
                let mem = stats.memory_bytes() as f64;
                rates.push(mem / secs / 1e6);
                wire_rate = wire_rate.max(wire as f64 / secs / 1e6);
                ratio = wire as f64 / mem;
            }
            rates.sort_by(f64::total_cmp);
            println!(
                "{:<8} {:<8} {:>5} {:>10.0} {:>10.0} {:>10.0} {:>7.3}",
                name,
                mode.to_string(),
                conns,
                rates[REPEAT - 1],
                rates[REPEAT / 2],
                wire_rate,
                ratio
            );
        }
    }
}
