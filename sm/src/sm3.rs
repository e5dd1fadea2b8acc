//! SM3 hash (GB/T 32905).

use sm3::{Digest, Sm3};

/// SM3 digest of `data`.
pub fn sm3_hash(data: &[u8]) -> [u8; 32] {
    Sm3::digest(data).into()
}

/// SM3 digest of `data`, lower-case hex.
pub fn sm3_hex(data: &[u8]) -> String {
    hex::encode(sm3_hash(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbt_32905_vectors() {
        assert_eq!(
            sm3_hex(b"abc"),
            "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
        );
        assert_eq!(
            sm3_hex(&b"abcd".repeat(16)),
            "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"
        );
    }
}
