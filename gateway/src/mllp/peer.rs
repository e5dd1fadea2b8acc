//! Who is at the other end of an MLLP connection, and what one address may hold.
//!
//! MLLP carries no credential, so the listener authenticates the connection before it reads a
//! message: on plain TCP by the peer's address (`mllp.allow`: address or network → institution),
//! on TLS by the client certificate (its SHA-256 bound to an institution with
//! `PUT /admin/institutions/{id}/client-certificate`, as for the mTLS HTTP listener). A
//! connection that cannot be authenticated is closed before anything is read, and the refusal
//! is recorded in the audit trail (DICOM 110114 user authentication, outcome 4, bounded: a
//! flood of refusals is summarised, never blocks). Every message's MSH-4.1 must then name one
//! of the connection's institutions (checked in [`super::adt`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use yiqiao_registry::audit::{AuditEvent, EntityRef, outcome};

use super::settings::{MllpPeer, parse_network};
use crate::state::AppState;

/// An authenticated connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The institutions this connection sends for: MSH-4.1 must be one of them.
    pub institutions: Vec<String>,
    /// How it was authenticated (`address 10.20.1.0/24`, `client certificate <sha256>`).
    pub by: String,
}

impl Peer {
    /// Is `facility` (MSH-4.1) one of the connection's institutions?
    pub fn sends_for(&self, facility: &str) -> bool {
        self.institutions.iter().any(|i| i == facility)
    }

    /// `Ok` when `facility` (MSH-4.1) is one of the connection's institutions; otherwise the
    /// attempt is recorded (durably, before the caller's AR; a failure to record is logged and
    /// the message refused all the same) and `Err` says why.
    pub async fn may_send_for(
        &self,
        state: &AppState,
        facility: &str,
        event: &str,
        control_id: &str,
    ) -> Result<(), String> {
        if self.sends_for(facility) {
            return Ok(());
        }
        let clip = |t: &str| t.chars().take(64).collect::<String>();
        let reason = format!(
            "MSH-4 {} is not the institution this connection is authenticated for ({}, by {})",
            clip(facility),
            self.institutions.join(", "),
            self.by
        );
        let mut record = state.auditor.rest_event("update", "U");
        record.outcome = outcome::MINOR_FAILURE.into();
        record.outcome_desc = Some(format!("HL7 v2 message refused: {reason}"));
        if let [only] = self.institutions.as_slice() {
            record.agent_institution = Some(only.clone());
        }
        feed_agent(&mut record, self.addr);
        record.entities.push(EntityRef::query(format!(
            "HL7 ADT^{} {} MSH-4 {}",
            clip(event),
            clip(control_id),
            clip(facility)
        )));
        if let Err(e) = state.auditor.record(record).await {
            tracing::error!(peer = %self.addr, error = %e.message, "cannot record a refused HL7 v2 message");
        }
        Err(reason)
    }
}

/// The peers allowed on the plain-TCP listener.
#[derive(Debug, Clone, Default)]
pub struct AllowList(Vec<(IpNet, String)>);

impl AllowList {
    /// Entries whose address does not parse are skipped (the settings check refuses them).
    pub fn new(entries: &[MllpPeer]) -> AllowList {
        AllowList(
            entries
                .iter()
                .filter_map(|p| Some((parse_network(&p.address)?, p.institution.trim().into())))
                .collect(),
        )
    }

    /// The peer authenticated by its address, if any entry contains it.
    pub fn authenticate(&self, addr: SocketAddr) -> Option<Peer> {
        let ip = addr.ip().to_canonical();
        let mut institutions = Vec::new();
        let mut networks = Vec::new();
        for (net, institution) in &self.0 {
            if net.contains(&ip) {
                if !institutions.contains(institution) {
                    institutions.push(institution.clone());
                }
                networks.push(net.to_string());
            }
        }
        (!institutions.is_empty()).then(|| Peer {
            addr,
            institutions,
            by: format!("address {}", networks.join(", ")),
        })
    }
}

/// Open connections per IP address, bounded.
#[derive(Debug)]
pub struct PeerSlots {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of an address; released when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<PeerSlots>,
    ip: IpAddr,
}

impl PeerSlots {
    pub fn new(max: usize) -> Arc<PeerSlots> {
        Arc::new(PeerSlots {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for another connection from `ip`, unless it already has the most allowed.
    pub fn claim(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            ip,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

fn feed_agent(event: &mut AuditEvent, addr: SocketAddr) {
    event.agent_user = Some(format!("mllp:{addr}"));
    event.agent_role = Some("hl7v2-feed".into());
    event.agent_address = Some(addr.ip().to_canonical().to_string());
}

/// A connection closed before any message was read: logged, and recorded in the audit trail
/// (bounded and non-blocking, like refused HTTP requests).
pub fn refuse(state: &AppState, addr: SocketAddr, listener: &str, why: &str) {
    tracing::warn!(peer = %addr, listener, reason = why, "MLLP connection refused");
    let mut event = state.auditor.rest_event("login", "E");
    event.type_code = "110114".into();
    event.subtype_code = "110122".into();
    event.outcome = outcome::MINOR_FAILURE.into();
    event.outcome_desc = Some(format!("MLLP connection refused: {why}"));
    feed_agent(&mut event, addr);
    event
        .entities
        .push(EntityRef::query(format!("MLLP listener {listener}")));
    state.auditor.record_refusal(event);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer(address: &str, institution: &str) -> MllpPeer {
        MllpPeer {
            address: address.into(),
            institution: institution.into(),
        }
    }

    #[test]
    fn allow_list_matches_addresses_and_networks() {
        let allow = AllowList::new(&[
            peer("10.20.1.0/24", "hosp-001"),
            peer("10.20.1.7", "hosp-002"),
            peer("::1", "hosp-003"),
        ]);
        let at = |s: &str| allow.authenticate(s.parse().unwrap());
        assert_eq!(at("10.20.1.9:5000").unwrap().institutions, ["hosp-001"]);
        let both = at("10.20.1.7:5000").unwrap();
        assert_eq!(both.institutions, ["hosp-001", "hosp-002"]);
        assert!(both.sends_for("hosp-002") && !both.sends_for("hosp-003"));
        assert!(at("10.20.2.1:5000").is_none());
        // An IPv4 peer on a dual-stack listener arrives as an IPv4-mapped IPv6 address.
        assert_eq!(
            at("[::ffff:10.20.1.9]:5000").unwrap().institutions,
            ["hosp-001"]
        );
        assert_eq!(at("[::1]:5000").unwrap().institutions, ["hosp-003"]);
        assert!(
            AllowList::new(&[])
                .authenticate("127.0.0.1:1".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn slots_are_bounded_per_address_and_released() {
        let slots = PeerSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.claim(a).unwrap();
        let _second = slots.claim(a).unwrap();
        assert!(slots.claim(a).is_none());
        assert!(slots.claim(b).is_some());
        drop(first);
        assert!(slots.claim(a).is_some());
    }
}
