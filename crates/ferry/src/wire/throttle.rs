//! `--max-bandwidth`: a token-bucket rate limiter and a `Write` wrapper
//! that paces a connection with it.
//!
//! The limiter is `Sync`: give each connection its own for a per-
//! connection cap, or share one `Arc<RateLimiter>` between the page
//! streams for a cap on their sum.

use super::WireError;
use std::io::{IoSlice, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Parses a bandwidth into bytes per second.
///
/// A positive number, an optional unit and an optional "/s" (or "ps"):
/// `1G`, `500M`, `100MiB/s`, `1gbit`, `10Gbps`, `2.5GB/s`, `800k`,
/// `12345`. Prefixes k, M, G, T (any case) are decimal (1000^n); Ki, Mi,
/// Gi, Ti binary (1024^n). No unit or `B` means bytes; `bit`, `bits` or
/// `bps` means bits. A lone lowercase `b` ("1gb") is refused as ambiguous.
pub fn parse_bandwidth(input: &str) -> Result<u64, WireError> {
    let bad = |why: &str| WireError::Bandwidth {
        input: input.to_string(),
        why: why.to_string(),
    };
    let mut s = input.trim();
    let mut bits = false;
    let lower = s.to_ascii_lowercase();
    if lower.ends_with("bps") {
        bits = true;
        s = &s[..s.len() - 3];
    } else if lower.ends_with("/sec") {
        s = &s[..s.len() - 4];
    } else if lower.ends_with("/s") {
        s = &s[..s.len() - 2];
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let unit = unit.trim();
    let value: f64 = num.parse().map_err(|_| bad("expected a number first"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(bad("must be positive (omit the option for no limit)"));
    }
    let mut rest = unit;
    let mut mult = 1f64;
    if let Some(c) = rest.chars().next() {
        let p = match c.to_ascii_lowercase() {
            'k' => Some(1),
            'm' => Some(2),
            'g' => Some(3),
            't' => Some(4),
            _ => None,
        };
        if let Some(p) = p {
            rest = &rest[1..];
            if rest.starts_with('i') || rest.starts_with('I') {
                rest = &rest[1..];
                mult = 1024f64.powi(p);
            } else {
                mult = 1000f64.powi(p);
            }
        }
    }
    match rest {
        "" | "B" => {}
        r if r.eq_ignore_ascii_case("bit") || r.eq_ignore_ascii_case("bits") => {
            if bits {
                return Err(bad("bits given twice"));
            }
            bits = true;
        }
        "b" => return Err(bad("ambiguous unit: write B for bytes or bit for bits")),
        _ => {
            return Err(bad(
                "unknown unit (use B, KB, MB, GB, KiB, MiB, GiB, bit, Mbit, Gbit...)",
            ))
        }
    }
    let mut bytes = value * mult;
    if bits {
        bytes /= 8.0;
    }
    if bytes < 1.0 {
        return Err(bad("less than one byte per second"));
    }
    if bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes.round() as u64)
}

/// A bandwidth for humans: "1.25 GB/s".
pub fn format_bandwidth(bytes_per_sec: u64) -> String {
    let b = bytes_per_sec as f64;
    for (unit, scale) in [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)] {
        if b >= scale {
            return format!("{:.2} {unit}/s", b / scale);
        }
    }
    format!("{bytes_per_sec} B/s")
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A token bucket: `rate` bytes per second on average, bursts up to
/// `burst` bytes. Taking more than is available goes into debt; the
/// taker then sleeps until the debt is paid.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

impl RateLimiter {
    /// A limiter at `bytes_per_sec` with a burst of 50 ms worth (at least
    /// 64 KiB). The bucket starts full.
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        let burst = (bytes_per_sec / 20).max(64 << 10);
        Self::with_burst(bytes_per_sec, burst)
    }

    pub fn with_burst(bytes_per_sec: u64, burst: u64) -> RateLimiter {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = burst.max(1) as f64;
        RateLimiter {
            rate,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Burst size in bytes.
    pub fn burst(&self) -> u64 {
        self.burst as u64
    }

    /// Takes `n` bytes from the bucket and says how long to wait before
    /// sending them (zero when the bucket had them).
    pub fn reserve(&self, n: u64) -> Duration {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + dt * self.rate).min(self.burst);
        b.tokens -= n as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.rate)
        }
    }

    /// Takes `n` bytes, sleeping as long as the rate requires.
    pub fn acquire(&self, n: u64) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// A writer paced by a [`RateLimiter`]. Writes are cut to at most one
/// burst so that a large frame is paced smoothly.
#[derive(Debug)]
pub struct Throttled<W> {
    inner: W,
    limiter: Arc<RateLimiter>,
}

impl<W> Throttled<W> {
    pub fn new(inner: W, limiter: Arc<RateLimiter>) -> Self {
        Throttled { inner, limiter }
    }

    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
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

    fn chunk(&self) -> usize {
        usize::try_from(self.limiter.burst())
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

impl<W: Write> Write for Throttled<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk());
        let n = self.inner.write(&buf[..n])?;
        self.limiter.acquire(n as u64);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        // At most one burst per step, gathered from up to 8 slices.
        let mut out = [IoSlice::new(&[]); 8];
        let mut k = 0;
        let mut left = self.chunk();
        for b in bufs {
            if k == out.len() || left == 0 {
                break;
            }
            let n = b.len().min(left);
            if n > 0 {
                out[k] = IoSlice::new(&b[..n]);
                k += 1;
                left -= n;
            }
        }
        let n = self.inner.write_vectored(&out[..k])?;
        self.limiter.acquire(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_spellings() {
        let cases: &[(&str, u64)] = &[
            ("1G", 1_000_000_000),
            ("500M", 500_000_000),
            ("100MiB/s", 100 << 20),
            ("1gbit", 125_000_000),
            ("10Gbps", 1_250_000_000),
            ("10 Gbit/s", 1_250_000_000),
            ("2.5GB/s", 2_500_000_000),
            ("800k", 800_000),
            ("64KiB", 65_536),
            ("12345", 12_345),
            ("1TB", 1_000_000_000_000),
            ("1 GiB/sec", 1 << 30),
            ("8bit", 1),
            (" 3MB ", 3_000_000),
        ];
        for (s, want) in cases {
            assert_eq!(parse_bandwidth(s).unwrap(), *want, "{s}");
        }
        for s in [
            "", "0", "-1M", "fast", "1gb", "1X", "1Mbitbps", "1e3", "1bit", "nanM", "1.2.3M",
        ] {
            assert!(parse_bandwidth(s).is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn formats_for_humans() {
        assert_eq!(format_bandwidth(1_250_000_000), "1.25 GB/s");
        assert_eq!(format_bandwidth(999), "999 B/s");
    }

    #[test]
    fn throttled_writes_are_cut_to_the_burst() {
        let l = Arc::new(RateLimiter::with_burst(u64::MAX / 2, 100));
        let mut w = Throttled::new(Vec::new(), l);
        let a = [1u8; 30];
        let b = [2u8; 200];
        let n = w
            .write_vectored(&[IoSlice::new(&a), IoSlice::new(&b)])
            .unwrap();
        assert_eq!(n, 100);
        assert_eq!(&w.get_ref()[..30], &a[..]);
        w.write_all(&b).unwrap();
        assert_eq!(w.get_ref().len(), 300);
    }

    #[test]
    fn bucket_allows_a_burst_then_charges() {
        let l = RateLimiter::with_burst(1_000_000, 100_000);
        assert_eq!(l.reserve(100_000), Duration::ZERO);
        let w = l.reserve(100_000);
        assert!(
            w > Duration::from_millis(90) && w <= Duration::from_millis(101),
            "{w:?}"
        );
    }
}
