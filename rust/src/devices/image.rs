//! Disk image files for block devices: open, check that the bytes are a raw disk, and lock
//! the file the way QEMU does, so that two programs never write one image unknowingly.
//!
//! Locking follows QEMU's `file-posix` driver, so QEMU, qemu-storage-daemon, qemu-img and
//! pyvhost see each other: open-file-description locks (`F_OFD_SETLK`, shared read locks
//! only) on single bytes, byte `100 + i` while holding permission `i` and byte `200 + i`
//! while refusing to share it, where the permissions are consistent read (0), write (1),
//! write-unchanged (2) and resize (3). After taking its own bytes, a user tests the
//! opposite ones: a permission it wants that someone refuses to share (`200 + i` locked by
//! another), or a permission it refuses to share that someone holds (`100 + i`), is a
//! conflict. Locks belong to the open file and go away when it is closed (or the process
//! dies), so nothing stale is ever left behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::devices::blk::SECTOR;

/// How an image is locked against other users (QEMU's `locking=` and `force-share=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Hold what we use, share nothing that would let another user corrupt the image:
    /// a writer excludes other writers and readers that forbid writers; a reader
    /// coexists with other readers.
    #[default]
    On,
    /// Read-only use that shares every permission (QEMU's `force-share=on`, what
    /// `qemu-img info -U` uses): coexists even with a writer.
    ForceShare,
    /// No locks at all (QEMU's `locking=off`), for those who coordinate otherwise.
    Off,
}

/// QEMU's block permissions, as bits; the lock byte of bit `i` is `base + i`.
mod perm {
    pub const CONSISTENT_READ: u8 = 1 << 0;
    pub const WRITE: u8 = 1 << 1;
    pub const WRITE_UNCHANGED: u8 = 1 << 2;
    /// Every permission: the three above and resize (bit 3).
    pub const ALL: u8 = 0xf;
    pub const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
}

/// Byte locked while holding a permission (QEMU's `RAW_LOCK_PERM_BASE`).
const PERM_BASE: u64 = 100;
/// Byte locked while refusing to share a permission (QEMU's `RAW_LOCK_SHARED_BASE`).
const SHARED_BASE: u64 = 200;
/// A byte of our own, locked shared by every pyvhost user of an image, so a conflict can
/// name pyvhost as the holder even when the holder's /proc entries are not readable.
/// Far from QEMU's bytes and libvirt's byte 0.
const PYVHOST_BYTE: u64 = 0x7076_6800;

/// Why an image cannot be served. The messages name the path and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened (or sized).
    #[error("open image {}: {source}", path.display())]
    Open {
        /// The path given.
        path: PathBuf,
        /// The error from open or fstat.
        source: io::Error,
    },
    /// The file starts with the signature of an image format other than raw.
    #[error(
        "open image {}: a {format} image, not a raw disk; only raw images are served \
         (convert it: qemu-img convert -O raw {} DISK.raw)",
        path.display(),
        path.display()
    )]
    Format {
        /// The path given.
        path: PathBuf,
        /// The format its signature names (qcow2, vmdk, ...).
        format: &'static str,
    },
    /// Neither a regular file nor a block device.
    #[error(
        "open image {}: {kind}, not a regular file or a block device",
        path.display()
    )]
    NotADisk {
        /// The path given.
        path: PathBuf,
        /// What it is instead (a directory, a FIFO, ...).
        kind: &'static str,
    },
    /// A zero-byte file.
    #[error(
        "open image {}: the file is empty; a disk needs at least one 512-byte sector \
         (make one: truncate -s 1G {})",
        path.display(),
        path.display()
    )]
    Empty {
        /// The path given.
        path: PathBuf,
    },
    /// A size that is not whole sectors.
    #[error(
        "open image {}: {size} bytes is not a multiple of the 512-byte sector \
         (round it up: truncate -s %512 {})",
        path.display(),
        path.display()
    )]
    Size {
        /// The path given.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// Another program holds the image in a way ours conflicts with.
    #[error("lock image {}: in use by {holder}, which {what}", path.display())]
    Locked {
        /// The path given.
        path: PathBuf,
        /// Who holds it: "qemu-storage-daemon (pid 1234)", "pyvhost (pid 99)", ...
        holder: String,
        /// What it holds: "holds the write permission", "does not share the write
        /// permission".
        what: String,
    },
    /// Force-share is for readers only (QEMU refuses it on a writable node too).
    #[error("open image {}: force-share needs a read-only image", path.display())]
    ForceShareWritable {
        /// The path given.
        path: PathBuf,
    },
}

impl ImageError {
    /// The path every variant names, for a caller that reports it apart from the reason.
    pub fn path(&self) -> &Path {
        match self {
            ImageError::Open { path, .. }
            | ImageError::Format { path, .. }
            | ImageError::NotADisk { path, .. }
            | ImageError::Empty { path }
            | ImageError::Size { path, .. }
            | ImageError::Locked { path, .. }
            | ImageError::ForceShareWritable { path } => path,
        }
    }
}

/// An open, checked and locked raw image. The locks last as long as the file.
#[derive(Debug)]
pub struct Image {
    file: File,
    size: u64,
}

impl Image {
    /// Opens `path` (read-write unless `readonly`), checks it is a non-empty raw image of
    /// whole sectors, and locks it according to `locking`.
    pub fn open(path: &Path, readonly: bool, locking: Locking) -> Result<Self, ImageError> {
        if locking == Locking::ForceShare && !readonly {
            return Err(ImageError::ForceShareWritable { path: path.into() });
        }
        let open_err = |source| ImageError::Open {
            path: path.into(),
            source,
        };
        // O_NONBLOCK: a FIFO given by mistake must not hang the open (it is refused
        // below); regular files and block devices ignore the flag.
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(open_err)?;
        let kind = file.metadata().map_err(open_err)?.file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(ImageError::NotADisk {
                path: path.into(),
                kind: if kind.is_dir() {
                    "a directory"
                } else if kind.is_char_device() {
                    "a character device"
                } else if kind.is_fifo() {
                    "a FIFO"
                } else {
                    "a socket"
                },
            });
        }
        // Seeking sizes block devices too, whose metadata length is 0.
        let size = (&file).seek(SeekFrom::End(0)).map_err(open_err)?;
        if size == 0 {
            return Err(ImageError::Empty { path: path.into() });
        }
        // The format first: other formats' files have any size.
        if let Some(format) = detect_format(&file).map_err(open_err)? {
            return Err(ImageError::Format {
                path: path.into(),
                format,
            });
        }
        if size % SECTOR != 0 {
            return Err(ImageError::Size {
                path: path.into(),
                size,
            });
        }
        lock(&file, path, readonly, locking)?;
        Ok(Image { file, size })
    }

    /// Size in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The open image, for reads and writes.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The open image, owned: the device keeps it (and its lock) for its lifetime.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// The signatures of the image formats QEMU knows, at the offsets where they live.
const SIGNATURES: &[(&str, usize, &[u8])] = &[
    ("qcow2", 0, b"QFI\xfb"),
    ("QED", 0, b"QED\0"),
    ("VMDK", 0, b"KDMV"),
    ("VMDK", 0, b"# Disk DescriptorFile"),
    ("VHDX", 0, b"vhdxfile"),
    ("VHD (vpc)", 0, b"conectix"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("VDI", 0x40, b"\x7f\x10\xda\xbe"),
    ("Parallels", 0, b"WithoutFreeSpace"),
    ("Parallels", 0, b"WithouFreSpacExt"),
    ("Bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format\n"),
];

/// The format whose signature the file starts with, if any (raw has none).
fn detect_format(file: &File) -> io::Result<Option<&'static str>> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = &head[..got];
    Ok(SIGNATURES
        .iter()
        .find(|(_, at, magic)| head.get(*at..*at + magic.len()) == Some(magic))
        .map(|(name, _, _)| *name))
}

fn flock_at(byte: u64, kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Takes a shared lock on one byte.
fn lock_byte(fd: BorrowedFd<'_>, byte: u64) -> io::Result<()> {
    let fl = flock_at(byte, libc::F_RDLCK);
    // SAFETY: F_OFD_SETLK reads the flock we pass; the fd is open for the borrow.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether another open file holds a lock on one byte (our own locks never conflict).
fn byte_taken(fd: BorrowedFd<'_>, byte: u64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK fills the flock we pass; the fd is open for the borrow.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } == 0 {
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn bits(mask: u8) -> impl Iterator<Item = u64> {
    (0..4u64).filter(move |i| mask & (1 << i) != 0)
}

fn lock(file: &File, path: &Path, readonly: bool, locking: Locking) -> Result<(), ImageError> {
    use std::os::fd::AsFd;
    let (held, shared) = match locking {
        Locking::Off => return Ok(()),
        Locking::ForceShare => (perm::CONSISTENT_READ, perm::ALL),
        Locking::On if readonly => (
            perm::CONSISTENT_READ,
            perm::CONSISTENT_READ | perm::WRITE_UNCHANGED,
        ),
        Locking::On => (
            perm::CONSISTENT_READ | perm::WRITE,
            perm::CONSISTENT_READ | perm::WRITE_UNCHANGED,
        ),
    };
    let fd = file.as_fd();
    let failed = |source| ImageError::Open {
        path: path.into(),
        source,
    };
    // Take ours first, then look for conflicts: of two users racing, at least one sees
    // the other (QEMU does the same).
    for byte in bits(held)
        .map(|i| PERM_BASE + i)
        .chain(bits(!shared & perm::ALL).map(|i| SHARED_BASE + i))
        .chain([PYVHOST_BYTE])
    {
        match lock_byte(fd, byte) {
            Ok(()) => {}
            // A conflicting write lock (not QEMU's, which only takes read locks).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                return Err(locked(
                    file,
                    path,
                    byte,
                    "holds an exclusive lock on it".into(),
                ))
            }
            Err(e) => return Err(failed(e)),
        }
    }
    let checks = bits(held)
        .map(|i| (SHARED_BASE + i, i, false))
        .chain(bits(!shared & perm::ALL).map(|i| (PERM_BASE + i, i, true)));
    for (byte, i, holds) in checks {
        if byte_taken(fd, byte).map_err(failed)? {
            let name = perm::NAMES[i as usize];
            let what = if holds {
                format!("holds the {name} permission")
            } else {
                format!("does not share the {name} permission")
            };
            return Err(locked(file, path, byte, what));
        }
    }
    Ok(())
}

fn locked(file: &File, path: &Path, byte: u64, what: String) -> ImageError {
    use std::os::fd::AsFd;
    let holder = match holder_process(file, byte) {
        Some(Holder {
            pid, pyvhost: true, ..
        }) => format!("pyvhost (pid {pid})"),
        Some(Holder { pid, comm, .. }) => format!("{} (pid {pid})", program_name(&comm)),
        // Not visible in /proc (another user's process): our own byte still tells.
        None if byte_taken(file.as_fd(), PYVHOST_BYTE).unwrap_or(false) => {
            "another pyvhost back-end".into()
        }
        None => "another process (QEMU, qemu-storage-daemon or qemu-img?)".into(),
    };
    ImageError::Locked {
        path: path.into(),
        holder,
        what,
    }
}

/// The kernel truncates process names to 15 bytes; give QEMU's programs their full names.
fn program_name(comm: &str) -> String {
    if comm.starts_with("qemu-storage-d") {
        "qemu-storage-daemon".into()
    } else if comm.starts_with("qemu-system-") {
        format!("QEMU ({comm})")
    } else {
        comm.into()
    }
}

/// A process holding a lock on an image.
struct Holder {
    pid: u32,
    comm: String,
    /// It holds our own byte too: a pyvhost process (whose name is the interpreter's).
    pyvhost: bool,
}

/// The process holding a lock on `byte` of `file`, found through `/proc/PID/fdinfo`
/// (best effort: other users' processes are not readable).
fn holder_process(file: &File, byte: u64) -> Option<Holder> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let key = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // Our own file holds some of the same bytes: never the holder.
            let fd_num = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
            if pid == std::process::id() && fd_num == Some(file.as_raw_fd()) {
                continue;
            }
            // stat follows the link: cheap, and skips every fd of another file.
            let same =
                std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == meta.ino());
            if !same {
                continue;
            }
            let info_path = entry.path().join("fdinfo").join(fd.file_name());
            let info = std::fs::read_to_string(info_path).unwrap_or_default();
            if info.lines().any(|l| lock_line_covers(l, &key, byte)) {
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                return Some(Holder {
                    pid,
                    comm: comm.trim().to_string(),
                    pyvhost: info
                        .lines()
                        .any(|l| lock_line_covers(l, &key, PYVHOST_BYTE)),
                });
            }
        }
    }
    None
}

/// Whether an fdinfo line `lock:\t1: OFDLCK ADVISORY READ -1 fe:00:1234 100 101` is a lock
/// on the file `key` (major:minor:inode) covering `byte`.
fn lock_line_covers(line: &str, key: &str, byte: u64) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.first() != Some(&"lock:") {
        return false;
    }
    let Some(at) = fields.iter().position(|f| *f == key) else {
        return false;
    };
    let start = fields.get(at + 1).and_then(|s| s.parse::<u64>().ok());
    let end = fields.get(at + 2).map(|s| {
        if *s == "EOF" {
            Some(u64::MAX)
        } else {
            s.parse::<u64>().ok()
        }
    });
    matches!((start, end), (Some(s), Some(Some(e))) if s <= byte && byte <= e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, bytes: &[u8], size: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pv-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size)
            .unwrap();
        path
    }

    #[test]
    fn formats_sizes_and_missing_files_are_refused_by_name() {
        let q = temp("q.img", b"QFI\xfb\0\0\0\x03", 1 << 20);
        let e = Image::open(&q, false, Locking::Off).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::Format {
                    format: "qcow2",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("q.img"), "{e}");
        let vdi = temp(
            "v.img",
            &[[0u8; 0x40].as_slice(), b"\x7f\x10\xda\xbe"].concat(),
            4096,
        );
        assert!(matches!(
            Image::open(&vdi, true, Locking::Off),
            Err(ImageError::Format { format: "VDI", .. })
        ));
        let empty = temp("e.img", b"", 0);
        assert!(matches!(
            Image::open(&empty, false, Locking::Off),
            Err(ImageError::Empty { .. })
        ));
        let odd = temp("o.img", b"", 1000);
        let e = Image::open(&odd, false, Locking::Off).unwrap_err();
        assert!(matches!(e, ImageError::Size { size: 1000, .. }), "{e}");
        let e = Image::open(Path::new("/nonexistent/x.img"), false, Locking::On).unwrap_err();
        assert_eq!(
            e.to_string(),
            "open image /nonexistent/x.img: No such file or directory (os error 2)"
        );
        for (path, kind) in [("/dev/null", "a character device"), ("/tmp", "a directory")] {
            let e = Image::open(Path::new(path), true, Locking::On).unwrap_err();
            assert!(matches!(e, ImageError::NotADisk { .. }), "{e}");
            assert!(e.to_string().contains(kind), "{e}");
        }
        let raw = temp("r.img", b"", 4096);
        assert_eq!(Image::open(&raw, false, Locking::On).unwrap().size(), 4096);
    }

    #[test]
    fn a_writer_excludes_writers_and_readers_share() {
        let p = temp("l.img", b"", 1 << 20);
        let w = Image::open(&p, false, Locking::On).unwrap();
        let e = Image::open(&p, false, Locking::On).unwrap_err();
        assert!(matches!(e, ImageError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("pyvhost (pid"), "{e}");
        assert!(Image::open(&p, true, Locking::On).is_err());
        // force-share reads anyway; no locking ignores it all.
        let fs = Image::open(&p, true, Locking::ForceShare).unwrap();
        assert!(Image::open(&p, false, Locking::Off).is_ok());
        drop((w, fs));
        let r1 = Image::open(&p, true, Locking::On).unwrap();
        let r2 = Image::open(&p, true, Locking::On).unwrap();
        let e = Image::open(&p, false, Locking::On).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not share the write permission"),
            "{e}"
        );
        drop((r1, r2));
        assert!(Image::open(&p, false, Locking::On).is_ok());
        assert!(matches!(
            Image::open(&p, false, Locking::ForceShare),
            Err(ImageError::ForceShareWritable { .. })
        ));
    }
}
