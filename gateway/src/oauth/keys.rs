//! The gateway's access-token signing key (ES256, P-256).
//!
//! Replicas must agree on it, so it lives in the database (`gateway_keys`): the first replica
//! to start generates it and inserts generation 1; the others read it (first writer wins on
//! both backends). Every key in the table is published at `/.well-known/jwks.json`.
//! The private key is stored as PKCS#8 in the database: protect database backups as you
//! protect the key (see docs/auth.md).

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use yiqiao_registry::auth::{self as store, GatewayKey};
use yiqiao_registry::store::DbConn;

/// `typ` of gateway access tokens (RFC 9068).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// Claims of a gateway access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub client_id: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    /// Granted scopes, space-separated.
    pub scope: String,
    /// HL7 v3 PurposeOfUse code (TREAT, ETREAT, …).
    pub purpose_of_use: String,
    /// Confirmation (RFC 8705): `{"x5t#S256": …}` when the token is bound to the client
    /// certificate of a mutual-TLS institution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<serde_json::Value>,
}

pub struct SigningKeys {
    kid: String,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    jwks: Value,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("kid", &self.kid)
            .finish()
    }
}

fn public_jwk(kid: &str, public_point: &[u8]) -> Result<Value, String> {
    if public_point.len() != 65 || public_point[0] != 4 {
        return Err("unexpected P-256 public key encoding".into());
    }
    Ok(json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&public_point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&public_point[33..65]),
    }))
}

impl SigningKeys {
    /// Load the key in force, generating generation 1 when the table is empty.
    pub fn load_or_create(conn: &mut DbConn) -> anyhow::Result<SigningKeys> {
        let current = match store::current_key(conn)? {
            Some(key) => key,
            None => {
                let rng = SystemRandom::new();
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| anyhow::anyhow!("cannot generate a P-256 key"))?;
                let pair = EcdsaKeyPair::from_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8.as_ref(),
                    &rng,
                )
                .map_err(|_| anyhow::anyhow!("generated key does not load"))?;
                let kid = format!("gw-{}", uuid::Uuid::new_v4().simple());
                let jwk =
                    public_jwk(&kid, pair.public_key().as_ref()).map_err(|e| anyhow::anyhow!(e))?;
                store::ensure_first_key(
                    conn,
                    &kid,
                    "ES256",
                    &STANDARD.encode(pkcs8.as_ref()),
                    &jwk.to_string(),
                )?
            }
        };
        let all = store::all_keys(conn)?;
        Self::from_rows(&current, &all)
    }

    fn from_rows(current: &GatewayKey, all: &[GatewayKey]) -> anyhow::Result<SigningKeys> {
        let der = STANDARD
            .decode(&current.private_pkcs8)
            .map_err(|_| anyhow::anyhow!("gateway_keys.private_pkcs8 is not base64"))?;
        let encoding = EncodingKey::from_ec_der(&der);
        let mut decoding = HashMap::new();
        let mut published = Vec::new();
        for row in all {
            let jwk: Value = serde_json::from_str(&row.public_jwk).map_err(|_| {
                anyhow::anyhow!("gateway_keys.public_jwk of {} is corrupt", row.kid)
            })?;
            let (Some(x), Some(y)) = (jwk["x"].as_str(), jwk["y"].as_str()) else {
                anyhow::bail!("gateway_keys.public_jwk of {} lacks x/y", row.kid);
            };
            decoding.insert(row.kid.clone(), DecodingKey::from_ec_components(x, y)?);
            published.push(jwk);
        }
        Ok(SigningKeys {
            kid: current.kid.clone(),
            encoding,
            decoding,
            jwks: json!({ "keys": published }),
        })
    }

    pub fn jwks(&self) -> &Value {
        &self.jwks
    }

    pub fn sign(&self, claims: &AccessClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some(ACCESS_TOKEN_TYP.into());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }

    /// Verify a gateway access token: ES256 only, our `kid`, `typ`, issuer, audience, `exp`.
    pub fn verify(&self, token: &str, issuer: &str) -> Result<AccessClaims, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        if header.alg != Algorithm::ES256 || header.typ.as_deref() != Some(ACCESS_TOKEN_TYP) {
            return Err("not a gateway access token".into());
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.decoding.get(kid))
            .ok_or("unknown signing key")?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 5;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<AccessClaims>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired".into(),
                _ => "the token does not verify".into(),
            })
    }
}
