//! Framing: every message on a ferry connection is one frame.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "FRY1" (0x46 0x52 0x59 0x31)
//! 4       1     frame type (FrameType)
//! 5       1     flags (none defined in 1.x: must be 0)
//! 6       2     reserved (must be 0)
//! 8       4     payload length in bytes, little endian
//! 12      4     CRC32C of the payload, little endian
//! 16      4     CRC32C of bytes 0..16 (the header itself), little endian
//! 20      ...   payload
//! ```
//!
//! A header is checked in this order: magic, header CRC, type, flags and
//! reserved bits, then the length against the cap for its type — all
//! before a byte of payload is read or allocated. The payload buffer then
//! only grows as payload bytes actually arrive, so a lying length costs
//! the liar its own bandwidth, not our memory. Any error leaves the stream
//! out of sync: the connection must be closed.

use super::{WireError, DEFAULT_MAX_PAYLOAD, MAGIC, MAX_FINAL_STATE};
use std::fmt;
use std::io::{IoSlice, Read, Write};

/// Size of a frame header.
pub const HEADER_LEN: usize = 20;

/// The type byte of a frame. Codes are stable within a major version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FrameType {
    /// Version and feature exchange (both directions).
    Hello = 0x01,
    /// Target → source: a random nonce to authenticate against.
    AuthChallenge = 0x02,
    /// Source → target: HMAC over the challenge, plus the source's nonce.
    AuthResponse = 0x03,
    /// Target → source: accepted, with the target's own proof.
    AuthOk = 0x04,
    /// Target → source: refused (then close).
    AuthFail = 0x05,
    /// Source → target, first frame of an extra page connection.
    StreamJoin = 0x06,
    /// Source → target: what is being migrated.
    MigrationStart = 0x10,
    /// Source → target: pages (binary payload, see `pages`).
    PageBatch = 0x11,
    /// Source → target: one pre-copy round is complete.
    RoundEnd = 0x12,
    /// Source → target: the inventory of the frozen tree.
    FinalState = 0x13,
    /// Source → target: everything is sent, restore now.
    Commit = 0x14,
    /// Target → source: the restored tree runs.
    Restored = 0x15,
    /// Target → source: the restore failed; the source resumes its job.
    RestoreFailed = 0x16,
    /// Source → target: a piece of a blob (contents of a file deleted while
    /// open), between FinalState and Commit.
    Blob = 0x17,
    /// Either direction: positive acknowledgement.
    Ack = 0x20,
    /// Either direction: the migration is abandoned.
    Abort = 0x21,
    /// Either direction: a protocol error (then close).
    Error = 0x22,
    /// Either direction: liveness probe.
    Ping = 0x23,
    /// Answer to `Ping`.
    Pong = 0x24,
    /// Post-copy: target → source, fetch these pages now.
    PageRequest = 0x30,
    /// Reserved: source → target, requested pages (batch payload); ferry
    /// sends replies as `PageBatch` on the main connection.
    PageReply = 0x31,
    /// Post-copy: source → target, between FinalState and Commit: the pages
    /// of one process that will come after the job resumes.
    PostcopyPlan = 0x32,
    /// Post-copy: target → source, every planned page is in place; the
    /// source may let its copy of the job go.
    PostcopyDone = 0x33,
}

impl FrameType {
    pub const ALL: [FrameType; 23] = [
        FrameType::Hello,
        FrameType::AuthChallenge,
        FrameType::AuthResponse,
        FrameType::AuthOk,
        FrameType::AuthFail,
        FrameType::StreamJoin,
        FrameType::MigrationStart,
        FrameType::PageBatch,
        FrameType::RoundEnd,
        FrameType::FinalState,
        FrameType::Commit,
        FrameType::Restored,
        FrameType::RestoreFailed,
        FrameType::Blob,
        FrameType::Ack,
        FrameType::Abort,
        FrameType::Error,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::PageRequest,
        FrameType::PageReply,
        FrameType::PostcopyPlan,
        FrameType::PostcopyDone,
    ];

    pub fn from_u8(b: u8) -> Option<FrameType> {
        Self::ALL.iter().copied().find(|t| *t as u8 == b)
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "Hello",
            FrameType::AuthChallenge => "AuthChallenge",
            FrameType::AuthResponse => "AuthResponse",
            FrameType::AuthOk => "AuthOk",
            FrameType::AuthFail => "AuthFail",
            FrameType::StreamJoin => "StreamJoin",
            FrameType::MigrationStart => "MigrationStart",
            FrameType::PageBatch => "PageBatch",
            FrameType::RoundEnd => "RoundEnd",
            FrameType::FinalState => "FinalState",
            FrameType::Commit => "Commit",
            FrameType::Restored => "Restored",
            FrameType::RestoreFailed => "RestoreFailed",
            FrameType::Blob => "Blob",
            FrameType::Ack => "Ack",
            FrameType::Abort => "Abort",
            FrameType::Error => "Error",
            FrameType::Ping => "Ping",
            FrameType::Pong => "Pong",
            FrameType::PageRequest => "PageRequest",
            FrameType::PageReply => "PageReply",
            FrameType::PostcopyPlan => "PostcopyPlan",
            FrameType::PostcopyDone => "PostcopyDone",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Payload caps, checked before a payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Cap for every frame type but `FinalState`.
    pub max_payload: u32,
    /// Cap for `FinalState` (never below `max_payload`).
    pub max_final_state: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_final_state: MAX_FINAL_STATE,
        }
    }
}

impl Limits {
    /// Limits with the given general cap (and the default `FinalState` cap).
    pub fn with_max_payload(max_payload: u32) -> Self {
        Limits {
            max_payload,
            ..Limits::default()
        }
    }

    /// The payload cap for frames of type `ty`.
    pub fn cap(&self, ty: FrameType) -> u32 {
        match ty {
            FrameType::FinalState => self.max_final_state.max(self.max_payload),
            _ => self.max_payload,
        }
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub ty: FrameType,
    pub flags: u8,
    pub len: u32,
    pub payload_crc: u32,
}

/// Builds a frame header.
pub fn encode_header(ty: FrameType, len: u32, payload_crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = ty as u8;
    h[5] = 0;
    h[6..8].copy_from_slice(&0u16.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..16].copy_from_slice(&payload_crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&h[0..16]);
    h[16..20].copy_from_slice(&hcrc.to_le_bytes());
    h
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Checks a header (magic, CRC, type, reserved bits, length cap).
pub fn decode_header(h: &[u8; HEADER_LEN], limits: &Limits) -> Result<FrameHeader, WireError> {
    if h[0..4] != MAGIC {
        return Err(WireError::BadMagic {
            found: [h[0], h[1], h[2], h[3]],
        });
    }
    let computed = crc32c::crc32c(&h[0..16]);
    let stored = le32(h, 16);
    if computed != stored {
        return Err(WireError::HeaderChecksum { computed, stored });
    }
    let ty = FrameType::from_u8(h[4]).ok_or(WireError::UnknownFrameType(h[4]))?;
    let flags = h[5];
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 || reserved != 0 {
        return Err(WireError::ReservedBits {
            ty,
            flags,
            reserved,
        });
    }
    let len = le32(h, 8);
    let max = limits.cap(ty);
    if len > max {
        return Err(WireError::TooLarge {
            ty,
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(FrameHeader {
        ty,
        flags,
        len,
        payload_crc: le32(h, 12),
    })
}

/// A received frame, borrowing its payload from the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub ty: FrameType,
    pub flags: u8,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    pub fn to_owned(&self) -> OwnedFrame {
        OwnedFrame {
            ty: self.ty,
            flags: self.flags,
            payload: self.payload.to_vec(),
        }
    }

    /// The complete frame (header + payload) as bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        encode_frame_into(self.ty, self.payload, &mut out);
        out
    }
}

/// A frame that owns its payload (tests, queues).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFrame {
    pub ty: FrameType,
    pub flags: u8,
    pub payload: Vec<u8>,
}

impl OwnedFrame {
    pub fn new(ty: FrameType, payload: Vec<u8>) -> Self {
        OwnedFrame {
            ty,
            flags: 0,
            payload,
        }
    }

    pub fn as_frame(&self) -> Frame<'_> {
        Frame {
            ty: self.ty,
            flags: self.flags,
            payload: &self.payload,
        }
    }
}

/// Appends a complete frame to `out`. Payloads over 4 GiB cannot be framed;
/// use [`FrameWriter`], which checks the caps, for anything untrusted.
pub fn encode_frame_into(ty: FrameType, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&encode_header(ty, len, crc32c::crc32c(payload)));
    out.extend_from_slice(payload);
}

/// Decodes one frame from the front of `bytes`; returns it and the number
/// of bytes it took.
pub fn decode_frame<'a>(bytes: &'a [u8], limits: &Limits) -> Result<(Frame<'a>, usize), WireError> {
    let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Closed {
            context: "inside a frame header",
        });
    };
    let h = decode_header(h, limits)?;
    let end = HEADER_LEN + h.len as usize;
    let Some(payload) = bytes.get(HEADER_LEN..end) else {
        return Err(WireError::Closed {
            context: "inside a frame payload",
        });
    };
    check_payload(&h, payload)?;
    Ok((
        Frame {
            ty: h.ty,
            flags: h.flags,
            payload,
        },
        end,
    ))
}

fn check_payload(h: &FrameHeader, payload: &[u8]) -> Result<(), WireError> {
    let computed = crc32c::crc32c(payload);
    if computed != h.payload_crc {
        return Err(WireError::PayloadChecksum {
            ty: h.ty,
            computed,
            stored: h.payload_crc,
        });
    }
    Ok(())
}

/// Reads frames from a byte stream into one reusable buffer.
pub struct FrameReader<R> {
    inner: R,
    /// Initialised bytes; the high-water mark of payload sizes seen.
    buf: Vec<u8>,
    limits: Limits,
    frames: u64,
    bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    pub fn with_limits(inner: R, limits: Limits) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            limits,
            frames: 0,
            bytes: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Frames and bytes (headers included) read so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.frames, self.bytes)
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads the next frame. A peer that closes between frames yields
    /// [`WireError::Closed`] with context "between frames".
    pub fn read_frame(&mut self) -> Result<Frame<'_>, WireError> {
        let mut hdr = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.inner.read(&mut hdr[got..]) {
                Ok(0) => {
                    return Err(WireError::Closed {
                        context: if got == 0 {
                            "between frames"
                        } else {
                            "inside a frame header"
                        },
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::io("reading a frame header")(e)),
            }
        }
        let h = decode_header(&hdr, &self.limits)?;
        let len = h.len as usize;
        // After an exceptionally large frame (a FinalState), give the
        // memory back rather than keeping it for the connection's life.
        if self.buf.len() > self.limits.max_payload as usize
            && len <= self.limits.max_payload as usize
        {
            self.buf.truncate(self.limits.max_payload as usize);
            self.buf.shrink_to_fit();
        }
        if self.buf.len() >= len {
            self.inner
                .read_exact(&mut self.buf[..len])
                .map_err(WireError::io("inside a frame payload"))?;
        } else {
            // Fill what is already initialised, then grow only as bytes arrive.
            let have = self.buf.len();
            self.inner
                .read_exact(&mut self.buf[..have])
                .map_err(WireError::io("inside a frame payload"))?;
            let want = (len - have) as u64;
            let n = (&mut self.inner)
                .take(want)
                .read_to_end(&mut self.buf)
                .map_err(WireError::io("inside a frame payload"))?;
            if (n as u64) < want {
                return Err(WireError::Closed {
                    context: "inside a frame payload",
                });
            }
        }
        let payload = &self.buf[..len];
        check_payload(&h, payload)?;
        self.frames += 1;
        self.bytes += (HEADER_LEN + len) as u64;
        Ok(Frame {
            ty: h.ty,
            flags: h.flags,
            payload,
        })
    }
}

/// Writes frames to a byte stream: one vectored write per frame (header
/// and payload parts), so nothing is copied for page batches.
pub struct FrameWriter<W> {
    inner: W,
    /// Scratch for serialising control messages.
    buf: Vec<u8>,
    limits: Limits,
    frames: u64,
    bytes: u64,
    /// A frame still unwritten after this long is an error (see
    /// [`FrameWriter::set_frame_deadline`]).
    deadline: Option<std::time::Duration>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    pub fn with_limits(inner: W, limits: Limits) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
            limits,
            frames: 0,
            bytes: 0,
            deadline: None,
        }
    }

    /// Fails a frame that is not written after `d`. A socket's send
    /// timeout bounds each write call, not the frame: on a dead link the
    /// kernel takes part of a large frame into its buffer, the call
    /// returns that part after the timeout, and the rest waits a timeout
    /// again.
    pub fn set_frame_deadline(&mut self, d: Option<std::time::Duration>) {
        self.deadline = d;
    }

    /// Frames and bytes (headers included) written so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.frames, self.bytes)
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush().map_err(WireError::io("flushing frames"))
    }

    /// Writes one frame.
    pub fn write_frame(&mut self, ty: FrameType, payload: &[u8]) -> Result<(), WireError> {
        self.write_parts(ty, &[payload])
    }

    /// Writes one frame whose payload is the concatenation of `parts`
    /// (at most 7 parts).
    pub fn write_parts(&mut self, ty: FrameType, parts: &[&[u8]]) -> Result<(), WireError> {
        const MAX_PARTS: usize = 7;
        if parts.len() > MAX_PARTS {
            return Err(WireError::Encode {
                ty,
                why: format!("{} payload parts, at most {MAX_PARTS}", parts.len()),
            });
        }
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let max = self.limits.cap(ty);
        if len > max as u64 {
            return Err(WireError::TooLarge {
                ty,
                len,
                max: max as u64,
            });
        }
        let crc = parts.iter().fold(0u32, |c, p| crc32c::crc32c_append(c, p));
        let header = encode_header(ty, len as u32, crc);
        let mut slices = [IoSlice::new(&[]); MAX_PARTS + 1];
        slices[0] = IoSlice::new(&header);
        for (s, p) in slices[1..].iter_mut().zip(parts) {
            *s = IoSlice::new(p);
        }
        write_all_vectored(&mut self.inner, &mut slices[..=parts.len()], self.deadline)
            .map_err(WireError::io("writing a frame"))?;
        self.frames += 1;
        self.bytes += HEADER_LEN as u64 + len;
        Ok(())
    }

    /// Serialises and writes a control message.
    pub fn send(&mut self, msg: &super::Message) -> Result<(), WireError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let r = msg
            .encode_into(&mut buf)
            .and_then(|()| self.write_frame(msg.frame_type(), &buf));
        self.buf = buf;
        r
    }

    /// Writes the batch being built by `enc` as a `PageBatch` frame and
    /// empties the encoder (keeping its pid and round).
    pub fn write_batch(&mut self, enc: &mut super::BatchEncoder) -> Result<(), WireError> {
        let r = {
            let parts = enc.finish()?;
            self.write_parts(FrameType::PageBatch, &parts.as_slices())
        };
        enc.clear();
        r
    }
}

/// `Write::write_all_vectored` (unstable in std).
fn write_all_vectored<W: Write>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
    deadline: Option<std::time::Duration>,
) -> std::io::Result<()> {
    let t0 = std::time::Instant::now();
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        if let Some(d) = deadline.filter(|&d| t0.elapsed() > d) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the frame was not sent within {d:?}"),
            ));
        }
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "failed to write the whole frame",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A writer that accepts at most `n` bytes per call (and only the first
    /// slice of a vectored write), to exercise partial writes.
    struct Dribble {
        out: Vec<u8>,
        n: usize,
    }
    impl Write for Dribble {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let k = b.len().min(self.n);
            self.out.extend_from_slice(&b[..k]);
            Ok(k)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Like a socket on a dead link: each call takes a little, slowly.
    struct Stalled;
    impl Write for Stalled {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(20));
            Ok(b.len().min(1))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_frame_past_its_deadline_fails() {
        let mut w = FrameWriter::new(Stalled);
        w.set_frame_deadline(Some(std::time::Duration::from_millis(50)));
        let t = std::time::Instant::now();
        let e = w
            .write_frame(FrameType::PageBatch, &[7u8; 100])
            .unwrap_err();
        assert!(e.to_string().contains("not sent within"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // Without a deadline the same frame goes through, slowly.
        let mut w = FrameWriter::new(Dribble {
            out: Vec::new(),
            n: 1,
        });
        w.write_frame(FrameType::PageBatch, &[7u8; 100]).unwrap();
    }

    #[test]
    fn header_layout_is_as_documented() {
        let h = encode_header(FrameType::PageBatch, 0x0102_0304, 0xaabb_ccdd);
        assert_eq!(&h[0..4], b"FRY1");
        assert_eq!(h[4], 0x11);
        assert_eq!(&h[5..8], &[0, 0, 0]);
        assert_eq!(&h[8..12], &[4, 3, 2, 1]);
        assert_eq!(&h[12..16], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(le32(&h, 16), crc32c::crc32c(&h[..16]));
    }

    #[test]
    fn frame_type_codes_round_trip() {
        for t in FrameType::ALL {
            assert_eq!(FrameType::from_u8(t as u8), Some(t));
        }
        let known = (0..=255u8)
            .filter(|b| FrameType::from_u8(*b).is_some())
            .count();
        assert_eq!(known, FrameType::ALL.len());
    }

    #[test]
    fn writer_and_reader_round_trip_with_partial_writes() {
        let mut w = FrameWriter::new(Dribble {
            out: Vec::new(),
            n: 3,
        });
        w.write_frame(FrameType::Ping, b"hello").unwrap();
        w.write_parts(FrameType::PageBatch, &[b"ab", b"", b"cdef"])
            .unwrap();
        w.write_frame(FrameType::Ack, b"").unwrap();
        assert_eq!(w.counters(), (3, 3 * 20 + 5 + 6));
        let bytes = w.into_inner().out;
        let mut r = FrameReader::new(Cursor::new(bytes));
        let f = r.read_frame().unwrap();
        assert_eq!((f.ty, f.payload), (FrameType::Ping, &b"hello"[..]));
        let f = r.read_frame().unwrap();
        assert_eq!((f.ty, f.payload), (FrameType::PageBatch, &b"abcdef"[..]));
        let f = r.read_frame().unwrap();
        assert_eq!((f.ty, f.payload), (FrameType::Ack, &b""[..]));
        match r.read_frame() {
            Err(WireError::Closed { context }) => assert_eq!(context, "between frames"),
            other => panic!("expected Closed, got {other:?}"),
        }
    }

    #[test]
    fn every_header_corruption_is_a_typed_error() {
        let mut good = Vec::new();
        encode_frame_into(FrameType::Ping, &[1, 2, 3, 4], &mut good);
        let lim = Limits::default();
        assert!(decode_frame(&good, &lim).is_ok());

        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            decode_frame(&b, &lim),
            Err(WireError::BadMagic { .. })
        ));

        let mut b = good.clone();
        b[9] ^= 1;
        assert!(matches!(
            decode_frame(&b, &lim),
            Err(WireError::HeaderChecksum { .. })
        ));

        let mut b = good.clone();
        b[HEADER_LEN] ^= 0x80;
        assert!(matches!(
            decode_frame(&b, &lim),
            Err(WireError::PayloadChecksum { .. })
        ));

        // Valid header CRC but unknown type / reserved bits / huge length.
        let reseal = |mut h: Vec<u8>| {
            let c = crc32c::crc32c(&h[0..16]);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            h
        };
        let mut b = good.clone();
        b[4] = 0xee;
        assert!(matches!(
            decode_frame(&reseal(b), &lim),
            Err(WireError::UnknownFrameType(0xee))
        ));
        let mut b = good.clone();
        b[6] = 1;
        assert!(matches!(
            decode_frame(&reseal(b), &lim),
            Err(WireError::ReservedBits { .. })
        ));
        let mut b = good.clone();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&reseal(b), &lim),
            Err(WireError::TooLarge { .. })
        ));
        // Truncated.
        assert!(matches!(
            decode_frame(&good[..good.len() - 1], &lim),
            Err(WireError::Closed { .. })
        ));
        assert!(matches!(
            decode_frame(&good[..5], &lim),
            Err(WireError::Closed { .. })
        ));
    }

    #[test]
    fn lying_length_does_not_allocate_the_claimed_size() {
        // A header claiming 16 MiB followed by 10 bytes: the reader errors
        // with Closed and its buffer stays tiny.
        let mut h = encode_header(FrameType::PageBatch, 16 << 20, 0).to_vec();
        h.extend_from_slice(&[0u8; 10]);
        let mut r = FrameReader::new(Cursor::new(h));
        assert!(matches!(r.read_frame(), Err(WireError::Closed { .. })));
        assert!(r.buf.capacity() < 1 << 20, "capacity {}", r.buf.capacity());
    }

    #[test]
    fn caps_apply_per_type_on_both_sides() {
        let lim = Limits {
            max_payload: 8,
            max_final_state: 32,
        };
        let mut w = FrameWriter::with_limits(Vec::new(), lim);
        assert!(matches!(
            w.write_frame(FrameType::Ping, &[0; 9]),
            Err(WireError::TooLarge { .. })
        ));
        w.write_frame(FrameType::FinalState, &[7; 30]).unwrap();
        let bytes = w.into_inner();
        let mut r = FrameReader::with_limits(Cursor::new(bytes.clone()), lim);
        assert_eq!(r.read_frame().unwrap().payload.len(), 30);
        let mut r =
            FrameReader::with_limits(Cursor::new(bytes), Limits::with_max_payload(8).min_final(8));
        assert!(matches!(r.read_frame(), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn reader_buffer_is_reused_and_shrinks_after_a_huge_frame() {
        let lim = Limits {
            max_payload: 1024,
            max_final_state: 1 << 20,
        };
        let mut bytes = Vec::new();
        encode_frame_into(FrameType::FinalState, &vec![3u8; 512 << 10], &mut bytes);
        encode_frame_into(FrameType::Ping, &[1; 100], &mut bytes);
        encode_frame_into(FrameType::Ping, &[2; 50], &mut bytes);
        let mut r = FrameReader::with_limits(Cursor::new(bytes), lim);
        assert_eq!(r.read_frame().unwrap().payload.len(), 512 << 10);
        assert_eq!(r.read_frame().unwrap().payload, &[1; 100][..]);
        assert!(r.buf.capacity() <= 1024 * 2);
        assert_eq!(r.read_frame().unwrap().payload, &[2; 50][..]);
    }

    impl Limits {
        fn min_final(mut self, n: u32) -> Self {
            self.max_final_state = n;
            self
        }
    }
}
