//! The `[mllp]` section of the settings (part of the one typed `Settings`, kept here to keep
//! config.rs short): listeners, who may send, and the limits that bound what a peer costs.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// HL7 v2 over MLLP listeners for hospital ADT feeds (docs/empi.md, "HL7 v2 feed").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MllpSettings {
    /// Start the listeners with the server.
    pub enabled: bool,
    /// Address of the plain-TCP listener (empty: none). Only peers on `allow` are served.
    pub listen: String,
    /// Who may send on the plain-TCP listener: each entry lets an address or network speak
    /// for one institution. Empty: nobody.
    pub allow: Vec<MllpPeer>,
    /// Address of the MLLP-over-TLS listener (empty: none). It uses the `[mtls]` certificate
    /// files and requires a client certificate bound to an institution.
    pub tls_listen: String,
    /// Largest accepted message (bytes between the MLLP start and end characters).
    pub max_message_bytes: usize,
    /// A connection that sends nothing (or does not finish its TLS handshake) for this long is
    /// closed.
    pub idle_timeout_secs: u64,
    /// Concurrent connections of all peers; more wait in the accept queue.
    pub max_connections: usize,
    /// Concurrent connections from one IP address; more are closed at once.
    pub max_connections_per_peer: usize,
    /// Most segments in one message.
    pub max_segments: usize,
    /// Most fields in one segment.
    pub max_fields_per_segment: usize,
    /// Most repetitions of one field.
    pub max_repetitions_per_field: usize,
    /// Most components in one repetition of a field (and subcomponents in one component).
    pub max_components: usize,
    /// Most values in one message: fields, repetitions, components and subcomponents together.
    pub max_values: usize,
}

/// An entry of `mllp.allow`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MllpPeer {
    /// An IP address (`10.20.1.5`) or network (`10.20.1.0/24`).
    pub address: String,
    /// Id of the institution (directory) whose messages this peer sends.
    pub institution: String,
}

impl Default for MllpSettings {
    fn default() -> MllpSettings {
        MllpSettings {
            enabled: false,
            listen: "127.0.0.1:2575".into(),
            allow: Vec::new(),
            tls_listen: String::new(),
            max_message_bytes: 1024 * 1024,
            idle_timeout_secs: 30,
            max_connections: 64,
            max_connections_per_peer: 4,
            max_segments: 500,
            max_fields_per_segment: 256,
            max_repetitions_per_field: 100,
            max_components: 64,
            max_values: 10_000,
        }
    }
}

/// An IP address or network in CIDR notation.
pub fn parse_network(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

impl MllpSettings {
    /// Range and consistency checks: `Err((key, why))`.
    pub fn check(&self, mtls: &crate::config::MtlsSettings) -> Result<(), (String, String)> {
        let bad = |key: &str, why: &str| Err((format!("mllp.{key}"), why.to_string()));
        for (key, value) in [("listen", &self.listen), ("tls_listen", &self.tls_listen)] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                return bad(key, "must be an address such as 0.0.0.0:2575");
            }
        }
        if !self.tls_listen.is_empty()
            && (mtls.cert_file.is_empty()
                || mtls.key_file.is_empty()
                || mtls.client_ca_file.is_empty())
        {
            return bad(
                "tls_listen",
                "needs mtls.cert_file, mtls.key_file and mtls.client_ca_file",
            );
        }
        for (i, peer) in self.allow.iter().enumerate() {
            if parse_network(&peer.address).is_none() {
                return bad(
                    &format!("allow[{i}].address"),
                    "must be an IP address or a network such as 10.20.1.0/24",
                );
            }
            if peer.institution.trim().is_empty() {
                return bad(
                    &format!("allow[{i}].institution"),
                    "must be an institution id",
                );
            }
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
            ("max_segments", self.max_segments),
            ("max_fields_per_segment", self.max_fields_per_segment),
            ("max_repetitions_per_field", self.max_repetitions_per_field),
            ("max_components", self.max_components),
            ("max_values", self.max_values),
        ] {
            if value == 0 {
                return bad(key, "must be positive");
            }
        }
        if self.max_message_bytes < 64 {
            return bad("max_message_bytes", "must be at least 64");
        }
        if self.idle_timeout_secs == 0 {
            return bad("idle_timeout_secs", "must be positive");
        }
        Ok(())
    }
}
