//! The table of DMA mappings a [`super::VhostVdpa`] made, per address space, so unmaps
//! can be checked against it.

use std::collections::BTreeMap;

use crate::kern::{Error, Result};

#[derive(Debug, Default)]
pub(super) struct Mappings {
    /// (asid, first iova) -> last iova (inclusive, so a range may end at 2^64).
    by_start: BTreeMap<(u32, u64), u64>,
}

/// The inclusive last address of `[iova, iova + size)`; `None` for size 0.
fn last_of(iova: u64, size: u64) -> Option<u64> {
    size.checked_sub(1).and_then(|s| iova.checked_add(s))
}

impl Mappings {
    pub(super) fn insert(&mut self, asid: u32, iova: u64, size: u64) {
        if let Some(last) = last_of(iova, size) {
            self.by_start.insert((asid, iova), last);
        }
    }

    fn overlapping(&self, asid: u32, first: u64, last: u64) -> Vec<(u64, u64)> {
        self.by_start
            .range((asid, 0)..=(asid, last))
            .filter(|(_, &end)| end >= first)
            .map(|(&(_, start), &end)| (start, end))
            .collect()
    }

    pub(super) fn check_unmap(&self, asid: u32, iova: u64, size: u64) -> Result<()> {
        let not_mapped = Error::NotMapped { iova, size, asid };
        let Some(last) = last_of(iova, size) else {
            return Err(Error::InvalidParam("dma_unmap of size 0".into()));
        };
        let hit = self.overlapping(asid, iova, last);
        if hit.is_empty() {
            return Err(not_mapped);
        }
        if let Some((s, e)) = hit.iter().find(|(s, e)| *s < iova || *e > last) {
            return Err(Error::InvalidParam(format!(
                "dma_unmap of {iova:#x}+{size:#x} would split the mapping {s:#x}..={e:#x}"
            )));
        }
        Ok(())
    }

    pub(super) fn remove(&mut self, asid: u32, iova: u64, size: u64) {
        if let Some(last) = last_of(iova, size) {
            for (start, _) in self.overlapping(asid, iova, last) {
                self.by_start.remove(&(asid, start));
            }
        }
    }

    pub(super) fn list(&self) -> Vec<(u32, u64, u64)> {
        self.by_start
            .iter()
            .map(|(&(asid, start), &last)| (asid, start, last - start + 1))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmap_must_hit_whole_mappings() {
        let mut m = Mappings::default();
        m.insert(0, 0x1000, 0x1000);
        m.insert(0, 0x4000, 0x2000);
        m.insert(1, 0x1000, 0x1000);
        assert!(matches!(
            m.check_unmap(0, 0x8000, 0x1000),
            Err(Error::NotMapped { .. })
        ));
        assert!(matches!(
            m.check_unmap(2, 0x1000, 0x1000),
            Err(Error::NotMapped { .. })
        ));
        assert!(matches!(
            m.check_unmap(0, 0x4000, 0x1000),
            Err(Error::InvalidParam(_))
        ));
        assert!(matches!(
            m.check_unmap(0, 0x1000, 0),
            Err(Error::InvalidParam(_))
        ));
        m.check_unmap(0, 0, 0x10000).unwrap();
        m.remove(0, 0, 0x10000);
        assert_eq!(m.list(), vec![(1, 0x1000, 0x1000)]);
        // A mapping may end at the very top of the address space.
        m.insert(0, u64::MAX - 0xfff, 0x1000);
        m.check_unmap(0, u64::MAX - 0xfff, 0x1000).unwrap();
        assert_eq!(m.list().len(), 2);
    }
}
