//! Mutual TLS for institutions (docs/auth.md, "Mutual TLS").
//!
//! With `[mtls] listen` set, the server also listens with TLS (rustls) and requires a client
//! certificate chained to `client_ca_file`. The leaf certificate's SHA-256 is attached to the
//! connection ([`ClientCert`]). An institution bound to a certificate
//! (`PUT /admin/institutions/{id}/client-certificate`) obtains tokens only over a connection
//! presenting that certificate, and its access tokens carry `cnf.x5t#S256` (RFC 8705): they are
//! accepted only on connections presenting the same certificate.

use std::any::Any;
use std::sync::Arc;

use actix_web::dev::Extensions;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::config::MtlsSettings;
use crate::error::{ApiError, ErrorCode};
use crate::extract::ValidJson;
use crate::service::authz::{InstitutionUpdate, Permit};
use crate::state::AppState;

/// The SHA-256 of the client certificate the connection presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCert(pub [u8; 32]);

impl ClientCert {
    /// Lowercase hex, as stored in the directory.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `x5t#S256` (RFC 8705): base64url of the digest.
    pub fn x5t_s256(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
}

/// The client certificate of the request's connection, if it came through the mTLS listener.
pub fn presented(req: &HttpRequest) -> Option<ClientCert> {
    req.conn_data::<ClientCert>().copied()
}

/// `HttpServer::on_connect` hook: remember the TLS client certificate of the connection.
pub fn on_connect(conn: &dyn Any, data: &mut Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tls) = conn.downcast_ref::<Tls>() {
        let (_, session) = tls.get_ref();
        if let Some(leaf) = session.peer_certificates().and_then(|c| c.first()) {
            data.insert(ClientCert(Sha256::digest(leaf.as_ref()).into()));
        }
    }
}

/// The rustls configuration of the mTLS listener: the server certificate, and client
/// certificates required and verified against `client_ca_file`.
pub fn server_config(settings: &MtlsSettings) -> anyhow::Result<rustls::ServerConfig> {
    let read_certs = |path: &str, key: &str| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| anyhow::anyhow!("mtls.{key} {path}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("mtls.{key} {path}: {e}"))?;
        if certs.is_empty() {
            anyhow::bail!("mtls.{key} {path}: no certificate");
        }
        Ok(certs)
    };
    let chain = read_certs(&settings.cert_file, "cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_file)
        .map_err(|e| anyhow::anyhow!("mtls.key_file {}: {e}", settings.key_file))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(&settings.client_ca_file, "client_ca_file")? {
        roots
            .add(ca)
            .map_err(|e| anyhow::anyhow!("mtls.client_ca_file: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| anyhow::anyhow!("mtls.client_ca_file: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("mtls: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("mtls.cert_file/key_file: {e}"))?;
    Ok(config)
}

/// The certificate an institution must present.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientCertBinding {
    /// SHA-256 of the certificate's DER encoding, 64 hex digits (colons allowed).
    pub sha256: String,
}

fn normalise_fingerprint(raw: &str) -> Result<String, ApiError> {
    let hex: String = raw
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "sha256 must be the certificate's SHA-256: 64 hex digits",
        )
        .field("sha256"));
    }
    Ok(hex)
}

/// Require mutual TLS for an institution, bound to one client certificate.
#[utoipa::path(put, path = "/admin/institutions/{id}/client-certificate", tag = "directory",
    params(("id" = String, Path)), request_body = ClientCertBinding,
    responses((status = 200, description = "Bound", body = ClientCertBinding),
              (status = 404, description = "No such institution"),
              (status = 422, description = "Not a SHA-256 fingerprint")),
    security(("admin_token" = [])))]
pub async fn bind(
    permit: Permit<InstitutionUpdate>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: ValidJson<ClientCertBinding>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let admin = permit.staff()?;
    let sha256 = normalise_fingerprint(&body.sha256)?;
    let id = id.into_inner();
    let (inst, fp) = (id.clone(), sha256.clone());
    let event = state
        .auditor
        .staff_event(admin, "update", "U", format!("Organization/{id}"));
    state
        .auditor
        .change(event, move |tx, _| {
            yiqiao_registry::directory::get(tx.conn(), &inst).map_err(ApiError::from)?;
            yiqiao_registry::mtls::bind(tx, &inst, &fp).map_err(ApiError::from)
        })
        .await?;
    Ok(HttpResponse::Ok().json(ClientCertBinding { sha256 }))
}

/// Stop requiring mutual TLS for an institution.
#[utoipa::path(delete, path = "/admin/institutions/{id}/client-certificate", tag = "directory",
    params(("id" = String, Path)),
    responses((status = 204, description = "Unbound"), (status = 404, description = "No binding")),
    security(("admin_token" = [])))]
pub async fn unbind(
    permit: Permit<InstitutionUpdate>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let admin = permit.staff()?;
    let id = id.into_inner();
    let inst = id.clone();
    let event = state
        .auditor
        .staff_event(admin, "update", "U", format!("Organization/{id}"));
    state
        .auditor
        .change(event, move |tx, _| {
            if yiqiao_registry::mtls::unbind(tx, &inst)? {
                Ok(())
            } else {
                Err(ApiError::not_found(format!(
                    "institution {inst} has no client certificate binding"
                )))
            }
        })
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
