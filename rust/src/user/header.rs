//! The 12-byte message header: request code, flags, body size, all in host byte order.
//!
//! Every check here runs on the header alone, before any body byte is read, so a hostile
//! size never reaches an allocation (ADVERSARIAL A3, A4, H2).

use super::{Error, Result};

/// Bytes in a header.
pub const HEADER_SIZE: usize = 12;

/// Largest body accepted (rust-vmm's `MAX_MSG_SIZE`). The largest body the spec defines
/// is the 2056-byte `GET_SHMEM_CONFIG` reply, so this is a bound, not a layout.
pub const MAX_BODY_SIZE: usize = 4096;

/// The `flags` field.
pub mod flags {
    /// Bits 0-1: protocol version.
    pub const VERSION_MASK: u32 = 0x3;
    /// The only version there is.
    pub const VERSION: u32 = 1;
    /// Bit 2: this message is a reply.
    pub const REPLY: u32 = 1 << 2;
    /// Bit 3: the sender wants a reply (REPLY_ACK, or requests that always get one).
    pub const NEED_REPLY: u32 = 1 << 3;
    /// Every bit with a meaning; the rest are reserved and must be zero.
    pub const KNOWN: u32 = VERSION_MASK | REPLY | NEED_REPLY;
}

/// The 12-byte header of every vhost-user message (`VhostUserMsg` without its body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The request code (front-end or back-end table, by direction).
    pub code: u32,
    /// Version (bits 0-1), REPLY (bit 2) and NEED_REPLY (bit 3).
    pub flags: u32,
    /// Body bytes that follow.
    pub size: u32,
}

impl Header {
    /// A request header: version 1, `NEED_REPLY` if asked.
    pub fn request(code: u32, size: u32, need_reply: bool) -> Self {
        let mut f = flags::VERSION;
        if need_reply {
            f |= flags::NEED_REPLY;
        }
        Header {
            code,
            flags: f,
            size,
        }
    }

    /// The header of a reply to this request: same code, exactly `VERSION | REPLY` (QEMU
    /// rejects replies with any other flag value).
    pub fn reply_to(&self, size: u32) -> Self {
        Header {
            code: self.code,
            flags: flags::VERSION | flags::REPLY,
            size,
        }
    }

    /// The header as sent, in native byte order (the protocol runs on one host).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.code.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// Reads a header as received; checks are the caller's (by direction and request).
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            code: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// Whether the sender asked for a REPLY_ACK status.
    pub fn needs_reply(&self) -> bool {
        self.flags & flags::NEED_REPLY != 0
    }

    /// Whether this is a reply rather than a request.
    pub fn is_reply(&self) -> bool {
        self.flags & flags::REPLY != 0
    }

    /// Version 1 and no reserved flag bit.
    fn check_common(&self) -> Result<()> {
        let version = self.flags & flags::VERSION_MASK;
        if version != flags::VERSION {
            return Err(Error::InvalidHeader(format!(
                "version {version}, expected {}",
                flags::VERSION
            )));
        }
        let reserved = self.flags & !flags::KNOWN;
        if reserved != 0 {
            return Err(Error::InvalidHeader(format!(
                "reserved flag bits {reserved:#x} set"
            )));
        }
        Ok(())
    }

    fn check_size(&self) -> Result<()> {
        if self.size as usize > MAX_BODY_SIZE {
            return Err(Error::OversizedMessage(self.size));
        }
        Ok(())
    }

    /// Checks a received request header: version 1, no reserved flag bits, `REPLY`
    /// clear, body no larger than [`MAX_BODY_SIZE`]. The code is not checked here (the
    /// channel knows which request set applies).
    pub fn check_request(&self) -> Result<()> {
        self.check_common()?;
        if self.is_reply() {
            return Err(Error::InvalidHeader("REPLY flag set on a request".into()));
        }
        self.check_size()
    }

    /// Checks a received reply header against the request code it must answer: version
    /// 1, no reserved bits, `REPLY` set, `NEED_REPLY` clear, same code, size bound.
    pub fn check_reply_to(&self, code: u32) -> Result<()> {
        self.check_common()?;
        if !self.is_reply() {
            return Err(Error::InvalidHeader("REPLY flag missing on a reply".into()));
        }
        if self.needs_reply() {
            return Err(Error::InvalidHeader(
                "NEED_REPLY flag set on a reply".into(),
            ));
        }
        if self.code != code {
            return Err(Error::ReplyMismatch(format!(
                "reply carries request code {}, expected {code}",
                self.code
            )));
        }
        self.check_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trip() {
        let h = Header {
            code: 0x0102_0304,
            flags: 0x0506_0708,
            size: 0x090A_0B0C,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..4], &0x0102_0304u32.to_ne_bytes());
        assert_eq!(&b[4..8], &0x0506_0708u32.to_ne_bytes());
        assert_eq!(&b[8..12], &0x090A_0B0Cu32.to_ne_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn constructors() {
        let r = Header::request(5, 40, false);
        assert_eq!(r.flags, 1);
        assert!(!r.needs_reply() && !r.is_reply());
        r.check_request().unwrap();
        let r = Header::request(5, 40, true);
        assert_eq!(r.flags, 0x9);
        assert!(r.needs_reply());
        r.check_request().unwrap();
        let reply = r.reply_to(8);
        assert_eq!(
            reply,
            Header {
                code: 5,
                flags: 0x5,
                size: 8
            }
        );
        reply.check_reply_to(5).unwrap();
    }

    #[test]
    fn request_version_checks() {
        for version in [0u32, 2, 3] {
            let h = Header {
                code: 1,
                flags: version,
                size: 0,
            };
            assert!(matches!(h.check_request(), Err(Error::InvalidHeader(_))));
        }
    }

    #[test]
    fn request_reserved_bits() {
        for bit in 4..32 {
            let h = Header {
                code: 1,
                flags: flags::VERSION | (1 << bit),
                size: 0,
            };
            assert!(
                matches!(h.check_request(), Err(Error::InvalidHeader(_))),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn request_with_reply_bit() {
        let h = Header {
            code: 1,
            flags: flags::VERSION | flags::REPLY,
            size: 0,
        };
        assert!(matches!(h.check_request(), Err(Error::InvalidHeader(_))));
    }

    #[test]
    fn request_size_bound() {
        let ok = Header::request(1, MAX_BODY_SIZE as u32, false);
        ok.check_request().unwrap();
        for size in [MAX_BODY_SIZE as u32 + 1, 0x10000, 0xFFFF_FFFF] {
            let h = Header::request(1, size, false);
            assert!(matches!(h.check_request(), Err(Error::OversizedMessage(s)) if s == size));
        }
    }

    #[test]
    fn reply_checks() {
        let good = Header {
            code: 24,
            flags: flags::VERSION | flags::REPLY,
            size: 12,
        };
        good.check_reply_to(24).unwrap();
        // Wrong code.
        assert!(matches!(
            good.check_reply_to(1),
            Err(Error::ReplyMismatch(_))
        ));
        // REPLY missing.
        let h = Header {
            flags: flags::VERSION,
            ..good
        };
        assert!(matches!(h.check_reply_to(24), Err(Error::InvalidHeader(_))));
        // NEED_REPLY on a reply.
        let h = Header {
            flags: flags::VERSION | flags::REPLY | flags::NEED_REPLY,
            ..good
        };
        assert!(matches!(h.check_reply_to(24), Err(Error::InvalidHeader(_))));
        // Bad version / reserved bit.
        let h = Header {
            flags: 2 | flags::REPLY,
            ..good
        };
        assert!(matches!(h.check_reply_to(24), Err(Error::InvalidHeader(_))));
        let h = Header {
            flags: flags::VERSION | flags::REPLY | 0x100,
            ..good
        };
        assert!(matches!(h.check_reply_to(24), Err(Error::InvalidHeader(_))));
        // Oversized.
        let h = Header {
            size: 0xFFFF_FFFF,
            ..good
        };
        assert!(matches!(
            h.check_reply_to(24),
            Err(Error::OversizedMessage(_))
        ));
    }
}
