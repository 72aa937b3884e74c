//! Sealed memfds: the shareable backing of guest RAM, and fstat/dup helpers for fds that
//! arrive from a peer.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{FileType, MemfdFlags, SealFlags, Stat};

use super::{invalid_input, retry_eintr};

/// Creates a close-on-exec memfd of `size` bytes whose size can never change again.
///
/// The seals matter because the fd is handed to a peer: without `F_SEAL_SHRINK` a peer could
/// truncate it and make our next access to the mapping SIGBUS (ADVERSARIAL C5/J8).
/// `F_SEAL_SEAL` stops anyone from lifting the seals later.
pub fn memfd_create(name: &str, size: u64) -> io::Result<OwnedFd> {
    if name.contains('\0') {
        return Err(invalid_input("memfd name contains a NUL byte"));
    }
    // ftruncate's off_t is signed: a larger size is ours to refuse, not the kernel's.
    if i64::try_from(size).is_err() {
        return Err(invalid_input("memfd size too large"));
    }
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    retry_eintr(|| Ok(rustix::fs::ftruncate(&fd, size)?))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// Size in bytes of the file behind `fd` (`st_size`; 0 for most non-regular fds).
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = fstat(fd)?;
    u64::try_from(st.st_size).map_err(|_| invalid_input("negative file size"))
}

/// A close-on-exec duplicate, so a copy kept for sharing never leaks into a child process.
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, 0)?)
}

/// `Some(size)` for a regular file (memfds and hugetlbfs files included), `None` for anything
/// else. Only regular files have a size that bounds what can be mapped without SIGBUS.
pub(crate) fn regular_file_size(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let st = fstat(fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    u64::try_from(st.st_size)
        .map(Some)
        .map_err(|_| invalid_input("negative file size"))
}

pub(super) fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(rustix::fs::fstat(fd)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::is_cloexec;
    use std::os::fd::{AsFd, AsRawFd};

    fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
        Ok(rustix::fs::ftruncate(fd, len)?)
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

        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        // The seals themselves are sealed.
        assert!(rustix::fs::fcntl_add_seals(&fd, SealFlags::WRITE).is_err());
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
