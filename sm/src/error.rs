//! Errors of the primitive layer.

/// Why an SM2/SM3/SM4 primitive failed. Carries no key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmError {
    /// The operating system's random number generator failed.
    #[error("system random number generator failed")]
    Rng,
    /// A key could not be parsed or is not an SM2 key.
    #[error("invalid SM2 key: {0}")]
    InvalidKey(&'static str),
    /// A key could not be encoded.
    #[error("SM2 key encoding failed")]
    KeyEncoding,
    /// The signer ID is longer than SM2 allows (ENTL is a 16-bit bit count).
    #[error("SM2 signer ID too long")]
    SignerIdTooLong,
    /// Signing failed.
    #[error("SM2 signing failed")]
    Sign,
    /// A signature's encoding is not a valid SM2 signature (DER or raw r||s).
    #[error("malformed SM2 signature encoding")]
    MalformedSignature,
    /// The signature does not verify under this key, message and signer ID.
    #[error("SM2 signature does not verify")]
    BadSignature,
    /// SM2 public-key encryption failed.
    #[error("SM2 encryption failed")]
    Encrypt,
    /// SM2 decryption failed: wrong key, wrong format, or C3 check failed.
    #[error("SM2 decryption failed")]
    Decrypt,
    /// SM4-GCM authentication failed: wrong key, nonce, AAD or tampered data.
    #[error("SM4-GCM tag mismatch")]
    TagMismatch,
    /// An input had the wrong length.
    #[error("invalid length of {0}")]
    InvalidLength(&'static str),
}
