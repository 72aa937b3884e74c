//! userfaultfd(2): the kernel object behind vhost-user postcopy migration.
//!
//! A back-end registers its mappings of guest memory with a userfaultfd in "missing" mode;
//! from then on a thread that touches a page the memory does not have yet (a fresh shared
//! memory page nobody wrote) sleeps in the kernel, and the fault is queued on the fd as a
//! 32-byte message. Whoever holds the fd (the front-end, which receives it with
//! POSTCOPY_ADVISE) reads the fault and resolves it by copying the page in (`UFFDIO_COPY`,
//! which also wakes the sleeper), or by waking the sleeper once the page is there another
//! way (`UFFDIO_WAKE`: QEMU copies into its own mapping of the same memfd, then wakes ours).
//!
//! The ioctls act on the address space of the process that created the fd, whoever calls
//! them: a front-end copies pages into the back-end's mappings at the back-end's addresses.
//!
//! Lifetime (what ends a wait): unregistering a range wakes every thread waiting on it, and
//! so does the release of the last fd to the object (the kernel then unregisters all). A
//! woken thread retries its access as an ordinary fault: shared memory then gets a zero
//! page. Nothing else wakes a waiter: a signal is handled and the fault taken again.
//!
//! Privilege: without `CAP_SYS_PTRACE`, `vm.unprivileged_userfaultfd=0` refuses the
//! syscall unless `UFFD_USER_MODE_ONLY` is asked for; a back-end cannot ask for it, since a
//! device often reaches guest memory from the kernel (`pwrite` from a guest buffer), and
//! those faults would then fail with EFAULT instead of waiting. So a non-root back-end
//! falls back to `/dev/userfaultfd` (whose file mode is the admin's way to grant it).
//!
//! Constants and layouts are those of `linux/userfaultfd.h` (Linux 6.12); the tests below
//! pin them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use rustix::mm::UserfaultfdFlags;

use super::{cvt, poll, retry_eintr};

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_MISSING_HUGETLBFS`: missing-mode registration of hugetlbfs mappings.
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`: missing-mode registration of shared memory (memfd, tmpfs),
/// which is what vhost-user guest memory is.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFDIO_REGISTER_MODE_MISSING`: fault on pages that are not there yet.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`: the event byte of a fault message.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`: the faulting access was a write.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `UFFD_USER_MODE_ONLY` (flag of the syscall): handle only faults from user mode.
pub const UFFD_USER_MODE_ONLY: i32 = 1;
/// Bit of `_UFFDIO_COPY` in the `ioctls` a registration reports as allowed on its range.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioApi {
    /// UFFD_API: the ABI version asked for.
    pub api: u64,
    /// Features asked for; the kernel writes back those it has.
    pub features: u64,
    /// Written by the kernel: the ioctls the fd supports.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioRange {
    /// Start of the range (page aligned).
    pub start: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioRegister {
    /// The range to watch for missing-page faults.
    pub range: UffdioRange,
    /// UFFDIO_REGISTER_MODE_* bits.
    pub mode: u64,
    /// Written by the kernel: the ioctls the range supports.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioCopy {
    /// Address in the registered range to fill.
    pub dst: u64,
    /// Address in this process to copy from.
    pub src: u64,
    /// Bytes to copy.
    pub len: u64,
    /// UFFDIO_COPY_MODE_* bits (0 wakes the faulting thread).
    pub mode: u64,
    /// Written by the kernel: bytes copied, or a negative errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UffdioZeropage {
    /// The range to fill with zeroes.
    pub range: UffdioRange,
    /// UFFDIO_ZEROPAGE_MODE_* bits.
    pub mode: u64,
    /// Written by the kernel: bytes zeroed, or a negative errno.
    pub zeropage: i64,
}

/// The size of `struct uffd_msg`, the unit of `read(2)` on a userfaultfd.
pub const UFFD_MSG_SIZE: usize = 32;
/// Offset of `arg.pagefault.flags` in `struct uffd_msg`.
const MSG_FLAGS_OFFSET: usize = 8;
/// Offset of `arg.pagefault.address` in `struct uffd_msg`.
const MSG_ADDRESS_OFFSET: usize = 16;

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
pub const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
pub const UFFDIO_WAKE: u64 = 0x8010_aa02;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
pub const UFFDIO_COPY: u64 = 0xc028_aa03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
pub const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`: a new userfaultfd.
pub const USERFAULTFD_IOC_NEW: u64 = 0xaa00;

/// One fault read from a userfaultfd: where (an address in the registering process) and
/// whether the access was a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    /// The faulting address (not page aligned).
    pub address: u64,
    /// Whether the access was a write (UFFD_PAGEFAULT_FLAG_WRITE).
    pub write: bool,
}

impl FaultEvent {
    /// Decodes a `struct uffd_msg`; `None` for any other event than a page fault (this
    /// crate asks for no other event).
    pub fn decode(msg: &[u8; UFFD_MSG_SIZE]) -> Option<Self> {
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            return None;
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        Some(FaultEvent {
            address: word(MSG_ADDRESS_OFFSET),
            write: word(MSG_FLAGS_OFFSET) & UFFD_PAGEFAULT_FLAG_WRITE != 0,
        })
    }
}

/// An owned userfaultfd, non-blocking and close-on-exec. Dropping it closes this process's
/// handle; the kernel object (and its registrations) lives until the last handle goes.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

/// Runs an ioctl whose argument is `arg`, retrying EINTR.
fn ioctl<T>(fd: BorrowedFd<'_>, req: u64, arg: &mut T) -> io::Result<()> {
    retry_eintr(|| {
        // SAFETY: every request number used with this helper is paired (in this module)
        // with the struct whose size it encodes, and `arg` is a live, writable value of
        // that struct for the duration of the call; `fd` is open for the borrow.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) })
    })
    .map(|_| ())
}

impl Userfaultfd {
    /// A new userfaultfd of this process, with the API handshake done for missing-mode
    /// registration of shared memory (`features`, e.g. [`UFFD_FEATURE_MISSING_SHMEM`]).
    /// Faults from kernel mode are handled too (no `UFFD_USER_MODE_ONLY`).
    pub fn new(features: u64) -> io::Result<Self> {
        let fd = Self::open()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(fd.as_fd(), UFFDIO_API, &mut api).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("userfaultfd API handshake with features {features:#x}: {e}"),
            )
        })?;
        Ok(Userfaultfd { fd })
    }

    fn open() -> io::Result<OwnedFd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the call takes only flags. (rustix marks it unsafe because the fd can
        // change how this process's memory faults: that power is what this type is for,
        // and only registered ranges are affected.)
        let err = match unsafe {
            rustix::mm::userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK)
        } {
            Ok(fd) => return Ok(fd),
            Err(e) => io::Error::from(e),
        };
        if err.raw_os_error() != Some(libc::EPERM) {
            return Err(io::Error::new(err.kind(), format!("userfaultfd: {err}")));
        }
        // Unprivileged with vm.unprivileged_userfaultfd=0: /dev/userfaultfd, if allowed.
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .map_err(|e| {
                io::Error::new(
                    err.kind(),
                    format!(
                        "userfaultfd: {err} (needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1, \
                         or access to /dev/userfaultfd: {e})"
                    ),
                )
            })?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as its argument, no pointer.
        let raw = cvt(unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as _,
                flags as libc::c_long,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("/dev/userfaultfd: {e}")))?;
        // SAFETY: a non-negative result of USERFAULTFD_IOC_NEW is a fresh fd.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Adopts a userfaultfd received from a peer (POSTCOPY_ADVISE). Not checked to be
    /// one: a wrong fd makes every ioctl fail (ENOTTY), never UB.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Userfaultfd { fd }
    }

    /// Registers `[start, start + len)` in missing mode; the range must be page-aligned
    /// mappings that support it (shared memory with `MISSING_SHMEM`). Refuses a range the
    /// kernel would not let us fill with `UFFDIO_COPY`.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_fd(), UFFDIO_REGISTER, &mut reg)?;
        if reg.ioctls & UFFDIO_COPY_BIT == 0 {
            let _ = self.unregister(start, len);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel does not allow UFFDIO_COPY on this range",
            ));
        }
        Ok(())
    }

    /// Unregisters `[start, start + len)`; threads waiting on a fault there are woken.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(self.fd.as_fd(), UFFDIO_UNREGISTER, &mut range)
    }

    /// Wakes the threads waiting on faults in `[start, start + len)` (after the pages were
    /// made present some other way).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(self.fd.as_fd(), UFFDIO_WAKE, &mut range)
    }

    /// Copies `data` (whole pages) to `dst` in the registering process and wakes the
    /// waiters there. Returns false when the pages were already present (EEXIST: someone
    /// resolved them first); the waiters are woken then too.
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<bool> {
        let mut done = 0usize;
        while done < data.len() {
            let mut copy = UffdioCopy {
                dst: dst + done as u64,
                src: data[done..].as_ptr() as u64,
                len: (data.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            match ioctl(self.fd.as_fd(), UFFDIO_COPY, &mut copy) {
                Ok(()) => return Ok(true),
                // A partial copy (the other process's mappings changing) reports what it
                // did in `copy`; go on from there.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && copy.copy > 0 => {
                    done += copy.copy as usize;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.wake(dst, data.len() as u64)?;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Maps zero pages at `[start, start + len)` and wakes the waiters there. False when
    /// the pages were already present (they are woken then too).
    pub fn zeropage(&self, start: u64, len: u64) -> io::Result<bool> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        match ioctl(self.fd.as_fd(), UFFDIO_ZEROPAGE, &mut z) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.wake(start, len)?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` (`None`: no bound) for the next fault and reads it; `None`
    /// when none came. Events other than page faults are skipped.
    pub fn read_fault(&self, timeout: Option<Duration>) -> io::Result<Option<FaultEvent>> {
        loop {
            if !poll::wait_fd(self.fd.as_fd(), libc::POLLIN, timeout)? {
                return Ok(None);
            }
            let mut msg = [0u8; UFFD_MSG_SIZE];
            let n = retry_eintr(|| Ok(rustix::io::read(&self.fd, &mut msg)?));
            match n {
                // Another reader took it between the poll and the read.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if timeout == Some(Duration::ZERO) {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
                Ok(UFFD_MSG_SIZE) => {
                    if let Some(fault) = FaultEvent::decode(&msg) {
                        return Ok(Some(fault));
                    }
                }
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("short userfaultfd read ({n} bytes): the fd is not a userfaultfd"),
                    ))
                }
            }
        }
    }

    /// A second handle on the same object (for the reply of POSTCOPY_ADVISE).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        super::dup_cloexec(self.fd.as_fd())
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of, size_of};
    use std::sync::Arc;

    use super::*;
    use crate::sys::test_util::is_cloexec;
    use crate::sys::{memfd_create, Mapping};

    /// `_IOC` of the generic ioctl ABI with type 0xAA (userfaultfd).
    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
    }

    #[test]
    fn layouts_match_linux_userfaultfd_h() {
        assert_eq!((size_of::<UffdioApi>(), align_of::<UffdioApi>()), (24, 8));
        assert_eq!(offset_of!(UffdioApi, features), 8);
        assert_eq!(offset_of!(UffdioApi, ioctls), 16);
        assert_eq!(size_of::<UffdioRange>(), 16);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(offset_of!(UffdioRegister, mode), 16);
        assert_eq!(offset_of!(UffdioRegister, ioctls), 24);
        assert_eq!(size_of::<UffdioCopy>(), 40);
        assert_eq!(offset_of!(UffdioCopy, src), 8);
        assert_eq!(offset_of!(UffdioCopy, len), 16);
        assert_eq!(offset_of!(UffdioCopy, mode), 24);
        assert_eq!(offset_of!(UffdioCopy, copy), 32);
        assert_eq!(size_of::<UffdioZeropage>(), 32);
        assert_eq!(offset_of!(UffdioZeropage, zeropage), 24);
    }

    #[test]
    fn request_numbers_match_linux_userfaultfd_h() {
        const W: u64 = 1;
        const R: u64 = 2;
        assert_eq!(UFFDIO_API, ioc(R | W, 0x3f, size_of::<UffdioApi>()));
        assert_eq!(
            UFFDIO_REGISTER,
            ioc(R | W, 0x00, size_of::<UffdioRegister>())
        );
        assert_eq!(UFFDIO_UNREGISTER, ioc(R, 0x01, size_of::<UffdioRange>()));
        assert_eq!(UFFDIO_WAKE, ioc(R, 0x02, size_of::<UffdioRange>()));
        assert_eq!(UFFDIO_COPY, ioc(R | W, 0x03, size_of::<UffdioCopy>()));
        assert_eq!(
            UFFDIO_ZEROPAGE,
            ioc(R | W, 0x04, size_of::<UffdioZeropage>())
        );
        assert_eq!(USERFAULTFD_IOC_NEW, ioc(0, 0x00, 0));
    }

    #[test]
    fn decodes_a_fault_message() {
        let mut msg = [0u8; UFFD_MSG_SIZE];
        msg[0] = UFFD_EVENT_PAGEFAULT;
        msg[8..16].copy_from_slice(&UFFD_PAGEFAULT_FLAG_WRITE.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x7f00_1234_5000u64.to_ne_bytes());
        assert_eq!(
            FaultEvent::decode(&msg),
            Some(FaultEvent {
                address: 0x7f00_1234_5000,
                write: true
            })
        );
        msg[0] = 0x13; // UFFD_EVENT_FORK
        assert_eq!(FaultEvent::decode(&msg), None);
    }

    /// A thread reading a missing page of registered shared memory waits until a page is
    /// copied in, and then sees exactly the copied bytes.
    #[test]
    fn a_fault_waits_for_its_page_and_sees_the_copy() {
        const PAGE: usize = 4096;
        let uffd = Userfaultfd::new(UFFD_FEATURE_MISSING_SHMEM).unwrap();
        assert!(is_cloexec(uffd.as_fd()));
        let fd = memfd_create("uffd-test", 4 * PAGE as u64).unwrap();
        let map = Arc::new(Mapping::map_shared(fd.as_fd(), 0, 4 * PAGE as u64, true).unwrap());
        let base = map.as_ptr() as u64;
        uffd.register(base, 4 * PAGE as u64).unwrap();
        assert_eq!(uffd.read_fault(Some(Duration::ZERO)).unwrap(), None);
        let m = map.clone();
        let reader = std::thread::spawn(move || {
            // SAFETY: the mapping is live (the Arc) and 4 pages long; page 2 is in range.
            unsafe { std::ptr::read_volatile(m.as_ptr().add(2 * PAGE + 8)) }
        });
        let fault = uffd
            .read_fault(Some(Duration::from_secs(10)))
            .unwrap()
            .expect("the reader faults");
        assert_eq!(fault.address & !(PAGE as u64 - 1), base + 2 * PAGE as u64);
        assert!(!fault.write);
        assert!(!reader.is_finished());
        let page = vec![0xabu8; PAGE];
        assert!(uffd.copy(base + 2 * PAGE as u64, &page).unwrap());
        assert_eq!(reader.join().unwrap(), 0xab);
        // Present now: a second copy reports it and changes nothing.
        assert!(!uffd.copy(base + 2 * PAGE as u64, &[0u8; PAGE]).unwrap());
        assert!(uffd.zeropage(base, PAGE as u64).unwrap());
        uffd.unregister(base, 4 * PAGE as u64).unwrap();
    }

    /// Unregistering wakes a waiter, which then gets an ordinary (zero) page: what lets a
    /// back-end whose front-end died stop its workers.
    #[test]
    fn unregister_wakes_a_waiter() {
        const PAGE: u64 = 4096;
        let uffd = Userfaultfd::new(UFFD_FEATURE_MISSING_SHMEM).unwrap();
        let fd = memfd_create("uffd-test", PAGE).unwrap();
        let map = Arc::new(Mapping::map_shared(fd.as_fd(), 0, PAGE, true).unwrap());
        let base = map.as_ptr() as u64;
        uffd.register(base, PAGE).unwrap();
        let m = map.clone();
        // SAFETY: the mapping is live (the Arc) and one page long.
        let reader = std::thread::spawn(move || unsafe { std::ptr::read_volatile(m.as_ptr()) });
        assert!(uffd
            .read_fault(Some(Duration::from_secs(10)))
            .unwrap()
            .is_some());
        uffd.unregister(base, PAGE).unwrap();
        assert_eq!(reader.join().unwrap(), 0);
    }

    #[test]
    fn bad_ranges_and_wrong_fds_fail_cleanly() {
        // A range that is not mapped at all.
        let uffd = Userfaultfd::new(UFFD_FEATURE_MISSING_SHMEM).unwrap();
        let err = uffd.register(0x1000, 0x1000).unwrap_err();
        assert!(err.raw_os_error().is_some(), "{err}");
        let not_uffd = Userfaultfd::from_fd(memfd_create("x", 4096).unwrap());
        assert_eq!(
            not_uffd.wake(0, 4096).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
    }
}
