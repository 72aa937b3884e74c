//! vDPA through `/dev/vhost-vdpa-N` (the seed's `VhostVdpa`): the generic vhost requests
//! of [`VhostDevice`] plus the vDPA ones (device id, status, config space, queue enable,
//! IOVA range, groups and address spaces, suspend/resume), and DMA mapping of this
//! process's memory through IOTLB messages.
//!
//! [`VhostVdpa::dma_map`] and [`VhostVdpa::dma_unmap`] keep a table of what is mapped, so
//! that unmapping a range nothing was mapped at is an error ([`Error::NotMapped`]) rather
//! than the kernel's silent no-op.

mod mappings;

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::backend::{LogRegion, MemoryRegion, VhostBackend, VringAddrs};
use crate::kern::abi::{self, IovaRange, VdpaConfigHeader};
use crate::kern::{Error, IotlbMessage, Result, VhostDevice};
use mappings::Mappings;

/// The largest config read or write accepted (virtio config spaces are a few hundred
/// bytes; this only bounds the buffer allocated for the ioctl).
pub const MAX_CONFIG_LEN: u32 = 1 << 16;

/// A vhost-vdpa device. The shared requests are its [`VhostBackend`] implementation; the
/// other kernel vhost requests go through [`device`](Self::device).
#[derive(Debug)]
pub struct VhostVdpa {
    dev: Arc<VhostDevice>,
    maps: Mutex<Mappings>,
}

impl VhostVdpa {
    /// Opens `/dev/vhost-vdpa-N`. The kernel allows one open at a time (EBUSY).
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self::new(Arc::new(VhostDevice::open(path)?)))
    }

    /// Wraps an open device; the vDPA calls share its fd with the common vhost ones.
    pub fn new(dev: Arc<VhostDevice>) -> Self {
        VhostVdpa {
            dev,
            maps: Mutex::new(Mappings::default()),
        }
    }

    /// The common vhost ioctls (features, owner, rings) on the same fd.
    pub fn device(&self) -> &Arc<VhostDevice> {
        &self.dev
    }

    /// `VHOST_VDPA_GET_DEVICE_ID`: the virtio device type behind the fd (2 = block, ...).
    pub fn get_device_id(&self) -> Result<u32> {
        self.dev
            .get_u32("VHOST_VDPA_GET_DEVICE_ID", abi::VHOST_VDPA_GET_DEVICE_ID)
    }

    /// `VHOST_VDPA_GET_STATUS`: the virtio device status byte.
    pub fn get_status(&self) -> Result<u8> {
        let mut s = 0u8;
        let op = "VHOST_VDPA_GET_STATUS";
        self.dev.ioctl_ref(op, abi::VHOST_VDPA_GET_STATUS, &mut s)?;
        Ok(s)
    }

    /// `VHOST_VDPA_SET_STATUS`; 0 resets the device. The kernel refuses clearing bits
    /// without a reset (EINVAL).
    pub fn set_status(&self, status: u8) -> Result<()> {
        let mut s = status;
        let op = "VHOST_VDPA_SET_STATUS";
        self.dev.ioctl_ref(op, abi::VHOST_VDPA_SET_STATUS, &mut s)
    }

    fn config_buffer(offset: u32, len: u32) -> Result<Vec<u64>> {
        if offset.checked_add(len).is_none() {
            return Err(Error::InvalidParam(format!(
                "config offset {offset:#x} + length {len:#x} overflows u32"
            )));
        }
        if len > MAX_CONFIG_LEN {
            return Err(Error::InvalidParam(format!(
                "config length {len} is more than {MAX_CONFIG_LEN}"
            )));
        }
        // u64 words: 8 header bytes then `len` bytes, aligned for the header.
        let words = 1 + (len as usize).div_ceil(8);
        let mut buf = vec![0u64; words];
        let head = VdpaConfigHeader { off: offset, len };
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&head.off.to_ne_bytes());
        h[4..].copy_from_slice(&head.len.to_ne_bytes());
        buf[0] = u64::from_ne_bytes(h);
        Ok(buf)
    }

    /// `size` bytes of the device config space from `offset`.
    pub fn get_config(&self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let mut buf = Self::config_buffer(offset, size)?;
        let op = "VHOST_VDPA_GET_CONFIG";
        self.dev
            .ioctl_words(op, abi::VHOST_VDPA_GET_CONFIG, &mut buf)?;
        let bytes: Vec<u8> = buf[1..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok(bytes[..size as usize].to_vec())
    }

    /// `VHOST_VDPA_SET_CONFIG`: writes `data` at `offset` of the config space.
    pub fn set_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| Error::InvalidParam("config data longer than u32".into()))?;
        let mut buf = Self::config_buffer(offset, len)?;
        let mut tail: Vec<u8> = data.to_vec();
        tail.resize((buf.len() - 1) * 8, 0);
        for (word, chunk) in buf[1..].iter_mut().zip(tail.chunks_exact(8)) {
            *word = u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk"));
        }
        let op = "VHOST_VDPA_SET_CONFIG";
        self.dev
            .ioctl_words(op, abi::VHOST_VDPA_SET_CONFIG, &mut buf)
    }

    /// `VHOST_VDPA_SET_VRING_ENABLE`: a queue must be enabled before the device uses it.
    pub fn set_vring_enable(&self, index: u32, enable: bool) -> Result<()> {
        let op = "VHOST_VDPA_SET_VRING_ENABLE";
        let req = abi::VHOST_VDPA_SET_VRING_ENABLE;
        self.dev.state(op, req, index, u32::from(enable)).map(drop)
    }

    /// The largest queue size the device supports.
    pub fn get_vring_num(&self) -> Result<u16> {
        let mut n = 0u16;
        let op = "VHOST_VDPA_GET_VRING_NUM";
        self.dev
            .ioctl_ref(op, abi::VHOST_VDPA_GET_VRING_NUM, &mut n)?;
        Ok(n)
    }

    /// The size of queue `index` (kernels since 6.9).
    pub fn get_vring_size(&self, index: u32) -> Result<u32> {
        let op = "VHOST_VDPA_GET_VRING_SIZE";
        self.dev.state(op, abi::VHOST_VDPA_GET_VRING_SIZE, index, 0)
    }

    /// The eventfd signalled on a config change (`None` detaches it).
    pub fn set_config_call(&self, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let raw = fd.map_or(-1, |f| std::os::fd::AsRawFd::as_raw_fd(&f));
        let op = "VHOST_VDPA_SET_CONFIG_CALL";
        self.dev.set_i32(op, abi::VHOST_VDPA_SET_CONFIG_CALL, raw)
    }

    /// `(first, last)`: the IOVAs the device can map, both inclusive.
    pub fn get_iova_range(&self) -> Result<(u64, u64)> {
        let mut r = IovaRange::default();
        let op = "VHOST_VDPA_GET_IOVA_RANGE";
        self.dev
            .ioctl_ref(op, abi::VHOST_VDPA_GET_IOVA_RANGE, &mut r)?;
        Ok((r.first, r.last))
    }

    /// `VHOST_VDPA_GET_CONFIG_SIZE`: how much config space `get_config` can read.
    pub fn get_config_size(&self) -> Result<u32> {
        let op = "VHOST_VDPA_GET_CONFIG_SIZE";
        self.dev.get_u32(op, abi::VHOST_VDPA_GET_CONFIG_SIZE)
    }

    /// `VHOST_VDPA_GET_VQS_COUNT`: how many queues the device has.
    pub fn get_vqs_count(&self) -> Result<u32> {
        let op = "VHOST_VDPA_GET_VQS_COUNT";
        self.dev.get_u32(op, abi::VHOST_VDPA_GET_VQS_COUNT)
    }

    /// `VHOST_VDPA_GET_GROUP_NUM`: how many virtqueue groups (for address space assignment).
    pub fn get_group_num(&self) -> Result<u32> {
        let op = "VHOST_VDPA_GET_GROUP_NUM";
        self.dev.get_u32(op, abi::VHOST_VDPA_GET_GROUP_NUM)
    }

    /// `VHOST_VDPA_GET_AS_NUM`: how many address spaces the device supports.
    pub fn get_as_num(&self) -> Result<u32> {
        let op = "VHOST_VDPA_GET_AS_NUM";
        self.dev.get_u32(op, abi::VHOST_VDPA_GET_AS_NUM)
    }

    /// The virtqueue group of queue `index`.
    pub fn get_vring_group(&self, index: u32) -> Result<u32> {
        let op = "VHOST_VDPA_GET_VRING_GROUP";
        self.dev
            .state(op, abi::VHOST_VDPA_GET_VRING_GROUP, index, 0)
    }

    /// The group of queue `index`'s descriptor table (needs `BACKEND_F_DESC_ASID`).
    pub fn get_vring_desc_group(&self, index: u32) -> Result<u32> {
        let op = "VHOST_VDPA_GET_VRING_DESC_GROUP";
        self.dev
            .state(op, abi::VHOST_VDPA_GET_VRING_DESC_GROUP, index, 0)
    }

    /// Binds virtqueue group `group` to address space `asid`.
    pub fn set_group_asid(&self, group: u32, asid: u32) -> Result<()> {
        let op = "VHOST_VDPA_SET_GROUP_ASID";
        self.dev
            .state(op, abi::VHOST_VDPA_SET_GROUP_ASID, group, asid)
            .map(drop)
    }

    /// Stops the device processing queues (needs `BACKEND_F_SUSPEND`).
    pub fn suspend(&self) -> Result<()> {
        self.dev.none("VHOST_VDPA_SUSPEND", abi::VHOST_VDPA_SUSPEND)
    }

    /// Resumes a suspended device (needs `BACKEND_F_RESUME`).
    pub fn resume(&self) -> Result<()> {
        self.dev.none("VHOST_VDPA_RESUME", abi::VHOST_VDPA_RESUME)
    }

    /// Maps `[iova, iova + size)` of address space `asid` to `vaddr` in this process: an
    /// IOTLB update, read-only for the device when `readonly`. The kernel pins the pages;
    /// it refuses (EFAULT) a range outside the device's IOVA range, an overlap with an
    /// existing mapping, or addresses not mapped in this process.
    pub fn dma_map(
        &self,
        iova: u64,
        size: u64,
        vaddr: u64,
        readonly: bool,
        asid: u32,
    ) -> Result<()> {
        let perm = if readonly {
            abi::VHOST_ACCESS_RO
        } else {
            abi::VHOST_ACCESS_RW
        };
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        self.dev
            .send_iotlb(&IotlbMessage::update(iova, size, vaddr, perm, asid))?;
        maps.insert(asid, iova, size);
        Ok(())
    }

    /// Unmaps every `dma_map` mapping inside `[iova, iova + size)` of `asid`: an IOTLB
    /// invalidate. A range that holds none is [`Error::NotMapped`]; one that cuts a mapping
    /// in two is refused ([`Error::InvalidParam`]) before the kernel sees it.
    pub fn dma_unmap(&self, iova: u64, size: u64, asid: u32) -> Result<()> {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.check_unmap(asid, iova, size)?;
        self.dev
            .send_iotlb(&IotlbMessage::invalidate(iova, size, asid))?;
        maps.remove(asid, iova, size);
        Ok(())
    }

    /// `VHOST_IOTLB_BATCH_BEGIN`/`END` around several maps (needs `BACKEND_F_IOTLB_BATCH`).
    pub fn batch(&self, begin: bool, asid: u32) -> Result<()> {
        self.dev.send_iotlb(&IotlbMessage::batch(begin, asid))
    }

    /// The `dma_map` mappings now in place: `(asid, iova, size)`.
    pub fn mappings(&self) -> Vec<(u32, u64, u64)> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner()).list()
    }
}

/// vDPA's `VhostBackend`: the generic requests are the kernel device's; the memory
/// table, which vhost-vdpa does not have, is DMA mappings at IOVA = guest address.
impl VhostBackend for VhostVdpa {
    fn get_features(&self) -> crate::Result<u64> {
        VhostBackend::get_features(&*self.dev)
    }
    fn set_features(&self, features: u64) -> crate::Result<()> {
        VhostBackend::set_features(&*self.dev, features)
    }
    fn set_owner(&self) -> crate::Result<()> {
        VhostBackend::set_owner(&*self.dev)
    }
    fn reset_owner(&self) -> crate::Result<()> {
        VhostBackend::reset_owner(&*self.dev)
    }
    /// Unmaps every mapping made through [`dma_map`](VhostVdpa::dma_map) (by this method
    /// or not), then maps each region's `userspace_addr` at IOVA = `guest_phys_addr`, so
    /// guest addresses in rings and descriptors are what the device reads. An empty table
    /// is refused first, as the kernel device refuses it.
    fn set_mem_table(&self, regions: &[MemoryRegion<'_>]) -> crate::Result<()> {
        if regions.is_empty() {
            return Err(Error::InvalidParam("the memory table is empty".into()).into());
        }
        for (asid, iova, size) in self.mappings() {
            self.dma_unmap(iova, size, asid)?;
        }
        for MemoryRegion { info: r, .. } in regions {
            self.dma_map(r.guest_phys_addr, r.memory_size, r.userspace_addr, false, 0)?;
        }
        Ok(())
    }
    fn set_log_base(&self, base: u64, region: Option<LogRegion<'_>>) -> crate::Result<()> {
        VhostBackend::set_log_base(&*self.dev, base, region)
    }
    fn set_log_fd(&self, fd: Option<BorrowedFd<'_>>) -> crate::Result<()> {
        VhostBackend::set_log_fd(&*self.dev, fd)
    }
    fn set_vring_num(&self, index: u32, num: u32) -> crate::Result<()> {
        VhostBackend::set_vring_num(&*self.dev, index, num)
    }
    fn set_vring_addr(&self, addrs: &VringAddrs) -> crate::Result<()> {
        VhostBackend::set_vring_addr(&*self.dev, addrs)
    }
    fn set_vring_base(&self, index: u32, base: u32) -> crate::Result<()> {
        VhostBackend::set_vring_base(&*self.dev, index, base)
    }
    fn get_vring_base(&self, index: u32) -> crate::Result<u32> {
        VhostBackend::get_vring_base(&*self.dev, index)
    }
    fn set_vring_kick(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> crate::Result<()> {
        VhostBackend::set_vring_kick(&*self.dev, index, fd)
    }
    fn set_vring_call(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> crate::Result<()> {
        VhostBackend::set_vring_call(&*self.dev, index, fd)
    }
    fn set_vring_err(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> crate::Result<()> {
        VhostBackend::set_vring_err(&*self.dev, index, fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_dev_null() -> VhostVdpa {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        VhostVdpa::new(Arc::new(VhostDevice::unprobed(f.into())))
    }

    #[test]
    fn config_ranges_the_abi_cannot_carry_are_refused_first() {
        let v = on_dev_null();
        assert!(matches!(
            v.get_config(u32::MAX - 3, 8),
            Err(Error::InvalidParam(_))
        ));
        assert!(matches!(
            v.get_config(0, MAX_CONFIG_LEN + 1),
            Err(Error::InvalidParam(_))
        ));
        assert!(matches!(
            v.set_config(u32::MAX, &[1, 2]),
            Err(Error::InvalidParam(_))
        ));
        // A valid range reaches the kernel, whose errno names the request.
        let e = v.get_config(0, 8).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().starts_with("VHOST_VDPA_GET_CONFIG: "), "{e}");
    }

    #[test]
    fn the_header_and_data_are_laid_out_as_struct_vhost_vdpa_config() {
        let buf = VhostVdpa::config_buffer(0x10, 13).unwrap();
        assert_eq!(buf.len(), 1 + 2); // 8 header bytes, 13 data bytes rounded up to words
        let head = buf[0].to_ne_bytes();
        assert_eq!(u32::from_ne_bytes(head[..4].try_into().unwrap()), 0x10);
        assert_eq!(u32::from_ne_bytes(head[4..].try_into().unwrap()), 13);
    }

    #[test]
    fn a_failed_map_is_not_recorded_and_unmapping_nothing_is_not_mapped() {
        let v = on_dev_null();
        // write() on /dev/null "succeeds", so the map is recorded; the unmap removes it.
        v.dma_map(0x1000, 0x2000, 0x7000_0000, false, 0).unwrap();
        assert_eq!(v.mappings(), vec![(0, 0x1000, 0x2000)]);
        let e = v.dma_unmap(0x9000, 0x1000, 0).unwrap_err();
        assert!(matches!(e, Error::NotMapped { iova: 0x9000, .. }));
        v.dma_unmap(0x1000, 0x2000, 0).unwrap();
        assert!(v.mappings().is_empty());
        // On a file that refuses writes the map fails with the errno and records nothing.
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let ro = VhostVdpa::new(Arc::new(VhostDevice::unprobed(f.into())));
        let e = ro
            .dma_map(0x1000, 0x1000, 0x7000_0000, true, 0)
            .unwrap_err();
        assert_eq!(e.errno(), Some(libc::EBADF));
        assert!(ro.mappings().is_empty());
    }
}
