//! Sealed memfds: the shareable backing of guest RAM, and fstat/dup helpers for fds that
//! arrive from a peer.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{cvt, invalid_input, retry_eintr};

/// Creates a close-on-exec memfd of `size` bytes whose size can never change again.
///
/// The seals matter because the fd is handed to a peer: without `F_SEAL_SHRINK` a peer could
/// truncate it and make our next access to the mapping SIGBUS (ADVERSARIAL C5/J8).
/// `F_SEAL_SEAL` stops anyone from lifting the seals later.
pub fn memfd_create(name: &str, size: u64) -> io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| invalid_input("memfd name contains a NUL byte"))?;
    let len = libc::off_t::try_from(size).map_err(|_| invalid_input("memfd size too large"))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let raw = cvt(unsafe {
        libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: `raw` was just returned by memfd_create, so it is open and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate takes no pointers and `fd` is open.
    retry_eintr(|| cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int argument, no pointer; `fd` is open.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(fd)
}

/// Size in bytes of the file behind `fd` (`st_size`; 0 for most non-regular fds).
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = fstat(fd)?;
    u64::try_from(st.st_size).map_err(|_| invalid_input("negative file size"))
}

/// A close-on-exec duplicate, so a copy kept for sharing never leaks into a child process.
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument, no pointer; `fd` is open for the borrow.
    let raw = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh duplicate returned by fcntl and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `Some(size)` for a regular file (memfds and hugetlbfs files included), `None` for anything
/// else. Only regular files have a size that bounds what can be mapped without SIGBUS.
pub(crate) fn regular_file_size(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let st = fstat(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    u64::try_from(st.st_size)
        .map(Some)
        .map_err(|_| invalid_input("negative file size"))
}

pub(super) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is writable storage of the right type; fstat fills it on success.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat returned 0, so it initialised the whole struct.
    Ok(unsafe { st.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::is_cloexec;
    use std::os::fd::AsFd;

    fn ftruncate(fd: BorrowedFd<'_>, len: i64) -> io::Result<()> {
        // SAFETY: ftruncate takes no pointers; `fd` is open.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
    }

    #[test]
    fn memfd_has_size_and_cannot_be_resized() {
        let fd = memfd_create("pyvhost-test", 8192).unwrap();
        assert_eq!(file_size(fd.as_fd()).unwrap(), 8192);
        assert_eq!(regular_file_size(fd.as_fd()).unwrap(), Some(8192));
        assert!(is_cloexec(fd.as_fd()));

        let err = ftruncate(fd.as_fd(), 4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        let err = ftruncate(fd.as_fd(), 16384).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert_eq!(file_size(fd.as_fd()).unwrap(), 8192);

        // SAFETY: F_GET_SEALS takes no argument; `fd` is open.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
        // The seals themselves are sealed.
        // SAFETY: as above, an int argument only.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1);
    }

    #[test]
    fn memfd_rejects_bad_arguments() {
        assert_eq!(
            memfd_create("a\0b", 4096).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            memfd_create("big", u64::MAX).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn dup_is_cloexec_and_shares_the_file() {
        let fd = memfd_create("pyvhost-test", 4096).unwrap();
        let d = dup_cloexec(fd.as_fd()).unwrap();
        assert_ne!(d.as_raw_fd(), fd.as_raw_fd());
        assert!(is_cloexec(d.as_fd()));
        assert_eq!(file_size(d.as_fd()).unwrap(), 4096);
    }

    #[test]
    fn non_regular_files_have_no_mappable_size() {
        let e = crate::sys::EventFd::new(true).unwrap();
        assert_eq!(regular_file_size(e.as_fd()).unwrap(), None);
    }
}
