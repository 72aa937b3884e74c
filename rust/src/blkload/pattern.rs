//! The verification pattern: every 8-byte little-endian word of the disk has a value
//! derived from its absolute byte offset and a generation number, so a block read back
//! proves both *where* it was written and *which* pass wrote it.
//!
//! `word(p, g) = splitmix64(p ^ (g << 40))` for the word at byte offset `p` (a multiple
//! of 8) written by generation `g`. Anyone can recompute it (the Python tests do,
//! independently) to check an image file on the host.

/// One step of the splitmix64 generator: a cheap bijective 64-bit mixer.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The value of the word at byte `offset` (a multiple of 8) for `generation`.
pub fn word(offset: u64, generation: u32) -> u64 {
    splitmix64(offset ^ (u64::from(generation) << 40))
}

/// Fills `buf` (a multiple of 8 bytes) with the pattern of the disk bytes starting at
/// `offset` (a multiple of 8).
pub fn fill(buf: &mut [u8], offset: u64, generation: u32) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(offset + 8 * i as u64, generation).to_le_bytes());
    }
}

/// Whether `buf` holds the pattern of `generation` for the disk bytes from `offset`.
pub fn matches(buf: &[u8], offset: u64, generation: u32) -> bool {
    buf.chunks_exact(8).enumerate().all(|(i, chunk)| {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        u64::from_le_bytes(w) == word(offset + 8 * i as u64, generation)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // splitmix64 from seed 0: the first output of the reference generator.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(word(0, 0), splitmix64(0));
        assert_eq!(word(8, 1), splitmix64(8 ^ (1 << 40)));
    }

    #[test]
    fn fill_then_match_and_detect_changes() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 8192, 3);
        assert!(matches(&buf, 8192, 3));
        assert!(!matches(&buf, 8192, 4), "another generation");
        assert!(!matches(&buf, 8192 + 512, 3), "another offset");
        buf[4000] ^= 1;
        assert!(!matches(&buf, 8192, 3), "one flipped bit");
    }
}
