//! The on-disk container shared by every file of an image directory
//! (documented in docs/image-format.md):
//!
//! ```text
//! offset  size  field
//! 0       8     magic "FERRYIMG"
//! 8       2     major version (must equal FORMAT_MAJOR)
//! 10      2     minor version (newer minors only add optional data)
//! 12      4     kind: 1 inventory, 2 pages, 3 blob
//! 16      8     payload length in bytes
//! 24      4     CRC32C of bytes 0..24 (the header itself)
//! 28      4     CRC32C of the payload (0 for page stores, whose runs carry their own)
//! 32      ...   payload
//! ```
//!
//! Decoding never trusts a length: the payload length is checked against
//! the file size and a per-kind cap before anything is allocated.

use super::ImageError;
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

pub const MAGIC: [u8; 8] = *b"FERRYIMG";
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 0;
pub const HEADER_LEN: usize = 32;

/// Largest inventory ferry will decode (metadata of a huge tree is far smaller).
pub const MAX_INVENTORY: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum FileKindTag {
    Inventory = 1,
    Pages = 2,
    Blob = 3,
}

/// Builds the 32-byte header.
pub fn header(kind: FileKindTag, payload_len: u64, payload_crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    h[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
    h[16..24].copy_from_slice(&payload_len.to_le_bytes());
    let hcrc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&hcrc.to_le_bytes());
    h[28..32].copy_from_slice(&payload_crc.to_le_bytes());
    h
}

/// A validated header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub minor: u16,
    pub payload_len: u64,
    pub payload_crc: u32,
}

/// Checks magic, version, kind and header CRC; `file_len` bounds the payload.
pub fn parse_header(
    path: &Path,
    bytes: &[u8],
    kind: FileKindTag,
    file_len: u64,
) -> Result<Header, ImageError> {
    let bad = |why: String| ImageError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "file is {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[0..8] != MAGIC {
        return Err(bad("not a ferry image file (bad magic)".into()));
    }
    let le16 = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let le32 = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let hcrc = crc32c::crc32c(&bytes[0..24]);
    if hcrc != le32(24) {
        return Err(bad("header checksum mismatch".into()));
    }
    let major = le16(8);
    if major != FORMAT_MAJOR {
        return Err(ImageError::Version {
            path: path.to_path_buf(),
            found: major,
            supported: FORMAT_MAJOR,
        });
    }
    let k = le32(12);
    if k != kind as u32 {
        return Err(bad(format!("file kind {k}, expected {}", kind as u32)));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[16..24]);
    let payload_len = u64::from_le_bytes(l);
    if payload_len != file_len.saturating_sub(HEADER_LEN as u64) {
        return Err(bad(format!(
            "payload length {payload_len} does not match the file size {file_len} (truncated?)"
        )));
    }
    Ok(Header {
        minor: le16(10),
        payload_len,
        payload_crc: le32(28),
    })
}

/// Encodes a metadata value as a complete file (header + postcard payload).
pub fn encode<T: Serialize>(kind: FileKindTag, value: &T) -> Result<Vec<u8>, ImageError> {
    let payload = postcard::to_stdvec(value).map_err(|e| ImageError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(
        kind,
        payload.len() as u64,
        crc32c::crc32c(&payload),
    ));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a complete metadata file produced by [`encode`].
pub fn decode<T: DeserializeOwned>(
    path: &Path,
    kind: FileKindTag,
    bytes: &[u8],
    cap: u64,
) -> Result<T, ImageError> {
    let h = parse_header(path, bytes, kind, bytes.len() as u64)?;
    if h.payload_len > cap {
        return Err(ImageError::Corrupt {
            path: path.to_path_buf(),
            why: format!(
                "payload of {} bytes exceeds the cap of {cap}",
                h.payload_len
            ),
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32c::crc32c(payload) != h.payload_crc {
        return Err(ImageError::Corrupt {
            path: path.to_path_buf(),
            why: "payload checksum mismatch".into(),
        });
    }
    let (v, rest) = postcard::take_from_bytes(payload).map_err(|e| ImageError::Corrupt {
        path: path.to_path_buf(),
        why: format!("cannot decode: {e}"),
    })?;
    if !rest.is_empty() {
        return Err(ImageError::Corrupt {
            path: path.to_path_buf(),
            why: format!("{} trailing bytes after the payload", rest.len()),
        });
    }
    Ok(v)
}
