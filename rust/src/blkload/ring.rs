//! One driver-side ring of either format behind one set of calls, so the load loop is
//! written once.

use crate::memory::GuestMemory;
use crate::vring::{PackedDriver, Result, RingLayout, SplitDriver};

#[derive(Debug)]
pub(super) enum Ring {
    Split(SplitDriver),
    Packed(PackedDriver),
}

macro_rules! each {
    ($self:expr, $q:ident => $e:expr) => {
        match $self {
            Ring::Split($q) => $e,
            Ring::Packed($q) => $e,
        }
    };
}

impl Ring {
    /// A fresh ring (areas zeroed) at `layout`.
    pub fn new(mem: &GuestMemory, layout: RingLayout, event_idx: bool) -> Result<Self> {
        layout.check_memory(mem)?;
        let mut ring = if layout.is_packed() {
            Ring::Packed(PackedDriver::new(layout, event_idx)?)
        } else {
            Ring::Split(SplitDriver::new(layout, event_idx)?)
        };
        each!(&mut ring, q => q.init(mem))?;
        Ok(ring)
    }

    pub fn add(
        &mut self,
        mem: &GuestMemory,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u16> {
        each!(self, q => q.add(mem, readable, writable))
    }

    pub fn publish(&mut self, mem: &GuestMemory) -> Result<()> {
        each!(self, q => q.publish(mem))
    }

    pub fn kick_needed(&mut self, mem: &GuestMemory) -> Result<bool> {
        each!(self, q => q.kick_needed(mem))
    }

    pub fn poll_used(&mut self, mem: &GuestMemory) -> Result<Vec<(u16, u32)>> {
        each!(self, q => q.poll_used(mem))
    }

    pub fn set_used_notification(&mut self, mem: &GuestMemory, enable: bool) -> Result<bool> {
        each!(self, q => q.set_used_notification(mem, enable))
    }

    pub fn in_flight(&self) -> u16 {
        each!(self, q => q.in_flight())
    }

    pub fn size(&self) -> u16 {
        each!(self, q => q.size())
    }
}
