//! Shared strict encodings: base64 (RFC 4648 §4, padded), base64url (§5, unpadded)
//! and the length-prefixed byte strings the canonical forms are built from.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

/// Standard base64 with padding.
pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Strict standard base64: padding required, no whitespace, no non-zero trailing bits.
/// `max_decoded` is checked on the text length before anything is decoded.
pub(crate) fn b64_decode(text: &str, max_decoded: usize) -> Option<Vec<u8>> {
    if text.len() > max_decoded.div_ceil(3) * 4 {
        return None;
    }
    STANDARD.decode(text).ok()
}

/// base64url without padding (as JOSE requires).
pub(crate) fn b64url_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Strict base64url: no padding, no whitespace, no non-zero trailing bits.
pub(crate) fn b64url_decode(text: &str, max_decoded: usize) -> Option<Vec<u8>> {
    if text.len() > (max_decoded * 4).div_ceil(3) {
        return None;
    }
    URL_SAFE_NO_PAD.decode(text).ok()
}

/// Appends `u32 big-endian length ‖ bytes` to `out`.
///
/// Every field of every canonical form in this crate is written this way, so no
/// field boundary can be shifted by the content of a neighbouring field.
pub(crate) fn put_lp(out: &mut Vec<u8>, bytes: &[u8]) {
    // Callers bound every field far below 4 GiB; saturate rather than wrap regardless.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_base64() {
        assert_eq!(b64_decode("AAE=", 16), Some(vec![0, 1]));
        assert_eq!(b64_decode("AAE", 16), None, "padding required");
        assert_eq!(b64_decode("AAF=", 16), None, "non-zero trailing bits");
        assert_eq!(b64_decode("AA E=", 16), None, "whitespace");
        assert_eq!(b64_decode("AAAAAAAA", 3), None, "too long before decoding");
        assert_eq!(b64url_decode("AAE", 16), Some(vec![0, 1]));
        assert_eq!(b64url_decode("AAE=", 16), None, "no padding in base64url");
        assert_eq!(b64url_decode("AA+/", 16), None, "not the url alphabet");
        let mut v = Vec::new();
        put_lp(&mut v, b"ab");
        assert_eq!(v, [0, 0, 0, 2, b'a', b'b']);
    }
}
