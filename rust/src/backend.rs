//! Types shared by every back-end family (vhost-user, kernel vhost, vDPA): the data the
//! `VhostBackend` interface carries, independent of how it travels.

/// Vring addresses as the front-end gives them, in its own virtual address space
/// (vhost-user) or as guest physical addresses (vDPA with IOTLB).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringAddrs {
    pub index: u32,
    pub flags: u32,
    pub desc: u64,
    pub used: u64,
    pub avail: u64,
    pub log: u64,
}

/// Bit of `VringAddrs::flags`: the used ring writes must be logged at `log`.
pub const VRING_ADDR_F_LOG: u32 = 1;

impl VringAddrs {
    /// Alignment rules of virtio 1.x split rings; a packed ring needs 16/4/4, which these
    /// already imply for desc and is checked by the ring layer for the event areas.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.flags & !VRING_ADDR_F_LOG != 0 {
            return Err("unknown vring address flags");
        }
        if self.desc % 16 != 0 {
            return Err("descriptor table address is not 16-byte aligned");
        }
        if self.avail % 2 != 0 {
            return Err("available ring address is not 2-byte aligned");
        }
        if self.used % 4 != 0 {
            return Err("used ring address is not 4-byte aligned");
        }
        Ok(())
    }
}
