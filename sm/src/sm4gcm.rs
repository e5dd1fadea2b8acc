//! SM4-GCM (GCM mode of NIST SP 800-38D over the SM4 block cipher, as in RFC 8998).

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{AesGcm, KeyInit};
use sm2::elliptic_curve::Generate;
use sm4::Sm4;

use crate::error::SmError;

/// SM4 key length in bytes.
pub const SM4_KEY_LEN: usize = 16;
/// SM4-GCM nonce length in bytes (96-bit IV).
pub const SM4_GCM_NONCE_LEN: usize = 12;
/// SM4-GCM tag length in bytes; the tag is appended to the ciphertext.
pub const SM4_GCM_TAG_LEN: usize = 16;

type Sm4Gcm = AesGcm<Sm4, U12>;

/// A fresh random SM4 key from the operating system's generator.
pub fn random_sm4_key() -> Result<[u8; SM4_KEY_LEN], SmError> {
    <[u8; SM4_KEY_LEN]>::try_generate().map_err(|_| SmError::Rng)
}

/// A fresh random 12-byte nonce. Never reuse a nonce with the same key.
pub fn random_sm4_gcm_nonce() -> Result<[u8; SM4_GCM_NONCE_LEN], SmError> {
    <[u8; SM4_GCM_NONCE_LEN]>::try_generate().map_err(|_| SmError::Rng)
}

/// Encrypts `plaintext`, returning `ciphertext ‖ tag` (tag: 16 bytes).
pub fn sm4_gcm_seal(
    key: &[u8; SM4_KEY_LEN],
    nonce: &[u8; SM4_GCM_NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, SmError> {
    let cipher = Sm4Gcm::new(key.into());
    cipher
        .encrypt(
            nonce.into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| SmError::InvalidLength("SM4-GCM plaintext"))
}

/// Decrypts `ciphertext ‖ tag`; fails with [`SmError::TagMismatch`] if anything was altered.
pub fn sm4_gcm_open(
    key: &[u8; SM4_KEY_LEN],
    nonce: &[u8; SM4_GCM_NONCE_LEN],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Vec<u8>, SmError> {
    if ciphertext_and_tag.len() < SM4_GCM_TAG_LEN {
        return Err(SmError::InvalidLength("SM4-GCM ciphertext"));
    }
    let cipher = Sm4Gcm::new(key.into());
    cipher
        .decrypt(
            nonce.into(),
            Payload {
                msg: ciphertext_and_tag,
                aad,
            },
        )
        .map_err(|_| SmError::TagMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sm4::cipher::BlockCipherEncrypt;

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let v = hex::decode(s).expect("hex");
        v.try_into().expect("length")
    }

    #[test]
    fn sm4_single_block_and_million_iterations() {
        let key: [u8; 16] = unhex("0123456789abcdeffedcba9876543210");
        let cipher = Sm4::new(&key.into());
        let mut block = key.into();
        cipher.encrypt_block(&mut block);
        assert_eq!(hex::encode(block), "681edf34d206965e86b3e94f536e4246");
        let mut block = key.into();
        for _ in 0..1_000_000 {
            cipher.encrypt_block(&mut block);
        }
        assert_eq!(hex::encode(block), "595298c7c6fd271f0402f804c33d3f66");
    }

    #[test]
    fn rfc8998_a1_sm4_gcm() {
        let key: [u8; 16] = unhex("0123456789ABCDEFFEDCBA9876543210");
        let iv: [u8; 12] = unhex("00001234567800000000ABCD");
        let aad = hex::decode("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2").expect("hex");
        let pt = hex::decode(
            "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD\
             EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA",
        )
        .expect("hex");
        let expected = "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735\
                        D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D\
                        83DE3541E4C2B58177E065A9BF7B62EC";
        let sealed = sm4_gcm_seal(&key, &iv, &aad, &pt).expect("seal");
        assert_eq!(hex::encode_upper(&sealed), expected);
        assert_eq!(sm4_gcm_open(&key, &iv, &aad, &sealed).expect("open"), pt);

        let mut bad_aad = aad.clone();
        bad_aad[0] ^= 1;
        assert_eq!(
            sm4_gcm_open(&key, &iv, &bad_aad, &sealed),
            Err(SmError::TagMismatch)
        );
        let mut bad_ct = sealed.clone();
        bad_ct[3] ^= 0x80;
        assert_eq!(
            sm4_gcm_open(&key, &iv, &aad, &bad_ct),
            Err(SmError::TagMismatch)
        );
        let n = bad_ct.len();
        let mut bad_tag = sealed;
        bad_tag[n - 1] ^= 1;
        assert_eq!(
            sm4_gcm_open(&key, &iv, &aad, &bad_tag),
            Err(SmError::TagMismatch)
        );
    }
}
