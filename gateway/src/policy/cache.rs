//! The per-replica cache of consents and agreements, kept fresh across replicas by the
//! database change counter and, when configured, the Redis marker (see the module docs of
//! [`crate::policy`]); and the care relationships read for rule 6.

use super::*;

/// Consent caches brought up to date during one request ([`Policy::sync_on`]): the change
/// counter read and the agreements in force then; hand it to [`Policy::release_with`] or
/// [`Policy::prepare_on`] / [`Policy::prepare`].
pub struct Synced {
    pub(super) seq: i64,
    pub(super) agreements: Arc<AgreementStore>,
}

/// What [`Policy::sync`] does next.
enum SyncPlan {
    /// The cache is current (Redis marker unchanged): its counter and agreements.
    Fresh(i64, Arc<AgreementStore>),
    Read(SyncRead),
}

/// A database read the cache needs: changes after `since`, agreements unless `cached`.
struct SyncRead {
    since: i64,
    cached: Option<Arc<AgreementStore>>,
    marker: Option<i64>,
}

pub(super) struct Cache {
    /// Database change counter the cache reflects.
    pub(super) seq: i64,
    /// Redis counter seen at the last database read (None: not read or Redis unavailable).
    pub(super) marker: Option<i64>,
    pub(super) synced_at: Option<Instant>,
    pub(super) patients: HashMap<String, Arc<Vec<Consent>>>,
    pub(super) agreements: Option<Arc<AgreementStore>>,
}

impl Policy {
    pub(super) async fn redis(&self) -> Option<ConnectionManager> {
        let client = self.redis.as_ref()?;
        let conn = self
            .redis_conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                match tokio::time::timeout(
                    self.timeout,
                    ConnectionManager::new_with_config(client.clone(), config),
                )
                .await
                {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("redis connect timed out".to_string()),
                }
            })
            .await;
        match conn {
            Ok(c) => Some(c.clone()),
            Err(e) => {
                tracing::warn!(cause = %e, "consent cache: Redis unavailable, reading the database counter");
                None
            }
        }
    }

    /// The Redis change counter; `None` without Redis or when it cannot be read.
    async fn redis_marker(&self) -> Option<i64> {
        let mut conn = self.redis().await?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(&self.version_key);
        let get = cmd.query_async::<Option<i64>>(&mut conn);
        match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(v)) => Some(v.unwrap_or(0)),
            Ok(Err(e)) => {
                tracing::warn!(cause = %e, "consent cache: Redis GET failed");
                None
            }
            Err(_) => None,
        }
    }

    /// After a consent or agreement write has committed: tell the other replicas (Redis) and
    /// drop this replica's cached entry. Call before answering the write.
    pub async fn changed(&self, patient: Option<&str>) {
        if let Ok(mut c) = self.cache.lock() {
            match patient {
                Some(p) => {
                    c.patients.remove(p);
                }
                None => c.agreements = None,
            }
            c.synced_at = None;
        }
        if let Some(mut conn) = self.redis().await {
            let mut cmd = redis::cmd("INCR");
            cmd.arg(&self.version_key);
            let incr = cmd.query_async::<i64>(&mut conn);
            match tokio::time::timeout(self.timeout, incr).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(cause = %e, "consent change not announced in Redis; other replicas see it within consent.cache_max_age_ms")
                }
                Err(_) => tracing::error!(
                    "consent change not announced in Redis (timeout); other replicas see it within consent.cache_max_age_ms"
                ),
            }
        }
    }

    /// Bring the cache up to date with the database; returns the counter it reflects.
    pub(super) async fn sync(&self) -> Result<(i64, Arc<AgreementStore>), ApiError> {
        let marker = self.redis_marker().await;
        let plan = match self.sync_plan(marker)? {
            SyncPlan::Fresh(seq, agreements) => return Ok((seq, agreements)),
            SyncPlan::Read(plan) => plan,
        };
        let (since, have) = (plan.since, plan.cached.is_some());
        let read = self
            .blocking(move |conn| Self::sync_read(conn, since, have))
            .await?;
        self.sync_apply(plan, read)
    }

    /// [`Policy::sync`] on a database connection the caller already holds (inside its own
    /// blocking call, e.g. next to its data query), so the per-request read costs no extra
    /// trip to the blocking pool. Without Redis only: with Redis the marker decides whether to
    /// read at all, and `None` leaves that to [`Policy::release`]. `None` too when enforcement
    /// is off (nothing to read).
    pub fn sync_on(&self, conn: &mut DbConn) -> Result<Option<Synced>, ApiError> {
        if !self.enforce || self.redis.is_some() {
            return Ok(None);
        }
        let plan = match self.sync_plan(None)? {
            SyncPlan::Fresh(seq, agreements) => return Ok(Some(Synced { seq, agreements })),
            SyncPlan::Read(plan) => plan,
        };
        let read = Self::sync_read(conn, plan.since, plan.cached.is_some())?;
        let (seq, agreements) = self.sync_apply(plan, read)?;
        Ok(Some(Synced { seq, agreements }))
    }

    /// Whether the cache is known fresh (the Redis marker has not moved within `max_age`), or
    /// what must be read.
    fn sync_plan(&self, marker: Option<i64>) -> Result<SyncPlan, ApiError> {
        let c = self.lock()?;
        if let (Some(m), Some(seen), Some(at), Some(agreements)) =
            (marker, c.marker, c.synced_at, &c.agreements)
            && m == seen
            && at.elapsed() < self.max_age
        {
            return Ok(SyncPlan::Fresh(c.seq, agreements.clone()));
        }
        Ok(SyncPlan::Read(SyncRead {
            since: c.seq,
            cached: c.agreements.clone(),
            marker,
        }))
    }

    /// One round trip: the counter, what changed, and the agreements only when they did.
    fn sync_read(
        conn: &mut DbConn,
        since: i64,
        have_agreements: bool,
    ) -> Result<(store::Changes, Option<Vec<StoredAgreement>>), yiqiao_registry::StoreError> {
        let changes = store::changes_since(conn, since.max(0))?;
        let reload = since < 0 || changes.agreements || !have_agreements;
        let agreements = if reload {
            Some(store::list_agreements(conn)?)
        } else {
            None
        };
        Ok((changes, agreements))
    }

    /// Drop what changed from the cache; returns the counter and agreements it now reflects.
    fn sync_apply(
        &self,
        plan: SyncRead,
        (changes, agreements): (store::Changes, Option<Vec<StoredAgreement>>),
    ) -> Result<(i64, Arc<AgreementStore>), ApiError> {
        let table = match (agreements, plan.cached) {
            (Some(rows), _) => {
                let mut table = AgreementStore::new();
                for row in &rows {
                    table.upsert(agreement_of(row).map_err(ApiError::internal)?);
                }
                Arc::new(table)
            }
            (None, Some(cached)) => cached,
            (None, None) => Arc::new(AgreementStore::new()),
        };
        let mut c = self.lock()?;
        if plan.since < 0 {
            c.patients.clear();
        }
        if changes.seq >= c.seq {
            for p in &changes.patients {
                c.patients.remove(p);
            }
            c.seq = changes.seq;
            c.agreements = Some(table.clone());
            c.marker = plan.marker;
            c.synced_at = Some(Instant::now());
        }
        Ok((changes.seq, table))
    }

    /// The care relationships (active encounters) of `patients` at `at`, for an internet-
    /// hospital requester (rule 6); empty for other kinds, which the rule does not concern.
    pub(super) async fn encounters_of(
        &self,
        requester: &Requester,
        patients: Vec<String>,
        at: DateTime<Utc>,
    ) -> Result<HashMap<String, Vec<Encounter>>, ApiError> {
        if requester.kind != InstitutionKind::InternetHospital || patients.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = self
            .blocking(move |conn| encounters::active_for_persons(conn, &patients, at.naive_utc()))
            .await?;
        Ok(care_relationships(rows))
    }

    /// [`Policy::encounters_of`] on a connection the caller holds.
    pub(super) fn encounters_on(
        conn: &mut DbConn,
        requester: &Requester,
        patients: &[String],
        at: DateTime<Utc>,
    ) -> Result<HashMap<String, Vec<Encounter>>, ApiError> {
        if requester.kind != InstitutionKind::InternetHospital || patients.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = encounters::active_for_persons(conn, patients, at.naive_utc())?;
        Ok(care_relationships(rows))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Cache>, ApiError> {
        self.cache
            .lock()
            .map_err(|_| ApiError::internal("consent cache lock poisoned"))
    }

    /// The consents of these patients (cached, else read), as of counter `seq`.
    pub(super) async fn consents_of(
        &self,
        patients: Vec<String>,
        seq: i64,
    ) -> Result<HashMap<String, Arc<Vec<Consent>>>, ApiError> {
        let (mut out, missing) = self.cached_consents(patients)?;
        if missing.is_empty() {
            return Ok(out);
        }
        let wanted = missing.clone();
        let rows = self
            .blocking(move |conn| store::for_patients(conn, &wanted))
            .await?;
        out.extend(self.cache_consents(missing, &rows, seq)?);
        Ok(out)
    }

    /// [`Policy::consents_of`] on a connection the caller holds (inside its blocking call).
    pub(super) fn consents_on(
        &self,
        conn: &mut DbConn,
        patients: Vec<String>,
        seq: i64,
    ) -> Result<HashMap<String, Arc<Vec<Consent>>>, ApiError> {
        let (mut out, missing) = self.cached_consents(patients)?;
        if missing.is_empty() {
            return Ok(out);
        }
        let rows = store::for_patients(conn, &missing)?;
        out.extend(self.cache_consents(missing, &rows, seq)?);
        Ok(out)
    }

    /// The cached consent lists of `patients`, and the patients not cached.
    #[allow(clippy::type_complexity)]
    fn cached_consents(
        &self,
        patients: Vec<String>,
    ) -> Result<(HashMap<String, Arc<Vec<Consent>>>, Vec<String>), ApiError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        let c = self.lock()?;
        for p in patients {
            match c.patients.get(&p) {
                Some(list) => {
                    out.insert(p, list.clone());
                }
                None => missing.push(p),
            }
        }
        Ok((out, missing))
    }

    /// The consent lists of `missing` from the rows read for them (cached when read at the
    /// counter the cache still reflects).
    fn cache_consents(
        &self,
        missing: Vec<String>,
        rows: &[(String, store::StoredConsent)],
        seq: i64,
    ) -> Result<HashMap<String, Arc<Vec<Consent>>>, ApiError> {
        let mut loaded: HashMap<String, Vec<Consent>> =
            missing.into_iter().map(|p| (p, Vec::new())).collect();
        for (patient, row) in rows {
            let mut consent = consent_of(row).map_err(ApiError::internal)?;
            // A consent recorded for a person since merged into `patient` applies to it.
            consent.patient = PatientId::new(patient.clone());
            loaded.entry(patient.clone()).or_default().push(consent);
        }
        let mut out = HashMap::new();
        let mut c = self.lock()?;
        // Only cache what was read at the counter the cache still reflects: a sync that ran
        // meanwhile may have dropped these patients because they changed.
        let cacheable = c.seq == seq;
        for (p, list) in loaded {
            let list = Arc::new(list);
            if cacheable {
                if c.patients.len() >= self.max_patients {
                    c.patients.clear();
                }
                c.patients.insert(p.clone(), list.clone());
            }
            out.insert(p, list);
        }
        Ok(out)
    }
}

/// Active encounters as the engine's care relationships, by person.
fn care_relationships(rows: Vec<encounters::CareRelationship>) -> HashMap<String, Vec<Encounter>> {
    let mut out: HashMap<String, Vec<Encounter>> = HashMap::new();
    for (person, institution, start, end) in rows {
        out.entry(person).or_default().push(Encounter {
            institution: InstitutionId::new(institution),
            period: Period {
                start: Some(start.and_utc()),
                end: end.map(|e| e.and_utc()),
            },
        });
    }
    out
}
