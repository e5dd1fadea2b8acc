//! Compact JWS (RFC 7515) signed with SM2/SM3, for client assertions (RFC 7523),
//! and the JWK form of SM2 public keys. Specified in `docs/sm2-jws.md`.
//!
//! - `alg` is [`JWS_ALG`] (`"SM2SM3"`); no other value is accepted.
//! - The signature is raw `r ‖ s`, 64 bytes, like ES256 (RFC 7518 §3.4), not DER.
//! - The signing input is `ASCII(BASE64URL(header) ‖ "." ‖ BASE64URL(payload))`,
//!   hashed as SM3(Z_A ‖ input) with the signer ID the verifier is given.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::encoding::{b64url_decode, b64url_encode};
use crate::error::SmError;
use crate::sm2::{Sm2PublicKey, Sm2Signature, Sm2SigningKey};

/// The JWS `alg` value for SM2 signatures with SM3 (not IANA-registered; see docs/sm2-jws.md).
pub const JWS_ALG: &str = "SM2SM3";
/// JWK `crv` value for the SM2 curve.
pub const JWK_CRV: &str = "SM2";
/// Largest compact JWS accepted, in bytes.
pub const MAX_JWS_BYTES: usize = 16 * 1024;
/// Largest decoded protected header, in bytes.
pub const MAX_JWS_HEADER_BYTES: usize = 2 * 1024;

/// Why a JWS was not produced or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Token or header larger than the limits.
    #[error("JWS {0} too large")]
    TooLarge(&'static str),
    /// Not three base64url parts, bad base64url, or not JSON objects.
    #[error("malformed JWS {0}")]
    Malformed(&'static str),
    /// `alg` missing or not `SM2SM3`.
    #[error("unsupported JWS alg (only SM2SM3)")]
    UnsupportedAlg,
    /// A `crit` header: this implementation understands no extensions.
    #[error("JWS crit header not supported")]
    CriticalHeader,
    /// Signature does not verify.
    #[error("JWS signature does not verify")]
    BadSignature,
    /// A primitive failed (signing, key parsing).
    #[error("JWS crypto: {0}")]
    Crypto(SmError),
}

/// Signs `claims` as a compact JWS. `header` must be a JSON object; `alg` is set to
/// `SM2SM3` (an existing different `alg` is an error). The key's own signer ID is used.
pub fn sign_jws(header: &Value, claims: &Value, key: &Sm2SigningKey) -> Result<String, JwsError> {
    let mut header: Map<String, Value> = header
        .as_object()
        .cloned()
        .ok_or(JwsError::Malformed("header"))?;
    match header.get("alg") {
        None => {
            header.insert("alg".into(), Value::String(JWS_ALG.into()));
        }
        Some(Value::String(alg)) if alg == JWS_ALG => {}
        Some(_) => return Err(JwsError::UnsupportedAlg),
    }
    if !claims.is_object() {
        return Err(JwsError::Malformed("payload"));
    }
    let header = serde_json::to_vec(&header).map_err(|_| JwsError::Malformed("header"))?;
    let claims = serde_json::to_vec(claims).map_err(|_| JwsError::Malformed("payload"))?;
    let signing_input = format!("{}.{}", b64url_encode(&header), b64url_encode(&claims));
    let signature = key
        .sign(signing_input.as_bytes())
        .map_err(JwsError::Crypto)?;
    let token = format!("{signing_input}.{}", b64url_encode(&signature.to_raw()));
    if token.len() > MAX_JWS_BYTES {
        return Err(JwsError::TooLarge("token"));
    }
    Ok(token)
}

/// Verifies a compact JWS signed with `SM2SM3` by `key` under `signer_id`
/// (usually `1234567812345678`) and returns `(header, claims)`, both JSON objects.
///
/// Checks only the signature and form; the caller checks `iss`, `sub`, `aud`, `exp`,
/// `jti` per RFC 7523.
pub fn verify_jws(
    token: &str,
    key: &Sm2PublicKey,
    signer_id: &str,
) -> Result<(Value, Value), JwsError> {
    if token.len() > MAX_JWS_BYTES {
        return Err(JwsError::TooLarge("token"));
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwsError::Malformed("compact serialization"));
    };
    let header_bytes =
        b64url_decode(h64, MAX_JWS_HEADER_BYTES).ok_or(JwsError::Malformed("header"))?;
    let header: Value =
        serde_json::from_slice(&header_bytes).map_err(|_| JwsError::Malformed("header"))?;
    let header_obj = header.as_object().ok_or(JwsError::Malformed("header"))?;
    if header_obj.get("alg").and_then(Value::as_str) != Some(JWS_ALG) {
        return Err(JwsError::UnsupportedAlg);
    }
    if header_obj.contains_key("crit") {
        return Err(JwsError::CriticalHeader);
    }
    let sig_bytes = b64url_decode(s64, 64).ok_or(JwsError::Malformed("signature"))?;
    let signature =
        Sm2Signature::from_raw(&sig_bytes).map_err(|_| JwsError::Malformed("signature"))?;
    let signing_input_len = h64.len() + 1 + p64.len();
    let signing_input = &token.as_bytes()[..signing_input_len];
    key.verify(signing_input, &signature, signer_id)
        .map_err(|e| match e {
            SmError::BadSignature => JwsError::BadSignature,
            other => JwsError::Crypto(other),
        })?;
    let payload = b64url_decode(p64, MAX_JWS_BYTES).ok_or(JwsError::Malformed("payload"))?;
    let claims: Value =
        serde_json::from_slice(&payload).map_err(|_| JwsError::Malformed("payload"))?;
    if !claims.is_object() {
        return Err(JwsError::Malformed("payload"));
    }
    Ok((header, claims))
}

/// An SM2 public key as a JWK: `{"kty":"EC","crv":"SM2","x":…,"y":…}` with x and y the
/// 32-byte big-endian affine coordinates, base64url without padding (as RFC 7518 §6.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sm2Jwk {
    /// Always `"EC"`.
    pub kty: String,
    /// Always `"SM2"`.
    pub crv: String,
    /// base64url of x (32 bytes).
    pub x: String,
    /// base64url of y (32 bytes).
    pub y: String,
    /// Key ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Intended use, `"sig"` for client assertion keys.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// `"SM2SM3"` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
}

impl Sm2Jwk {
    /// The JWK of `key` (`use` = `sig`, `alg` = `SM2SM3`).
    pub fn from_public_key(key: &Sm2PublicKey, kid: Option<&str>) -> Self {
        let point = key.to_uncompressed();
        Self {
            kty: "EC".into(),
            crv: JWK_CRV.into(),
            x: b64url_encode(&point[1..33]),
            y: b64url_encode(&point[33..65]),
            kid: kid.map(str::to_owned),
            use_: Some("sig".into()),
            alg: Some(JWS_ALG.into()),
        }
    }

    /// The public key, after checking `kty`, `crv`, `alg`, coordinate lengths and that the
    /// point lies on the SM2 curve.
    pub fn to_public_key(&self) -> Result<Sm2PublicKey, JwsError> {
        if self.kty != "EC" || self.crv != JWK_CRV {
            return Err(JwsError::Malformed("jwk kty/crv"));
        }
        if self.alg.as_deref().is_some_and(|alg| alg != JWS_ALG) {
            return Err(JwsError::UnsupportedAlg);
        }
        let x = b64url_decode(&self.x, 32).ok_or(JwsError::Malformed("jwk x"))?;
        let y = b64url_decode(&self.y, 32).ok_or(JwsError::Malformed("jwk y"))?;
        if x.len() != 32 || y.len() != 32 {
            return Err(JwsError::Malformed("jwk coordinate length"));
        }
        let mut point = Vec::with_capacity(65);
        point.push(0x04);
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        Sm2PublicKey::from_sec1_bytes(&point).map_err(JwsError::Crypto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sm2::{DEFAULT_SIGNER_ID, Sm2PrivateKey};
    use serde_json::json;

    fn key() -> (Sm2SigningKey, Sm2PublicKey) {
        let sk = Sm2PrivateKey::generate().unwrap();
        (sk.signing_key(DEFAULT_SIGNER_ID).unwrap(), sk.public_key())
    }

    #[test]
    fn sign_verify_and_tamper() {
        let (sk, pk) = key();
        let claims =
            json!({"iss":"H330100","sub":"H330100","aud":"https://gw/token","exp":1,"jti":"a"});
        let token = sign_jws(&json!({"typ":"JWT","kid":"k1"}), &claims, &sk).unwrap();
        let (header, got) = verify_jws(&token, &pk, DEFAULT_SIGNER_ID).unwrap();
        assert_eq!(got, claims);
        assert_eq!(header["alg"], "SM2SM3");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(b64url_decode(parts[2], 64).unwrap().len(), 64);

        assert_eq!(verify_jws(&token, &pk, ""), Err(JwsError::BadSignature));
        let (_, other) = key();
        assert_eq!(
            verify_jws(&token, &other, DEFAULT_SIGNER_ID),
            Err(JwsError::BadSignature)
        );

        let forged_payload = b64url_encode(br#"{"iss":"evil"}"#);
        let t = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(
            verify_jws(&t, &pk, DEFAULT_SIGNER_ID),
            Err(JwsError::BadSignature)
        );

        let none = b64url_encode(br#"{"alg":"none"}"#);
        let t = format!("{}.{}.{}", none, parts[1], parts[2]);
        assert_eq!(
            verify_jws(&t, &pk, DEFAULT_SIGNER_ID),
            Err(JwsError::UnsupportedAlg)
        );
        let crit = b64url_encode(br#"{"alg":"SM2SM3","crit":["b64"],"b64":false}"#);
        let t = format!("{}.{}.{}", crit, parts[1], parts[2]);
        assert_eq!(
            verify_jws(&t, &pk, DEFAULT_SIGNER_ID),
            Err(JwsError::CriticalHeader)
        );

        let padded = format!("{token}=");
        assert!(matches!(
            verify_jws(&padded, &pk, DEFAULT_SIGNER_ID),
            Err(JwsError::Malformed(_))
        ));
        let four = format!("{token}.x");
        assert!(matches!(
            verify_jws(&four, &pk, DEFAULT_SIGNER_ID),
            Err(JwsError::Malformed(_))
        ));
        let big = "a".repeat(MAX_JWS_BYTES + 1);
        assert_eq!(
            verify_jws(&big, &pk, DEFAULT_SIGNER_ID),
            Err(JwsError::TooLarge("token"))
        );
        assert_eq!(
            sign_jws(&json!({"alg":"ES256"}), &claims, &sk),
            Err(JwsError::UnsupportedAlg)
        );
    }

    #[test]
    fn jwk_round_trip() {
        let (_, pk) = key();
        let jwk = Sm2Jwk::from_public_key(&pk, Some("k1"));
        let text = serde_json::to_string(&jwk).unwrap();
        assert!(text.contains(r#""kty":"EC""#) && text.contains(r#""crv":"SM2""#));
        assert!(text.contains(r#""use":"sig""#));
        let back: Sm2Jwk = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_public_key().unwrap(), pk);
        let mut bad = back.clone();
        bad.crv = "P-256".into();
        assert!(bad.to_public_key().is_err());
        let mut off_curve = back;
        off_curve.y = b64url_encode(&[7u8; 32]);
        assert!(off_curve.to_public_key().is_err());
    }
}
