//! Seed derivation, at the bottom of the layers: every random stream of a run (data order,
//! augmentation, mixup, stochastic depth, detection's samplers) is seeded by a pure function of
//! the run's seed and its position, so that resuming a run replays it exactly.

/// A 64-bit seed for a named random stream at a given position, so that every random choice is a
/// pure function of (seed, stream, epoch, step) and resuming a run replays it exactly.
pub fn derive_seed(seed: u64, stream: &str, a: u64, b: u64) -> u64 {
    // SplitMix64 over the inputs: cheap, well mixed, stable across platforms.
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut mix = |v: u64| {
        x = x.wrapping_add(v).wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x = z ^ (z >> 31);
    };
    for byte in stream.bytes() {
        mix(byte as u64);
    }
    mix(a);
    mix(b);
    x
}
