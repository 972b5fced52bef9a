//! Where the target puts received pages: the [`PageSink`] trait, and
//! [`MemorySink`], an in-memory implementation for tests and small jobs.
//!
//! A sink receives every page version the source sends, tagged with its
//! round. Within one connection pages arrive in order; the source sends a
//! given page always on the same connection (see `source::stream_for`),
//! so a later version never overtakes an earlier one. A sink may still
//! keep the round per page and ignore stale versions, as `MemorySink`
//! does.

use super::PAGE_SIZE;
use std::collections::BTreeMap;

/// The error a sink reports (disk full, I/O...); wrapped by the receiver
/// into `WireError::Sink` with the pid and address.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Storage for received pages.
pub trait PageSink: Send {
    /// A page with contents (already decompressed).
    fn page(
        &mut self,
        pid: i32,
        round: u32,
        addr: u64,
        data: &[u8; PAGE_SIZE],
    ) -> Result<(), SinkError>;

    /// `npages` all-zero pages from `addr`.
    fn zero(&mut self, pid: i32, round: u32, addr: u64, npages: u32) -> Result<(), SinkError>;

    /// `npages` pages from `addr` the source no longer has: forget them.
    fn absent(&mut self, pid: i32, round: u32, addr: u64, npages: u32) -> Result<(), SinkError>;

    /// Everything received so far must be durable/visible (called before
    /// the restore starts).
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

impl<S: PageSink + ?Sized> PageSink for Box<S> {
    fn page(
        &mut self,
        pid: i32,
        round: u32,
        addr: u64,
        data: &[u8; PAGE_SIZE],
    ) -> Result<(), SinkError> {
        (**self).page(pid, round, addr, data)
    }
    fn zero(&mut self, pid: i32, round: u32, addr: u64, npages: u32) -> Result<(), SinkError> {
        (**self).zero(pid, round, addr, npages)
    }
    fn absent(&mut self, pid: i32, round: u32, addr: u64, npages: u32) -> Result<(), SinkError> {
        (**self).absent(pid, round, addr, npages)
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        (**self).flush()
    }
}

/// A page held by [`MemorySink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageContent<'a> {
    Zero,
    Data(&'a [u8; PAGE_SIZE]),
}

#[derive(Debug)]
struct MemPage {
    round: u32,
    data: Option<Box<[u8; PAGE_SIZE]>>,
}

/// Pages in a map keyed by (pid, addr); the newest round wins. Holds at
/// most `max_pages` pages (a sink error beyond), so a hostile or buggy
/// peer cannot make it eat the machine.
#[derive(Debug)]
pub struct MemorySink {
    pages: BTreeMap<(i32, u64), MemPage>,
    max_pages: usize,
    stale: u64,
}

impl Default for MemorySink {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySink {
    /// Default cap: 1 Mi pages (4 GiB of data).
    pub const DEFAULT_MAX_PAGES: usize = 1 << 20;

    pub fn new() -> Self {
        Self::with_max_pages(Self::DEFAULT_MAX_PAGES)
    }

    pub fn with_max_pages(max_pages: usize) -> Self {
        MemorySink {
            pages: BTreeMap::new(),
            max_pages,
            stale: 0,
        }
    }

    /// The stored version of a page.
    pub fn get(&self, pid: i32, addr: u64) -> Option<PageContent<'_>> {
        self.pages.get(&(pid, addr)).map(|p| match &p.data {
            Some(d) => PageContent::Data(d),
            None => PageContent::Zero,
        })
    }

    /// The round of the stored version of a page.
    pub fn round_of(&self, pid: i32, addr: u64) -> Option<u32> {
        self.pages.get(&(pid, addr)).map(|p| p.round)
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Versions ignored because a newer round was already stored.
    pub fn stale(&self) -> u64 {
        self.stale
    }

    /// Every page, by pid then address.
    pub fn iter(&self) -> impl Iterator<Item = (i32, u64, PageContent<'_>)> + '_ {
        self.pages.iter().map(|(&(pid, addr), p)| {
            (
                pid,
                addr,
                match &p.data {
                    Some(d) => PageContent::Data(d),
                    None => PageContent::Zero,
                },
            )
        })
    }

    fn room(&self, n: u64) -> Result<(), SinkError> {
        if self.pages.len() as u64 + n > self.max_pages as u64 {
            return Err(format!(
                "memory sink full: {} pages held, {n} more would pass the cap of {}",
                self.pages.len(),
                self.max_pages
            )
            .into());
        }
        Ok(())
    }

    /// Stores one version; returns false if it was stale.
    fn put(&mut self, pid: i32, round: u32, addr: u64, data: Option<&[u8; PAGE_SIZE]>) -> bool {
        match self.pages.get_mut(&(pid, addr)) {
            Some(p) if p.round > round => {
                self.stale += 1;
                false
            }
            Some(p) => {
                p.round = round;
                match (data, &mut p.data) {
                    (Some(d), Some(old)) => old.copy_from_slice(d),
                    (Some(d), slot) => *slot = Some(Box::new(*d)),
                    (None, slot) => *slot = None,
                }
                true
            }
            None => {
                self.pages.insert(
                    (pid, addr),
                    MemPage {
                        round,
                        data: data.map(|d| Box::new(*d)),
                    },
                );
                true
            }
        }
    }
}

impl PageSink for MemorySink {
    fn page(
        &mut self,
        pid: i32,
        round: u32,
        addr: u64,
        data: &[u8; PAGE_SIZE],
    ) -> Result<(), SinkError> {
        if !self.pages.contains_key(&(pid, addr)) {
            self.room(1)?;
        }
        self.put(pid, round, addr, Some(data));
        Ok(())
    }

    fn zero(&mut self, pid: i32, round: u32, addr: u64, npages: u32) -> Result<(), SinkError> {
        self.room(npages as u64)?;
        for i in 0..npages as u64 {
            self.put(pid, round, addr + i * PAGE_SIZE as u64, None);
        }
        Ok(())
    }

    fn absent(&mut self, pid: i32, round: u32, addr: u64, npages: u32) -> Result<(), SinkError> {
        for i in 0..npages as u64 {
            let key = (pid, addr + i * PAGE_SIZE as u64);
            match self.pages.get(&key) {
                Some(p) if p.round > round => self.stale += 1,
                Some(_) => {
                    self.pages.remove(&key);
                }
                None => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_round_wins_and_absent_forgets() {
        let mut s = MemorySink::new();
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        s.page(1, 1, 0x1000, &a).unwrap();
        s.page(1, 2, 0x1000, &b).unwrap();
        s.page(1, 1, 0x1000, &a).unwrap();
        assert_eq!(s.get(1, 0x1000), Some(PageContent::Data(&b)));
        assert_eq!(s.stale(), 1);
        s.zero(1, 3, 0x1000, 2).unwrap();
        assert_eq!(s.get(1, 0x1000), Some(PageContent::Zero));
        assert_eq!(s.get(1, 0x2000), Some(PageContent::Zero));
        s.page(1, 4, 0x2000, &a).unwrap();
        s.absent(1, 4, 0x1000, 1).unwrap();
        assert_eq!(s.get(1, 0x1000), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s.round_of(1, 0x2000), Some(4));
        assert_eq!(s.iter().count(), 1);
    }

    #[test]
    fn memory_sink_is_capped() {
        let mut s = MemorySink::with_max_pages(4);
        assert!(s.zero(1, 1, 0, 4).is_ok());
        assert!(s.zero(1, 1, 0x10000, 1).is_err());
        assert!(s.zero(1, 1, 0, u32::MAX).is_err());
        // Overwriting a held page needs no room.
        assert!(s.page(1, 2, 0x1000, &[5; PAGE_SIZE]).is_ok());
        assert!(s.page(1, 2, 0x9000, &[5; PAGE_SIZE]).is_err());
    }
}
