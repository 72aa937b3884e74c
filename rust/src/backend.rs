//! Types shared by every back-end family (vhost-user, kernel vhost, vDPA): the data the
//! `VhostBackend` interface carries, independent of how it travels, and the
//! [`VhostBackend`] trait itself.

use std::os::fd::BorrowedFd;

use crate::memory::RegionInfo;
use crate::Result as BackendResult;

/// Vring addresses as the front-end gives them, in its own virtual address space
/// (vhost-user) or as guest physical addresses (vDPA with IOTLB).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringAddrs {
    /// The queue's index.
    pub index: u32,
    /// `VHOST_VRING_F_LOG` or 0: whether used-ring writes are logged.
    pub flags: u32,
    /// Address of the descriptor table (split) or ring (packed).
    pub desc: u64,
    /// Address of the used ring (split) or device event area (packed).
    pub used: u64,
    /// Address of the avail ring (split) or driver event area (packed).
    pub avail: u64,
    /// Guest-physical address of the used ring for dirty logging (used when `flags` asks).
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

/// One region of guest memory as every family takes it in `set_mem_table`: where the
/// guest sees it, where this process has it mapped, and the file behind it. vhost-user
/// sends the fd (a region without one is refused); kernel vhost reads the memory through
/// `userspace_addr` and ignores it; vDPA maps `userspace_addr` at IOVA = guest address.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRegion<'a> {
    /// The region's addresses, size and offset in `fd`.
    pub info: RegionInfo,
    /// The file behind the region: vhost-user sends it (a region without one is refused);
    /// kernel vhost and vDPA use `userspace_addr` instead.
    pub fd: Option<BorrowedFd<'a>>,
}

/// The dirty log as vhost-user shares it (`LOG_SHMFD`): `mmap_size` bytes at `mmap_offset`
/// of `fd`. Kernel vhost takes an address in this process instead (`set_log_base`'s base).
#[derive(Clone, Copy, Debug)]
pub struct LogRegion<'a> {
    /// The log's size in bytes.
    pub mmap_size: u64,
    /// Where the log starts in `fd`.
    pub mmap_offset: u64,
    /// The memfd the back-end maps to mark pages.
    pub fd: BorrowedFd<'a>,
}

/// The control plane every vhost family shares (rust-vmm's `VhostBackend`): negotiate
/// features, claim ownership, hand over the memory map and the dirty log, then set each
/// virtqueue up. Implemented by the vhost-user [`Frontend`](crate::user::Frontend), the
/// kernel [`VhostDevice`](crate::kern::VhostDevice) and [`VhostVdpa`](crate::vdpa::VhostVdpa),
/// so a caller written against `&dyn VhostBackend` drives any of them. Every method is one
/// request (one message or one ioctl), except vDPA's `set_mem_table`, which is IOTLB
/// mappings; failures keep their family's error inside [`crate::Error`].
///
/// Fds are borrowed: the back-end duplicates what it keeps. A `None` notification fd
/// detaches it (`VHOST_FILE_UNBIND`, or vhost-user's "no fd" flag).
pub trait VhostBackend: Send + Sync {
    /// The virtio feature bits the device offers (`GET_FEATURES`).
    fn get_features(&self) -> BackendResult<u64>;
    /// Acks `features` (`SET_FEATURES`).
    fn set_features(&self, features: u64) -> BackendResult<()>;
    /// Claims the device for this process or connection (`SET_OWNER`).
    fn set_owner(&self) -> BackendResult<()>;
    /// Gives up ownership (`RESET_OWNER`; deprecated by the vhost-user spec).
    fn reset_owner(&self) -> BackendResult<()>;
    /// Installs the guest memory map, replacing the previous one (`SET_MEM_TABLE`).
    fn set_mem_table(&self, regions: &[MemoryRegion<'_>]) -> BackendResult<()>;
    /// Where the dirty log lives: `base` in this process (kernel; `region` is `None`), or
    /// the shared-memory `region` (vhost-user with `LOG_SHMFD`; `base` is 0).
    fn set_log_base(&self, base: u64, region: Option<LogRegion<'_>>) -> BackendResult<()>;
    /// The eventfd signalled after log writes (`SET_LOG_FD`).
    fn set_log_fd(&self, fd: Option<BorrowedFd<'_>>) -> BackendResult<()>;
    /// The size of queue `index` (`SET_VRING_NUM`).
    fn set_vring_num(&self, index: u32, num: u32) -> BackendResult<()>;
    /// The ring addresses of queue `addrs.index` (`SET_VRING_ADDR`).
    fn set_vring_addr(&self, addrs: &VringAddrs) -> BackendResult<()>;
    /// Where queue `index` resumes (`SET_VRING_BASE`).
    fn set_vring_base(&self, index: u32, base: u32) -> BackendResult<()>;
    /// Stops queue `index` and returns where it stopped (`GET_VRING_BASE`).
    fn get_vring_base(&self, index: u32) -> BackendResult<u32>;
    /// The eventfd the driver signals for queue `index` (`SET_VRING_KICK`).
    fn set_vring_kick(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> BackendResult<()>;
    /// The eventfd the device signals for used buffers of `index` (`SET_VRING_CALL`).
    fn set_vring_call(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> BackendResult<()>;
    /// The eventfd the device signals on an error of queue `index` (`SET_VRING_ERR`).
    fn set_vring_err(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> BackendResult<()>;
}

/// `impl VhostBackend for $type`, each method calling the inherent method of the same name
/// and wrapping its error, except the three whose arguments differ by family
/// (`set_mem_table`, `set_log_base`, `set_log_fd`), which go inside the braces.
macro_rules! vhost_backend_by_inherent {
    ($(#[$attr:meta])* $type:ty { $($custom:tt)* }) => {
        $(#[$attr])*
        impl $crate::backend::VhostBackend for $type {
            fn get_features(&self) -> $crate::Result<u64> {
                Ok(<$type>::get_features(self)?)
            }
            fn set_features(&self, features: u64) -> $crate::Result<()> {
                Ok(<$type>::set_features(self, features)?)
            }
            fn set_owner(&self) -> $crate::Result<()> {
                Ok(<$type>::set_owner(self)?)
            }
            fn reset_owner(&self) -> $crate::Result<()> {
                Ok(<$type>::reset_owner(self)?)
            }
            fn set_vring_num(&self, index: u32, num: u32) -> $crate::Result<()> {
                Ok(<$type>::set_vring_num(self, index, num)?)
            }
            fn set_vring_addr(&self, addrs: &$crate::backend::VringAddrs) -> $crate::Result<()> {
                Ok(<$type>::set_vring_addr(self, addrs)?)
            }
            fn set_vring_base(&self, index: u32, base: u32) -> $crate::Result<()> {
                Ok(<$type>::set_vring_base(self, index, base)?)
            }
            fn get_vring_base(&self, index: u32) -> $crate::Result<u32> {
                Ok(<$type>::get_vring_base(self, index)?)
            }
            fn set_vring_kick(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> $crate::Result<()> {
                Ok(<$type>::set_vring_kick(self, index, fd)?)
            }
            fn set_vring_call(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> $crate::Result<()> {
                Ok(<$type>::set_vring_call(self, index, fd)?)
            }
            fn set_vring_err(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> $crate::Result<()> {
                Ok(<$type>::set_vring_err(self, index, fd)?)
            }
            $($custom)*
        }
    };
}
pub(crate) use vhost_backend_by_inherent;

#[cfg(test)]
mod tests {
    //! The three families driven through one `&dyn VhostBackend`. vhost-user runs against
    //! an in-process back-end session; no /dev/vhost-* exists on a build host, so the
    //! kernel device and vDPA run on /dev/null, where each call must reach its own ioctl
    //! (named in the error) and vDPA's memory table must become DMA mappings.

    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::thread;

    use super::*;
    use crate::kern::{self, VhostDevice};
    use crate::memory::GuestMemory;
    use crate::sys::eventfd::EventFd;
    use crate::user::backend::{BackendHandler, BackendSession};
    use crate::user::Frontend;
    use crate::vdpa::VhostVdpa;

    const VERSION_1: u64 = 1 << 32;

    /// A vhost-user device that records the requests it is given.
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Recorder {
        fn log(&self, what: String) -> crate::user::Result<()> {
            self.0.lock().unwrap().push(what);
            Ok(())
        }
    }

    impl BackendHandler for Recorder {
        fn max_queues(&self) -> u32 {
            1
        }
        fn get_features(&mut self) -> crate::user::Result<u64> {
            Ok(VERSION_1 | 1)
        }
        fn set_features(&mut self, features: u64) -> crate::user::Result<()> {
            self.log(format!("features {features:#x}"))
        }
        fn set_owner(&mut self) -> crate::user::Result<()> {
            self.log("owner".into())
        }
        fn reset_owner(&mut self) -> crate::user::Result<()> {
            self.log("reset owner".into())
        }
        fn set_mem_table(&mut self, mem: &GuestMemory) -> crate::user::Result<()> {
            self.log(format!("memory {}", mem.regions().len()))
        }
        fn set_vring_num(&mut self, index: u32, num: u32) -> crate::user::Result<()> {
            self.log(format!("num {index} {num}"))
        }
        fn set_vring_addr(&mut self, a: &VringAddrs) -> crate::user::Result<()> {
            self.log(format!("addr {}", a.index))
        }
        fn set_vring_base(&mut self, index: u32, base: u32) -> crate::user::Result<()> {
            self.log(format!("base {index} {base}"))
        }
        fn get_vring_base(&mut self, index: u32) -> crate::user::Result<u32> {
            Ok(7 + index)
        }
        fn set_vring_kick(&mut self, i: u32, fd: Option<OwnedFd>) -> crate::user::Result<()> {
            self.log(format!("kick {i} {}", fd.is_some()))
        }
        fn set_vring_call(&mut self, i: u32, fd: Option<OwnedFd>) -> crate::user::Result<()> {
            self.log(format!("call {i} {}", fd.is_some()))
        }
        fn set_vring_err(&mut self, i: u32, fd: Option<OwnedFd>) -> crate::user::Result<()> {
            self.log(format!("err {i} {}", fd.is_some()))
        }
        fn set_log_fd(&mut self, _fd: OwnedFd) -> crate::user::Result<()> {
            self.log("log fd".into())
        }
    }

    /// What a VMM does with any back-end: negotiate, claim it, hand over memory, set a
    /// queue up, stop it. Returns the base the queue stopped at.
    fn bring_up(
        b: &dyn VhostBackend,
        table: &[MemoryRegion<'_>],
        ring: u64,
        ev: BorrowedFd<'_>,
    ) -> crate::Result<u32> {
        let offered = b.get_features()?;
        b.set_owner()?;
        b.set_features(offered & VERSION_1)?;
        b.set_mem_table(table)?;
        b.set_vring_num(0, 64)?;
        b.set_vring_addr(&VringAddrs {
            index: 0,
            desc: ring,
            avail: ring + 0x400,
            used: ring + 0x800,
            ..Default::default()
        })?;
        b.set_vring_base(0, 3)?;
        b.set_vring_call(0, Some(ev))?;
        b.set_vring_kick(0, Some(ev))?;
        b.set_vring_err(0, None)?;
        b.get_vring_base(0)
    }

    fn table_of(ram: &GuestMemory) -> Vec<MemoryRegion<'_>> {
        ram.regions()
            .iter()
            .map(|r| MemoryRegion {
                info: r.info(),
                fd: Some(r.fd()),
            })
            .collect()
    }

    #[test]
    fn vhost_user_through_the_trait() {
        let (a, b) = UnixStream::pair().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut handler = Recorder(seen.clone());
        let server = thread::spawn(move || BackendSession::new(b).run(&mut handler));
        let fe = Frontend::new(a).unwrap();
        let backend: &dyn VhostBackend = &fe;
        let ram = GuestMemory::allocate(&[(0, 1 << 20)]).unwrap();
        let table = table_of(&ram);
        let ring = table[0].info.userspace_addr + 0x1000;
        let ev = EventFd::new(false).unwrap();

        assert_eq!(bring_up(backend, &table, ring, ev.as_fd()).unwrap(), 7);
        // What vhost-user cannot carry is refused before it is sent, as the family's error.
        let no_fd = [MemoryRegion {
            fd: None,
            ..table[0]
        }];
        for err in [
            backend.set_mem_table(&no_fd).unwrap_err(),
            backend.set_log_base(0, None).unwrap_err(),
            backend.set_log_fd(None).unwrap_err(),
        ] {
            assert!(
                matches!(err, crate::Error::User(crate::user::Error::InvalidParam(_))),
                "{err}"
            );
        }
        // ...and the connection goes on.
        backend.set_log_fd(Some(ev.as_fd())).unwrap();
        backend.reset_owner().unwrap();
        drop(fe);
        server.join().unwrap().unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "owner",
                "features 0x100000000",
                "memory 1",
                "num 0 64",
                "addr 0",
                "base 0 3",
                "call 0 true",
                "kick 0 true",
                "err 0 false",
                "log fd",
                "reset owner",
            ]
        );
    }

    fn dev_null() -> OwnedFd {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        f.into()
    }

    /// Each shared method on a file that is no vhost device: the kernel's ENOTTY, with
    /// the request that reached it named.
    fn each_method_reaches_its_ioctl(b: &dyn VhostBackend) {
        let ev = EventFd::new(false).unwrap();
        let fd = Some(ev.as_fd());
        let addrs = VringAddrs::default();
        let calls: Vec<(&str, crate::Result<()>)> = vec![
            ("GET_FEATURES", b.get_features().map(drop)),
            ("SET_FEATURES", b.set_features(VERSION_1)),
            ("SET_OWNER", b.set_owner()),
            ("RESET_OWNER", b.reset_owner()),
            ("SET_LOG_BASE", b.set_log_base(0x1000, None)),
            ("SET_LOG_FD", b.set_log_fd(fd)),
            ("SET_VRING_NUM", b.set_vring_num(0, 64)),
            ("SET_VRING_ADDR", b.set_vring_addr(&addrs)),
            ("SET_VRING_BASE", b.set_vring_base(0, 0)),
            ("GET_VRING_BASE", b.get_vring_base(0).map(drop)),
            ("SET_VRING_KICK", b.set_vring_kick(0, fd)),
            ("SET_VRING_CALL", b.set_vring_call(0, None)),
            ("SET_VRING_ERR", b.set_vring_err(0, fd)),
        ];
        for (name, r) in calls {
            let Err(crate::Error::Kern(e)) = r else {
                panic!("{name}: {r:?}")
            };
            assert_eq!(e.errno(), Some(libc::ENOTTY), "{name}: {e}");
            assert!(e.to_string().starts_with(&format!("VHOST_{name}: ")), "{e}");
        }
        let log = LogRegion {
            mmap_size: 4096,
            mmap_offset: 0,
            fd: ev.as_fd(),
        };
        let e = b.set_log_base(0, Some(log)).unwrap_err();
        assert!(
            matches!(e, crate::Error::Kern(kern::Error::InvalidParam(_))),
            "{e}"
        );
        let e = b.set_mem_table(&[]).unwrap_err();
        assert!(
            matches!(e, crate::Error::Kern(kern::Error::InvalidParam(_))),
            "{e}"
        );
    }

    #[test]
    fn kernel_vhost_through_the_trait() {
        let dev = VhostDevice::unprobed(dev_null());
        let ram = GuestMemory::allocate(&[(0, 1 << 20)]).unwrap();
        each_method_reaches_its_ioctl(&dev);
        let e = VhostBackend::set_mem_table(&dev, &table_of(&ram)).unwrap_err();
        assert!(e.to_string().starts_with("VHOST_SET_MEM_TABLE: "), "{e}");
    }

    #[test]
    fn vdpa_through_the_trait_maps_the_memory_table() {
        let vdpa = VhostVdpa::new(Arc::new(VhostDevice::unprobed(dev_null())));
        let backend: &dyn VhostBackend = &vdpa;
        let ram = GuestMemory::allocate(&[(0, 1 << 20), (1 << 30, 1 << 21)]).unwrap();
        let table = table_of(&ram);
        each_method_reaches_its_ioctl(backend);
        // /dev/null takes the IOTLB writes: the table becomes mappings at IOVA = gpa...
        backend.set_mem_table(&table).unwrap();
        assert_eq!(vdpa.mappings(), [(0, 0, 1 << 20), (0, 1 << 30, 1 << 21)]);
        // ...and a new table replaces them, including one mapped by hand.
        vdpa.dma_map(1 << 40, 4096, 0x7000_0000, true, 1).unwrap();
        backend.set_mem_table(&table[1..]).unwrap();
        assert_eq!(vdpa.mappings(), [(0, 1 << 30, 1 << 21)]);
    }
}
