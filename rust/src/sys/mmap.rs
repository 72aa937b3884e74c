//! mmap(2) with the checks that keep a hostile region description from turning into a
//! SIGBUS or a wild pointer (ADVERSARIAL B6, C2, C3, C5).

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr;

use rustix::fs::SealFlags;
use rustix::mm::{MapFlags, ProtFlags};

use super::invalid_input;
use super::memfd::regular_file_size;

/// An owned memory mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    /// Start of the kernel mapping (page aligned).
    base: *mut u8,
    /// Length passed to mmap, including the part below the requested offset.
    map_len: usize,
    /// Distance from `base` to the first byte the caller asked for.
    delta: usize,
    /// Length the caller asked for.
    len: usize,
}

// SAFETY: a Mapping is only an address range; it has no thread affinity. Accesses go through
// raw pointers whose synchronisation is the caller's responsibility, as for any shared memory.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only exposes the pointer and the length, both immutable.
unsafe impl Sync for Mapping {}

#[allow(clippy::len_without_is_empty)] // a Mapping is never empty: len 0 is rejected
impl Mapping {
    /// MAP_SHARED of [offset, offset+len) of fd. Rejects len 0 and any u64 overflow; for a
    /// regular file or memfd (fstat S_IFREG) rejects offset+len > file size (mapping past EOF
    /// succeeds but SIGBUSes on touch); handles an offset that is not page aligned by mapping
    /// from the page below and offsetting the pointer.
    ///
    /// An fd that cannot be mapped at all (eventfd, socket, pipe) fails with the kernel's
    /// ENODEV here rather than later.
    pub fn map_shared(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> io::Result<Self> {
        if len == 0 {
            return Err(invalid_input("cannot map 0 bytes"));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| invalid_input("mapping offset + length overflows"))?;
        if let Some(size) = regular_file_size(fd)? {
            if end > size {
                return Err(invalid_input("mapping extends past the end of the file"));
            }
        }
        // `page_size` is read from the auxiliary vector once: no syscall.
        let page = rustix::param::page_size() as u64;
        let delta = offset % page;
        let map_offset = offset - delta;
        // mmap's off_t is signed: a larger offset is ours to refuse, not the kernel's.
        if i64::try_from(map_offset).is_err() {
            return Err(invalid_input("mapping offset too large"));
        }
        let map_len = len
            .checked_add(delta)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| invalid_input("mapping length too large"))?;
        // Fits: delta < page, and map_len fits a usize.
        let delta = delta as usize;
        let len = map_len - delta;
        let mut prot = ProtFlags::READ;
        if writable {
            prot |= ProtFlags::WRITE;
        }
        // SAFETY: a NULL hint lets the kernel choose a fresh range, so no existing Rust
        // object is replaced; an error comes back as `Err`, never as MAP_FAILED.
        let base = unsafe {
            rustix::mm::mmap(
                ptr::null_mut(),
                map_len,
                prot,
                MapFlags::SHARED,
                fd,
                map_offset,
            )
        }?;
        Ok(Self {
            base: base.cast(),
            map_len,
            delta,
            len,
        })
    }

    /// THE path for memory a front-end hands over (guest memory regions, the inflight area,
    /// the dirty log): read-write [`map_shared`](Self::map_shared) (so len 0, overflow and a
    /// range past the end of a regular file are refused before any mmap), preceded, when
    /// `require_sealed` is on, by [`check_shrink_sealed`]. A peer that can shrink the file
    /// after the size check turns our next access into a SIGBUS (ADVERSARIAL C5/J8); the
    /// seal is what makes the size check hold for the mapping's whole life.
    pub fn map_front_end(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        require_sealed: bool,
    ) -> Result<Self, FrontEndMapError> {
        if require_sealed {
            check_shrink_sealed(fd)?;
        }
        Ok(Self::map_shared(fd, offset, len, true)?)
    }

    /// Private zero-filled read-write memory (e.g. rings of a purely local test set-up).
    pub fn map_anonymous(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(invalid_input("cannot map 0 bytes"));
        }
        // SAFETY: anonymous mapping at a kernel-chosen address; nothing existing is touched
        // and an error comes back as `Err`, never as MAP_FAILED.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        Ok(Self {
            base: base.cast(),
            map_len: len,
            delta: 0,
            len,
        })
    }

    /// Points at `offset` in the file (not at the page boundary below it).
    pub fn as_ptr(&self) -> *mut u8 {
        // `delta < map_len`, so this stays inside the mapping; wrapping_add avoids unsafe.
        self.base.wrapping_add(self.delta)
    }

    /// Bytes usable from [`as_ptr`](Self::as_ptr).
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // munmap of a range we mapped cannot fail, and a destructor has nobody to tell.
        // SAFETY: `base`/`map_len` describe exactly the range this object mapped, and no
        // reference into it can outlive `self` (only raw pointers, which are the holder's
        // responsibility: guest memory keeps the Mapping in an Arc while in use).
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.map_len) };
    }
}

/// The sealed-memory policy (ADVERSARIAL J8): `fd` must carry F_SEAL_SHRINK, so nobody can
/// truncate it under a mapping. QEMU seals its `memory-backend-memfd` this way by default;
/// files that cannot be sealed (not a memfd, or an fd without F_GET_SEALS) are refused.
pub fn check_shrink_sealed(fd: BorrowedFd<'_>) -> Result<(), FrontEndMapError> {
    // An fd that cannot carry seals (not a memfd) fails F_GET_SEALS with EINVAL: refused.
    if rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| s.contains(SealFlags::SHRINK)) {
        Ok(())
    } else {
        Err(FrontEndMapError::Unsealed)
    }
}

/// Why [`Mapping::map_front_end`] refused a front-end's fd.
#[derive(Debug, thiserror::Error)]
pub enum FrontEndMapError {
    /// The sealed-memory policy is on and the fd can still shrink under the mapping.
    #[error("fd is not sealed against shrinking (F_SEAL_SHRINK) and sealed memory is required")]
    Unsealed,
    /// Bad range (0 bytes, overflow, past the end of the file) or the kernel's mmap error.
    #[error(transparent)]
    Map(#[from] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::unsealed_memfd;
    use crate::sys::{memfd_create, EventFd};
    use std::os::fd::AsFd;

    fn pwrite(fd: BorrowedFd<'_>, data: &[u8], off: u64) {
        assert_eq!(rustix::io::pwrite(fd, data, off).unwrap(), data.len());
    }

    #[test]
    fn front_end_fds_go_through_the_seal_policy_and_the_size_check() {
        let unsealed = unsealed_memfd(8192);
        // Policy on: refused before any mmap, whatever the range.
        let e = Mapping::map_front_end(unsealed.as_fd(), 0, 4096, true).unwrap_err();
        assert!(matches!(e, FrontEndMapError::Unsealed), "{e:?}");
        assert!(e.to_string().contains("F_SEAL_SHRINK"), "{e}");
        // An fd that cannot carry seals at all (eventfd) is refused too.
        let ev = EventFd::new(true).unwrap();
        let e = Mapping::map_front_end(ev.as_fd(), 0, 8, true).unwrap_err();
        assert!(matches!(e, FrontEndMapError::Unsealed), "{e:?}");
        // Policy off: mapped, but the size check still holds.
        let m = Mapping::map_front_end(unsealed.as_fd(), 4096, 4096, false).unwrap();
        assert_eq!(m.len(), 4096);
        drop(m);
        let invalid = |e: FrontEndMapError| matches!(e, FrontEndMapError::Map(ref io) if io.kind() == io::ErrorKind::InvalidInput);
        let e = Mapping::map_front_end(unsealed.as_fd(), 4096, 4097, false).unwrap_err();
        assert!(invalid(e));
        let e = Mapping::map_front_end(unsealed.as_fd(), 0, 0, false).unwrap_err();
        assert!(invalid(e));
        // A sealed memfd passes the policy, and the size check still applies.
        let sealed = memfd_create("t", 4096).unwrap();
        let m = Mapping::map_front_end(sealed.as_fd(), 0, 4096, true).unwrap();
        assert_eq!(m.len(), 4096);
        let e = Mapping::map_front_end(sealed.as_fd(), 0, 8192, true).unwrap_err();
        assert!(invalid(e));
    }

    #[test]
    fn rejects_zero_length_and_overflow() {
        let fd = memfd_create("t", 4096).unwrap();
        let e = Mapping::map_shared(fd.as_fd(), 0, 0, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = Mapping::map_shared(fd.as_fd(), u64::MAX - 1, 4, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = Mapping::map_shared(fd.as_fd(), 4, u64::MAX - 1, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(Mapping::map_anonymous(0).is_err());
    }

    #[test]
    fn rejects_past_end_of_file() {
        let fd = memfd_create("t", 4096).unwrap();
        assert!(Mapping::map_shared(fd.as_fd(), 0, 8192, true).is_err());
        assert!(Mapping::map_shared(fd.as_fd(), 4096, 1, true).is_err());
        assert!(Mapping::map_shared(fd.as_fd(), 1, 4096, true).is_err());
        // Exactly up to EOF is fine.
        let m = Mapping::map_shared(fd.as_fd(), 4095, 1, true).unwrap();
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn unaligned_offset_points_at_the_right_byte() {
        let fd = memfd_create("t", 3 * 4096).unwrap();
        let pattern: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        pwrite(fd.as_fd(), &pattern, 0);
        let off = 4096 + 100;
        let m = Mapping::map_shared(fd.as_fd(), off, 50, true).unwrap();
        assert_eq!(m.len(), 50);
        // SAFETY: the mapping covers 50 bytes from as_ptr().
        let got = unsafe { std::slice::from_raw_parts(m.as_ptr(), 50) };
        assert_eq!(got, &pattern[off as usize..off as usize + 50]);

        // A write through it lands at that file offset.
        // SAFETY: byte 0 is inside the writable mapping.
        unsafe { m.as_ptr().write(0xAA) };
        let whole = Mapping::map_shared(fd.as_fd(), 0, 3 * 4096, false).unwrap();
        // SAFETY: `off` < the 3-page mapping length.
        assert_eq!(unsafe { whole.as_ptr().add(off as usize).read() }, 0xAA);
    }

    #[test]
    fn unmappable_fds_fail_with_enodev() {
        let e = EventFd::new(true).unwrap();
        let err = Mapping::map_shared(e.as_fd(), 0, 4096, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));

        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = Mapping::map_shared(a.as_fd(), 0, 4096, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        drop(b);
    }

    #[test]
    fn read_only_fd_cannot_be_mapped_writable() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let err = Mapping::map_shared(f.as_fd(), 0, 1, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        Mapping::map_shared(f.as_fd(), 0, 1, false).unwrap();
    }

    #[test]
    fn anonymous_mapping_is_zeroed_and_writable() {
        let m = Mapping::map_anonymous(10000).unwrap();
        assert_eq!(m.len(), 10000);
        // SAFETY: the mapping is 10000 writable bytes.
        let s = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), m.len()) };
        assert!(s.iter().all(|&b| b == 0));
        s[9999] = 1;
    }
}
