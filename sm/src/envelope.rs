//! The Yiqiao SM envelope: an SM4-GCM encrypted, SM2-signed JSON object that carries a
//! payload from one institution to another, bound to the request it answers.
//!
//! The format is specified for integrators in `docs/sm-envelope.md`; this module is the
//! reference implementation. Opening checks, in order: structure and sizes, the sender's
//! signature, the timestamp window, the request binding, the key unwrap, the GCM tag.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::encoding::{b64_decode, b64_encode, put_lp};
use crate::error::SmError;
use crate::sm2::{
    DEFAULT_SIGNER_ID, Sm2CiphertextFormat, Sm2PrivateKey, Sm2PublicKey, Sm2Signature,
    Sm2SigningKey,
};
use crate::sm3::sm3_hex;
use crate::sm4gcm::{
    SM4_GCM_NONCE_LEN, SM4_GCM_TAG_LEN, SM4_KEY_LEN, random_sm4_gcm_nonce, random_sm4_key,
    sm4_gcm_open, sm4_gcm_seal,
};

/// HTTP media type of a serialized envelope.
pub const ENVELOPE_MEDIA_TYPE: &str = "application/yiqiao-sm-envelope+json";
/// The only envelope version this crate reads and writes.
pub const ENVELOPE_VERSION: u32 = 1;
/// Value of `enc_alg`: SM4 in GCM mode, 12-byte nonce, 16-byte tag appended.
pub const ENC_ALG: &str = "SM4-GCM";
/// Value of `key_wrap_alg`: SM2 public-key encryption of the 16-byte SM4 key, ciphertext
/// in GM/T 0009 DER (`SEQUENCE { x, y, hash, ciphertext }`).
pub const KEY_WRAP_ALG: &str = "SM2-GMT0009-DER";
/// Value of `sig_alg`: SM2 signature with SM3, signer ID `1234567812345678`, DER.
pub const SIG_ALG: &str = "SM2-SM3";
/// Largest payload (plaintext) an envelope may carry.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;
/// Largest serialized envelope [`Envelope::from_json`] accepts.
pub const MAX_ENVELOPE_BYTES: usize = 12 * 1024 * 1024;
/// Largest sender ID, recipient key ID, requester ID or request ID, in UTF-8 bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Largest content type, in bytes.
pub const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Largest HTTP method / path-and-query accepted in a request binding, in bytes.
pub const MAX_PATH_BYTES: usize = 8 * 1024;
/// A 16-byte key wrapped as DER takes about 120 bytes; anything above this is refused.
const MAX_WRAPPED_KEY_BYTES: usize = 256;
/// DER of an SM2 signature is at most 72 bytes.
const MAX_SIGNATURE_BYTES: usize = 72;

const BINDING_CONTEXT: &[u8] = b"yiqiao-sm-binding-v1";
const HEADER_CONTEXT: &[u8] = b"yiqiao-sm-envelope-v1";
const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%SZ";

/// Why an envelope was not sealed or not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Larger than the stated limit; refused before decoding.
    #[error("{field} too large (limit {limit} bytes)")]
    TooLarge {
        /// The offending field (`envelope` for the whole document).
        field: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// A field is missing, badly encoded or has the wrong length or syntax.
    #[error("malformed envelope field {field}: {reason}")]
    Malformed {
        /// The JSON field name (`json` when the document itself does not parse).
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A version or algorithm this implementation does not speak.
    #[error("unsupported {field}")]
    Unsupported {
        /// The JSON field name.
        field: &'static str,
    },
    /// The sender's signature does not verify (tampered envelope or wrong sender key).
    #[error("envelope signature does not verify")]
    BadSignature,
    /// The timestamp is older than the allowed window.
    #[error("envelope expired: {age_seconds} s old")]
    Expired {
        /// Seconds between the envelope's timestamp and `now`.
        age_seconds: i64,
    },
    /// The timestamp lies further in the future than the allowed skew.
    #[error("envelope timestamp {ahead_seconds} s in the future")]
    ClockSkew {
        /// Seconds the timestamp is ahead of `now`.
        ahead_seconds: i64,
    },
    /// The envelope answers a different request (replay or mix-up).
    #[error("request binding mismatch")]
    BindingMismatch,
    /// The wrapped key does not decrypt with this recipient key.
    #[error("wrapped key does not decrypt with this recipient key")]
    KeyUnwrap,
    /// SM4-GCM authentication of the ciphertext failed.
    #[error("ciphertext authentication tag mismatch")]
    TagMismatch,
    /// A primitive failed while sealing (randomness, encryption, signing).
    #[error("sealing failed: {0}")]
    Seal(SmError),
}

/// What a response is bound to: the request it answers.
///
/// Canonical bytes (all fields length-prefixed, see [`RequestBinding::canonical_bytes`]);
/// the envelope's `request_binding` is the lower-case hex SM3 of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBinding {
    method: String,
    path_and_query: String,
    requester_id: String,
    request_id: String,
}

impl RequestBinding {
    /// `method` is upper-cased (ASCII); `path_and_query` is the request target exactly as
    /// sent on the request line (origin form, no decoding or normalisation);
    /// `requester_id` the institution that asked; `request_id` its unique request ID / nonce.
    pub fn new(
        method: &str,
        path_and_query: &str,
        requester_id: &str,
        request_id: &str,
    ) -> Result<Self, EnvelopeError> {
        check_len("method", method, 32)?;
        check_len("path_and_query", path_and_query, MAX_PATH_BYTES)?;
        check_len("requester_id", requester_id, MAX_ID_BYTES)?;
        check_len("request_id", request_id, MAX_ID_BYTES)?;
        Ok(Self {
            method: method.to_ascii_uppercase(),
            path_and_query: path_and_query.to_owned(),
            requester_id: requester_id.to_owned(),
            request_id: request_id.to_owned(),
        })
    }

    /// `LP("yiqiao-sm-binding-v1") ‖ LP(METHOD) ‖ LP(path_and_query) ‖ LP(requester_id) ‖ LP(request_id)`,
    /// where `LP(x)` = 4-byte big-endian length of `x` ‖ the UTF-8 bytes of `x`.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.path_and_query.len());
        put_lp(&mut out, BINDING_CONTEXT);
        put_lp(&mut out, self.method.as_bytes());
        put_lp(&mut out, self.path_and_query.as_bytes());
        put_lp(&mut out, self.requester_id.as_bytes());
        put_lp(&mut out, self.request_id.as_bytes());
        out
    }

    /// Lower-case hex SM3 of [`RequestBinding::canonical_bytes`] (64 characters).
    pub fn digest_hex(&self) -> String {
        sm3_hex(&self.canonical_bytes())
    }
}

/// The sending institution: its ID and its SM2 signing key (signer ID `1234567812345678`).
#[derive(Debug, Clone)]
pub struct SenderKeys {
    sender_id: String,
    signing_key: Sm2SigningKey,
}

impl SenderKeys {
    /// `sender_id` is the institution ID the receiver uses to look up `key`'s public half.
    pub fn new(sender_id: &str, key: &Sm2PrivateKey) -> Result<Self, EnvelopeError> {
        check_id("sender_id", sender_id)?;
        let signing_key = key
            .signing_key(DEFAULT_SIGNER_ID)
            .map_err(EnvelopeError::Seal)?;
        Ok(Self {
            sender_id: sender_id.to_owned(),
            signing_key,
        })
    }

    /// The sender (institution) ID.
    pub fn sender_id(&self) -> &str {
        &self.sender_id
    }
}

/// The recipient's encryption key and the ID under which the recipient knows it.
#[derive(Debug, Clone)]
pub struct RecipientKey {
    /// Key ID the recipient uses to pick the private key (`recipient_key_id`).
    pub key_id: String,
    /// The recipient's SM2 public key.
    pub public_key: Sm2PublicKey,
}

/// A Yiqiao SM envelope as it travels (JSON, media type [`ENVELOPE_MEDIA_TYPE`]).
///
/// Binary fields hold standard padded base64 (RFC 4648 §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Format version, `1`.
    pub version: u32,
    /// [`ENC_ALG`].
    pub enc_alg: String,
    /// [`KEY_WRAP_ALG`].
    pub key_wrap_alg: String,
    /// [`SIG_ALG`].
    pub sig_alg: String,
    /// Sending institution ID.
    pub sender_id: String,
    /// Recipient key ID.
    pub recipient_key_id: String,
    /// RFC 3339 UTC, whole seconds: `YYYY-MM-DDTHH:MM:SSZ`.
    pub timestamp: String,
    /// Lower-case hex SM3 of the request binding.
    pub request_binding: String,
    /// Media type of the payload.
    pub content_type: String,
    /// base64 of the SM2-encrypted SM4 key (GM/T 0009 DER).
    pub wrapped_key: String,
    /// base64 of the 12-byte SM4-GCM nonce.
    pub nonce: String,
    /// base64 of ciphertext ‖ 16-byte tag.
    pub ciphertext: String,
    /// base64 of the sender's DER SM2 signature.
    pub signature: String,
}

/// Binary fields of a structurally valid envelope.
struct Decoded {
    wrapped_key: Vec<u8>,
    nonce: [u8; SM4_GCM_NONCE_LEN],
    ciphertext: Vec<u8>,
    signature: Sm2Signature,
    timestamp: DateTime<Utc>,
}

impl Envelope {
    /// Encrypts `payload` to `recipient`, binds it to `binding`, and signs it as `sender`.
    pub fn seal(
        payload: &[u8],
        content_type: &str,
        sender: &SenderKeys,
        recipient: &RecipientKey,
        binding: &RequestBinding,
        now: DateTime<Utc>,
    ) -> Result<Self, EnvelopeError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(EnvelopeError::TooLarge {
                field: "payload",
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        check_content_type(content_type)?;
        check_id("recipient_key_id", &recipient.key_id)?;
        let key = random_sm4_key().map_err(EnvelopeError::Seal)?;
        let nonce = random_sm4_gcm_nonce().map_err(EnvelopeError::Seal)?;
        let wrapped_key = recipient
            .public_key
            .encrypt(&key, Sm2CiphertextFormat::Der)
            .map_err(EnvelopeError::Seal)?;
        let mut envelope = Self {
            version: ENVELOPE_VERSION,
            enc_alg: ENC_ALG.to_owned(),
            key_wrap_alg: KEY_WRAP_ALG.to_owned(),
            sig_alg: SIG_ALG.to_owned(),
            sender_id: sender.sender_id.clone(),
            recipient_key_id: recipient.key_id.clone(),
            timestamp: now.format(TIMESTAMP_FORMAT).to_string(),
            request_binding: binding.digest_hex(),
            content_type: content_type.to_owned(),
            wrapped_key: b64_encode(&wrapped_key),
            nonce: b64_encode(&nonce),
            ciphertext: String::new(),
            signature: String::new(),
        };
        let aad = envelope.canonical_header(&wrapped_key, &nonce);
        let ciphertext = sm4_gcm_seal(&key, &nonce, &aad, payload).map_err(EnvelopeError::Seal)?;
        envelope.ciphertext = b64_encode(&ciphertext);
        envelope.sign(sender, &aad, &ciphertext)?;
        Ok(envelope)
    }

    /// Checks and decrypts. Order: structure, signature (by `sender_public_key`, signer ID
    /// `1234567812345678`), timestamp within `max_skew` of `now` either way, request binding,
    /// key unwrap with `recipient_private_key`, GCM tag. Returns the payload and its content type.
    ///
    /// The caller picks `sender_public_key` by [`Envelope::sender_id`] and
    /// `recipient_private_key` by [`Envelope::recipient_key_id`].
    pub fn open(
        &self,
        recipient_private_key: &Sm2PrivateKey,
        sender_public_key: &Sm2PublicKey,
        expected_binding: &RequestBinding,
        now: DateTime<Utc>,
        max_skew: Duration,
    ) -> Result<(Vec<u8>, String), EnvelopeError> {
        self.verify(sender_public_key, expected_binding, now, max_skew)?;
        self.decrypt(recipient_private_key)
    }

    /// The checks of [`Envelope::open`] that need no private key: structure, signature,
    /// timestamp, request binding. A caller may run this and [`Envelope::decrypt`] at the
    /// same time, and must use the payload only when both succeed.
    pub fn verify(
        &self,
        sender_public_key: &Sm2PublicKey,
        expected_binding: &RequestBinding,
        now: DateTime<Utc>,
        max_skew: Duration,
    ) -> Result<(), EnvelopeError> {
        let decoded = self.decode()?;
        let aad = self.canonical_header(&decoded.wrapped_key, &decoded.nonce);
        let signing_input = signing_input(&aad, &decoded.ciphertext);
        sender_public_key
            .verify(&signing_input, &decoded.signature, DEFAULT_SIGNER_ID)
            .map_err(|_| EnvelopeError::BadSignature)?;

        let skew = i64::try_from(max_skew.as_secs()).unwrap_or(i64::MAX);
        let age = now.signed_duration_since(decoded.timestamp).num_seconds();
        if age > skew {
            return Err(EnvelopeError::Expired { age_seconds: age });
        }
        if -age > skew {
            return Err(EnvelopeError::ClockSkew {
                ahead_seconds: -age,
            });
        }
        if self.request_binding != expected_binding.digest_hex() {
            return Err(EnvelopeError::BindingMismatch);
        }
        Ok(())
    }

    /// The key unwrap and GCM decryption of [`Envelope::open`] (structure checked too; the
    /// header is authenticated by the GCM tag). Says nothing about who sealed it: only
    /// together with a successful [`Envelope::verify`] is the payload trustworthy.
    pub fn decrypt(
        &self,
        recipient_private_key: &Sm2PrivateKey,
    ) -> Result<(Vec<u8>, String), EnvelopeError> {
        let decoded = self.decode()?;
        let aad = self.canonical_header(&decoded.wrapped_key, &decoded.nonce);
        let key = recipient_private_key
            .decrypt(&decoded.wrapped_key, Sm2CiphertextFormat::Der)
            .map_err(|_| EnvelopeError::KeyUnwrap)?;
        let key: [u8; SM4_KEY_LEN] = key
            .as_slice()
            .try_into()
            .map_err(|_| EnvelopeError::KeyUnwrap)?;
        let payload = sm4_gcm_open(&key, &decoded.nonce, &aad, &decoded.ciphertext)
            .map_err(|_| EnvelopeError::TagMismatch)?;
        Ok((payload, self.content_type.clone()))
    }

    /// Parses a serialized envelope, refusing documents over [`MAX_ENVELOPE_BYTES`]
    /// and unknown fields. Field contents are checked by [`Envelope::open`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                field: "envelope",
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        serde_json::from_slice(bytes).map_err(|_| EnvelopeError::Malformed {
            field: "json",
            reason: "not an envelope object (missing, unknown or mistyped field)",
        })
    }

    /// Serializes as compact JSON.
    pub fn to_json(&self) -> Result<String, EnvelopeError> {
        serde_json::to_string(self).map_err(|_| EnvelopeError::Malformed {
            field: "json",
            reason: "serialization failed",
        })
    }

    /// The canonical header: the SM4-GCM AAD, and the first part of the signing input.
    ///
    /// `LP("yiqiao-sm-envelope-v1") ‖ LP(version as decimal) ‖ LP(enc_alg) ‖ LP(key_wrap_alg) ‖
    /// LP(sig_alg) ‖ LP(sender_id) ‖ LP(recipient_key_id) ‖ LP(timestamp) ‖ LP(request_binding) ‖
    /// LP(content_type) ‖ LP(wrapped_key bytes) ‖ LP(nonce bytes)`.
    fn canonical_header(&self, wrapped_key: &[u8], nonce: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        put_lp(&mut out, HEADER_CONTEXT);
        put_lp(&mut out, self.version.to_string().as_bytes());
        put_lp(&mut out, self.enc_alg.as_bytes());
        put_lp(&mut out, self.key_wrap_alg.as_bytes());
        put_lp(&mut out, self.sig_alg.as_bytes());
        put_lp(&mut out, self.sender_id.as_bytes());
        put_lp(&mut out, self.recipient_key_id.as_bytes());
        put_lp(&mut out, self.timestamp.as_bytes());
        put_lp(&mut out, self.request_binding.as_bytes());
        put_lp(&mut out, self.content_type.as_bytes());
        put_lp(&mut out, wrapped_key);
        put_lp(&mut out, nonce);
        out
    }

    fn sign(
        &mut self,
        sender: &SenderKeys,
        header: &[u8],
        ciphertext: &[u8],
    ) -> Result<(), EnvelopeError> {
        let signature = sender
            .signing_key
            .sign(&signing_input(header, ciphertext))
            .map_err(EnvelopeError::Seal)?;
        self.signature = b64_encode(&signature.to_der());
        Ok(())
    }

    /// Structural checks, cheapest first, each size checked before decoding.
    fn decode(&self) -> Result<Decoded, EnvelopeError> {
        if self.version != ENVELOPE_VERSION {
            return Err(EnvelopeError::Unsupported { field: "version" });
        }
        if self.enc_alg != ENC_ALG {
            return Err(EnvelopeError::Unsupported { field: "enc_alg" });
        }
        if self.key_wrap_alg != KEY_WRAP_ALG {
            return Err(EnvelopeError::Unsupported {
                field: "key_wrap_alg",
            });
        }
        if self.sig_alg != SIG_ALG {
            return Err(EnvelopeError::Unsupported { field: "sig_alg" });
        }
        check_id("sender_id", &self.sender_id)?;
        check_id("recipient_key_id", &self.recipient_key_id)?;
        let timestamp = parse_timestamp(&self.timestamp)?;
        if self.request_binding.len() != 64
            || !self
                .request_binding
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(malformed("request_binding", "not 64 lower-case hex digits"));
        }
        check_content_type(&self.content_type)?;
        let wrapped_key = decode_field("wrapped_key", &self.wrapped_key, MAX_WRAPPED_KEY_BYTES)?;
        let nonce = decode_field("nonce", &self.nonce, SM4_GCM_NONCE_LEN)?
            .try_into()
            .map_err(|_| malformed("nonce", "not 12 bytes"))?;
        let ciphertext = decode_field(
            "ciphertext",
            &self.ciphertext,
            MAX_PAYLOAD_BYTES + SM4_GCM_TAG_LEN,
        )?;
        if ciphertext.len() < SM4_GCM_TAG_LEN {
            return Err(malformed("ciphertext", "shorter than the 16-byte tag"));
        }
        let signature = decode_field("signature", &self.signature, MAX_SIGNATURE_BYTES)?;
        let signature = Sm2Signature::from_der(&signature)
            .map_err(|_| malformed("signature", "not a DER SM2 signature"))?;
        Ok(Decoded {
            wrapped_key,
            nonce,
            ciphertext,
            signature,
            timestamp,
        })
    }
}

/// Signing input: `canonical header ‖ LP(ciphertext ‖ tag)`.
fn signing_input(header: &[u8], ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len() + 4 + ciphertext.len());
    out.extend_from_slice(header);
    put_lp(&mut out, ciphertext);
    out
}

fn malformed(field: &'static str, reason: &'static str) -> EnvelopeError {
    EnvelopeError::Malformed { field, reason }
}

fn decode_field(field: &'static str, text: &str, max: usize) -> Result<Vec<u8>, EnvelopeError> {
    if text.len() > max.div_ceil(3) * 4 {
        return Err(EnvelopeError::TooLarge { field, limit: max });
    }
    let bytes = b64_decode(text, max).ok_or(malformed(field, "not strict padded base64"))?;
    if bytes.len() > max {
        return Err(EnvelopeError::TooLarge { field, limit: max });
    }
    Ok(bytes)
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), EnvelopeError> {
    if value.is_empty() {
        return Err(malformed(field, "empty"));
    }
    if value.len() > max {
        return Err(EnvelopeError::TooLarge { field, limit: max });
    }
    if value.chars().any(char::is_control) {
        return Err(malformed(field, "contains control characters"));
    }
    Ok(())
}

fn check_id(field: &'static str, value: &str) -> Result<(), EnvelopeError> {
    check_len(field, value, MAX_ID_BYTES)
}

fn check_content_type(value: &str) -> Result<(), EnvelopeError> {
    check_len("content_type", value, MAX_CONTENT_TYPE_BYTES)?;
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(malformed("content_type", "not printable ASCII"));
    }
    Ok(())
}

fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, EnvelopeError> {
    let bad = || malformed("timestamp", "not RFC 3339 UTC YYYY-MM-DDTHH:MM:SSZ");
    if text.len() != 20 {
        return Err(bad());
    }
    let naive = NaiveDateTime::parse_from_str(text, TIMESTAMP_FORMAT).map_err(|_| bad())?;
    let parsed = naive.and_utc();
    // Only the canonical spelling is accepted (the signature covers the text).
    if parsed.format(TIMESTAMP_FORMAT).to_string() != text {
        return Err(bad());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests;
