//! Outbound URL policy: every URL the gateway calls on someone else's say — document
//! attachment locations (fetched when a member reads the Binary), subscription webhooks and
//! institutions' federation endpoints — passes the same checks (docs/outbound.md,
//! `[outbound]`):
//!
//! - scheme: `https`, or `http` when `outbound.allow_http`;
//! - destination: the host is resolved once, every address it resolves to is checked against
//!   [`ranges::forbidden_range`] (loopback, link-local and metadata, private, shared, multicast,
//!   documentation …) unless inside `outbound.allow_cidrs`, and the connection goes to exactly
//!   the checked addresses ([`PinnedResolver`], so a second DNS answer cannot swap them);
//!   IP literals are checked the same way before the request is built;
//! - no redirects are followed; no proxy from the environment is used.
//!
//! One answer for every refusal, at registration and at fetch time alike: HTTP 422 with the
//! error code `outbound-refused` ([`refused`]). Why a URL was refused is logged, never sent.
//! Clients built here also carry the gateway's TLS client identity (`client_cert_file`,
//! `client_key_file`) and extra trust anchors (`ca_file`) when configured.

pub mod ranges;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorCode};

/// `[outbound]`: the policy for URLs the gateway calls.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundSettings {
    /// Allow `http://` URLs (closed networks, tests); otherwise `https` only.
    pub allow_http: bool,
    /// Networks (CIDR, e.g. `10.20.0.0/16`, `127.0.0.0/8`) the gateway may call although they
    /// are in a refused range. Empty by default: loopback, private and link-local are refused.
    pub allow_cidrs: Vec<String>,
    /// Deadline of one DNS resolution.
    pub resolve_timeout_ms: u64,
    /// PEM file with the gateway's TLS client certificate chain, presented to hospitals
    /// (ECDSA or RSA; rustls has no SM2). Needs `client_key_file`.
    pub client_cert_file: String,
    /// PEM file with the private key of `client_cert_file` (PKCS#8, SEC1 or PKCS#1).
    pub client_key_file: String,
    /// PEM file with extra trust anchors for hospitals' server certificates (a regional CA).
    pub ca_file: String,
}

impl Default for OutboundSettings {
    fn default() -> OutboundSettings {
        OutboundSettings {
            allow_http: false,
            allow_cidrs: Vec::new(),
            resolve_timeout_ms: 2000,
            client_cert_file: String::new(),
            client_key_file: String::new(),
            ca_file: String::new(),
        }
    }
}

impl OutboundSettings {
    /// Range checks for `Settings::check`: `Err((key, why))`.
    pub fn check(&self) -> Result<(), (String, String)> {
        for (i, cidr) in self.allow_cidrs.iter().enumerate() {
            parse_cidr(cidr).map_err(|why| (format!("outbound.allow_cidrs[{i}]"), why))?;
        }
        if self.resolve_timeout_ms == 0 {
            return Err((
                "outbound.resolve_timeout_ms".into(),
                "must be positive".into(),
            ));
        }
        if self.client_cert_file.is_empty() != self.client_key_file.is_empty() {
            return Err((
                "outbound.client_cert_file".into(),
                "client_cert_file and client_key_file are set together".into(),
            ));
        }
        Ok(())
    }
}

/// A network in CIDR notation; a bare address is a /32 or /128.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    text.trim()
        .parse::<IpNet>()
        .or_else(|_| text.trim().parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not a network in CIDR notation (e.g. 10.0.0.0/8)"))
}

/// Why a URL is refused (logged; the client always gets [`refused`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not an absolute URL")]
    NotAUrl,
    #[error("scheme {0:?} is not allowed")]
    Scheme(String),
    #[error("no host")]
    NoHost,
    #[error("credentials in the URL")]
    Credentials,
    #[error("{host} is {range} ({ip})")]
    Forbidden {
        host: String,
        ip: IpAddr,
        range: &'static str,
    },
    #[error("{0} does not resolve")]
    Unresolved(String),
}

/// The one error of every refusal: 422 `outbound-refused`, naming the field when known.
pub fn refused(field: Option<&str>) -> ApiError {
    let e = ApiError::new(
        ErrorCode::OutboundRefused,
        "the gateway does not call this URL: its scheme or destination is refused by the outbound policy",
    );
    match field {
        Some(f) => e.field(f),
        None => e,
    }
}

/// The policy of this process (cheap to clone).
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    inner: Arc<PolicyInner>,
}

#[derive(Debug)]
struct PolicyInner {
    allow_http: bool,
    allow: Vec<IpNet>,
    resolve_timeout: Duration,
    identity: Option<reqwest::Identity>,
    roots: Vec<reqwest::Certificate>,
}

impl OutboundPolicy {
    pub fn new(settings: &OutboundSettings) -> anyhow::Result<OutboundPolicy> {
        let allow = settings
            .allow_cidrs
            .iter()
            .map(|c| parse_cidr(c).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let read = |key: &str, path: &str| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("outbound.{key} {path}: {e}"))
        };
        let identity =
            if settings.client_cert_file.is_empty() {
                None
            } else {
                let mut pem = read("client_cert_file", &settings.client_cert_file)?;
                pem.push(b'\n');
                pem.extend(read("client_key_file", &settings.client_key_file)?);
                Some(reqwest::Identity::from_pem(&pem).map_err(|e| {
                    anyhow::anyhow!("outbound.client_cert_file/client_key_file: {e}")
                })?)
            };
        let roots = if settings.ca_file.is_empty() {
            Vec::new()
        } else {
            reqwest::Certificate::from_pem_bundle(&read("ca_file", &settings.ca_file)?)
                .map_err(|e| anyhow::anyhow!("outbound.ca_file: {e}"))?
        };
        Ok(OutboundPolicy {
            inner: Arc::new(PolicyInner {
                allow_http: settings.allow_http,
                allow,
                resolve_timeout: Duration::from_millis(settings.resolve_timeout_ms.max(1)),
                identity,
                roots,
            }),
        })
    }

    /// Whether the gateway may connect to `ip`.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), Refusal> {
        let Some(range) = ranges::forbidden_range(ip) else {
            return Ok(());
        };
        let canonical = ip.to_canonical();
        if self
            .inner
            .allow
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&canonical))
        {
            return Ok(());
        }
        Err(Refusal::Forbidden {
            host: host.to_string(),
            ip,
            range,
        })
    }

    /// The checks that need no DNS: an absolute URL with an allowed scheme, a host, no
    /// credentials, and (for an IP literal) an allowed address.
    pub fn check_syntax(&self, raw: &str) -> Result<url::Url, Refusal> {
        let url = url::Url::parse(raw).map_err(|_| Refusal::NotAUrl)?;
        match url.scheme() {
            "https" => {}
            "http" if self.inner.allow_http => {}
            other => return Err(Refusal::Scheme(other.to_string())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refusal::Credentials);
        }
        match url.host() {
            None => Err(Refusal::NoHost),
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(&ip.to_string(), IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
        }?;
        Ok(url)
    }

    /// Resolve `host` once and check every address: the addresses, or the refusal.
    pub async fn resolve(&self, host: &str) -> Result<Vec<SocketAddr>, Refusal> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.check_ip(host, ip)?;
            return Ok(vec![SocketAddr::new(ip, 0)]);
        }
        let looked = tokio::time::timeout(
            self.inner.resolve_timeout,
            tokio::net::lookup_host((host, 0)),
        )
        .await;
        let addrs: Vec<SocketAddr> = match looked {
            Ok(Ok(addrs)) => addrs.collect(),
            _ => Vec::new(),
        };
        if addrs.is_empty() {
            return Err(Refusal::Unresolved(host.to_string()));
        }
        for a in &addrs {
            self.check_ip(host, a.ip())?;
        }
        Ok(addrs)
    }

    /// The check at registration: syntax, then the addresses the host resolves to now. A
    /// host that does not resolve yet is accepted (it is checked again on every call).
    pub async fn check_registration(&self, raw: &str, field: &str) -> Result<(), ApiError> {
        let url = self
            .check_syntax(raw)
            .map_err(|why| log_refusal(raw, &why, field))?;
        if let Some(url::Host::Domain(host)) = url.host() {
            match self.resolve(host).await {
                Ok(_) | Err(Refusal::Unresolved(_)) => {}
                Err(why) => return Err(log_refusal(raw, &why, field)),
            }
        }
        Ok(())
    }

    /// A reqwest client builder with the policy built in: DNS through [`PinnedResolver`], no
    /// redirects, no proxy from the environment, the TLS client identity and trust anchors.
    /// Callers still run [`OutboundPolicy::check_syntax`] on each URL (IP literals bypass DNS).
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder()
            .dns_resolver(Arc::new(PinnedResolver {
                policy: self.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some(id) = &self.inner.identity {
            builder = builder.identity(id.clone());
        }
        for root in &self.inner.roots {
            builder = builder.add_root_certificate(root.clone());
        }
        builder
    }
}

/// Log a refusal with its reason and return the one public error.
pub fn log_refusal(raw: &str, why: &Refusal, field: &str) -> ApiError {
    // The URL is the caller's own input (no patient data); its reason helps the operator.
    tracing::warn!(url = %raw, field, reason = %why, "outbound URL refused");
    refused(Some(field))
}

/// Whether a reqwest error is the policy refusing the destination at connect time.
pub fn refusal_of(err: &reqwest::Error) -> Option<Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            return Some(r.clone());
        }
        source = e.source();
    }
    None
}

/// A DNS resolver for reqwest that resolves once, refuses the name if any address is in a
/// refused range, and hands the connector exactly the checked addresses.
#[derive(Debug)]
pub struct PinnedResolver {
    policy: OutboundPolicy,
}

impl reqwest::dns::Resolve for PinnedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let addrs = policy.resolve(name.as_str()).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(allow_http: bool, cidrs: &[&str]) -> OutboundPolicy {
        OutboundPolicy::new(&OutboundSettings {
            allow_http,
            allow_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            ..OutboundSettings::default()
        })
        .unwrap()
    }

    #[test]
    fn schemes_and_literals() {
        let p = policy(false, &[]);
        assert!(p.check_syntax("https://his.example/fhir").is_ok());
        assert_eq!(
            p.check_syntax("http://his.example/fhir"),
            Err(Refusal::Scheme("http".into()))
        );
        assert!(matches!(
            p.check_syntax("file:///etc/passwd"),
            Err(Refusal::Scheme(_))
        ));
        assert!(matches!(
            p.check_syntax("https://127.0.0.1/x"),
            Err(Refusal::Forbidden { .. })
        ));
        assert!(matches!(
            p.check_syntax("https://[::ffff:169.254.169.254]/x"),
            Err(Refusal::Forbidden { .. })
        ));
        assert!(matches!(
            p.check_syntax("https://2130706433/x"),
            Err(Refusal::Forbidden { .. })
        ));
        assert_eq!(
            p.check_syntax("https://u:p@his.example/"),
            Err(Refusal::Credentials)
        );
        assert!(
            policy(true, &[])
                .check_syntax("http://his.example/")
                .is_ok()
        );
    }

    #[test]
    fn allow_list_admits_refused_ranges() {
        let p = policy(true, &["127.0.0.0/8", "fd00::/8", "10.1.2.3"]);
        assert!(p.check_syntax("http://127.0.0.1:8080/x").is_ok());
        assert!(p.check_syntax("http://[::ffff:127.0.0.1]/x").is_ok());
        assert!(p.check_syntax("http://[fd00::5]/x").is_ok());
        assert!(p.check_syntax("http://10.1.2.3/x").is_ok());
        assert!(p.check_syntax("http://10.1.2.4/x").is_err());
        assert!(p.check_syntax("http://169.254.169.254/x").is_err());
    }

    #[test]
    fn settings_are_checked() {
        let mut s = OutboundSettings {
            allow_cidrs: vec!["10.0.0.0/33".into()],
            ..OutboundSettings::default()
        };
        assert_eq!(s.check().unwrap_err().0, "outbound.allow_cidrs[0]");
        s.allow_cidrs = vec!["192.168.0.0/16".into()];
        assert!(s.check().is_ok());
        s.client_cert_file = "cert.pem".into();
        assert_eq!(s.check().unwrap_err().0, "outbound.client_cert_file");
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused() {
        let p = policy(true, &[]);
        assert!(matches!(
            p.resolve("localhost").await,
            Err(Refusal::Forbidden { .. })
        ));
        let allowed = policy(true, &["127.0.0.0/8", "::1/128"]);
        let addrs = allowed.resolve("localhost").await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }
}
