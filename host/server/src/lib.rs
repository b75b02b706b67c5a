//! Lathe's service: the REST API under `/api/v1` (projects, files, datasets, plugins,
//! suites, jobs and their events), the OpenAI-compatible files, fine-tuning and inference
//! API under `/v1`, the web UI (`web`), Prometheus metrics, and the worker that runs queued jobs.
//! Thin over the job layer
//! (`lathe_jobs`) and the store (`lathe_store`): it authenticates, resolves the ids in a
//! request into a pipeline's spec, queues it, and serves what the pipelines wrote.

pub mod api;
pub mod auth;
pub mod checkpoints;
pub mod demo;
pub mod deployments;
pub mod error;
pub mod inference;
pub mod openai;
pub mod packs;
pub mod state;
pub mod web;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use error::{ApiError, ApiResult};
pub use state::{AppState, ServerConfig};

#[derive(OpenApi)]
#[openapi(
    info(title = "Lathe", description = "Fine-tune open-weight LLMs for domain tasks, and prove they beat the prompted base model."),
    components(schemas())
)]
struct ApiDoc;

/// Every route, registered once for routing and for the OpenAPI document.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(api::routes()).merge(openai::routes()).merge(inference::routes()).merge(deployments::routes()).merge(packs::routes())
}

/// The application: routes, the OpenAPI document at `/api/v1/openapi.json`, metrics, and
/// the web pages.
pub fn app(state: Arc<AppState>) -> Router {
    let (router, doc) = routes().split_for_parts();
    let doc = Arc::new(doc);
    router
        .merge(web::routes())
        .route("/api/v1/openapi.json", axum::routing::get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }))
        .route("/metrics", axum::routing::get(api::metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), api::count_requests))
        .layer(axum::extract::DefaultBodyLimit::max(state.config.max_upload_bytes))
        .with_state(state)
}

/// Serves until Ctrl-C, with `workers` in-process workers.
pub async fn serve(state: Arc<AppState>, addr: SocketAddr, workers: usize) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("lathe serve: listening on http://{}", listener.local_addr()?);
    serve_on(listener, state, workers, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// Serves on a bound listener, with `workers` in-process workers, until `shutdown`
/// completes; then the workers are told to stop.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    workers: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    for i in 0..workers {
        let s = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move { worker::run(s, format!("serve-{}-{i}", std::process::id()), stop).await });
    }
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await
}
