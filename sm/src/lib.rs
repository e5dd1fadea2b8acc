//! SM2/SM3/SM4 primitives, the Yiqiao SM envelope and SM2 JWS client assertions.
//!
//! Error conventions: every fallible function returns one of this crate's own
//! `thiserror` enums — [`SmError`] for primitives, [`EnvelopeError`] for the
//! envelope, [`JwsError`] for JWS. Variants say *why* something was rejected
//! (bad signature, stale timestamp, wrong request binding, ...) so the gateway
//! can log and audit the exact cause; none of them carries key material or
//! plaintext.
//!
//! Invariants:
//! - no IO, no global state; the caller passes the clock (`now`) in;
//! - every SM2 signature uses SM3 and an explicit signer ID
//!   ([`DEFAULT_SIGNER_ID`] unless the caller says otherwise);
//! - every SM2 ciphertext has an explicit [`Sm2CiphertextFormat`]; nothing guesses;
//! - inputs from the network are size-checked before they are decoded.

#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used))]

mod encoding;
pub mod envelope;
mod error;
pub mod jws;
pub mod request_sig;
mod sm2;
mod sm3;
mod sm4gcm;

pub use crate::envelope::{
    ENVELOPE_MEDIA_TYPE, Envelope, EnvelopeError, RecipientKey, RequestBinding, SenderKeys,
};
pub use crate::error::SmError;
pub use crate::jws::{JWS_ALG, JwsError, Sm2Jwk, sign_jws, verify_jws};
pub use crate::request_sig::{RequestSigError, SignedRequest};

pub use crate::sm2::{
    DEFAULT_SIGNER_ID, Sm2CiphertextFormat, Sm2PrivateKey, Sm2PublicKey, Sm2Signature,
    Sm2SigningKey,
};
pub use crate::sm3::{sm3_hash, sm3_hex};
pub use crate::sm4gcm::{
    SM4_GCM_NONCE_LEN, SM4_GCM_TAG_LEN, SM4_KEY_LEN, random_sm4_gcm_nonce, random_sm4_key,
    sm4_gcm_open, sm4_gcm_seal,
};
