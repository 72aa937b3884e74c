//! The messages read from and written to `/dev/vduse/NAME`: `struct vduse_dev_request` and
//! `struct vduse_dev_response` (152 bytes each), parsed from and encoded to bytes, so the
//! parser is tested on byte buffers without a kernel.

use super::abi::{
    MSG_SIZE, VDUSE_GET_VQ_STATE, VDUSE_REQ_RESULT_FAILED, VDUSE_REQ_RESULT_OK, VDUSE_SET_STATUS,
    VDUSE_UPDATE_IOTLB,
};

/// Offset of the request's union (after type, request_id and 4 reserved words).
const BODY: usize = 24;

/// One request of the kernel, as read from the device fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The driver (or vhost-vdpa's GET_VRING_BASE) asks where queue `index` is: answer
    /// with [`Response::vq_state`].
    GetVqState {
        /// Request id to echo.
        id: u32,
        /// The queue (unchecked: the caller checks it against its queue count).
        index: u32,
    },
    /// The driver wrote the status byte (0 = reset; DRIVER_OK = start).
    SetStatus {
        /// Request id to echo.
        id: u32,
        /// The new status.
        status: u8,
    },
    /// The mappings of IOVAs `start..=last` changed: fetch them again before use.
    UpdateIotlb {
        /// Request id to echo.
        id: u32,
        /// First IOVA.
        start: u64,
        /// Last IOVA (inclusive).
        last: u64,
    },
    /// A type this crate does not know (a newer kernel): answered with a failure.
    Unknown {
        /// Request id to echo.
        id: u32,
        /// The type word.
        kind: u32,
    },
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl Request {
    /// Parses one request; `Err` says why when `bytes` is not a whole request (the kernel
    /// always transfers exactly [`MSG_SIZE`] bytes, so anything else is a bug worth naming).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != MSG_SIZE {
            return Err(format!(
                "{} bytes where a request has {MSG_SIZE}",
                bytes.len()
            ));
        }
        let kind = u32_at(bytes, 0);
        let id = u32_at(bytes, 4);
        Ok(match kind {
            VDUSE_GET_VQ_STATE => Request::GetVqState {
                id,
                index: u32_at(bytes, BODY),
            },
            VDUSE_SET_STATUS => Request::SetStatus {
                id,
                status: bytes[BODY],
            },
            VDUSE_UPDATE_IOTLB => Request::UpdateIotlb {
                id,
                start: u64_at(bytes, BODY),
                last: u64_at(bytes, BODY + 8),
            },
            kind => Request::Unknown { id, kind },
        })
    }

    /// The request id, to echo in the response.
    pub fn id(&self) -> u32 {
        match *self {
            Request::GetVqState { id, .. }
            | Request::SetStatus { id, .. }
            | Request::UpdateIotlb { id, .. }
            | Request::Unknown { id, .. } => id,
        }
    }

    /// The request's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::GetVqState { .. } => "VDUSE_GET_VQ_STATE",
            Request::SetStatus { .. } => "VDUSE_SET_STATUS",
            Request::UpdateIotlb { .. } => "VDUSE_UPDATE_IOTLB",
            Request::Unknown { .. } => "unknown VDUSE request",
        }
    }

    /// Encodes the request as the kernel lays it out (tests, and a peer written in Rust).
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        let (kind, id) = match *self {
            Request::GetVqState { id, index } => {
                b[BODY..BODY + 4].copy_from_slice(&index.to_ne_bytes());
                (VDUSE_GET_VQ_STATE, id)
            }
            Request::SetStatus { id, status } => {
                b[BODY] = status;
                (VDUSE_SET_STATUS, id)
            }
            Request::UpdateIotlb { id, start, last } => {
                b[BODY..BODY + 8].copy_from_slice(&start.to_ne_bytes());
                b[BODY + 8..BODY + 16].copy_from_slice(&last.to_ne_bytes());
                (VDUSE_UPDATE_IOTLB, id)
            }
            Request::Unknown { id, kind } => (kind, id),
        };
        b[0..4].copy_from_slice(&kind.to_ne_bytes());
        b[4..8].copy_from_slice(&id.to_ne_bytes());
        b
    }
}

/// A response written back to the device fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request it answers.
    pub id: u32,
    /// Whether it was handled.
    pub ok: bool,
    /// For GET_VQ_STATE: the queue and its state, as the kernel's union lays it out (split:
    /// the avail index in the first word; packed: `last_avail_counter`, `last_avail_idx`,
    /// `last_used_counter`, `last_used_idx`).
    pub vq_state: Option<(u32, [u16; 4])>,
}

impl Response {
    /// A success with nothing to report (SET_STATUS, UPDATE_IOTLB).
    pub fn ok(id: u32) -> Self {
        Response {
            id,
            ok: true,
            vq_state: None,
        }
    }

    /// A refusal (a bad queue index, an unknown request, a failed start).
    pub fn failed(id: u32) -> Self {
        Response {
            id,
            ok: false,
            vq_state: None,
        }
    }

    /// The answer to GET_VQ_STATE for a split ring: queue `index` resumes at avail index
    /// `avail`.
    pub fn vq_state(id: u32, index: u32, avail: u16) -> Self {
        Self::vq_state_words(id, index, [avail, 0, 0, 0])
    }

    /// The answer to GET_VQ_STATE with the state's four words (a packed ring's).
    pub fn vq_state_words(id: u32, index: u32, words: [u16; 4]) -> Self {
        Response {
            id,
            ok: true,
            vq_state: Some((index, words)),
        }
    }

    /// Encodes it as `struct vduse_dev_response`.
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b[0..4].copy_from_slice(&self.id.to_ne_bytes());
        let result = if self.ok {
            VDUSE_REQ_RESULT_OK
        } else {
            VDUSE_REQ_RESULT_FAILED
        };
        b[4..8].copy_from_slice(&result.to_ne_bytes());
        if let Some((index, words)) = self.vq_state {
            b[BODY..BODY + 4].copy_from_slice(&index.to_ne_bytes());
            for (i, w) in words.iter().enumerate() {
                b[BODY + 4 + 2 * i..BODY + 6 + 2 * i].copy_from_slice(&w.to_ne_bytes());
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_the_kernel_layout() {
        let mut b = [0u8; MSG_SIZE];
        b[0..4].copy_from_slice(&VDUSE_UPDATE_IOTLB.to_ne_bytes());
        b[4..8].copy_from_slice(&7u32.to_ne_bytes());
        b[24..32].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[32..40].copy_from_slice(&0x1fffu64.to_ne_bytes());
        assert_eq!(
            Request::parse(&b),
            Ok(Request::UpdateIotlb {
                id: 7,
                start: 0x1000,
                last: 0x1fff
            })
        );
        b[0..4].copy_from_slice(&VDUSE_SET_STATUS.to_ne_bytes());
        b[24] = 0xf;
        assert_eq!(
            Request::parse(&b),
            Ok(Request::SetStatus { id: 7, status: 0xf })
        );
        b[0..4].copy_from_slice(&VDUSE_GET_VQ_STATE.to_ne_bytes());
        b[24..28].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(
            Request::parse(&b),
            Ok(Request::GetVqState { id: 7, index: 3 })
        );
    }

    #[test]
    fn every_request_round_trips_through_bytes() {
        for r in [
            Request::GetVqState {
                id: 1,
                index: 65535,
            },
            Request::SetStatus { id: 2, status: 0 },
            Request::UpdateIotlb {
                id: 3,
                start: 0,
                last: u64::MAX,
            },
            Request::Unknown { id: 4, kind: 99 },
        ] {
            assert_eq!(Request::parse(&r.encode()), Ok(r));
            assert_eq!(r.id(), Request::parse(&r.encode()).unwrap().id());
        }
    }

    #[test]
    fn unknown_types_and_short_reads_are_named() {
        let r = Request::Unknown { id: 9, kind: 3 };
        assert_eq!(r.name(), "unknown VDUSE request");
        let err = Request::parse(&r.encode()[..100]).unwrap_err();
        assert_eq!(err, "100 bytes where a request has 152");
        assert!(Request::parse(&[0u8; MSG_SIZE + 1]).is_err());
    }

    #[test]
    fn responses_encode_to_the_kernel_layout() {
        let b = Response::vq_state(5, 2, 0x1234).encode();
        assert_eq!(u32_at(&b, 0), 5);
        assert_eq!(u32_at(&b, 4), VDUSE_REQ_RESULT_OK);
        assert_eq!(u32_at(&b, 24), 2);
        assert_eq!(u16::from_ne_bytes([b[28], b[29]]), 0x1234);
        let p = Response::vq_state_words(5, 1, [1, 0x7ffe, 0, 3]).encode();
        assert_eq!(u32_at(&p, 24), 1);
        let word = |o: usize| u16::from_ne_bytes([p[o], p[o + 1]]);
        assert_eq!([word(28), word(30), word(32), word(34)], [1, 0x7ffe, 0, 3]);
        let f = Response::failed(6).encode();
        assert_eq!(u32_at(&f, 4), VDUSE_REQ_RESULT_FAILED);
        assert!(f[8..].iter().all(|&x| x == 0));
        assert_eq!(u32_at(&Response::ok(8).encode(), 4), VDUSE_REQ_RESULT_OK);
    }
}
