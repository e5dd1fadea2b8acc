//! The audit form of release decisions: one entry per candidate, grouped by decision.

use super::*;

/// The audit form of one candidate's decision: what [`group_reasons`] groups and writes.
/// Typed (not a JSON tree) so that a page of results costs a few allocations per candidate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasonEntry {
    /// `permit` or `deny`.
    pub effect: &'static str,
    /// The deciding rule's id.
    pub rule: &'static str,
    /// The engine's sentence for the auditor.
    pub reason: String,
    /// The consent the decision rests on.
    pub consent: Option<String>,
    /// The agreement the decision rests on.
    pub agreement: Option<String>,
    /// `mask`, `pseudonymise`, `flag-for-review`.
    pub obligations: Vec<&'static str>,
    /// Further rules relied on.
    pub notes: Vec<NoteEntry>,
    pub custodian: Option<String>,
    pub patient: Option<String>,
    /// `Type/id` of the resource decided on.
    pub resource: Option<String>,
    /// Why a permitted resource was withheld after all (its obligations could not be met).
    pub masking_failed: Option<String>,
}

/// A further rule a decision relied on (its sentence is not audited, its ids are).
/// Fields in name order: the audited JSON has its keys sorted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct NoteEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
    pub rule: &'static str,
}

impl ReasonEntry {
    /// The audit form of `decision` (no custodian, patient or resource yet).
    pub fn of(decision: &Decision) -> ReasonEntry {
        ReasonEntry {
            effect: match decision.effect {
                Effect::Permit => "permit",
                Effect::Deny => "deny",
            },
            rule: decision.decided_by.rule.as_str(),
            reason: decision.decided_by.text.clone(),
            consent: decision
                .decided_by
                .consent
                .as_ref()
                .map(|c| c.as_str().to_string()),
            agreement: decision
                .decided_by
                .agreement
                .as_ref()
                .map(|a| a.as_str().to_string()),
            obligations: decision
                .obligations
                .iter()
                .map(|o| match o {
                    Obligation::Mask { .. } => "mask",
                    Obligation::Pseudonymise { .. } => "pseudonymise",
                    Obligation::FlagForReview { .. } => "flag-for-review",
                })
                .collect(),
            notes: decision
                .notes
                .iter()
                .map(|n| NoteEntry {
                    rule: n.rule.as_str(),
                    consent: n.consent.as_ref().map(|c| c.as_str().to_string()),
                    agreement: n.agreement.as_ref().map(|a| a.as_str().to_string()),
                })
                .collect(),
            ..ReasonEntry::default()
        }
    }

    /// The whole entry as one JSON object (sorted keys, absent fields left out).
    pub fn to_value(&self) -> Value {
        let mut out = serde_json::Map::new();
        out.insert("effect".into(), Value::from(self.effect));
        out.insert("rule".into(), Value::from(self.rule));
        out.insert("reason".into(), Value::from(self.reason.as_str()));
        if !self.obligations.is_empty() {
            out.insert("obligations".into(), json!(self.obligations));
        }
        if !self.notes.is_empty() {
            out.insert("notes".into(), json!(self.notes));
        }
        for (k, v) in [
            ("agreement", &self.agreement),
            ("custodian", &self.custodian),
            ("masking_failed", &self.masking_failed),
            ("consent", &self.consent),
            ("patient", &self.patient),
            ("resource", &self.resource),
        ] {
            if let Some(v) = v {
                out.insert(k.into(), Value::from(v.as_str()));
            }
        }
        Value::Object(out)
    }

    /// The reason text with this entry's consent id replaced by `{consent}`.
    fn template(&self) -> std::borrow::Cow<'_, str> {
        match &self.consent {
            Some(id) if !id.is_empty() && self.reason.contains(id.as_str()) => {
                std::borrow::Cow::Owned(self.reason.replace(id.as_str(), "{consent}"))
            }
            _ => std::borrow::Cow::Borrowed(&self.reason),
        }
    }
}

/// What entries of one group share: everything but resource, patient and consent.
#[derive(PartialEq, Eq, Hash)]
struct GroupKey<'a> {
    effect: &'static str,
    rule: &'static str,
    template: std::borrow::Cow<'a, str>,
    agreement: Option<&'a str>,
    obligations: &'a [&'static str],
    notes: &'a [NoteEntry],
    custodian: Option<&'a str>,
    masking_failed: Option<&'a str>,
}

/// Group per-candidate audit reasons into one entry per distinct decision, in order of first
/// appearance, so a page of 50 results is not 50 copies of the same rule and text (the audit
/// record's size was a visible share of a search's latency; BENCHMARKS.md, "Consent engine").
///
/// Candidates fall into one group when everything but their resource, patient and consent is
/// equal (effect, rule, custodian, agreement, obligations, notes), the reason text compared
/// with the consent's id in it replaced by `{consent}`. Each group carries `count`, and:
/// - when all its candidates share one patient and one consent: those at the group level, the
///   reason text as the engine wrote it, and `resources` (their references, in candidate order);
/// - otherwise `items`, one `{patient, consent, resources}` per distinct patient and consent
///   (in order of first appearance; absent fields left out), and the reason text with
///   `{consent}` standing for each item's consent.
///
/// Nothing an auditor reads is lost: every candidate is in exactly one group with its own
/// decision, patient, consent and resource, and each reason text can be restored exactly.
pub fn group_reasons(entries: &[ReasonEntry]) -> Value {
    serde_json::to_value(grouped(entries)).unwrap_or_else(|_| json!([]))
}

/// [`group_reasons`] as JSON text, written straight from the entries (the form audited).
pub fn reasons_json(entries: &[ReasonEntry]) -> String {
    serde_json::to_string(&grouped(entries)).unwrap_or_else(|_| "[]".to_string())
}

/// One audited entry of [`group_reasons`]. Fields in name order: the JSON is the same as a
/// `serde_json::Value` object's (sorted keys).
#[derive(Serialize)]
struct Group<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consent: Option<&'a str>,
    count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    custodian: Option<&'a str>,
    effect: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    items: Option<Vec<Item<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    masking_failed: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    notes: &'a [NoteEntry],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    obligations: &'a [&'static str],
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: Option<&'a str>,
    reason: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: Option<Vec<&'a str>>,
    rule: &'static str,
}

/// The results of one patient under one consent, in a group whose results differ by patient
/// or consent.
#[derive(Serialize)]
struct Item<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    consent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: Option<&'a str>,
    resources: Vec<&'a str>,
}

fn grouped(entries: &[ReasonEntry]) -> Vec<Group<'_>> {
    let mut groups: Vec<(std::borrow::Cow<'_, str>, Vec<&ReasonEntry>)> = Vec::new();
    let mut by_key: HashMap<GroupKey<'_>, usize> = HashMap::new();
    for entry in entries {
        let key = GroupKey {
            effect: entry.effect,
            rule: entry.rule,
            template: entry.template(),
            agreement: entry.agreement.as_deref(),
            obligations: &entry.obligations,
            notes: &entry.notes,
            custodian: entry.custodian.as_deref(),
            masking_failed: entry.masking_failed.as_deref(),
        };
        let at = match by_key.get(&key) {
            Some(&at) => at,
            None => {
                groups.push((key.template.clone(), Vec::new()));
                by_key.insert(key, groups.len() - 1);
                groups.len() - 1
            }
        };
        groups[at].1.push(entry);
    }
    drop(by_key);
    groups
        .into_iter()
        .map(|(template, items)| {
            let first = items[0];
            let uniform = items
                .iter()
                .all(|e| e.patient == first.patient && e.consent == first.consent);
            let mut g = Group {
                agreement: first.agreement.as_deref(),
                consent: None,
                count: items.len(),
                custodian: first.custodian.as_deref(),
                effect: first.effect,
                items: None,
                masking_failed: first.masking_failed.as_deref(),
                notes: &first.notes,
                obligations: &first.obligations,
                patient: None,
                reason: template,
                resources: None,
                rule: first.rule,
            };
            if uniform {
                g.reason = std::borrow::Cow::Borrowed(&first.reason);
                g.patient = first.patient.as_deref();
                g.consent = first.consent.as_deref();
                g.resources = Some(items.iter().filter_map(|e| e.resource.as_deref()).collect());
            } else {
                let mut list: Vec<Item<'_>> = Vec::new();
                let mut at: HashMap<(Option<&str>, Option<&str>), usize> = HashMap::new();
                for e in &items {
                    let key = (e.patient.as_deref(), e.consent.as_deref());
                    let i = *at.entry(key).or_insert_with(|| {
                        list.push(Item {
                            consent: key.1,
                            patient: key.0,
                            resources: Vec::new(),
                        });
                        list.len() - 1
                    });
                    list[i].resources.extend(e.resource.as_deref());
                }
                g.items = Some(list);
            }
            g
        })
        .collect()
}

/// The audit form of one decision.
pub fn decision_reasons(decision: &Decision) -> Value {
    ReasonEntry::of(decision).to_value()
}

/// Put one decision into an audit event.
pub fn annotate_decision(event: &mut AuditEvent, decision: &Decision) {
    event.consent_decision = Some(
        match decision.effect {
            Effect::Permit => "permit",
            Effect::Deny => "deny",
        }
        .to_string(),
    );
    event.consent_reasons = Some(json!([decision_reasons(decision)]).to_string());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(effect: &'static str, rule: &'static str, reason: &str) -> ReasonEntry {
        ReasonEntry {
            effect,
            rule,
            reason: reason.into(),
            ..ReasonEntry::default()
        }
    }

    fn with(base: &ReasonEntry, resource: &str) -> ReasonEntry {
        ReasonEntry {
            resource: Some(resource.into()),
            ..base.clone()
        }
    }

    #[test]
    fn reasons_are_grouped_by_decision_with_every_resource_kept() {
        let permit = ReasonEntry {
            custodian: Some("h1".into()),
            patient: Some("P1".into()),
            ..entry("permit", "custodian", "own data")
        };
        let deny = ReasonEntry {
            consent: Some("c-9".into()),
            custodian: Some("h2".into()),
            patient: Some("P1".into()),
            ..entry("deny", "consent-deny", "patient said no")
        };
        let entries = vec![
            with(&permit, "DocumentReference/a"),
            with(&deny, "DocumentReference/b"),
            with(&permit, "DocumentReference/c"),
            permit.clone(), // a candidate without a resource reference still counts
            with(&deny, "DocumentReference/d"),
        ];
        let grouped = group_reasons(&entries);
        let groups = grouped.as_array().unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0]["rule"], "custodian");
        assert_eq!(groups[0]["count"], 3);
        assert_eq!(
            groups[0]["resources"],
            json!(["DocumentReference/a", "DocumentReference/c"])
        );
        assert_eq!(groups[1]["consent"], "c-9");
        assert_eq!(groups[1]["count"], 2);
        assert_eq!(
            groups[1]["resources"],
            json!(["DocumentReference/b", "DocumentReference/d"])
        );
        // The same decision at another custodian is another entry.
        let elsewhere = ReasonEntry {
            custodian: Some("h3".into()),
            ..with(&permit, "DocumentReference/e")
        };
        let grouped = group_reasons(&[entries[0].clone(), elsewhere]);
        assert_eq!(grouped.as_array().unwrap().len(), 2);
        // So is the same decision whose obligations could not be met.
        let failed = ReasonEntry {
            effect: "deny",
            masking_failed: Some("no such field".into()),
            ..with(&permit, "DocumentReference/f")
        };
        let grouped = group_reasons(&[entries[0].clone(), failed]);
        assert_eq!(grouped[1]["masking_failed"], "no such field");
        assert_eq!(grouped[1]["effect"], "deny");
        assert_eq!(group_reasons(&[]), json!([]));
    }

    #[test]
    fn decisions_that_differ_only_by_patient_and_consent_share_an_entry_with_items() {
        let permit = |patient: &str, consent: &str, doc: &str| ReasonEntry {
            custodian: Some("h1".into()),
            consent: Some(consent.into()),
            patient: Some(patient.into()),
            resource: Some(doc.into()),
            notes: vec![NoteEntry {
                rule: "agreement-relied-on",
                consent: None,
                agreement: Some("A1".into()),
            }],
            ..entry(
                "permit",
                "consent-permit",
                &format!(
                    "The patient's consent {consent} permits Organization/h2 access for purpose TREAT."
                ),
            )
        };
        let entries = vec![
            permit("P1", "Consent/c1", "DocumentReference/a"),
            permit("P2", "Consent/c2", "DocumentReference/b"),
            permit("P2", "Consent/c2", "DocumentReference/c"),
        ];
        let grouped = group_reasons(&entries);
        let groups = grouped.as_array().unwrap();
        assert_eq!(groups.len(), 1, "{grouped}");
        let g = &groups[0];
        assert_eq!(g["count"], 3);
        assert_eq!(
            g["reason"],
            "The patient's consent {consent} permits Organization/h2 access for purpose TREAT."
        );
        assert!(g.get("patient").is_none() && g.get("consent").is_none());
        assert_eq!(
            g["items"],
            json!([
                {"patient": "P1", "consent": "Consent/c1", "resources": ["DocumentReference/a"]},
                {"patient": "P2", "consent": "Consent/c2",
                 "resources": ["DocumentReference/b", "DocumentReference/c"]},
            ])
        );
        // Every original entry can be restored exactly from its group and item.
        let items = g["items"].as_array().unwrap();
        let mut restored_all = Vec::new();
        for item in items {
            for resource in item["resources"].as_array().unwrap() {
                let mut restored = g.as_object().unwrap().clone();
                restored.remove("count");
                restored.remove("items");
                for (k, v) in item.as_object().unwrap() {
                    if k != "resources" {
                        restored.insert(k.clone(), v.clone());
                    }
                }
                restored.insert("resource".into(), resource.clone());
                let text = restored["reason"]
                    .as_str()
                    .unwrap()
                    .replace("{consent}", item["consent"].as_str().unwrap());
                restored.insert("reason".into(), json!(text));
                restored_all.push(Value::Object(restored));
            }
        }
        let originals: Vec<Value> = entries.iter().map(ReasonEntry::to_value).collect();
        assert_eq!(restored_all, originals);
        // The audited text is written straight from the entries, with sorted keys, exactly
        // as this JSON value prints.
        assert_eq!(reasons_json(&entries), grouped.to_string());
        assert_eq!(
            reasons_json(&entries[..1]),
            r#"[{"consent":"Consent/c1","count":1,"custodian":"h1","effect":"permit","notes":[{"agreement":"A1","rule":"agreement-relied-on"}],"patient":"P1","reason":"The patient's consent Consent/c1 permits Organization/h2 access for purpose TREAT.","resources":["DocumentReference/a"],"rule":"consent-permit"}]"#
        );
        // One patient and one consent: the plain form, with the text as written.
        let one = group_reasons(&entries[1..]);
        assert_eq!(one[0]["consent"], "Consent/c2");
        assert_eq!(one[0]["patient"], "P2");
        assert_eq!(entries[1].to_value()["reason"], one[0]["reason"]);
        assert_eq!(
            one[0]["notes"],
            json!([{"rule": "agreement-relied-on", "agreement": "A1"}])
        );
        assert_eq!(
            one[0]["resources"],
            json!(["DocumentReference/b", "DocumentReference/c"])
        );
    }
}
