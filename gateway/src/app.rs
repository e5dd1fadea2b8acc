//! Building and running the HTTP server. Settings are passed in, never global, so tests start
//! real servers on port 0 with their own database.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpRequest, middleware, web};

use crate::config::Settings;
use crate::error::{ApiError, ErrorCode};
use crate::federation;
use crate::metrics::Metrics;
use crate::oauth;
use crate::routes::{
    auditing, consent, directory, docs, documents, empi, encounters, institutions, metadata, ops,
    patients, practitioners, subscriptions,
};
use crate::state::AppState;

/// All routes in one table. Each resource answers unknown methods with 405 + OperationOutcome.
pub fn routes(cfg: &mut web::ServiceConfig) {
    public_and_admin_routes(cfg);
    member_and_staff_routes(cfg);
}

/// Operations, machine and people's authentication, the directory (administration and its
/// public FHIR views).
fn public_and_admin_routes(cfg: &mut web::ServiceConfig) {
    cfg
        // Operations (no authentication).
        .service(resource("/healthz").route(web::get().to(ops::healthz)))
        .service(resource("/readyz").route(web::get().to(ops::readyz)))
        .service(resource("/metrics").route(web::get().to(ops::metrics)))
        .service(resource("/metadata").route(web::get().to(metadata::metadata)))
        .service(resource("/fhir/metadata").route(web::get().to(metadata::metadata)))
        .service(resource("/openapi.json").route(web::get().to(docs::openapi)))
        .service(resource("/docs").route(web::get().to(docs::page)))
        .service(resource("/docs/redoc.standalone.js").route(web::get().to(docs::redoc_js)))
        // Machine authentication (SMART Backend Services).
        .service(resource("/oauth2/token").route(web::post().to(oauth::token)))
        .service(resource("/oauth2/events").route(web::get().to(oauth::own_events)))
        .service(resource("/oauth2/whoami").route(web::get().to(oauth::whoami)))
        .service(resource("/.well-known/jwks.json").route(web::get().to(oauth::jwks)))
        .service(
            resource("/.well-known/smart-configuration")
                .route(web::get().to(oauth::smart_configuration)),
        )
        // People's login (OpenID Connect) and staff sessions.
        .service(resource("/login").route(web::get().to(crate::oidc::login)))
        .service(resource("/login/callback").route(web::get().to(crate::oidc::callback)))
        .service(resource("/login/token").route(web::post().to(crate::oidc::bearer_token)))
        .service(resource("/login/whoami").route(web::get().to(crate::oidc::whoami)))
        .service(resource("/logout").route(web::post().to(crate::oidc::logout)))
        // Directory administration (admin role).
        .service(
            resource("/admin/institutions")
                .route(web::get().to(institutions::list))
                .route(web::post().to(institutions::create)),
        )
        .service(
            resource("/admin/institutions/{id}")
                .route(web::get().to(institutions::read))
                .route(web::put().to(institutions::update)),
        )
        .service(
            resource("/admin/institutions/{id}/suspend")
                .route(web::post().to(institutions::suspend)),
        )
        .service(
            resource("/admin/institutions/{id}/client-certificate")
                .route(web::put().to(crate::mtls::bind))
                .route(web::delete().to(crate::mtls::unbind)),
        )
        .service(
            resource("/admin/institutions/{id}/activate")
                .route(web::post().to(institutions::activate)),
        )
        // FHIR directory views.
        .service(
            resource("/fhir/Organization").route(web::get().to(directory::search_organizations)),
        )
        .service(
            resource("/fhir/Organization/{id}").route(web::get().to(directory::read_organization)),
        )
        .service(resource("/fhir/Endpoint").route(web::get().to(directory::search_endpoints)))
        .service(resource("/fhir/Endpoint/{id}").route(web::get().to(directory::read_endpoint)));
}

/// The member- and staff-facing API: EMPI, rosters, documents and subscriptions, consent,
/// EMPI administration, the auditors' workspace and console, federated queries, encounters.
fn member_and_staff_routes(cfg: &mut web::ServiceConfig) {
    cfg
        // EMPI: FHIR Patient feed, PDQm, PIXm, $match (institutions).
        .service(
            resource("/fhir/Patient")
                .route(web::get().to(patients::search))
                .route(web::post().to(patients::create))
                .route(web::put().to(patients::conditional_update)),
        )
        .service(resource("/fhir/Patient/$ihe-pix").route(web::get().to(patients::pix)))
        .service(resource("/fhir/Patient/$match").route(web::post().to(patients::match_patient)))
        .service(resource("/fhir/Patient/{id}").route(web::get().to(patients::read)))
        // Staff rosters (FHIR Practitioner): who the X-Yiqiao-User of a member is.
        .service(
            resource("/fhir/Practitioner")
                .route(web::get().to(practitioners::search))
                .route(web::post().to(practitioners::create))
                .route(web::put().to(practitioners::conditional_update)),
        )
        .service(resource("/fhir/Practitioner/{id}").route(web::get().to(practitioners::read)))
        // Document registry (MHD-style) and subscriptions.
        .service(resource("/fhir").route(web::post().to(documents::transaction)))
        .service(
            resource("/fhir/DocumentReference")
                .route(web::get().to(documents::search))
                .route(web::post().to(documents::create)),
        )
        .service(resource("/fhir/DocumentReference/{id}").route(web::get().to(documents::read)))
        .service(resource("/fhir/Binary/{id}").route(web::get().to(documents::retrieve)))
        .service(
            resource("/fhir/Subscription")
                .route(web::get().to(subscriptions::search))
                .route(web::post().to(subscriptions::create)),
        )
        .service(
            resource("/fhir/Subscription/{id}")
                .route(web::get().to(subscriptions::read))
                .route(web::delete().to(subscriptions::delete)),
        )
        .service(
            resource("/fhir/Subscription/{id}/$status").route(web::get().to(subscriptions::status)),
        )
        .service(
            resource("/fhir/Subscription/{id}/$events").route(web::get().to(subscriptions::events)),
        )
        .service(
            resource("/fhir/Subscription/{id}/$retry-dead")
                .route(web::post().to(subscriptions::retry_dead)),
        )
        // Consent (institutions record patients' decisions) and the policy simulator (staff).
        .service(
            resource("/fhir/Consent")
                .route(web::get().to(consent::search))
                .route(web::post().to(consent::create)),
        )
        .service(
            resource("/fhir/Consent/{id}")
                .route(web::get().to(consent::read))
                .route(web::put().to(consent::update)),
        )
        .service(resource("/consent/$evaluate").route(web::post().to(consent::evaluate)))
        .service(resource("/admin/agreements").route(web::get().to(consent::list_agreements)))
        .service(resource("/admin/agreements/{id}").route(web::put().to(consent::put_agreement)))
        // EMPI administration (admin role).
        .service(resource("/empi/persons/{id}").route(web::get().to(empi::read_person)))
        .service(resource("/empi/persons/{id}/$merge").route(web::post().to(empi::merge)))
        .service(resource("/empi/persons/{id}/$unmerge").route(web::post().to(empi::unmerge)))
        .service(resource("/empi/review").route(web::get().to(empi::list_review)))
        .service(resource("/empi/review/{id}/link").route(web::post().to(empi::review_link)))
        .service(
            resource("/empi/review/{id}/keep-separate")
                .route(web::post().to(empi::review_keep_separate)),
        )
        // The auditors' workspace (auditor role; "who accessed my records" for institutions).
        .service(resource("/fhir/AuditEvent").route(web::get().to(auditing::search)))
        .service(resource("/fhir/AuditEvent/{id}").route(web::get().to(auditing::read)))
        .service(resource("/audit/alerts").route(web::get().to(auditing::list_alerts)))
        .service(resource("/audit/alerts/{id}/ack").route(web::post().to(auditing::ack_alert)))
        .service(resource("/audit/flagged-patients").route(web::get().to(auditing::list_flags)))
        .service(
            resource("/audit/flagged-patients/{patient}")
                .route(web::put().to(auditing::put_flag))
                .route(web::delete().to(auditing::delete_flag)),
        )
        .service(resource("/audit/chain").route(web::get().to(auditing::chain_status)))
        .service(resource("/audit/stats/daily").route(web::get().to(auditing::daily_stats)))
        .service(resource("/audit/report").route(web::get().to(auditing::report)))
        // The auditors' web console (page, script and style compiled into the binary).
        .service(resource("/console").route(web::get().to(crate::console::page)))
        .service(resource("/console/console.js").route(web::get().to(crate::console::script)))
        .service(resource("/console/console.css").route(web::get().to(crate::console::style)))
        .service(resource("/console/session").route(web::get().to(crate::console::session)))
        // Federated queries to member hospitals (crate::federation).
        .service(resource("/federation/key").route(web::get().to(federation::routes::gateway_key)));
    for t in federation::routes::FEDERATED_TYPES {
        let mut res =
            resource(&format!("/fhir/{t}")).route(web::get().to(federation::routes::search));
        // Care relationships are registered on the same path; GET stays the federated search.
        if t == "Encounter" {
            res = res.route(web::post().to(encounters::create));
        }
        cfg.service(res);
    }
    cfg.service(
        resource("/fhir/Encounter/{id}")
            .route(web::get().to(encounters::read))
            .route(web::put().to(encounters::update)),
    );
}

fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn method_not_allowed(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} is not supported on {}", req.method(), req.path()),
    ))
}

async fn unknown_route(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::new(
        ErrorCode::UnknownRoute,
        format!("no endpoint at {}", req.path()),
    ))
}

/// A built server, bound and ready to run.
pub struct Application {
    port: u16,
    server: Server,
    state: AppState,
    /// Bound addresses of the HL7 v2 MLLP listeners (when `mllp.enabled`).
    mllp: crate::mllp::Bound,
}

impl Application {
    /// Open the store (migrating when configured), bind the listener and build the server.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(settings.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
        Self::build_with_listener(settings, listener).await
    }

    pub async fn build_with_listener(
        settings: Settings,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        let port = listener.local_addr()?.port();
        let store = yiqiao_registry::Store::open(&settings.store_options())?;
        if settings.database.migrate_on_start {
            let migrating = store.clone();
            let applied = tokio::task::spawn_blocking(move || migrating.migrate()).await??;
            if !applied.is_empty() {
                tracing::info!(count = applied.len(), "applied database migrations");
            }
        }
        // Monthly audit partitions ahead (PostgreSQL), before the first record is written. A
        // failure is not fatal: the DEFAULT partition takes the records meanwhile.
        let partitioning = (store.clone(), settings.clone());
        match tokio::task::spawn_blocking(move || {
            crate::retention::ensure_partitions(&partitioning.0, &partitioning.1)
        })
        .await?
        {
            Ok(created) if !created.is_empty() => {
                tracing::info!(?created, "made audit partitions ahead")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(cause = %e, "could not make audit partitions ahead; the maintenance run retries")
            }
        }
        let redis = match settings.redis.url.expose() {
            "" => None,
            url => Some(redis::Client::open(url).map_err(|e| anyhow::anyhow!("redis.url: {e}"))?),
        };
        let mut settings = settings;
        if settings.public_url.is_empty() {
            settings.listen = listener.local_addr()?;
        }
        let key_store = store.clone();
        let keys = tokio::task::spawn_blocking(move || {
            let mut conn = key_store.conn()?;
            oauth::keys::SigningKeys::load_or_create(&mut conn)
        })
        .await??;
        let limits = oauth::limits::SharedLimits::new(
            redis.clone(),
            &settings.redis.key_prefix,
            Duration::from_millis(settings.redis.timeout_ms),
        );
        let audit_key = crate::audit::load_signing_key(&settings, true)?;
        let signer = Arc::new(
            yiqiao_registry::audit::AuditSigner::new(&audit_key)
                .map_err(|e| anyhow::anyhow!("audit key: {e}"))?,
        );
        let auditor = crate::audit::Auditor::start(store.clone(), signer, &settings);
        let failure_rate = settings.auth.failure_log_per_minute;
        let policy = Arc::new(crate::policy::Policy::new(
            &settings,
            store.clone(),
            redis.clone(),
        )?);
        let outbound = crate::outbound::OutboundPolicy::new(&settings.outbound)?;
        let federation = federation::Federation::new(&settings, &outbound)?;
        let documents = Arc::new(crate::documents::DocumentRuntime::new(
            &settings.documents,
            &settings.subscriptions,
            &outbound,
            auditor.replica(),
        )?);
        let state = AppState {
            outbound,
            policy,
            federation,
            documents,
            auditor,
            base_url: settings.public_base_url().into(),
            settings: Arc::new(settings),
            store,
            redis,
            metrics: Metrics::new()?,
            auth: Arc::new(oauth::AuthRuntime::new(keys, limits, failure_rate)),
            oidc: Arc::new(crate::oidc::OidcRuntime::default()),
        };
        crate::alerting::start(state.clone());
        crate::retention::start(state.clone());
        crate::documents::start_worker(state.clone());
        let http = state.settings.http.clone();
        let data = web::Data::new(state.clone());
        let mut server = actix_web::HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(http.max_body_bytes))
                .app_data(web::QueryConfig::default().error_handler(|err, _| {
                    ApiError::new(ErrorCode::InvalidParameter, format!("query string: {err}"))
                        .into()
                }))
                .app_data(web::PathConfig::default().error_handler(|err, _| {
                    ApiError::new(ErrorCode::InvalidParameter, format!("path: {err}")).into()
                }))
                .wrap(middleware::from_fn(
                    crate::sanitize::refuse_control_characters,
                ))
                .wrap(middleware::from_fn(crate::audit::record_refusals))
                .wrap(middleware::from_fn(crate::middleware::observe))
                .configure(routes)
                .default_service(web::to(unknown_route))
        })
        .on_connect(crate::mtls::on_connect)
        .keep_alive(Duration::from_secs(http.keep_alive_secs))
        .shutdown_timeout(http.shutdown_timeout_secs)
        .listen(listener)?;
        if !state.settings.mtls.listen.is_empty() {
            let tls = crate::mtls::server_config(&state.settings.mtls)?;
            let addr = &state.settings.mtls.listen;
            let tls_listener = TcpListener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (mtls.listen): {e}"))?;
            server = server.listen_rustls_0_23(tls_listener, tls)?;
        }
        if http.workers > 0 {
            server = server.workers(http.workers);
        }
        let mllp = if state.settings.mllp.enabled {
            crate::mllp::start(state.clone(), &state.settings.mllp).await?
        } else {
            crate::mllp::Bound::default()
        };
        Ok(Application {
            port,
            server: server.run(),
            state,
            mllp,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Address of the plain-TCP HL7 v2 MLLP listener, when enabled.
    pub fn mllp_addr(&self) -> Option<std::net::SocketAddr> {
        self.mllp.plain
    }

    /// Address of the MLLP-over-TLS listener, when enabled.
    pub fn mllp_tls_addr(&self) -> Option<std::net::SocketAddr> {
        self.mllp.tls
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serve until SIGINT/SIGTERM; in-flight requests get `http.shutdown_timeout_secs` to finish.
    pub async fn run(self) -> std::io::Result<()> {
        self.server.await
    }

    /// Handle to stop the server (tests, embedded use).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub fn into_server(self) -> Server {
        self.server
    }
}
