//! SM2 keys, signatures (SM3 with an explicit signer ID) and public-key encryption
//! with an explicit ciphertext format.

use std::fmt;

use sm2::dsa::signature::{RandomizedSigner, Verifier};
use sm2::elliptic_curve::Generate;
use sm2::elliptic_curve::common::getrandom::SysRng;
use sm2::elliptic_curve::sec1::ToSec1Point;
use sm2::elliptic_curve::zeroize::Zeroizing;
use sm2::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use sm2::pke::{DecryptingKey, EncryptingKey, Mode};

use crate::error::SmError;

/// The signer ID (distinguishing identifier) GM/T 0009 names as default.
///
/// OpenSSL's default is the EMPTY ID: always pass `-pkeyopt distid:1234567812345678`.
pub const DEFAULT_SIGNER_ID: &str = "1234567812345678";

/// SM2 ciphertext layouts. There is no default: both sides must name the one they use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sm2CiphertextFormat {
    /// `C1 ‖ C3 ‖ C2` with C1 = `04 ‖ x ‖ y` (GB/T 32918.4 order).
    RawC1C3C2,
    /// `C1 ‖ C2 ‖ C3` with C1 = `04 ‖ x ‖ y`: the old order some legacy systems still emit.
    RawC1C2C3Legacy,
    /// GM/T 0009 DER: `SEQUENCE { x INTEGER, y INTEGER, hash OCTET STRING, ciphertext OCTET STRING }`.
    /// The only form OpenSSL 3 `pkeyutl` reads and writes.
    Der,
}

/// An SM2 private key. `Debug` never prints the key.
#[derive(Clone)]
pub struct Sm2PrivateKey {
    secret: sm2::SecretKey,
}

impl fmt::Debug for Sm2PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sm2PrivateKey")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl Sm2PrivateKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Self, SmError> {
        let secret = sm2::SecretKey::try_generate().map_err(|_| SmError::Rng)?;
        Ok(Self { secret })
    }

    /// A key from a 32-byte big-endian scalar (1 ≤ d < n). For deterministic test and
    /// simulator keys derived from a seed; real keys come from [`Sm2PrivateKey::generate`].
    pub fn from_scalar_bytes(bytes: &[u8; 32]) -> Result<Self, SmError> {
        let secret = sm2::SecretKey::from_slice(bytes)
            .map_err(|_| SmError::InvalidKey("scalar out of range"))?;
        Ok(Self { secret })
    }

    /// Reads a PKCS#8 `-----BEGIN PRIVATE KEY-----` PEM (as `openssl genpkey -algorithm SM2` writes).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SmError> {
        let secret = sm2::SecretKey::from_pkcs8_pem(pem)
            .map_err(|_| SmError::InvalidKey("not a PKCS#8 SM2 private key PEM"))?;
        Ok(Self { secret })
    }

    /// Reads a PKCS#8 DER private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, SmError> {
        let secret = sm2::SecretKey::from_pkcs8_der(der)
            .map_err(|_| SmError::InvalidKey("not a PKCS#8 SM2 private key"))?;
        Ok(Self { secret })
    }

    /// Writes a PKCS#8 PEM (LF line endings) that OpenSSL 3 reads as an SM2 key.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, SmError> {
        self.secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| SmError::KeyEncoding)
    }

    /// The matching public key.
    pub fn public_key(&self) -> Sm2PublicKey {
        Sm2PublicKey {
            inner: self.secret.public_key(),
        }
    }

    /// A signing key bound to `signer_id` (usually [`DEFAULT_SIGNER_ID`]).
    pub fn signing_key(&self, signer_id: &str) -> Result<Sm2SigningKey, SmError> {
        Sm2SigningKey::new(self, signer_id)
    }

    /// Decrypts an SM2 ciphertext in the stated `format`.
    pub fn decrypt(
        &self,
        ciphertext: &[u8],
        format: Sm2CiphertextFormat,
    ) -> Result<Zeroizing<Vec<u8>>, SmError> {
        let scalar = self.secret.to_nonzero_scalar();
        let plain = match format {
            Sm2CiphertextFormat::RawC1C3C2 => {
                DecryptingKey::new_with_mode(scalar, Mode::C1C3C2).decrypt(ciphertext)
            }
            Sm2CiphertextFormat::RawC1C2C3Legacy => {
                DecryptingKey::new_with_mode(scalar, Mode::C1C2C3).decrypt(ciphertext)
            }
            Sm2CiphertextFormat::Der => {
                DecryptingKey::new_with_mode(scalar, Mode::C1C3C2).decrypt_der(ciphertext)
            }
        };
        plain.map(Zeroizing::new).map_err(|_| SmError::Decrypt)
    }
}

/// An SM2 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct Sm2PublicKey {
    inner: sm2::PublicKey,
}

impl fmt::Debug for Sm2PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sm2PublicKey({})", hex::encode(self.to_uncompressed()))
    }
}

impl Sm2PublicKey {
    /// Reads an SPKI `-----BEGIN PUBLIC KEY-----` PEM (as `openssl pkey -pubout` writes).
    pub fn from_spki_pem(pem: &str) -> Result<Self, SmError> {
        let inner = sm2::PublicKey::from_public_key_pem(pem)
            .map_err(|_| SmError::InvalidKey("not an SPKI SM2 public key PEM"))?;
        Ok(Self { inner })
    }

    /// Reads an SPKI DER public key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, SmError> {
        let inner = sm2::PublicKey::from_public_key_der(der)
            .map_err(|_| SmError::InvalidKey("not an SPKI SM2 public key"))?;
        Ok(Self { inner })
    }

    /// Writes an SPKI PEM (LF line endings) that OpenSSL 3 reads as an SM2 key.
    pub fn to_spki_pem(&self) -> Result<String, SmError> {
        self.inner
            .to_public_key_pem(LineEnding::LF)
            .map_err(|_| SmError::KeyEncoding)
    }

    /// Reads a SEC1 point (`04 ‖ x ‖ y`, or compressed). Rejects points not on the curve.
    pub fn from_sec1_bytes(bytes: &[u8]) -> Result<Self, SmError> {
        let inner = sm2::PublicKey::from_sec1_bytes(bytes)
            .map_err(|_| SmError::InvalidKey("not an SM2 curve point"))?;
        Ok(Self { inner })
    }

    /// The uncompressed SEC1 point `04 ‖ x ‖ y` (65 bytes).
    pub fn to_uncompressed(&self) -> [u8; 65] {
        let point = self.inner.as_affine().to_sec1_point(false);
        let mut out = [0u8; 65];
        let bytes = point.as_bytes();
        if bytes.len() == out.len() {
            out.copy_from_slice(bytes);
        }
        out
    }

    /// Verifies an SM2-with-SM3 signature made with `signer_id`.
    pub fn verify(
        &self,
        message: &[u8],
        signature: &Sm2Signature,
        signer_id: &str,
    ) -> Result<(), SmError> {
        let vk = sm2::dsa::VerifyingKey::new(signer_id, self.inner)
            .map_err(|_| SmError::SignerIdTooLong)?;
        vk.verify(message, &signature.inner)
            .map_err(|_| SmError::BadSignature)
    }

    /// Encrypts `message` to this key in the stated `format`.
    pub fn encrypt(&self, message: &[u8], format: Sm2CiphertextFormat) -> Result<Vec<u8>, SmError> {
        let mut rng = SysRng;
        let out = match format {
            Sm2CiphertextFormat::RawC1C3C2 => {
                EncryptingKey::new_with_mode(self.inner, Mode::C1C3C2).encrypt(&mut rng, message)
            }
            Sm2CiphertextFormat::RawC1C2C3Legacy => {
                EncryptingKey::new_with_mode(self.inner, Mode::C1C2C3).encrypt(&mut rng, message)
            }
            Sm2CiphertextFormat::Der => EncryptingKey::new_with_mode(self.inner, Mode::C1C3C2)
                .encrypt_der(&mut rng, message),
        };
        out.map_err(|_| SmError::Encrypt)
    }
}

/// An SM2 private key bound to a signer ID, ready to sign with SM3.
#[derive(Clone)]
pub struct Sm2SigningKey {
    inner: sm2::dsa::SigningKey,
    public_key: Sm2PublicKey,
}

impl fmt::Debug for Sm2SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sm2SigningKey")
            .field("signer_id", &self.inner.distid())
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl Sm2SigningKey {
    /// Binds `key` to `signer_id`.
    pub fn new(key: &Sm2PrivateKey, signer_id: &str) -> Result<Self, SmError> {
        let inner = sm2::dsa::SigningKey::new(signer_id, &key.secret)
            .map_err(|_| SmError::SignerIdTooLong)?;
        Ok(Self {
            inner,
            public_key: key.public_key(),
        })
    }

    /// The signer ID this key signs with.
    pub fn signer_id(&self) -> &str {
        self.inner.distid()
    }

    /// The public key that verifies this key's signatures.
    pub fn public_key(&self) -> &Sm2PublicKey {
        &self.public_key
    }

    /// Signs `message` (SM3 over `Z_A ‖ message`), with a hedged nonce (RFC 6979 plus system randomness).
    pub fn sign(&self, message: &[u8]) -> Result<Sm2Signature, SmError> {
        let inner = self
            .inner
            .try_sign_with_rng(&mut SysRng, message)
            .map_err(|_| SmError::Sign)?;
        Ok(Sm2Signature { inner })
    }
}

/// An SM2 signature `(r, s)`, encodable as DER or as raw `r ‖ s` (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Sm2Signature {
    inner: sm2::dsa::Signature,
}

impl Sm2Signature {
    /// Parses `SEQUENCE { r INTEGER, s INTEGER }` DER (strict).
    pub fn from_der(der: &[u8]) -> Result<Self, SmError> {
        let inner = sm2::dsa::Signature::from_der(der).map_err(|_| SmError::MalformedSignature)?;
        Ok(Self { inner })
    }

    /// DER `SEQUENCE { r INTEGER, s INTEGER }` (at most 72 bytes).
    pub fn to_der(&self) -> Vec<u8> {
        self.inner.to_der().to_vec()
    }

    /// Parses raw `r ‖ s`, exactly 64 bytes, each big-endian.
    pub fn from_raw(raw: &[u8]) -> Result<Self, SmError> {
        if raw.len() != 64 {
            return Err(SmError::MalformedSignature);
        }
        let inner =
            sm2::dsa::Signature::from_slice(raw).map_err(|_| SmError::MalformedSignature)?;
        Ok(Self { inner })
    }

    /// Raw `r ‖ s`, 64 bytes.
    pub fn to_raw(&self) -> [u8; 64] {
        self.inner.to_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_scalar_bytes_are_deterministic_and_range_checked() {
        assert!(Sm2PrivateKey::from_scalar_bytes(&[0u8; 32]).is_err());
        assert!(
            Sm2PrivateKey::from_scalar_bytes(&[0xff; 32]).is_err(),
            "d ≥ n"
        );
        let a = Sm2PrivateKey::from_scalar_bytes(&[7u8; 32]).unwrap();
        let b = Sm2PrivateKey::from_scalar_bytes(&[7u8; 32]).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let pem = a.to_pkcs8_pem().unwrap();
        let c = Sm2PrivateKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(c.public_key(), a.public_key());
    }

    #[test]
    fn pem_round_trip_sign_verify() {
        let key = Sm2PrivateKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let key2 = Sm2PrivateKey::from_pkcs8_pem(&pem).unwrap();
        let pub_pem = key2.public_key().to_spki_pem().unwrap();
        let public = Sm2PublicKey::from_spki_pem(&pub_pem).unwrap();
        assert_eq!(public, key.public_key());

        let signer = key.signing_key(DEFAULT_SIGNER_ID).unwrap();
        let sig = signer.sign(b"hello").unwrap();
        public.verify(b"hello", &sig, DEFAULT_SIGNER_ID).unwrap();
        assert_eq!(
            public.verify(b"hellp", &sig, DEFAULT_SIGNER_ID),
            Err(SmError::BadSignature)
        );
        assert_eq!(
            public.verify(b"hello", &sig, ""),
            Err(SmError::BadSignature),
            "signer ID is part of Z_A"
        );
        let der = sig.to_der();
        assert_eq!(Sm2Signature::from_der(&der).unwrap(), sig);
        assert_eq!(Sm2Signature::from_raw(&sig.to_raw()).unwrap(), sig);
        assert_eq!(
            Sm2Signature::from_raw(&[0u8; 63]),
            Err(SmError::MalformedSignature)
        );
    }

    #[test]
    fn encrypt_decrypt_every_format_and_never_across_formats() {
        let key = Sm2PrivateKey::generate().unwrap();
        let public = key.public_key();
        let msg = b"0123456789abcdef";
        for format in [
            Sm2CiphertextFormat::RawC1C3C2,
            Sm2CiphertextFormat::RawC1C2C3Legacy,
            Sm2CiphertextFormat::Der,
        ] {
            let ct = public.encrypt(msg, format).unwrap();
            assert_eq!(key.decrypt(&ct, format).unwrap().as_slice(), msg);
            if format != Sm2CiphertextFormat::Der {
                assert_eq!(ct[0], 0x04, "raw forms carry the 04 prefix");
                assert_eq!(ct.len(), 65 + 32 + msg.len());
            } else {
                assert_eq!(ct[0], 0x30);
            }
        }
        let raw = public.encrypt(msg, Sm2CiphertextFormat::RawC1C3C2).unwrap();
        assert!(
            key.decrypt(&raw, Sm2CiphertextFormat::RawC1C2C3Legacy)
                .is_err()
        );
        assert!(key.decrypt(&raw, Sm2CiphertextFormat::Der).is_err());
        let other = Sm2PrivateKey::generate().unwrap();
        assert_eq!(
            other.decrypt(&raw, Sm2CiphertextFormat::RawC1C3C2).err(),
            Some(SmError::Decrypt)
        );
    }
}
