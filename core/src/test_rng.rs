//! The seeded generator core's randomized tests share (splitmix64: small, fast, and good enough
//! to draw test inputs; seeded, so a failure reproduces).

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// Up to 39 bytes drawn from `from`.
    pub(crate) fn bytes(&mut self, from: &[u8]) -> Vec<u8> {
        let len = self.below(40);
        (0..len).map(|_| from[self.below(from.len())]).collect()
    }
}
