//! The request decoders: any code, body and fd count gives a request or an error, never a
//! panic; a decoded request re-encodes (with the encoder the sender uses) to a body that
//! decodes to the same request and has the size of the original; a header round-trips
//! through its 12 bytes, and one that passes the request checks is a version-1 request
//! with a body the protocol allows.
//!
//! Input: byte 0 picks the direction (bit 0: front-end to back-end, or back-end channel)
//! and byte 1 the request, byte 2 the number of fds (0-3); the rest is the body, whose
//! first 12 bytes are also decoded as a header.

use std::fs::File;
use std::os::fd::OwnedFd;

use vhost_core::user::codes::{BackendReq, FrontendReq};
use vhost_core::user::header::{Header, HEADER_SIZE, MAX_BODY_SIZE};
use vhost_core::user::message::{BackendRequest, FrontendRequest};

use crate::input::Input;

fn fds(n: u8) -> Vec<OwnedFd> {
    (0..n)
        .filter_map(|_| File::open("/dev/null").ok().map(OwnedFd::from))
        .collect()
}

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let backend = input.bool();
    let pick = usize::from(input.u8());
    let nfds = input.u8() % 4;
    let body = input.0;

    if let Ok(bytes) = <[u8; HEADER_SIZE]>::try_from(&body[..body.len().min(HEADER_SIZE)]) {
        let h = Header::from_bytes(&bytes);
        assert_eq!(h.to_bytes(), bytes, "header round trip");
        if h.check_request().is_ok() {
            assert!(!h.is_reply(), "a request header with REPLY passed: {h:?}");
            assert!(
                h.size as usize <= MAX_BODY_SIZE,
                "oversized body passed: {h:?}"
            );
        }
    }

    if backend {
        let code = BackendReq::ALL[pick % BackendReq::ALL.len()];
        if let Ok(req) = BackendRequest::decode(code, body, fds(nfds)) {
            assert_eq!(req.kind(), code);
            let again = req.encode_body();
            let req2 = BackendRequest::decode(code, &again, fds(nfds))
                .unwrap_or_else(|e| panic!("{code:?}: re-decode of its own encoding failed: {e}"));
            assert_eq!(req2.encode_body(), again, "{code:?}: encoding not stable");
        }
    } else {
        let code = FrontendReq::ALL[pick % FrontendReq::ALL.len()];
        if let Ok(req) = FrontendRequest::decode(code, body, fds(nfds)) {
            assert_eq!(req.kind(), code);
            let again = req.encode_body();
            assert_eq!(
                again.len(),
                body.len(),
                "{code:?}: encoding changed the size"
            );
            let req2 = FrontendRequest::decode(code, &again, fds(nfds))
                .unwrap_or_else(|e| panic!("{code:?}: re-decode of its own encoding failed: {e}"));
            assert_eq!(req2.kind(), code);
            assert_eq!(req2.encode_body(), again, "{code:?}: encoding not stable");
        }
    }
}
