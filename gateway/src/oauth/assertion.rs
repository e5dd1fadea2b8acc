//! Client assertions (RFC 7523 §2.2, SMART Backend Services): parse, select the registered
//! key by `kid`, verify the signature, check the claims.
//!
//! Algorithm confusion is excluded by construction: the header's `alg` is only accepted if it
//! is one of [`SUPPORTED_ALGS`] *and* matches the type of the key registered under `kid`
//! (RS256/RS384 ↔ an RSA JWK, ES256 ↔ EC P-256, ES384 ↔ EC P-384, SM2SM3 ↔ a key in
//! `sm2_keys`). The verifier is then built for that one algorithm only; `none` and HMAC
//! algorithms never reach a verifier.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use yiqiao_registry::directory::Institution;

use super::error::OAuthError;

/// `alg` values accepted in client assertions.
pub const SUPPORTED_ALGS: [&str; 5] = ["RS256", "RS384", "ES256", "ES384", yiqiao_sm::JWS_ALG];
/// Largest client assertion accepted, bytes.
pub const MAX_ASSERTION_BYTES: usize = 8 * 1024;
/// Longest `exp - now` accepted (SMART: at most five minutes ahead).
pub const MAX_LIFETIME_SECS: i64 = 300;

/// The unverified parts of an assertion, read to find the client and its key.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub token: String,
    pub alg: String,
    pub kid: Option<String>,
    pub claims: Value,
}

impl Parsed {
    /// The claimed client id (`iss`).
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
    pub fn jti(&self) -> Option<&str> {
        self.claims.get("jti").and_then(Value::as_str)
    }
}

fn decode_part(part: &str, what: &str) -> Result<Value, OAuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| OAuthError::request(format!("client_assertion {what} is not base64url")))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|_| OAuthError::request(format!("client_assertion {what} is not JSON")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(OAuthError::request(format!(
            "client_assertion {what} is not a JSON object"
        )))
    }
}

/// Size, form and base64url of the compact JWS; header and claims as JSON objects.
pub fn parse(token: &str) -> Result<Parsed, OAuthError> {
    if token.len() > MAX_ASSERTION_BYTES {
        return Err(OAuthError::request(format!(
            "client_assertion is larger than {MAX_ASSERTION_BYTES} bytes"
        )));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(OAuthError::request(
            "client_assertion is not a compact JWS (three base64url parts)",
        ));
    }
    if URL_SAFE_NO_PAD.decode(parts[2]).is_err() {
        return Err(OAuthError::request(
            "client_assertion signature is not base64url",
        ));
    }
    let header = decode_part(parts[0], "header")?;
    let claims = decode_part(parts[1], "payload")?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kid = header.get("kid").and_then(Value::as_str).map(String::from);
    Ok(Parsed {
        token: token.to_string(),
        alg,
        kid,
        claims,
    })
}

/// Verify the signature with the institution's key named by `kid`.
pub fn verify_signature(parsed: &Parsed, institution: &Institution) -> Result<(), OAuthError> {
    if !SUPPORTED_ALGS.contains(&parsed.alg.as_str()) {
        return Err(OAuthError::client(format!(
            "alg {:?} is not accepted (supported: {})",
            parsed.alg,
            SUPPORTED_ALGS.join(", ")
        )));
    }
    let kid = parsed
        .kid
        .as_deref()
        .ok_or_else(|| OAuthError::client("the assertion header has no kid"))?;
    if parsed.alg == yiqiao_sm::JWS_ALG {
        let key = institution
            .sm2_keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| {
                OAuthError::client(format!(
                    "kid {kid} is not an SM2 key registered for {}",
                    institution.id
                ))
            })?;
        let public = yiqiao_sm::Sm2PublicKey::from_spki_pem(key.pem.trim())
            .map_err(|_| OAuthError::client(format!("registered SM2 key {kid} is unusable")))?;
        yiqiao_sm::verify_jws(&parsed.token, &public, yiqiao_sm::DEFAULT_SIGNER_ID)
            .map_err(|e| OAuthError::client(format!("SM2 signature rejected: {e}")))?;
        return Ok(());
    }
    let jwk = institution.jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"].as_str() == Some(kid)))
        .ok_or_else(|| {
            OAuthError::client(format!(
                "kid {kid} is not a key registered for {}",
                institution.id
            ))
        })?;
    let (algorithm, kty, crv) = match parsed.alg.as_str() {
        "RS256" => (Algorithm::RS256, "RSA", None),
        "RS384" => (Algorithm::RS384, "RSA", None),
        "ES256" => (Algorithm::ES256, "EC", Some("P-256")),
        _ => (Algorithm::ES384, "EC", Some("P-384")),
    };
    let key_matches = jwk["kty"].as_str() == Some(kty)
        && crv.is_none_or(|c| jwk["crv"].as_str() == Some(c))
        && jwk["alg"].as_str().is_none_or(|a| a == parsed.alg);
    if !key_matches {
        return Err(OAuthError::client(format!(
            "alg {} does not match the type of registered key {kid}",
            parsed.alg
        )));
    }
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone())
        .map_err(|_| OAuthError::client(format!("registered key {kid} is unusable")))?;
    let key = DecodingKey::from_jwk(&jwk)
        .map_err(|_| OAuthError::client(format!("registered key {kid} is unusable")))?;
    let mut validation = Validation::new(algorithm);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(&parsed.token, &key, &validation)
        .map_err(|e| OAuthError::client(format!("signature rejected: {e}")))?;
    Ok(())
}

/// RFC 7523 §3 claim checks, after the signature verified. `now` in seconds since the epoch.
pub fn check_claims(
    parsed: &Parsed,
    client_id: &str,
    token_url: &str,
    now: i64,
    skew: i64,
) -> Result<(String, i64), OAuthError> {
    let claims = &parsed.claims;
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("sub") != Some(client_id) {
        return Err(OAuthError::grant("sub must equal iss (the client id)"));
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == token_url,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(token_url)),
        _ => false,
    };
    if !aud_ok {
        return Err(OAuthError::grant(format!("aud must be {token_url}")));
    }
    let number = |name: &str| claims.get(name).and_then(Value::as_i64);
    let exp = number("exp").ok_or_else(|| OAuthError::grant("exp is required"))?;
    if exp <= now - skew {
        return Err(OAuthError::grant("the assertion has expired"));
    }
    if exp > now + MAX_LIFETIME_SECS + skew {
        return Err(OAuthError::grant(
            "exp is more than five minutes in the future",
        ));
    }
    if let Some(claim) = claims.get("nbf") {
        let nbf = claim
            .as_i64()
            .ok_or_else(|| OAuthError::grant("nbf must be a number"))?;
        if nbf > now + skew {
            return Err(OAuthError::grant("the assertion is not valid yet (nbf)"));
        }
    }
    if let Some(claim) = claims.get("iat") {
        let iat = claim
            .as_i64()
            .ok_or_else(|| OAuthError::grant("iat must be a number"))?;
        if iat > now + skew {
            return Err(OAuthError::grant("iat is in the future"));
        }
    }
    let jti = text("jti")
        .filter(|j| !j.is_empty())
        .ok_or_else(|| OAuthError::grant("jti is required"))?;
    if jti.len() > 256 {
        return Err(OAuthError::grant("jti is longer than 256 characters"));
    }
    Ok((jti.to_string(), exp))
}
