//! `lathe serve` (the API and an in-process worker) and `lathe worker` (workers only,
//! against a shared database): parse flags, open the store, hand over to `lathe_server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use lathe_server::{AppState, ServerConfig};

use crate::cli::DataDir;

#[derive(Args)]
pub struct ServiceArgs {
    /// PostgreSQL (`postgres://…`) or SQLite (`sqlite:///path/lathe.db`); default: SQLite
    /// in the data folder.
    #[arg(long, env = "LATHE_DATABASE_URL")]
    database_url: Option<String>,
    /// A base model jobs may name, `NAME=PATH` (repeatable); default:
    /// `smollm2-135m-instruct=models/SmolLM2-135M-Instruct.Q4_1.gguf`.
    #[arg(long = "model")]
    models: Vec<String>,
    /// cpu (default), cuda[:N] or wgpu.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Multiply every token with f32 activations (the reference's numerics) instead of the
    /// default: sampled tokens with 8-bit activations and integer dot products (llama.cpp's;
    /// faster, logits a few tenths away), prompts in f32. Serving and the eval jobs use the
    /// same, so the gate measures what is served.
    #[arg(long, env = "LATHE_F32_ACTIVATIONS")]
    f32_activations: bool,
    /// Largest upload, in MiB.
    #[arg(long, default_value_t = 512)]
    max_upload_mib: usize,
    /// Seconds a worker's claim on a job lasts without a heartbeat; a job whose worker
    /// died is given to another worker after this.
    #[arg(long, default_value_t = 30)]
    lease_secs: u64,
    /// The memory this process's workers announce, in MiB (give the GPU's on a GPU
    /// worker); they claim only jobs that need at most this much. Default: the host's.
    #[arg(long)]
    memory_mb: Option<i64>,
    /// Sequences a served model's running batch holds at most (`/v1/chat/completions`).
    #[arg(long, default_value_t = 32)]
    max_seqs: usize,
    /// Tokens one decode step computes at most: decode tokens plus prompt chunks.
    #[arg(long, default_value_t = 256)]
    max_step_tokens: usize,
    /// Key/value cache of each served model, in MiB.
    #[arg(long, default_value_t = 256)]
    kv_cache_mib: usize,
    /// LoRA adapters each served model holds in memory at once.
    #[arg(long, default_value_t = 8)]
    max_loras: usize,
    /// Keep artifacts (uploads, plugins, training checkpoints) in an S3-compatible bucket,
    /// `s3://bucket[/prefix]`, cached in the data folder; endpoint, region and keys come
    /// from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    /// Default: the data folder holds them.
    #[arg(long, env = "LATHE_ARTIFACTS")]
    artifacts: Option<String>,
    /// Seconds a request to the bucket is retried while it does not answer before the
    /// upload or job fails.
    #[arg(long, default_value_t = 120)]
    artifacts_patience_secs: u64,
    #[command(flatten)]
    dir: DataDir,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// In-process workers (0: only separate `lathe worker` processes run jobs).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Jobs run at once by this process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[command(flatten)]
    service: ServiceArgs,
}

impl ServiceArgs {
    fn runtime(&self) -> Result<tokio::runtime::Runtime> {
        lathe_engine::quant::set_int8_activations(!self.f32_activations);
        lathe_engine::quant::cpu_kernel().map_err(anyhow::Error::msg)?;
        lathe_engine::team::spin().map_err(anyhow::Error::msg)?;
        if let Some(n) = self.threads {
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting the thread count")?;
        }
        Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
    }

    async fn state(&self) -> Result<Arc<AppState>> {
        let mut config = ServerConfig::new(self.dir.path());
        config.device = self.device.clone();
        config.max_upload_bytes = self.max_upload_mib << 20;
        config.memory_mb = self.memory_mb;
        config.lease = std::time::Duration::from_secs(self.lease_secs.max(1));
        config.artifacts = self.artifacts.as_ref().map(|url| {
            lathe_store::S3Config::new(url.clone()).patience(std::time::Duration::from_secs(self.artifacts_patience_secs.max(1)))
        });
        config.serving = lathe_serving::ServeConfig {
            max_seqs: self.max_seqs.max(1),
            max_step_tokens: self.max_step_tokens.max(1),
            kv_cache_bytes: self.kv_cache_mib << 20,
            max_loras: self.max_loras.max(1),
        };
        if !self.models.is_empty() {
            config.models.clear();
            for m in &self.models {
                let Some((name, path)) = m.split_once('=') else { bail!("--model {m}: expected NAME=PATH") };
                config.models.insert(name.to_string(), PathBuf::from(path));
            }
        }
        // Fail now, not in the first job, when the device cannot be used.
        lathe_engine::device::parse_device(&config.device)?;
        Ok(AppState::open(config, self.database_url.as_deref()).await?)
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
    a.service.runtime()?.block_on(async {
        let state = a.service.state().await?;
        if let Some(token) = state.db.ensure_admin().await? {
            println!("first start: an admin token for the team `admin` (shown once, keep it):\n\n    {}\n", token.expose());
        }
        lathe_server::serve(state, a.addr, a.workers).await?;
        Ok(())
    })
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    a.service.runtime()?.block_on(async {
        let state = a.service.state().await?;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut handles = Vec::new();
        for i in 0..a.workers.max(1) {
            let (s, stop) = (state.clone(), stop.clone());
            let id = format!("worker-{}-{}-{i}", lathe_server::state::hostname(), std::process::id());
            println!("lathe worker: {id} waiting for jobs");
            handles.push(tokio::spawn(async move { lathe_server::worker::run(s, id, stop).await }));
        }
        tokio::signal::ctrl_c().await?;
        let _ = stop_tx.send(true);
        for h in handles {
            let _ = h.await;
        }
        Ok(())
    })
}
