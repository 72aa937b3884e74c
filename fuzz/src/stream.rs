//! A hostile vhost-user byte stream with fds, as the session targets feed it to a peer.
//!
//! The input is a sequence of chunks: a control byte, a 12-byte header, then as many body
//! bytes as the header's `size` field says (fewer at the end of the input). The header is
//! sent as it is, so a chunk may lie about its size, flags or code. The control byte says
//! how the chunk travels:
//! - bits 0-1: how many fds ride on the header (0-3);
//! - bits 2-3: what they are: 0 the guest-memory memfd, 1 an eventfd, 2 `/dev/null`, 3 one
//!   end of a socketpair whose other end is closed at once;
//! - bit 4: the body goes in a second `sendmsg` (a message split across reads).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use vhost_core::sys::{dup_cloexec, send_all};
use vhost_core::user::header::Header;

/// What fds a chunk carries (control byte bits 2-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    Memory = 0,
    EventFd = 1,
    DevNull = 2,
    Socket = 3,
}

/// One chunk of a stream, for the seed builders.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub fds: u8,
    pub kind: FdKind,
    pub split: bool,
    pub header: Header,
    pub body: Vec<u8>,
}

impl Chunk {
    /// A well-formed message without fds.
    pub fn message(header: Header, body: Vec<u8>) -> Self {
        Chunk {
            fds: 0,
            kind: FdKind::Memory,
            split: false,
            header,
            body,
        }
    }

    /// The same message carrying `n` fds of `kind`.
    pub fn with_fds(mut self, n: u8, kind: FdKind) -> Self {
        self.fds = n;
        self.kind = kind;
        self
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push((self.fds & 3) | ((self.kind as u8) << 2) | (u8::from(self.split) << 4));
        out.extend_from_slice(&self.header.to_bytes());
        out.extend_from_slice(&self.body);
    }
}

/// Encodes chunks into one fuzz input.
pub fn encode(chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        c.encode(&mut out);
    }
    out
}

fn make_fd(kind: u8, memory: BorrowedFd<'_>) -> Option<OwnedFd> {
    match kind {
        0 => dup_cloexec(memory).ok(),
        1 => {
            // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            // SAFETY: as above.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        }
        2 => File::open("/dev/null").ok().map(OwnedFd::from),
        _ => UnixStream::pair().ok().map(|(a, _)| OwnedFd::from(a)),
    }
}

/// Sends the chunks of `data` on `sock` until the input ends or the peer goes away.
/// `memory` is the memfd sent for fd kind 0.
pub fn send(sock: &UnixStream, data: &[u8], memory: BorrowedFd<'_>) {
    let mut rest = data;
    while let Some((&ctrl, tail)) = rest.split_first() {
        let hlen = tail.len().min(12);
        let (header, tail) = tail.split_at(hlen);
        let size = if hlen == 12 {
            u32::from_ne_bytes(header[8..12].try_into().expect("4 bytes")) as usize
        } else {
            0
        };
        let (body, tail) = tail.split_at(size.min(tail.len()));
        rest = tail;
        let owned: Vec<OwnedFd> = (0..ctrl & 3)
            .filter_map(|_| make_fd((ctrl >> 2) & 3, memory))
            .collect();
        let fds: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
        let sent = if ctrl & 0x10 != 0 {
            send_all(sock.as_fd(), header, &fds).and_then(|()| send_all(sock.as_fd(), body, &[]))
        } else {
            let whole = [header, body].concat();
            send_all(sock.as_fd(), &whole, &fds)
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Reads and drops whatever the peer sends until it closes (its replies or requests),
/// closing any fds that came with them.
pub fn drain(sock: &UnixStream) {
    let mut buf = vec![0u8; 65536];
    loop {
        match vhost_core::sys::recv_with_fds(sock.as_fd(), &mut buf, 8) {
            Ok(r) if r.len == 0 => return,
            Ok(_) => {}
            // Too many fds at once: they were closed, the bytes were read.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(_) => return,
        }
    }
}
