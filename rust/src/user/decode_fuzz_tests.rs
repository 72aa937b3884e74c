//! Bounded random testing of the decoders: any body, any size, any fd count, for every
//! request code, must give `Ok` or an error — never a panic — and a decoded request must
//! re-encode to the body it came from (no field silently dropped).

use std::fs::File;
use std::os::fd::OwnedFd;

use super::codes::{BackendReq, FrontendReq};
use super::message::{BackendRequest, FrontendRequest};

/// xorshift64*: deterministic, so a failure reproduces from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Mostly small values and boundary values, which is where layouts break.
    fn field_byte(&mut self) -> u8 {
        match self.below(4) {
            0 => 0,
            1 => 0xff,
            _ => self.next() as u8,
        }
    }
}

fn fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| OwnedFd::from(File::open("/dev/null").unwrap()))
        .collect()
}

fn body(rng: &mut Rng, sizes: &[usize]) -> Vec<u8> {
    let len = if rng.below(3) == 0 {
        rng.below(300) as usize
    } else {
        sizes[rng.below(sizes.len() as u64) as usize]
    };
    (0..len).map(|_| rng.field_byte()).collect()
}

/// Sizes of the fixed layouts, so that many bodies get past the size check.
const SIZES: &[usize] = &[0, 8, 12, 16, 20, 24, 32, 40, 72, 104, 136, 268];

#[test]
fn frontend_requests_never_panic_and_round_trip() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut decoded = 0;
    for round in 0..100_000 {
        let code = FrontendReq::ALL[rng.below(FrontendReq::ALL.len() as u64) as usize];
        let b = body(&mut rng, SIZES);
        let nfds = rng.below(4) as usize;
        if let Ok(req) = FrontendRequest::decode(code, &b, fds(nfds)) {
            decoded += 1;
            assert_eq!(req.kind(), code, "round {round}");
            let again = req.encode_body();
            let n = again.len();
            // Padding is written as zero, so compare after a second decode.
            let req2 = FrontendRequest::decode(code, &again, fds(nfds))
                .unwrap_or_else(|e| panic!("round {round}: {code:?} re-decode failed: {e}"));
            assert_eq!(req2.encode_body(), again, "round {round}: {code:?}");
            assert_eq!(n, b.len(), "round {round}: {code:?} changed size");
        }
    }
    assert!(
        decoded > 1200,
        "only {decoded} bodies decoded: generator too weak"
    );
}

#[test]
fn backend_requests_never_panic_and_round_trip() {
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    let mut decoded = 0;
    for round in 0..50_000 {
        let code = BackendReq::ALL[rng.below(BackendReq::ALL.len() as u64) as usize];
        let b = body(&mut rng, SIZES);
        let nfds = rng.below(3) as usize;
        if let Ok(req) = BackendRequest::decode(code, &b, fds(nfds)) {
            decoded += 1;
            let again = req.encode_body();
            let req2 = BackendRequest::decode(code, &again, fds(nfds))
                .unwrap_or_else(|e| panic!("round {round}: {code:?} re-decode failed: {e}"));
            assert_eq!(req2.encode_body(), again, "round {round}: {code:?}");
        }
    }
    assert!(
        decoded > 300,
        "only {decoded} bodies decoded: generator too weak"
    );
}

/// The `GET_SHMEM_CONFIG` reply a hostile back-end sends: any body decodes to a config or
/// an error, never a panic, and a decoded config re-encodes to the same bytes (padding
/// aside): the count is always the number of non-zero sizes.
#[test]
fn shmem_config_replies_never_panic_and_round_trip() {
    use super::payload::ShmemConfig;
    let mut rng = Rng(0x5eed_1234_abcd_0003);
    let sizes = [
        ShmemConfig::SIZE,
        ShmemConfig::SIZE - 8,
        ShmemConfig::SIZE + 8,
    ];
    let mut decoded = 0;
    for round in 0..5_000 {
        let mut b = body(&mut rng, &sizes);
        if b.len() == ShmemConfig::SIZE && rng.below(2) == 0 {
            // Zero some sizes, then make the count honest half of the time.
            for chunk in b[8..].chunks_mut(8) {
                if rng.below(2) == 0 {
                    chunk.fill(0);
                }
            }
            let used = b[8..]
                .chunks(8)
                .filter(|c| c.iter().any(|&x| x != 0))
                .count();
            b[..4].copy_from_slice(&(used as u32).to_ne_bytes());
        }
        if let Ok(cfg) = ShmemConfig::from_bytes(&b) {
            decoded += 1;
            let again = cfg.to_bytes();
            assert_eq!(again[..4], b[..4], "round {round}: count");
            assert_eq!(again[8..], b[8..], "round {round}: sizes");
            assert_eq!(
                ShmemConfig::from_regions(&cfg.regions()).unwrap(),
                cfg,
                "round {round}"
            );
        }
    }
    assert!(
        decoded > 500,
        "only {decoded} replies decoded: generator too weak"
    );
}
