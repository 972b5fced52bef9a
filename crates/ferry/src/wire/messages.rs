//! Control messages: their fields, frame types and postcard payloads.
//!
//! Every control frame's payload is the postcard encoding of the
//! message's fields (the frame type says which message it is); messages
//! without fields have an empty payload. Page batches (`PageBatch`,
//! `PageReply`) are binary and handled by [`super::pages`].
//!
//! Decoding is strict — trailing bytes after the fields are an error —
//! except where a newer minor version may have appended fields: `Hello`
//! is always decoded leniently, and everything else is when the peer
//! announced a higher minor version ([`Message::decode_lenient`]).

use super::auth::{Mac, Nonce, SessionId};
use super::frame::{Frame, FrameType};
use super::{WireError, PROTOCOL_MAJOR, PROTOCOL_MINOR};
use crate::image::{Inventory, MachineInfo};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which end of a migration a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// `ferry migrate`: has the running job, sends it.
    Source,
    /// `ferry agent`: receives and restores.
    Target,
}

/// What a peer can do. Unknown bits are ignored, so a newer minor version
/// can add capabilities without breaking older peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// Page encodings this peer can send/decode: [`Features::LZ4`],
    /// [`Features::ZSTD`] (raw and zero are always supported).
    pub compression: u32,
    /// Extra page connections this peer will open/accept.
    pub max_streams: u16,
    /// Other capabilities: [`Features::POST_COPY`], [`Features::LAZY_RESTORE`].
    pub flags: u32,
}

impl Features {
    pub const LZ4: u32 = 1 << 0;
    pub const ZSTD: u32 = 1 << 1;
    /// Post-copy and hybrid migration (`PostcopyPlan`, `PageRequest`,
    /// `PostcopyDone`).
    pub const POST_COPY: u32 = 1 << 0;
    /// After pre-copy, the target may resume the job before its private
    /// memory is in place and fill it from the pages it already holds
    /// (userfaultfd, as in post-copy, without the network).
    pub const LAZY_RESTORE: u32 = 1 << 1;

    /// What this implementation supports, with up to `max_streams` extra
    /// page connections.
    pub fn ours(max_streams: u16) -> Features {
        Features {
            compression: Self::LZ4 | Self::ZSTD,
            max_streams,
            flags: Self::POST_COPY | Self::LAZY_RESTORE,
        }
    }

    /// The features both peers have.
    pub fn negotiate(&self, other: &Features) -> Features {
        Features {
            compression: self.compression & other.compression,
            max_streams: self.max_streams.min(other.max_streams),
            flags: self.flags & other.flags,
        }
    }

    /// Whether pages compressed with `c` may be sent.
    pub fn allows(&self, c: Compression) -> bool {
        match c {
            Compression::None => true,
            Compression::Lz4 => self.compression & Self::LZ4 != 0,
            Compression::Zstd(_) => self.compression & Self::ZSTD != 0,
        }
    }
}

/// `Hello`: the first frame on the main connection, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub major: u16,
    pub minor: u16,
    pub role: Role,
    /// Chosen at random by the source; the target echoes it.
    pub session: SessionId,
    pub features: Features,
    /// Free text, e.g. "ferry 0.1.0", for messages and logs.
    pub software: String,
}

impl Hello {
    /// A Hello with this build's protocol version.
    pub fn new(role: Role, session: SessionId, features: Features) -> Hello {
        Hello {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            role,
            session,
            features,
            software: concat!("ferry ", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }

    /// Refuses a peer whose major version differs.
    pub fn check_version(&self) -> Result<(), WireError> {
        if self.major != PROTOCOL_MAJOR {
            return Err(WireError::Version {
                major: self.major,
                minor: self.minor,
            });
        }
        Ok(())
    }
}

/// `AuthChallenge` (target → source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthChallenge {
    pub nonce: Nonce,
}

/// `AuthResponse` (source → target): the source's proof, and its own
/// nonce for the target to prove itself against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthResponse {
    pub mac: Mac,
    pub nonce: Nonce,
}

/// `AuthOk` (target → source): the target's proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthOk {
    pub mac: Mac,
}

/// How page contents are compressed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Compression {
    /// Raw pages (zero pages are always sent as flags).
    None,
    /// lz4 block compression per page: cheap, for live streams.
    #[default]
    Lz4,
    /// zstd per page at the given level (-7..=22; 0 means zstd's default, 3).
    Zstd(i32),
}

impl Compression {
    /// zstd's own default level.
    pub const ZSTD_DEFAULT_LEVEL: i32 = 3;
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

impl FromStr for Compression {
    type Err = WireError;

    /// "none" (or "off", "raw"), "lz4", "zstd", "zstd:LEVEL" / "zstd=LEVEL".
    fn from_str(s: &str) -> Result<Self, WireError> {
        let bad = |why: &str| WireError::CompressionSpec {
            input: s.to_string(),
            why: why.to_string(),
        };
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "none" | "off" | "raw" => return Ok(Compression::None),
            "lz4" => return Ok(Compression::Lz4),
            "zstd" => return Ok(Compression::Zstd(Compression::ZSTD_DEFAULT_LEVEL)),
            _ => {}
        }
        let Some(level) = t.strip_prefix("zstd:").or_else(|| t.strip_prefix("zstd=")) else {
            return Err(bad("expected none, lz4, zstd or zstd:LEVEL"));
        };
        let level: i32 = level
            .parse()
            .map_err(|_| bad("the zstd level is not an integer"))?;
        if !(-7..=22).contains(&level) {
            return Err(bad("the zstd level must be in -7..=22"));
        }
        Ok(Compression::Zstd(if level == 0 {
            Compression::ZSTD_DEFAULT_LEVEL
        } else {
            level
        }))
    }
}

/// How the source intends to migrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    /// Rounds of pages while the job runs, then stop-and-copy.
    PreCopy,
    /// Freeze, send the state and the pages needed first, resume on the
    /// target, then fetch pages on demand while the rest streams.
    PostCopy,
    /// Pre-copy rounds, then post-copy for what is left.
    Hybrid,
}

impl MigrationMode {
    /// Whether the job resumes on the target before all its pages are there.
    pub fn is_postcopy(self) -> bool {
        !matches!(self, MigrationMode::PreCopy)
    }
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationMode::PreCopy => "precopy",
            MigrationMode::PostCopy => "postcopy",
            MigrationMode::Hybrid => "hybrid",
        })
    }
}

impl FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" | "pre-copy" => Ok(MigrationMode::PreCopy),
            "postcopy" | "post-copy" => Ok(MigrationMode::PostCopy),
            "hybrid" => Ok(MigrationMode::Hybrid),
            _ => Err(format!(
                "unknown mode {s:?}: expected precopy, postcopy or hybrid"
            )),
        }
    }
}

/// `MigrationStart` (source → target): what comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStart {
    /// Job name (for the agent's job table and logs).
    pub job: String,
    pub description: String,
    pub mode: MigrationMode,
    /// Encoding the source will use for pages.
    pub compression: Compression,
    /// Extra page connections the source will open (0 = pages on the main
    /// connection only); at most the negotiated `max_streams`.
    pub streams: u16,
    /// Estimate of the pages of the first round (for progress and space).
    pub total_pages: u64,
    /// Processes in the tree.
    pub processes: u32,
    /// The source machine; the target refuses a machine it cannot restore.
    pub machine: MachineInfo,
}

/// `StreamJoin` (source → target): first frame of an extra page
/// connection. `mac` proves the connection belongs to the authenticated
/// session (see [`super::auth::AuthToken::join_proof`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamJoin {
    pub session: SessionId,
    /// 1..=streams (0 is the main connection).
    pub index: u16,
    pub mac: Mac,
}

/// `RoundEnd` (source → target): every batch of `round` has been written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundEnd {
    /// Rounds count from 1 and increase by one.
    pub round: u32,
    /// Pages sent this round, on all connections (zero and absent included).
    pub pages_sent: u64,
    /// Pages found dirty at the end of this round (what the next round sends).
    pub dirty_count: u64,
    /// The last round: the tree is frozen and every page has been sent.
    pub last: bool,
    /// Cumulative `PageBatch` frames sent so far per connection, index 0
    /// the main connection, then streams 1..=n.
    pub batches: Vec<u64>,
}

/// `Restored` (target → source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// pid of the restored root process (as seen on the target).
    pub pid: i32,
    /// Time from Commit to the tree running, ms.
    pub restore_ms: u64,
}

/// `Blob` (source → target): bytes `offset..offset+data.len()` of blob
/// `index` of the FinalState inventory. Pieces come in order; each blob is
/// complete (length and CRC32C as the inventory says) before Commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobChunk {
    pub index: u32,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Largest piece of a blob per frame.
pub const BLOB_CHUNK: usize = 4 << 20;

/// `PageRequest` (target → source, post-copy): the job faulted on these
/// pages; send them ahead of the background stream. `pid` is the image's
/// (namespace) pid, `addr` the page's address in the source process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    pub pid: i32,
    pub addr: u64,
    pub npages: u32,
}

/// `npages` pages from `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRun {
    pub addr: u64,
    pub npages: u32,
}

impl PlanRun {
    /// Runs covering `[start, end)` (page aligned), split where a run
    /// would exceed `u32::MAX` pages.
    pub fn covering(start: u64, end: u64) -> impl Iterator<Item = PlanRun> {
        const PAGE: u64 = super::PAGE_SIZE as u64;
        let mut a = start;
        std::iter::from_fn(move || {
            (a < end).then(|| {
                let n = ((end - a) / PAGE).min(u32::MAX as u64);
                let r = PlanRun {
                    addr: a,
                    npages: n as u32,
                };
                a += n * PAGE;
                r
            })
        })
    }
}

/// Most runs one `PostcopyPlan` frame may carry (a plan larger than that is
/// split over several frames for the same pid).
pub const MAX_PLAN_RUNS: usize = 1 << 20;

/// `PostcopyPlan` (source → target, between FinalState and Commit): pages of
/// process `pid` that are not sent before the job resumes. They stay
/// missing in the restored process until they arrive or it faults on them;
/// every other page is either restored or was absent on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyPlan {
    pub pid: i32,
    /// Sorted, disjoint runs.
    pub runs: Vec<PlanRun>,
}

/// `PostcopyDone` (target → source): every planned page is in place (or
/// the job ended). What the target measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PostcopyDone {
    /// Faults on planned pages that had not arrived: served by a request.
    pub remote_faults: u64,
    /// Faults on pages the source never had (or the job dropped): zero-filled here.
    pub local_faults: u64,
    /// Fault → page in place, for remote faults (µs).
    pub fault_latency_p50_us: f64,
    pub fault_latency_p99_us: f64,
    pub fault_latency_max_us: f64,
    /// Resume → last planned page in place (ms).
    pub last_page_ms: f64,
    /// Planned pages placed.
    pub pages_placed: u64,
    /// The job ended before every page arrived.
    pub job_ended: bool,
}

/// A control message. Page batches are not messages (see `pages`).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    AuthChallenge(AuthChallenge),
    AuthResponse(AuthResponse),
    AuthOk(AuthOk),
    AuthFail { reason: String },
    StreamJoin(StreamJoin),
    MigrationStart(Box<MigrationStart>),
    RoundEnd(RoundEnd),
    FinalState(Box<Inventory>),
    Blob(BlobChunk),
    Commit,
    Restored(Restored),
    RestoreFailed { reason: String },
    Ack,
    Abort { reason: String },
    Error { message: String },
    Ping { seq: u64 },
    Pong { seq: u64 },
    PageRequest(PageRequest),
    PostcopyPlan(PostcopyPlan),
    PostcopyDone(PostcopyDone),
}

impl Message {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::Hello(_) => FrameType::Hello,
            Message::AuthChallenge(_) => FrameType::AuthChallenge,
            Message::AuthResponse(_) => FrameType::AuthResponse,
            Message::AuthOk(_) => FrameType::AuthOk,
            Message::AuthFail { .. } => FrameType::AuthFail,
            Message::StreamJoin(_) => FrameType::StreamJoin,
            Message::MigrationStart(_) => FrameType::MigrationStart,
            Message::RoundEnd(_) => FrameType::RoundEnd,
            Message::FinalState(_) => FrameType::FinalState,
            Message::Blob(_) => FrameType::Blob,
            Message::Commit => FrameType::Commit,
            Message::Restored(_) => FrameType::Restored,
            Message::RestoreFailed { .. } => FrameType::RestoreFailed,
            Message::Ack => FrameType::Ack,
            Message::Abort { .. } => FrameType::Abort,
            Message::Error { .. } => FrameType::Error,
            Message::Ping { .. } => FrameType::Ping,
            Message::Pong { .. } => FrameType::Pong,
            Message::PageRequest(_) => FrameType::PageRequest,
            Message::PostcopyPlan(_) => FrameType::PostcopyPlan,
            Message::PostcopyDone(_) => FrameType::PostcopyDone,
        }
    }

    /// Appends the payload (not the frame header) to `buf`.
    pub fn encode_into(&self, buf: &mut Vec<u8>) -> Result<(), WireError> {
        let ty = self.frame_type();
        fn put<T: Serialize + ?Sized>(
            ty: FrameType,
            buf: &mut Vec<u8>,
            v: &T,
        ) -> Result<(), WireError> {
            let out =
                postcard::to_extend(v, std::mem::take(buf)).map_err(|e| WireError::Encode {
                    ty,
                    why: e.to_string(),
                })?;
            *buf = out;
            Ok(())
        }
        match self {
            Message::Hello(m) => put(ty, buf, m),
            Message::AuthChallenge(m) => put(ty, buf, m),
            Message::AuthResponse(m) => put(ty, buf, m),
            Message::AuthOk(m) => put(ty, buf, m),
            Message::AuthFail { reason } => put(ty, buf, reason),
            Message::StreamJoin(m) => put(ty, buf, m),
            Message::MigrationStart(m) => put(ty, buf, m),
            Message::RoundEnd(m) => put(ty, buf, m),
            Message::FinalState(m) => put(ty, buf, m),
            Message::Blob(m) => put(ty, buf, m),
            Message::Commit | Message::Ack => Ok(()),
            Message::Restored(m) => put(ty, buf, m),
            Message::RestoreFailed { reason } => put(ty, buf, reason),
            Message::Abort { reason } => put(ty, buf, reason),
            Message::Error { message } => put(ty, buf, message),
            Message::Ping { seq } => put(ty, buf, seq),
            Message::Pong { seq } => put(ty, buf, seq),
            Message::PageRequest(m) => put(ty, buf, m),
            Message::PostcopyPlan(m) => put(ty, buf, m),
            Message::PostcopyDone(m) => put(ty, buf, m),
        }
    }

    /// The payload as a fresh vector.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut v = Vec::new();
        self.encode_into(&mut v)?;
        Ok(v)
    }

    /// Decodes a control frame; trailing bytes are an error (except for
    /// `Hello`, which is always lenient).
    pub fn decode(frame: &Frame<'_>) -> Result<Message, WireError> {
        Self::decode_inner(frame, frame.ty == FrameType::Hello)
    }

    /// Decodes a control frame ignoring trailing bytes: for a peer with a
    /// newer minor version, which may append fields.
    pub fn decode_lenient(frame: &Frame<'_>) -> Result<Message, WireError> {
        Self::decode_inner(frame, true)
    }

    fn decode_inner(frame: &Frame<'_>, lenient: bool) -> Result<Message, WireError> {
        let ty = frame.ty;
        let p = frame.payload;
        fn take<T: DeserializeOwned>(
            ty: FrameType,
            p: &[u8],
            lenient: bool,
        ) -> Result<T, WireError> {
            let (v, rest) = postcard::take_from_bytes::<T>(p).map_err(|e| WireError::Decode {
                ty,
                why: e.to_string(),
            })?;
            if !rest.is_empty() && !lenient {
                return Err(WireError::Decode {
                    ty,
                    why: format!("{} trailing bytes", rest.len()),
                });
            }
            Ok(v)
        }
        let empty = |m: Message| {
            if p.is_empty() || lenient {
                Ok(m)
            } else {
                Err(WireError::Decode {
                    ty,
                    why: format!("{} bytes in a payload that must be empty", p.len()),
                })
            }
        };
        Ok(match ty {
            FrameType::Hello => Message::Hello(take(ty, p, lenient)?),
            FrameType::AuthChallenge => Message::AuthChallenge(take(ty, p, lenient)?),
            FrameType::AuthResponse => Message::AuthResponse(take(ty, p, lenient)?),
            FrameType::AuthOk => Message::AuthOk(take(ty, p, lenient)?),
            FrameType::AuthFail => Message::AuthFail {
                reason: take(ty, p, lenient)?,
            },
            FrameType::StreamJoin => Message::StreamJoin(take(ty, p, lenient)?),
            FrameType::MigrationStart => Message::MigrationStart(Box::new(take(ty, p, lenient)?)),
            FrameType::RoundEnd => Message::RoundEnd(take(ty, p, lenient)?),
            FrameType::FinalState => Message::FinalState(Box::new(take(ty, p, lenient)?)),
            FrameType::Blob => Message::Blob(take(ty, p, lenient)?),
            FrameType::Commit => empty(Message::Commit)?,
            FrameType::Restored => Message::Restored(take(ty, p, lenient)?),
            FrameType::RestoreFailed => Message::RestoreFailed {
                reason: take(ty, p, lenient)?,
            },
            FrameType::Ack => empty(Message::Ack)?,
            FrameType::Abort => Message::Abort {
                reason: take(ty, p, lenient)?,
            },
            FrameType::Error => Message::Error {
                message: take(ty, p, lenient)?,
            },
            FrameType::Ping => Message::Ping {
                seq: take(ty, p, lenient)?,
            },
            FrameType::Pong => Message::Pong {
                seq: take(ty, p, lenient)?,
            },
            FrameType::PageRequest => Message::PageRequest(take(ty, p, lenient)?),
            FrameType::PostcopyPlan => {
                let plan: PostcopyPlan = take(ty, p, lenient)?;
                if plan.runs.len() > MAX_PLAN_RUNS {
                    return Err(WireError::Decode {
                        ty,
                        why: format!("{} runs (at most {MAX_PLAN_RUNS})", plan.runs.len()),
                    });
                }
                Message::PostcopyPlan(plan)
            }
            FrameType::PostcopyDone => Message::PostcopyDone(take(ty, p, lenient)?),
            FrameType::PageBatch | FrameType::PageReply => {
                return Err(WireError::Decode {
                    ty,
                    why: "a page batch is binary, not a control message".into(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::OwnedFrame;

    fn machine() -> MachineInfo {
        MachineInfo {
            kernel_release: "6.18.0".into(),
            hostname: "node1".into(),
            page_size: 4096,
            xstate_size: 2696,
            xcr0: 0x2e7,
            vdso_layout: vec![("[vvar]".into(), 16384), ("[vdso]".into(), 8192)],
        }
    }

    fn samples() -> Vec<Message> {
        let sid = SessionId([7; 16]);
        vec![
            Message::Hello(Hello::new(Role::Source, sid, Features::ours(4))),
            Message::AuthChallenge(AuthChallenge { nonce: [1; 32] }),
            Message::AuthResponse(AuthResponse {
                mac: [2; 32],
                nonce: [3; 32],
            }),
            Message::AuthOk(AuthOk { mac: [4; 32] }),
            Message::AuthFail {
                reason: "no".into(),
            },
            Message::StreamJoin(StreamJoin {
                session: sid,
                index: 2,
                mac: [5; 32],
            }),
            Message::MigrationStart(Box::new(MigrationStart {
                job: "lulesh".into(),
                description: "test".into(),
                mode: MigrationMode::PreCopy,
                compression: Compression::Zstd(3),
                streams: 2,
                total_pages: 1 << 20,
                processes: 3,
                machine: machine(),
            })),
            Message::RoundEnd(RoundEnd {
                round: 3,
                pages_sent: 100,
                dirty_count: 7,
                last: true,
                batches: vec![1, 2, 3],
            }),
            Message::Commit,
            Message::Restored(Restored {
                pid: 4242,
                restore_ms: 17,
            }),
            Message::RestoreFailed {
                reason: "pid taken".into(),
            },
            Message::Ack,
            Message::Abort {
                reason: "bye".into(),
            },
            Message::Error {
                message: "bad".into(),
            },
            Message::Ping { seq: u64::MAX },
            Message::Pong { seq: 0 },
            Message::PageRequest(PageRequest {
                pid: 1,
                addr: 0x1000,
                npages: 1,
            }),
            Message::PostcopyPlan(PostcopyPlan {
                pid: 3,
                runs: vec![PlanRun {
                    addr: 0x7000,
                    npages: 9,
                }],
            }),
            Message::PostcopyDone(PostcopyDone {
                remote_faults: 3,
                local_faults: 1,
                fault_latency_p50_us: 80.5,
                fault_latency_p99_us: 300.0,
                fault_latency_max_us: 400.0,
                last_page_ms: 12.0,
                pages_placed: 100,
                job_ended: false,
            }),
        ]
    }

    #[test]
    fn messages_round_trip() {
        for m in samples() {
            let f = OwnedFrame::new(m.frame_type(), m.encode().unwrap());
            assert_eq!(Message::decode(&f.as_frame()).unwrap(), m);
        }
    }

    #[test]
    fn trailing_bytes_are_strict_except_hello_and_lenient() {
        for m in samples() {
            let mut p = m.encode().unwrap();
            p.push(0);
            let f = OwnedFrame::new(m.frame_type(), p);
            let strict = Message::decode(&f.as_frame());
            if m.frame_type() == FrameType::Hello {
                assert_eq!(strict.unwrap(), m);
            } else {
                assert!(
                    strict.is_err(),
                    "{:?} accepted a trailing byte",
                    m.frame_type()
                );
            }
            assert_eq!(Message::decode_lenient(&f.as_frame()).unwrap(), m);
        }
    }

    #[test]
    fn batch_frames_are_not_messages() {
        let f = OwnedFrame::new(FrameType::PageBatch, vec![]);
        assert!(matches!(
            Message::decode(&f.as_frame()),
            Err(WireError::Decode { .. })
        ));
    }

    #[test]
    fn compression_parses() {
        assert_eq!("lz4".parse::<Compression>().unwrap(), Compression::Lz4);
        assert_eq!("NONE".parse::<Compression>().unwrap(), Compression::None);
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd(3));
        assert_eq!(
            "zstd:19".parse::<Compression>().unwrap(),
            Compression::Zstd(19)
        );
        assert_eq!(
            "zstd=-3".parse::<Compression>().unwrap(),
            Compression::Zstd(-3)
        );
        assert_eq!(
            "zstd:0".parse::<Compression>().unwrap(),
            Compression::Zstd(3)
        );
        for bad in ["", "gzip", "zstd:99", "zstd:x"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
        for c in [Compression::None, Compression::Lz4, Compression::Zstd(7)] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
    }

    #[test]
    fn features_negotiate_to_the_intersection() {
        let a = Features::ours(8);
        let b = Features {
            compression: Features::LZ4 | 1 << 9,
            max_streams: 2,
            flags: 1 << 5,
        };
        let n = a.negotiate(&b);
        assert_eq!(n.compression, Features::LZ4);
        assert_eq!(n.max_streams, 2);
        assert_eq!(n.flags, 0);
        assert!(n.allows(Compression::Lz4) && !n.allows(Compression::Zstd(1)));
        assert!(n.allows(Compression::None));
    }

    #[test]
    fn major_version_must_match() {
        let mut h = Hello::new(Role::Target, SessionId([0; 16]), Features::ours(1));
        assert!(h.check_version().is_ok());
        h.minor += 5;
        assert!(h.check_version().is_ok());
        h.major += 1;
        assert!(matches!(h.check_version(), Err(WireError::Version { .. })));
    }
}
