//! Building the application: the store, the service, the router and the listener,
//! and serving until a shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::claim;
use crate::clock::Clock;
use crate::config::Settings;
use crate::http::{AppState, Limits, router};
use crate::jobs::{self, SweepSettings};
use crate::service::{Sources, SprayService};
use crate::store::{self, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot open the store at {place}: {source}")]
    Open { place: String, source: StoreError },
    #[error("cannot listen on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
}

/// A store, migrated and ready.
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StartupError> {
    let store = store::open(&settings.database_url, settings.database_max_connections)
        .await
        .map_err(|source| StartupError::Open {
            place: crate::config::redact_url(&settings.database_url),
            source,
        })?;
    let store: Arc<dyn Store> = Arc::new(store::GuardedStore::new(store, settings.store_concurrency));
    store.migrate().await?;
    Ok(store)
}

/// Says at start, not at the first request, that Redis does not answer. The service
/// starts all the same: SQL is the truth and the gate only accelerates it
/// (`docs/design.md` section 2); claims take the SQL path until Redis answers.
async fn warn_if_redis_is_down(settings: &Settings, url: &str) {
    let redis = crate::config::redact_url(url);
    let gate = redis_ca_pem(settings)
        .map_err(|e| crate::gate::GateUnavailable(e.to_string()))
        .and_then(|ca| crate::gate::RedisGate::with_ca(url, &settings.redis_key_prefix, ca));
    let answer = match gate {
        Ok(gate) => gate.check().await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(()) => tracing::info!(%redis, "redis answers"),
        Err(error) => tracing::warn!(
            %redis,
            %error,
            "redis does not answer at start: serving on the SQL path until it does"
        ),
    }
}

/// The CA certificate `--redis-ca` names, read once at start.
fn redis_ca_pem(settings: &Settings) -> Result<Option<Vec<u8>>, StartupError> {
    settings
        .redis_ca
        .as_ref()
        .map(|path| {
            std::fs::read(path)
                .map_err(|e| StartupError::Settings(format!("--redis-ca {}: {e}", path.display())))
        })
        .transpose()
}

/// The router over a given store and sources (tests bring their own clock and tokens).
pub fn build_router(
    settings: &Settings,
    store: Arc<dyn Store>,
    sources: Sources,
) -> Result<Router, StartupError> {
    let policy = settings.policy().map_err(StartupError::Settings)?;
    let lease = settings.claim_lease().map_err(StartupError::Settings)?;
    let claims = claim::for_settings(
        store.clone(),
        settings.redis_url.as_deref(),
        redis_ca_pem(settings)?,
        &settings.redis_key_prefix,
        lease,
    )
    .map_err(|e| StartupError::Settings(format!("--redis-url: {e}")))?;
    let service = Arc::new(SprayService::new(store, sources, policy, claims));
    let gateway_secret = settings.gateway_secret.as_deref().map(Arc::from);
    let limits = Limits::new(settings.max_concurrent_requests, settings.request_timeout);
    Ok(router(
        AppState {
            service,
            gateway_secret,
        },
        limits,
    ))
}

/// The service bound to its listener, not yet serving.
pub struct Application {
    listener: TcpListener,
    router: Router,
    store: Arc<dyn Store>,
    shutdown_timeout: Duration,
    clock: Arc<dyn Clock>,
    sweep: SweepSettings,
}

impl Application {
    /// Production wiring: the system clock and the OS CSPRNG.
    pub async fn build(settings: &Settings) -> Result<Application, StartupError> {
        Application::build_with(settings, Sources::system()).await
    }

    pub async fn build_with(settings: &Settings, sources: Sources) -> Result<Application, StartupError> {
        settings.policy().map_err(StartupError::Settings)?;
        settings.claim_lease().map_err(StartupError::Settings)?;
        let sweep = settings.sweep().map_err(StartupError::Settings)?;
        // The address first: a port that is taken must stop the start before anything is
        // written (no database file created, no migration applied).
        let listener = TcpListener::bind(&settings.listen)
            .await
            .map_err(|source| StartupError::Listen {
                address: settings.listen.clone(),
                source,
            })?;
        let store = open_store(settings).await?;
        if let Some(url) = &settings.redis_url {
            warn_if_redis_is_down(settings, url).await;
        }
        let clock = sources.clock.clone();
        let router = build_router(settings, store.clone(), sources)?;
        Ok(Application {
            listener,
            router,
            store,
            shutdown_timeout: settings.shutdown_timeout,
            clock,
            sweep,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting, gives in-flight requests
    /// up to the shutdown timeout to finish, stops the sweepers, and closes the store.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
        // The sweepers run beside the server and stop when shutdown begins (or when the
        // server ends and drops `stopping_tx`).
        let sweepers = tokio::spawn(jobs::run(
            self.store.clone(),
            self.clock.clone(),
            self.sweep,
            stopping_rx.clone(),
        ));
        // TCP_NODELAY on every accepted connection (axum leaves Nagle's algorithm on): an
        // answer is written as soon as it is ready, whatever is still unacknowledged.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            let _ = stopping_tx.send(true);
        });
        let drain_deadline = async {
            let _ = stopping_rx.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(self.shutdown_timeout).await;
        };
        tokio::select! {
            served = server => served?,
            () = drain_deadline => {
                tracing::warn!(timeout = ?self.shutdown_timeout, "in-flight requests did not finish in time; exiting");
            }
        }
        // A sweeper pass in progress finishes its batch, within the same bound.
        if tokio::time::timeout(self.shutdown_timeout, sweepers)
            .await
            .is_err()
        {
            tracing::warn!("the sweepers did not stop in time; exiting");
        }
        self.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
