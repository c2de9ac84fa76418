//! Key and value generation.
//!
//! Keys are fixed-size, zero-padded decimal numbers (`00004711` for index 4711 with
//! 8-byte keys), so every key is URL-safe, all keys have exactly `key_size` bytes, and
//! the same index names the same key in every system and every run.

use bytes::Bytes;
use rand::distributions::Alphanumeric;
use rand::{Rng, SeedableRng};

/// Largest key size accepted (keys travel in URL paths).
pub const MAX_KEY_SIZE: usize = 1024;
/// Largest value size accepted.
pub const MAX_VALUE_SIZE: usize = 16 * 1024 * 1024;

/// Why a key space cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeySpaceError {
    /// The key space must hold at least one key.
    #[error("--keys must be at least 1")]
    NoKeys,
    /// The key size is 0 or larger than [`MAX_KEY_SIZE`].
    #[error("--key-size must be between 1 and {MAX_KEY_SIZE}, got {0}")]
    KeySize(usize),
    /// The keys do not fit in `key_size` decimal digits.
    #[error("--keys {keys} needs keys of at least {needed} bytes, but --key-size is {key_size}")]
    TooManyKeys {
        /// Number of distinct keys asked for.
        keys: u64,
        /// Digits the largest index needs.
        needed: usize,
        /// Key size asked for.
        key_size: usize,
    },
}

/// A set of `keys` distinct keys of `key_size` bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpace {
    key_size: usize,
    keys: u64,
}

/// Number of decimal digits of `n` (at least 1).
fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

impl KeySpace {
    /// Builds a key space, checking that `keys` distinct keys fit in `key_size` bytes.
    pub fn new(key_size: usize, keys: u64) -> Result<Self, KeySpaceError> {
        if keys == 0 {
            return Err(KeySpaceError::NoKeys);
        }
        if key_size == 0 || key_size > MAX_KEY_SIZE {
            return Err(KeySpaceError::KeySize(key_size));
        }
        let needed = digits(keys - 1);
        if needed > key_size {
            return Err(KeySpaceError::TooManyKeys {
                keys,
                needed,
                key_size,
            });
        }
        Ok(KeySpace { key_size, keys })
    }

    /// Number of distinct keys.
    pub fn len(&self) -> u64 {
        self.keys
    }

    /// Always false: a key space holds at least one key.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Size of every key in bytes.
    pub fn key_size(&self) -> usize {
        self.key_size
    }

    /// Writes the key with the given index (taken modulo the key-space size) into `out`,
    /// replacing its contents. No allocation once `out` has grown to `key_size`.
    pub fn write_key(&self, index: u64, out: &mut String) {
        use std::fmt::Write as _;
        out.clear();
        // Writing into a String cannot fail.
        let _ = write!(out, "{:0width$}", index % self.keys, width = self.key_size);
    }

    /// Picks a key index uniformly at random.
    pub fn pick<R: Rng>(&self, rng: &mut R) -> u64 {
        rng.gen_range(0..self.keys)
    }
}

/// A value of `size` alphanumeric bytes derived from `seed` (printable, so it survives
/// every system's API unchanged, including JSON string fields).
pub fn make_value(size: usize, seed: u64) -> Bytes {
    let rng = rand::rngs::StdRng::seed_from_u64(seed);
    rng.sample_iter(Alphanumeric)
        .take(size)
        .collect::<Vec<u8>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn keys_are_fixed_size_zero_padded() {
        let ks = KeySpace::new(8, 100_000).unwrap();
        let mut buf = String::new();
        ks.write_key(0, &mut buf);
        assert_eq!(buf, "00000000");
        ks.write_key(4711, &mut buf);
        assert_eq!(buf, "00004711");
        ks.write_key(99_999, &mut buf);
        assert_eq!(buf, "00099999");
        // Indices wrap around the key space.
        ks.write_key(100_001, &mut buf);
        assert_eq!(buf, "00000001");
    }

    #[test]
    fn keys_are_distinct_and_fill_exactly() {
        let ks = KeySpace::new(3, 1000).unwrap();
        let mut buf = String::new();
        let mut seen = HashSet::new();
        for i in 0..1000 {
            ks.write_key(i, &mut buf);
            assert_eq!(buf.len(), 3);
            assert!(buf.bytes().all(|b| b.is_ascii_digit()));
            assert!(seen.insert(buf.clone()), "duplicate key at {i}");
        }
    }

    #[test]
    fn rejects_key_spaces_that_do_not_fit() {
        assert_eq!(KeySpace::new(8, 0), Err(KeySpaceError::NoKeys));
        assert_eq!(KeySpace::new(0, 10), Err(KeySpaceError::KeySize(0)));
        assert_eq!(
            KeySpace::new(2, 101),
            Err(KeySpaceError::TooManyKeys {
                keys: 101,
                needed: 3,
                key_size: 2
            })
        );
        // 100 keys are 00..99: two digits are enough.
        assert!(KeySpace::new(2, 100).is_ok());
        assert!(KeySpace::new(1, 1).is_ok());
    }

    #[test]
    fn picks_stay_in_range() {
        let ks = KeySpace::new(4, 7).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let picks: HashSet<u64> = (0..1000).map(|_| ks.pick(&mut rng)).collect();
        assert!(picks.iter().all(|p| *p < 7));
        assert_eq!(
            picks.len(),
            7,
            "uniform picks should cover a tiny key space"
        );
    }

    #[test]
    fn values_have_the_requested_size_and_are_printable() {
        let v = make_value(256, 42);
        assert_eq!(v.len(), 256);
        assert!(v.iter().all(u8::is_ascii_alphanumeric));
        assert_eq!(v, make_value(256, 42));
        assert_ne!(v, make_value(256, 43));
        assert!(make_value(0, 1).is_empty());
    }
}
