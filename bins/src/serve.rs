//! Serving the REST API: listeners (bound or inherited from systemd),
//! request logging, graceful shutdown on SIGTERM/SIGINT.

use std::convert::Infallible;
use std::future::Future;
use std::net::TcpListener;

use anyhow::Context as _;
use warp::Filter;

/// Requests slower than this are logged at `info` even when they succeed.
pub const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_millis(250);

/// Wraps `filter` so that every request is logged through tracing (target
/// `vivian::http`) with its method, path, status and duration.
///
/// Levels: successful reads (`GET`/`HEAD` answered below 400 within
/// [`SLOW_REQUEST`]) at `debug`; changes (any other method), refusals
/// (4xx) and slow requests at `info`; server errors (5xx) at `warn`. At the
/// default `info` level a busy dashboard therefore costs no log line per
/// poll, and an operator sees every request with
/// `RUST_LOG=info,vivian::http=debug`.
pub fn with_request_log<F>(
    filter: F,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone + Send + Sync + 'static
where
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    filter
        .with(warp::log::custom(|info: warp::log::Info<'_>| {
            let status = info.status().as_u16();
            let elapsed = info.elapsed();
            let read = matches!(
                *info.method(),
                warp::http::Method::GET | warp::http::Method::HEAD
            );
            macro_rules! log_at {
                ($level:expr) => {
                    tracing::event!(
                        target: "vivian::http",
                        $level,
                        method = %info.method(),
                        path = %info.path(),
                        status,
                        duration_us = elapsed.as_micros() as u64,
                        "{} {} {} {}us",
                        info.method(),
                        info.path(),
                        status,
                        elapsed.as_micros()
                    )
                };
            }
            if status >= 500 {
                log_at!(tracing::Level::WARN);
            } else if !read || status >= 400 || elapsed >= SLOW_REQUEST {
                log_at!(tracing::Level::INFO);
            } else {
                log_at!(tracing::Level::DEBUG);
            }
        }))
        .map(warp::Reply::into_response)
}

/// Turns any rejection left over by `filter` (a path outside the API's
/// prefixes, for instance) into a JSON `{"error": ...}` answer, so the
/// server never answers with an empty body.
pub fn with_json_fallback<F, R>(
    filter: F,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone + Send + Sync + 'static
where
    F: Filter<Extract = (R,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
    R: warp::Reply + 'static,
{
    filter
        .map(|r: R| warp::Reply::into_response(r))
        .recover(|rej: warp::Rejection| async move {
            Ok::<_, Infallible>(crate::api::rejection_response(&rej))
        })
        .unify()
}

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install the SIGTERM handler: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    let mut int = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install the SIGINT handler: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Binds `host:port` for HTTP, naming the address in the error.
pub fn bind_http(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    let addr = format!("{host}:{port}");
    let l = TcpListener::bind(&addr)
        .or_else(|e| {
            // An IPv6 literal needs brackets in a socket address.
            if host.contains(':') && !host.starts_with('[') {
                TcpListener::bind(format!("[{host}]:{port}"))
            } else {
                Err(e)
            }
        })
        .with_context(|| format!("cannot listen on {addr} (EXECUTOR_HOST:EXECUTOR_PORT)"))?;
    Ok(l)
}

/// Serves `filter` on every listener until `shutdown` resolves, then lets
/// in-flight requests finish and returns.
pub async fn serve<F>(
    filter: F,
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    anyhow::ensure!(!listeners.is_empty(), "no HTTP listener to serve on");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for l in listeners {
        l.set_nonblocking(true)
            .context("cannot make the HTTP listener non-blocking")?;
        let local = l.local_addr().ok();
        let l = tokio::net::TcpListener::from_std(l)
            .context("cannot register the HTTP listener with the runtime")?;
        if let Some(a) = local {
            tracing::info!("REST API listening on http://{a}");
        }
        let mut rx = rx.clone();
        let server = warp::serve(filter.clone())
            .incoming(l)
            .graceful(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            });
        servers.spawn(server.run());
    }
    shutdown.await;
    let _ = tx.send(true);
    while servers.join_next().await.is_some() {}
    tracing::info!("REST API stopped");
    Ok(())
}

/// Runs the executor's service until SIGTERM/SIGINT: opens MarsDB, starts
/// the PDUs and the farm, and serves the REST API on the socket-activated
/// `EXECUTOR_HTTP_IPv4_SOCKET_NAME` listeners, else on
/// `EXECUTOR_HOST:EXECUTOR_PORT`. On shutdown, in-flight requests finish
/// before the PDUs are stopped; MarsDB writes are atomic, so the file is
/// consistent at any time.
pub async fn run_executor(config: vivian_core::config::Config) -> anyhow::Result<()> {
    use std::sync::Arc;
    use vivian_core::farm::{Farm, FarmOptions};
    use vivian_core::marsdb::{FileMarsDb, FileOptions, MarsDb, Validator};
    use vivian_core::pdu::{PduManager, PduOptions};

    // Listeners first, so that clients connecting during start-up wait
    // instead of being refused.
    let name = &config.executor_http_ipv4_socket_name;
    let mut listeners = vivian_boots::activation::listeners_named(name)
        .with_context(|| format!("socket activation of {name:?}"))?;
    if listeners.is_empty() {
        listeners.push(bind_http(&config.executor_host, config.executor_port)?);
    } else {
        tracing::info!(
            "serving the REST API on {} socket-activated listener(s) named {name:?}",
            listeners.len()
        );
    }

    let registry = Arc::new(vivian_pdu::default_registry());
    let validator: Validator = registry.marsdb_validator();
    let opts = FileOptions {
        vpdu_endpoint: config.executor_vpdu_endpoint.as_ref().map(|hp| {
            if hp.host.contains(':') {
                format!("[{}]:{}", hp.host, hp.port)
            } else {
                format!("{}:{}", hp.host, hp.port)
            }
        }),
        validator: Some(validator),
        ..FileOptions::default()
    };
    let db = FileMarsDb::open(&config.mars_db_file, opts)
        .await
        .with_context(|| format!("cannot open MARS_DB_FILE {}", config.mars_db_file.display()))?;
    if let Some(e) = db.error() {
        tracing::error!("MarsDB is invalid, starting with the last good (empty) database: {e}");
    }
    let db: Arc<dyn MarsDb> = Arc::new(db);
    // The artifact cache (EXECUTOR_ARTIFACT_CACHE_ROOT): DUTs boot from it.
    let artifacts = crate::artifacts::Artifacts::from_config(&config)?;
    // DHCP and TFTP on PRIVATE_INTERFACE (or socket-activated), unless
    // BOOTS_DISABLE_SERVERS is set. Boot events go to the log and, once
    // the farm runs, to discovery (an unknown machine netbooting during a
    // discovery is registered on the discovery's port).
    use vivian_core::netboot::{BootEvent, BootEventSink};
    let log_sink: Arc<dyn BootEventSink> = Arc::new(|ev: BootEvent| {
        tracing::debug!(target: "vivian::boots", mac = %ev.mac, dut = ?ev.dut_id, "{:?}", ev.kind);
    });
    let farm_sink: Arc<std::sync::OnceLock<Arc<dyn BootEventSink>>> =
        Arc::new(std::sync::OnceLock::new());
    let boots = vivian_boots::Boots::start(
        &vivian_boots::BootsConfig::from_config(&config),
        Arc::new(vivian_core::netboot::MarsDbDuts::new(db.clone())),
        {
            let (farm_sink, log_sink) = (farm_sink.clone(), log_sink.clone());
            Arc::new(move |ev: BootEvent| match farm_sink.get() {
                Some(sink) => sink.record(ev),
                None => log_sink.record(ev),
            })
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot start the boot servers: {e} (set BOOTS_DISABLE_SERVERS=1 to run without DHCP and TFTP)"
        )
    })?;

    // One HTTP client (one parse of the trust store) for SALAD and the
    // U-Boot downloads; GitLab's has settings of its own (no redirects).
    let (http, roots) = vivian_core::http_client::build("executor")
        .context("cannot create the executor's HTTP client")?;
    if let Some(a) = &artifacts {
        // U-Boot's kernels and initrds over TFTP come from the cache too.
        boots.set_artifact_fetcher(a.clone());
    } else {
        boots.set_artifact_fetcher(Arc::new(vivian_boots::HttpFetcher::with_client(
            http.clone(),
        )));
    }
    let pdus = Arc::new(PduManager::new(registry, PduOptions::default()));
    let mut farm_opts = FarmOptions::new(config.farm_name.clone());
    // Sergent Hartman: registration, training boot loops and quick checks,
    // run by the job engine once it is installed below.
    farm_opts.quick_check_enabled = config.quick_check_enabled();
    farm_opts.training = Some(crate::engine::training_options(&config));
    // GitLab runners: registered, verified and written to GITLAB_CONF_FILE
    // at start-up, on every MarsDB change and every 30 minutes.
    let gitlab = vivian_gitlab::Reconciler::new(
        db.clone(),
        Arc::new(
            vivian_gitlab::GitlabClient::new(vivian_gitlab::GitlabClientOptions::default())
                .context("cannot create the GitLab HTTP client")?,
        ),
        vivian_gitlab::ReconcilerSettings::from_config(&config, std::env::vars()),
    )
    .map_err(|e| anyhow::anyhow!("GitLab runners: {e}"))?;
    let gitlab_task = gitlab.spawn();
    // Job buckets: with MINIO_URL set, the root credentials are checked
    // now (a clear error if refused) and a previous run's leftovers removed.
    let job_buckets = crate::job_bucket::from_env(
        &config,
        std::env::var_os("MINIO_URL").is_some(),
        config
            .mars_db_file
            .parent()
            .map(|d| d.join("job_buckets.json"))
            .unwrap_or_else(|| std::path::PathBuf::from("job_buckets.json")),
    )
    .await?;
    let farm = Farm::new(db, pdus, farm_opts);
    farm.start().await;
    let _ = farm_sink.set(vivian_core::netboot::discovery_sink(farm.clone(), log_sink));

    // The job engine: consoles from SALAD_URL, job logs next to MarsDB.
    let console: Arc<dyn vivian_core::console::ConsoleSource> = Arc::new(
        vivian_salad::SaladClient::with_http_client(config.salad_url.as_str(), http.clone(), roots)
            .map_err(|e| anyhow::anyhow!("SALAD_URL={}: {e}", config.salad_url.as_str()))?,
    );
    let log_dir = config
        .mars_db_file
        .parent()
        .map(|d| d.join("job_logs"))
        .unwrap_or_else(|| std::path::PathBuf::from("job_logs"));
    let engine = crate::engine::JobEngine::new(
        console.clone(),
        crate::engine::EngineOptions {
            minio_url: config.minio_url.as_str().to_string(),
            job_env: config.job_environment(),
            parse: vivian_core::job::ParseOptions {
                default_machine_unfit_for_service: config
                    .console_pattern_default_machine_unfit_for_service_regex
                    .as_ref()
                    .map(|r| r.as_str().to_string()),
            },
            log_dir,
            artifacts: artifacts.clone(),
        },
    );
    farm.set_job_runner(Arc::new(engine.with_job_buckets(job_buckets)));

    let netboot = Arc::new(vivian_core::netboot::DefaultNetboot::new(
        config.boots_defaults.clone(),
        farm.clone(),
    ));
    // U-Boot's boot.scr over TFTP is rendered from the same configuration.
    boots.set_netboot(netboot.clone());
    let state = crate::api::ApiState::with_options(
        farm.clone(),
        crate::api::ApiOptions {
            netboot: Some(netboot),
            minio_url: config.minio_url.as_str().to_string(),
            job_env: config.job_environment(),
        },
    );
    // GET /api/v1/dut/<id> shows the DUT's runners; DELETE removes them.
    state.set_runner_hook(Arc::new(gitlab.clone()));
    // `logs_endpoint`: SALAD's read-only console ports, followed in memory.
    let salad_host = config
        .salad_url
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let logs = crate::api::ConsoleLogs::new(console, salad_host);
    let logs_task = logs.spawn(farm.db().clone(), std::time::Duration::from_secs(30));
    state.set_logs_source(logs);
    if let Some(a) = artifacts {
        state.set_artifacts(a);
    }
    // Freed heap pages go back to the system once requests stop for a
    // moment (unless the operator tunes malloc through the environment).
    let idle_trim = crate::memory::IdleTrim::new(crate::memory::QUIET_BEFORE_TRIM);
    let malloc_ours = !crate::memory::environment_tunes_malloc(std::env::vars());
    let trim_task = malloc_ours.then(|| idle_trim.spawn());
    // Code that only start-up ran is unmapped once start-up is over.
    let release_task = crate::memory::spawn_start_up_release(malloc_ours);
    let filter = crate::api::server_filter(state)
        .with(warp::log::custom({
            let idle_trim = idle_trim.clone();
            move |_| idle_trim.activity()
        }))
        .map(warp::Reply::into_response);
    let res = serve(filter, listeners, shutdown_signal()).await;
    if let Some(t) = trim_task {
        t.abort();
    }
    release_task.abort();
    logs_task.abort();
    boots.shutdown();
    gitlab.shutdown();
    let _ = gitlab_task.await;
    farm.shutdown().await;
    tracing::info!("executor stopped");
    res
}
