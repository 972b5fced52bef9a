//! What a migration reports: the JSON `ferry migrate --json` prints and the
//! numbers benchmarks record.

use serde::Serialize;

/// Pages sent, by how they travelled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PagesByKind {
    pub zero: u64,
    pub raw: u64,
    pub lz4: u64,
    pub zstd: u64,
    /// Gone by the time they were read (unmapped).
    pub absent: u64,
    /// Pages of the job's writable anonymous and shared memory that held
    /// nothing when the migration started (never touched, or given back to
    /// the kernel, e.g. by ferry's freed-memory library): never sent.
    pub not_present: u64,
    /// Sent again because the job wrote them after an earlier send.
    pub resent: u64,
    pub total: u64,
}

/// One pre-copy round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// 0 is the full first pass; the last round is the stop-and-copy.
    pub round: u32,
    /// Pages found written at the end of the round (sent by the next one).
    pub dirty_pages: u64,
    pub pages_sent: u64,
    pub bytes_sent: u64,
    pub duration_ms: f64,
    /// Bytes per second while sending.
    pub bandwidth: f64,
    pub estimated_downtime_ms: f64,
    /// Whether the job was frozen (the stop-and-copy round).
    pub frozen: bool,
}

/// Fault service latency on the target (µs).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// `precopy`, `postcopy` or `hybrid`.
    pub mode: String,
    /// The job's pid on the source.
    pub pid: i32,
    pub target: String,
    /// The job's root pid on the target, as the target host sees it.
    pub target_pid: i32,
    pub processes: usize,
    pub threads: usize,
    pub controller: String,
    /// The memory-update pattern that ended the live phase ("a", "b", "c").
    pub pattern: Option<String>,
    pub stop_reason: String,
    /// Freeze on the source → the job runs on the target (measured).
    pub downtime_ms: f64,
    pub total_ms: f64,
    /// Of the downtime: the target's restore.
    pub restore_ms: f64,
    /// Pre-copy: the target resumed the job before copying its private
    /// memory into place and filled it afterwards from the pages it held.
    pub lazy_restore: bool,
    pub live_ms: f64,
    /// Bytes on the wire (frames, all connections).
    pub bytes_sent: u64,
    /// Bytes of memory those pages hold (4 KiB each, zero pages included).
    pub memory_bytes: u64,
    pub pages: PagesByKind,
    pub rounds: Vec<RoundReport>,
    pub compression: String,
    pub streams: u16,
    pub tracker: String,
    /// Post-copy/hybrid: freeze → running on the target (= downtime).
    pub resume_ms: Option<f64>,
    /// Post-copy/hybrid: faults on pages not there yet, fetched from here.
    pub remote_faults: Option<u64>,
    /// Post-copy/hybrid: faults the target answered itself with a zero page.
    pub local_faults: Option<u64>,
    pub fault_latency_us: Option<Latency>,
    /// Post-copy/hybrid: resume → the last page in place on the target.
    pub last_page_ms: Option<f64>,
    /// Post-copy/hybrid: pages sent before the resume / after it.
    pub pages_before_resume: Option<u64>,
    pub pages_after_resume: Option<u64>,
    /// Post-copy/hybrid: of the pages after the resume, those of shared
    /// memory (each page of a shared object once), and how many of them
    /// the job touched before they came (sent on the target's request).
    pub shared_pages_after_resume: Option<u64>,
    pub shared_page_requests: Option<u64>,
}
