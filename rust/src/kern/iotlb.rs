//! IOTLB messages on a vhost or vDPA fd (the seed's `VhostIotlbBackend` and its parser):
//! `struct vhost_msg_v2` written to the device to map and unmap I/O virtual addresses,
//! and read from it when the kernel reports a miss or an access failure.

use super::abi::{self, IotlbMsg, MsgV2};
use super::error::{Error, Result};

/// `struct vhost_msg` (v1): the same 72 bytes with an `int` type and no address space.
const VHOST_IOTLB_MSG_V1: u32 = 0x1;
/// Bytes of one message on the fd, v1 and v2 alike.
pub const MSG_SIZE: usize = std::mem::size_of::<MsgV2>();

/// One IOTLB message, decoded. `kind` and `perm` are the `VHOST_IOTLB_*` and
/// `VHOST_ACCESS_*` values of `linux/vhost_types.h`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbMessage {
    /// I/O virtual address: what the device uses.
    pub iova: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// Address in this process the range maps to (updates only).
    pub uaddr: u64,
    /// `VHOST_ACCESS_*`: what the device may do there (updates only).
    pub perm: u8,
    /// `VHOST_IOTLB_*`: update, invalidate, miss or the batch markers.
    pub kind: u8,
    /// Address space id (vDPA with `VHOST_BACKEND_F_IOTLB_ASID`; 0 otherwise).
    pub asid: u32,
}

impl IotlbMessage {
    /// An update: map `size` bytes at `iova` to `uaddr` with `perm`.
    pub fn update(iova: u64, size: u64, uaddr: u64, perm: u8, asid: u32) -> Self {
        IotlbMessage {
            iova,
            size,
            uaddr,
            perm,
            kind: abi::VHOST_IOTLB_UPDATE,
            asid,
        }
    }

    /// An invalidation: unmap `size` bytes at `iova`.
    pub fn invalidate(iova: u64, size: u64, asid: u32) -> Self {
        IotlbMessage {
            iova,
            size,
            kind: abi::VHOST_IOTLB_INVALIDATE,
            asid,
            ..Default::default()
        }
    }

    /// A batch marker (`VHOST_IOTLB_BATCH_BEGIN`/`END`); the kernel ignores the rest.
    pub fn batch(begin: bool, asid: u32) -> Self {
        IotlbMessage {
            kind: if begin {
                abi::VHOST_IOTLB_BATCH_BEGIN
            } else {
                abi::VHOST_IOTLB_BATCH_END
            },
            asid,
            ..Default::default()
        }
    }

    /// Checks the fields the kernel would otherwise reject with a bare EINVAL/EFAULT:
    /// known kind and permission bits.
    pub fn check(&self) -> Result<()> {
        if !(abi::VHOST_IOTLB_MISS..=abi::VHOST_IOTLB_BATCH_END).contains(&self.kind) {
            return Err(Error::InvalidParam(format!(
                "unknown IOTLB message type {}",
                self.kind
            )));
        }
        if self.perm & !abi::VHOST_ACCESS_RW != 0 {
            return Err(Error::InvalidParam(format!(
                "unknown IOTLB permission bits {:#x}",
                self.perm
            )));
        }
        Ok(())
    }

    /// The 72 bytes of `struct vhost_msg_v2`, padding zeroed.
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut out = [0u8; MSG_SIZE];
        out[0..4].copy_from_slice(&abi::VHOST_IOTLB_MSG_V2.to_ne_bytes());
        out[4..8].copy_from_slice(&self.asid.to_ne_bytes());
        out[8..16].copy_from_slice(&self.iova.to_ne_bytes());
        out[16..24].copy_from_slice(&self.size.to_ne_bytes());
        out[24..32].copy_from_slice(&self.uaddr.to_ne_bytes());
        out[32] = self.perm;
        out[33] = self.kind;
        out
    }

    /// Decodes one message as the kernel writes it: v2 (`VHOST_IOTLB_MSG_V2`, with an
    /// address space) or v1 (`VHOST_IOTLB_MSG`, address space 0).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != MSG_SIZE {
            return Err(Error::Malformed(format!(
                "an IOTLB message is {MSG_SIZE} bytes, got {}",
                bytes.len()
            )));
        }
        let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
        let asid = match u32_at(0) {
            abi::VHOST_IOTLB_MSG_V2 => u32_at(4),
            VHOST_IOTLB_MSG_V1 => 0,
            other => {
                return Err(Error::Malformed(format!(
                    "message type {other:#x} is not an IOTLB message"
                )))
            }
        };
        let msg = IotlbMessage {
            iova: u64_at(8),
            size: u64_at(16),
            uaddr: u64_at(24),
            perm: bytes[32],
            kind: bytes[33],
            asid,
        };
        msg.check().map_err(|e| Error::Malformed(e.to_string()))?;
        Ok(msg)
    }
}

impl From<&IotlbMessage> for IotlbMsg {
    fn from(m: &IotlbMessage) -> Self {
        IotlbMsg {
            iova: m.iova,
            size: m.size,
            uaddr: m.uaddr,
            perm: m.perm,
            kind: m.kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_the_struct_layout() {
        use std::mem::offset_of;
        let m = IotlbMessage::update(0x1000, 0x2000, 0x7f00_0000_0000, abi::VHOST_ACCESS_RO, 3);
        let bytes = m.encode();
        let base = offset_of!(MsgV2, iotlb);
        let at = |off: usize, len: usize| &bytes[off..off + len];
        assert_eq!(at(offset_of!(MsgV2, kind), 4), &2u32.to_ne_bytes());
        assert_eq!(at(offset_of!(MsgV2, asid), 4), &3u32.to_ne_bytes());
        assert_eq!(
            at(base + offset_of!(IotlbMsg, iova), 8),
            &0x1000u64.to_ne_bytes()
        );
        assert_eq!(
            at(base + offset_of!(IotlbMsg, size), 8),
            &0x2000u64.to_ne_bytes()
        );
        let uaddr = 0x7f00_0000_0000u64.to_ne_bytes();
        assert_eq!(at(base + offset_of!(IotlbMsg, uaddr), 8), &uaddr);
        assert_eq!(
            bytes[base + offset_of!(IotlbMsg, perm)],
            abi::VHOST_ACCESS_RO
        );
        assert_eq!(
            bytes[base + offset_of!(IotlbMsg, kind)],
            abi::VHOST_IOTLB_UPDATE
        );
        assert!(bytes[34..].iter().all(|&b| b == 0));
        assert_eq!(IotlbMessage::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn decode_accepts_v1_and_rejects_garbage() {
        let mut bytes = IotlbMessage::invalidate(0x4000, 0x1000, 0).encode();
        bytes[0..4].copy_from_slice(&1u32.to_ne_bytes());
        bytes[4..8].copy_from_slice(&0xdead_u32.to_ne_bytes()); // v1 padding, ignored
        let m = IotlbMessage::decode(&bytes).unwrap();
        assert_eq!(
            (m.kind, m.asid, m.iova),
            (abi::VHOST_IOTLB_INVALIDATE, 0, 0x4000)
        );

        assert!(matches!(
            IotlbMessage::decode(&bytes[..71]),
            Err(Error::Malformed(_))
        ));
        bytes[0..4].copy_from_slice(&7u32.to_ne_bytes());
        assert!(matches!(
            IotlbMessage::decode(&bytes),
            Err(Error::Malformed(_))
        ));
        let mut bad = IotlbMessage::batch(true, 0).encode();
        bad[33] = 9;
        assert!(matches!(
            IotlbMessage::decode(&bad),
            Err(Error::Malformed(_))
        ));
        let mut perm = IotlbMessage::batch(false, 0).encode();
        perm[32] = 0x4;
        assert!(matches!(
            IotlbMessage::decode(&perm),
            Err(Error::Malformed(_))
        ));
    }
}
