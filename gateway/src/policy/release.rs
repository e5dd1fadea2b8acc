//! Release: deciding what of an answer leaves the gateway, under the patients' consents, the
//! agreements and the masking obligations. Every path ends in [`Policy::release_prepared`],
//! the one place that decides and masks; it fails closed (see its docs).

use super::*;

/// One resource on its way out: who holds it, whose it is, and the resource itself.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Custodian institution id (the institution that registered the data).
    pub custodian: String,
    /// Enterprise person id; `None` for data not linked to a person (no consent can name it).
    pub patient: Option<String>,
    pub resource: Value,
}

/// A resource that was not released, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Withheld {
    /// Index in the input list.
    pub index: usize,
    pub custodian: String,
    pub patient: Option<String>,
    /// Rule id (stable, see `yiqiao_consent::RuleId`), or `masking-failed`.
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
    pub reason: String,
}

/// Everything a release decides with besides the candidates, loaded once per request
/// ([`Policy::prepare_on`] / [`Policy::prepare`]): the requester, the agreements and consents
/// as of one change counter, the care relationships, the instant. A request that releases
/// in several parts (the federated search, one hospital's answer at a time, as they arrive)
/// decides every part with the same state and reads nothing shared after the first.
pub struct Prepared {
    requester: Requester,
    /// `None`: enforcement is off (`consent.enforce = false`), everything is released.
    state: Option<PreparedState>,
}

struct PreparedState {
    agreements: Arc<AgreementStore>,
    consents: HashMap<String, Arc<Vec<Consent>>>,
    encounters: HashMap<String, Vec<Encounter>>,
    at: DateTime<Utc>,
}

/// The result of [`Policy::release`].
#[derive(Debug, Default)]
pub struct Released {
    /// (index in the input, resource after masking), in input order.
    pub kept: Vec<(usize, Value)>,
    pub withheld: Vec<Withheld>,
    /// One audit entry per candidate (decision and reasons).
    reasons: Vec<ReasonEntry>,
    /// Whether enforcement was switched off (`consent.enforce = false`).
    unenforced: bool,
    /// Resources released and taken out of `kept` ([`Released::take_kept`]).
    taken: usize,
}

impl Released {
    /// Move the released resources out (a release in parts hands each part's resources on
    /// as it goes); they still count as released in the summary.
    pub fn take_kept(&mut self) -> Vec<(usize, Value)> {
        self.taken += self.kept.len();
        std::mem::take(&mut self.kept)
    }

    /// Withheld counts by rule id.
    pub fn withheld_by_rule(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for w in &self.withheld {
            *out.entry(w.rule.clone()).or_insert(0) += 1;
        }
        out
    }

    /// `permit` (all released), `deny` (none), `partial`, or `none` (nothing to decide).
    pub fn summary(&self) -> &'static str {
        match (
            self.kept.is_empty() && self.taken == 0,
            self.withheld.is_empty(),
        ) {
            _ if self.unenforced => "not-enforced",
            (true, true) => "none",
            (false, true) => "permit",
            (true, false) => "deny",
            (false, false) => "partial",
        }
    }

    /// Withhold a candidate whose patient's consents were not read for this release.
    fn withhold_unread(&mut self, index: usize, candidate: Candidate) {
        const RULE: &str = "consents-not-read";
        let reason = "the patient's consents were not read for this release".to_string();
        self.reasons.push(ReasonEntry {
            effect: "deny",
            rule: RULE,
            reason: reason.clone(),
            custodian: Some(candidate.custodian.clone()),
            patient: candidate.patient.clone(),
            resource: resource_ref(&candidate.resource),
            ..ReasonEntry::default()
        });
        self.withheld.push(Withheld {
            index,
            custodian: candidate.custodian,
            patient: candidate.patient,
            rule: RULE.into(),
            consent: None,
            reason,
        });
    }

    /// Forget every candidate at index `n` or later (read ahead but not released).
    pub fn truncate(&mut self, n: usize) {
        self.kept.retain(|(i, _)| *i < n);
        self.withheld.retain(|w| w.index < n);
        self.reasons.truncate(n);
    }

    /// Append the results of another batch of candidates that followed this one; its indices
    /// are shifted by `offset` (the number of candidates before it).
    pub fn append(&mut self, other: Released, offset: usize) {
        self.unenforced |= other.unenforced;
        self.taken += other.taken;
        self.kept
            .extend(other.kept.into_iter().map(|(i, r)| (i + offset, r)));
        self.withheld
            .extend(other.withheld.into_iter().map(|mut w| {
                w.index += offset;
                w
            }));
        self.reasons.extend(other.reasons);
    }

    /// 403 `consent-denied` naming the rule that withheld the (first) resource.
    pub fn refusal(&self) -> ApiError {
        let (rule, reason) = self
            .withheld
            .first()
            .map(|w| (w.rule.as_str(), w.reason.as_str()))
            .unwrap_or(("consent", "withheld by the access policy"));
        ApiError::new(
            crate::error::ErrorCode::ConsentDenied,
            format!("withheld by the access policy (rule {rule}): {reason}"),
        )
    }

    /// The audited reasons: one entry per distinct decision (see [`group_reasons`]).
    pub fn reasons(&self) -> Value {
        group_reasons(&self.reasons)
    }

    /// Put the decision and its reasons (rule ids, consent and agreement ids) into an audit event.
    pub fn annotate(&self, event: &mut AuditEvent) {
        event.consent_decision = Some(self.summary().to_string());
        event.consent_reasons = Some(reasons_json(&self.reasons));
    }
}

impl Policy {
    /// Decide each candidate, mask the permitted ones by their obligations, and say what was
    /// withheld and why. Order is kept.
    pub async fn release(
        &self,
        caller: &Caller,
        ask: &Ask,
        candidates: Vec<Candidate>,
    ) -> Result<Released, ApiError> {
        self.release_for(&Self::requester(caller), ask, candidates)
            .await
    }

    /// [`Policy::release`] with the caches synchronised by [`Policy::sync_on`] earlier in
    /// this request (`None`: synchronise now).
    pub async fn release_with(
        &self,
        caller: &Caller,
        ask: &Ask,
        candidates: Vec<Candidate>,
        synced: Option<Synced>,
    ) -> Result<Released, ApiError> {
        self.release_synced(&Self::requester(caller), ask, candidates, synced)
            .await
    }

    /// [`Policy::release`] for a requester that is not the caller (a subscriber).
    pub async fn release_for(
        &self,
        requester: &Requester,
        ask: &Ask,
        candidates: Vec<Candidate>,
    ) -> Result<Released, ApiError> {
        self.release_synced(requester, ask, candidates, None).await
    }

    async fn release_synced(
        &self,
        requester: &Requester,
        ask: &Ask,
        candidates: Vec<Candidate>,
        synced: Option<Synced>,
    ) -> Result<Released, ApiError> {
        if self.enforce && candidates.is_empty() {
            return Ok(Released::default());
        }
        let own = requester.institution.as_str();
        // The custodian's own data needs no consents (rule 1); read only the others'.
        let patients: Vec<String> = candidates
            .iter()
            .filter(|c| c.custodian != own)
            .filter_map(|c| c.patient.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let prepared = self.prepare_for(requester, patients, synced).await?;
        Ok(self.release_prepared(&prepared, ask, candidates))
    }

    /// The release context of `caller` for these patients' data ([`Prepared`]), reading
    /// what the caches lack; `synced` as from [`Policy::sync_on`] (`None`: synchronise now).
    pub async fn prepare(
        &self,
        caller: &Caller,
        patients: Vec<String>,
        synced: Option<Synced>,
    ) -> Result<Prepared, ApiError> {
        self.prepare_for(&Self::requester(caller), patients, synced)
            .await
    }

    async fn prepare_for(
        &self,
        requester: &Requester,
        patients: Vec<String>,
        synced: Option<Synced>,
    ) -> Result<Prepared, ApiError> {
        if !self.enforce {
            return Ok(Prepared {
                requester: requester.clone(),
                state: None,
            });
        }
        let (seq, agreements) = match synced {
            Some(Synced { seq, agreements }) => (seq, agreements),
            None => self.sync().await?,
        };
        let at = Utc::now();
        let consents = if patients.is_empty() {
            HashMap::new()
        } else {
            self.consents_of(patients.clone(), seq).await?
        };
        let encounters = self.encounters_of(requester, patients, at).await?;
        Ok(Prepared {
            requester: requester.clone(),
            state: Some(PreparedState {
                agreements,
                consents,
                encounters,
                at,
            }),
        })
    }

    /// [`Policy::prepare`] inside a blocking call that holds `conn` and has just run
    /// [`Policy::sync_on`] on it: no further trip to the database pool. `Ok(None)` when the
    /// synchronisation was left to [`Policy::prepare`] (with Redis, `synced` is `None`).
    pub fn prepare_on(
        &self,
        conn: &mut DbConn,
        requester: Requester,
        patients: Vec<String>,
        synced: Option<&Synced>,
    ) -> Result<Option<Prepared>, ApiError> {
        if !self.enforce {
            return Ok(Some(Prepared {
                requester,
                state: None,
            }));
        }
        let Some(Synced { seq, agreements }) = synced else {
            return Ok(None);
        };
        let at = Utc::now();
        let encounters = Self::encounters_on(conn, &requester, &patients, at)?;
        let consents = if patients.is_empty() {
            HashMap::new()
        } else {
            self.consents_on(conn, patients, *seq)?
        };
        Ok(Some(Prepared {
            requester,
            state: Some(PreparedState {
                agreements: agreements.clone(),
                consents,
                encounters,
                at,
            }),
        }))
    }

    /// Decide and mask `candidates` with a prepared context (no IO): the release itself, the
    /// one place every release path ends in. It fails closed: a resource leaves only when the
    /// engine permits it and its obligations are met; another custodian's resource about a
    /// patient whose consents the context does not hold is withheld (`consents-not-read`),
    /// never decided as if the patient had none. Data not linked to a person is decided
    /// without consents (none can name it).
    pub fn release_prepared(
        &self,
        prepared: &Prepared,
        ask: &Ask,
        candidates: Vec<Candidate>,
    ) -> Released {
        let Some(PreparedState {
            agreements,
            consents,
            encounters,
            at,
        }) = &prepared.state
        else {
            return Released {
                kept: candidates
                    .into_iter()
                    .map(|c| c.resource)
                    .enumerate()
                    .collect(),
                unenforced: true,
                ..Released::default()
            };
        };
        let requester = &prepared.requester;
        let own = requester.institution.as_str();
        let at = *at;
        let mut released = Released::default();
        let pseudonymiser = self
            .key
            .as_ref()
            .map(|k| Pseudonymiser::new(k, InstitutionId::new(own)));
        let none: Vec<Consent> = Vec::new();
        for (index, candidate) in candidates.into_iter().enumerate() {
            let data = data_item_of(&candidate.resource);
            // Unlinked data is keyed by nothing a consent could name.
            let patient_key = candidate
                .patient
                .clone()
                .unwrap_or_else(|| "(unlinked)".to_string());
            let patient = PatientId::new(patient_key.clone());
            let custodian = InstitutionId::new(candidate.custodian.clone());
            let list = match consents.get(&patient_key) {
                Some(list) => list.as_ref(),
                None if candidate.patient.is_some() && candidate.custodian != own => {
                    released.withhold_unread(index, candidate);
                    continue;
                }
                None => &none,
            };
            let request = AccessRequest {
                requester,
                purpose: ask.purpose,
                patient: &patient,
                custodian: &custodian,
                data: &data,
                at,
                break_glass_reason: ask.break_glass_reason.as_deref(),
                encounters: encounters.get(&patient_key).map_or(&[][..], Vec::as_slice),
            };
            let decision = self.engine.decide(
                &request,
                list,
                agreements.between(&custodian, &requester.institution),
            );
            let mut reasons = ReasonEntry::of(&decision);
            reasons.custodian = Some(candidate.custodian.clone());
            reasons.patient = candidate.patient.clone();
            reasons.resource = resource_ref(&candidate.resource);
            if decision.is_permit() {
                let mut resource = candidate.resource;
                match apply_obligations(
                    &mut resource,
                    &decision.obligations,
                    pseudonymiser.as_ref(),
                ) {
                    Ok(()) => released.kept.push((index, resource)),
                    Err(e) => {
                        reasons.effect = "deny";
                        reasons.masking_failed = Some(e.to_string());
                        released.withheld.push(Withheld {
                            index,
                            custodian: candidate.custodian,
                            patient: candidate.patient,
                            rule: "masking-failed".into(),
                            consent: None,
                            reason: format!(
                                "permitted with obligations that could not be met: {e}"
                            ),
                        });
                    }
                }
            } else {
                released.withheld.push(Withheld {
                    index,
                    custodian: candidate.custodian,
                    patient: candidate.patient,
                    rule: decision.decided_by.rule.as_str().to_string(),
                    consent: decision
                        .decided_by
                        .consent
                        .as_ref()
                        .map(|c| c.as_str().to_string()),
                    reason: decision.decided_by.text.clone(),
                });
            }
            released.reasons.push(reasons);
        }
        released
    }

    /// Mask one resource by a decision's obligations (for single-resource exits).
    pub fn mask(
        &self,
        caller: &Caller,
        decision: &Decision,
        resource: &mut Value,
    ) -> Result<(), ApiError> {
        let pseudonymiser = self
            .key
            .as_ref()
            .map(|k| Pseudonymiser::new(k, InstitutionId::new(caller.institution.id.as_str())));
        apply_obligations(resource, &decision.obligations, pseudonymiser.as_ref()).map_err(|e| {
            ApiError::new(
                crate::error::ErrorCode::ConsentDenied,
                format!(
                    "the data may only be released with obligations that cannot be met here: {e}"
                ),
            )
        })
    }
}
