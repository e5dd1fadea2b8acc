//! SM2 signatures on HTTP requests: how the gateway proves to a hospital that a federation
//! call (or a document retrieval) comes from it (docs/hospital-contract.md, "Verifying the
//! gateway").
//!
//! The canonical string is UTF-8 text, one field per line, joined by `\n` (no trailing
//! newline):
//!
//! ```text
//! yiqiao-request-v1
//! <METHOD, upper case>
//! <request target: path and query exactly as sent, e.g. /fhir/Patient?identifier=a%7Cb>
//! <X-Yiqiao-Timestamp: Unix seconds, decimal>
//! <X-Yiqiao-Requester: the gateway id>
//! <X-Request-Id>
//! <SM3 of the body, 64 lower-case hex digits (of the empty string for a GET)>
//! ```
//!
//! The signature is SM2 with SM3 and the signer ID [`crate::DEFAULT_SIGNER_ID`]
//! (`1234567812345678`, GM/T 0009) over those bytes, sent in `X-Yiqiao-Signature` as
//! standard padded base64 of the DER `SEQUENCE { r INTEGER, s INTEGER }`.

use crate::encoding::{b64_decode, b64_encode};
use crate::{Sm2PublicKey, Sm2Signature, Sm2SigningKey, sm3_hex};

/// First line of the canonical string (the version of this scheme).
pub const REQUEST_SIG_VERSION: &str = "yiqiao-request-v1";
/// Header: Unix seconds at signing.
pub const TIMESTAMP_HEADER: &str = "x-yiqiao-timestamp";
/// Header: base64 (padded) of the DER SM2 signature.
pub const SIGNATURE_HEADER: &str = "x-yiqiao-signature";
/// Header: id of the gateway key that signed (the gateway's `federation.key_id`), so a
/// hospital can pick the key during a rotation. Not signed: a wrong key fails to verify.
pub const KEY_ID_HEADER: &str = "x-yiqiao-key-id";

/// Longest field accepted in a canonical string (a request target is bounded by servers too).
const MAX_FIELD: usize = 16 * 1024;
/// Longest DER SM2 signature.
const MAX_DER_SIG: usize = 72;

/// Why a request signature was not made or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestSigError {
    /// A field is empty, too long, or contains a line break or other control character.
    #[error("request field {0} is not signable")]
    Field(&'static str),
    /// The signature header is not base64 of a DER SM2 signature.
    #[error("malformed request signature")]
    Malformed,
    /// The timestamp header is not Unix seconds.
    #[error("malformed request timestamp")]
    MalformedTimestamp,
    /// The timestamp is further from the verifier's clock than allowed.
    #[error("request timestamp {skew} s away from now (limit {limit} s)")]
    ClockSkew { skew: i64, limit: u64 },
    /// The signature does not verify under the gateway's key.
    #[error("request signature does not verify")]
    BadSignature,
    /// Signing failed.
    #[error("request signing failed")]
    Sign,
}

/// The signed parts of one request.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// Path and query exactly as sent on the request line.
    pub target: &'a str,
    /// Unix seconds.
    pub timestamp: i64,
    /// `X-Yiqiao-Requester`.
    pub requester: &'a str,
    /// `X-Request-Id`.
    pub request_id: &'a str,
    pub body: &'a [u8],
}

fn field<'a>(name: &'static str, value: &'a str) -> Result<&'a str, RequestSigError> {
    if value.is_empty() || value.len() > MAX_FIELD || value.chars().any(char::is_control) {
        return Err(RequestSigError::Field(name));
    }
    Ok(value)
}

impl SignedRequest<'_> {
    /// The canonical string (module docs).
    pub fn canonical(&self) -> Result<String, RequestSigError> {
        let method = field("method", self.method)?.to_ascii_uppercase();
        Ok([
            REQUEST_SIG_VERSION,
            &method,
            field("target", self.target)?,
            &self.timestamp.to_string(),
            field("requester", self.requester)?,
            field("request_id", self.request_id)?,
            &sm3_hex(self.body),
        ]
        .join("\n"))
    }

    /// `X-Yiqiao-Signature`: base64 of the DER signature of the canonical string.
    pub fn sign(&self, key: &Sm2SigningKey) -> Result<String, RequestSigError> {
        let canonical = self.canonical()?;
        let sig = key
            .sign(canonical.as_bytes())
            .map_err(|_| RequestSigError::Sign)?;
        Ok(b64_encode(&sig.to_der()))
    }

    /// Check `signature` (the header's text) under `key` with the default signer ID, and the
    /// timestamp within `max_skew_secs` of `now` (Unix seconds) either way.
    pub fn verify(
        &self,
        key: &Sm2PublicKey,
        signature: &str,
        now: i64,
        max_skew_secs: u64,
    ) -> Result<(), RequestSigError> {
        let skew = self.timestamp.saturating_sub(now);
        if skew.unsigned_abs() > max_skew_secs {
            return Err(RequestSigError::ClockSkew {
                skew,
                limit: max_skew_secs,
            });
        }
        let der = b64_decode(signature.trim(), MAX_DER_SIG).ok_or(RequestSigError::Malformed)?;
        let sig = Sm2Signature::from_der(&der).map_err(|_| RequestSigError::Malformed)?;
        let canonical = self.canonical()?;
        key.verify(canonical.as_bytes(), &sig, crate::DEFAULT_SIGNER_ID)
            .map_err(|_| RequestSigError::BadSignature)
    }
}

/// Parse `X-Yiqiao-Timestamp` (decimal Unix seconds, no sign, no spaces).
pub fn parse_timestamp(text: &str) -> Result<i64, RequestSigError> {
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestSigError::MalformedTimestamp);
    }
    text.parse()
        .map_err(|_| RequestSigError::MalformedTimestamp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_SIGNER_ID, Sm2PrivateKey};

    fn request(body: &[u8]) -> SignedRequest<'_> {
        SignedRequest {
            method: "get",
            target: "/h/fz-004/fhir/Patient?identifier=urn%3Aoid%3A1%7C42",
            timestamp: 1_765_000_000,
            requester: "yiqiao-gateway",
            request_id: "0f8d7c1e-1111-4222-8333-944455556666",
            body,
        }
    }

    #[test]
    fn canonical_string_is_line_per_field() {
        let text = request(b"").canonical().unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[0], REQUEST_SIG_VERSION);
        assert_eq!(lines[1], "GET");
        assert_eq!(lines[3], "1765000000");
        // SM3 of the empty string (GB/T 32905 reference value).
        assert_eq!(
            lines[6],
            "1ab21d8355cfa17f8e61194831e81a8f22bec8c728fefb747ed035eb5082aa2b"
        );
    }

    #[test]
    fn signatures_verify_and_bind_every_field() {
        let key = Sm2PrivateKey::generate().unwrap();
        let signer = key.signing_key(DEFAULT_SIGNER_ID).unwrap();
        let public = key.public_key();
        let req = request(b"{}");
        let sig = req.sign(&signer).unwrap();
        req.verify(&public, &sig, 1_765_000_010, 300).unwrap();
        let mut other = req;
        other.target = "/h/fz-005/fhir/Patient?identifier=urn%3Aoid%3A1%7C42";
        assert_eq!(
            other.verify(&public, &sig, 1_765_000_010, 300),
            Err(RequestSigError::BadSignature)
        );
        let mut other = req;
        other.body = b"{ }";
        assert_eq!(
            other.verify(&public, &sig, 1_765_000_010, 300),
            Err(RequestSigError::BadSignature)
        );
        let mut other = req;
        other.request_id = "another";
        assert!(other.verify(&public, &sig, 1_765_000_010, 300).is_err());
        assert!(matches!(
            req.verify(&public, &sig, 1_765_000_400, 300),
            Err(RequestSigError::ClockSkew { .. })
        ));
        let stranger = Sm2PrivateKey::generate().unwrap().public_key();
        assert_eq!(
            req.verify(&stranger, &sig, 1_765_000_010, 300),
            Err(RequestSigError::BadSignature)
        );
        assert_eq!(
            req.verify(&public, "not base64!", 1_765_000_010, 300),
            Err(RequestSigError::Malformed)
        );
    }

    #[test]
    fn fields_with_line_breaks_are_refused() {
        let mut req = request(b"");
        req.request_id = "a\nb";
        assert_eq!(req.canonical(), Err(RequestSigError::Field("request_id")));
        assert!(parse_timestamp("-1").is_err());
        assert!(parse_timestamp("17650000001234").is_err());
        assert_eq!(parse_timestamp("1765000000"), Ok(1_765_000_000));
    }
}
