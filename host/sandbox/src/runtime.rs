//! The engine, the upload checks, the compile cache, and calls under limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{CodeBuilder, CodeHint, Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::types::*;
use crate::v0_1::{self, World, WorldPre};

/// Per-call and per-upload limits: the runtime's default, and each world's own where it
/// sets one ([`RuntimeConfig::worlds`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Components larger than this are refused at upload.
    pub max_component_bytes: usize,
    /// CPU deadline of one call (epoch interruption; it can slip by a tick or two when the
    /// machine is loaded).
    pub timeout: Duration,
    /// The cap on a plugin instance's linear memory.
    pub memory_bytes: usize,
    /// Deterministic metering: the fuel one call may burn (needs `RuntimeConfig::fuel`).
    pub fuel: Option<u64>,
    /// The cap on the size of what one call returns.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_component_bytes: 32 << 20,
            timeout: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            fuel: None,
            max_output_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled plugins are cached (by sha256 of the upload and the engine's
    /// compatibility hash); None compiles every load.
    pub cache_dir: Option<PathBuf>,
    /// The wasm stack of a call.
    pub max_stack_bytes: usize,
    /// Compile with fuel metering (costs some speed; enables `Limits::fuel`).
    pub fuel: bool,
    /// The limits of every world that has no entry in `worlds`.
    pub limits: Limits,
    /// A world's own limits (a Python scorer carries an interpreter and may need more room
    /// than a Rust formatter; a validator on the serving path may get less time).
    pub worlds: BTreeMap<Kind, Limits>,
}

impl RuntimeConfig {
    /// What plugins of `kind` run under.
    pub fn limits_for(&self, kind: Kind) -> &Limits {
        self.worlds.get(&kind).unwrap_or(&self.limits)
    }

    /// The largest component any world accepts: an upload over it is refused unparsed.
    pub fn max_upload_bytes(&self) -> usize {
        self.worlds.values().chain([&self.limits]).map(|l| l.max_component_bytes).max().unwrap_or(0)
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_stack_bytes: 512 << 10,
            fuel: false,
            limits: Limits::default(),
            worlds: BTreeMap::new(),
        }
    }
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the upload is {bytes} bytes, over the {limit}-byte cap for any plugin")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the {kind} component is {bytes} bytes, over the host's {limit}-byte cap for {kind} plugins")]
    ComponentTooLarge { kind: Kind, bytes: usize, limit: usize },
    #[error("the upload is not WebAssembly (no `\\0asm` header)")]
    NotWasm,
    #[error(
        "the upload is a core WebAssembly module, not a component: build it with \
         `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    NotAComponent,
    #[error("the component does not validate: {0}")]
    Invalid(String),
    #[error("the component imports something the sandbox does not provide: {0}")]
    Imports(String),
    #[error(
        "the component implements no lathe:plugin world this host accepts (versions {accepted}); \
         it exports: {exports}"
    )]
    UnknownWorld { accepted: String, exports: String },
    /// It cannot be instantiated at all ([`CallError::StartMemory`], [`CallError::Start`]).
    #[error("{0}")]
    Start(CallError),
    #[error("the plugin's `info` failed: {0}")]
    Info(CallError),
    #[error("the plugin exports the {world} world but its info says it is a {declared}")]
    KindMismatch { world: Kind, declared: Kind },
    #[error("the plugin's config schema is not JSON: {0}")]
    BadSchema(String),
    #[error("compile cache {path}: {error}")]
    Cache { path: PathBuf, error: String },
}

/// The WIT package versions this host accepts.
pub const ACCEPTED_WIT_VERSIONS: &[&str] = &[v0_1::VERSION];

pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    stderr: MemoryOutputPipe,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The memory cap, with an error of its own so a call that hits it says so.
struct Limiter {
    memory_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{desired} bytes of memory asked for, over the cap of {cap}")]
struct MemoryCapReached {
    cap: usize,
    desired: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            return Err(MemoryCapReached { cap: self.memory_bytes, desired }.into());
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

struct Inner {
    engine: Engine,
    linker: Linker<State>,
    config: RuntimeConfig,
    tick: Duration,
}

/// Owns the wasmtime engine (shared by every plugin) and its epoch ticker.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> wasmtime::Result<Self> {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true)
            .consume_fuel(config.fuel)
            .max_wasm_stack(config.max_stack_bytes)
            .parallel_compilation(true)
            // Copy-on-write memory images, which make a new instance cost a mapping instead
            // of a copy of the data segments (0.9 against 6.3 ms for a Python plugin's
            // ~15 MB heap snapshot), only where they map the compile cache's file. Without
            // a file wasmtime writes the image into a memfd and seals it, and Linux refuses
            // the write seal (EBUSY) while another CPU's page batch still holds a page just
            // written: CI saw a Python plugin's `info` trap with "Device or resource busy".
            .memory_init_cow(config.cache_dir.is_some());
        let engine = Engine::new(&cfg)?;
        let mut linker = Linker::new(&engine);
        v0_1::add_to_linker(&mut linker)?;
        let tick = Duration::from_millis(10);
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("lathe-plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(tick);
                }
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                config,
                tick,
            }),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Checks an upload and readies it for calls: size, a component, compiled (or loaded
    /// from the cache), imports only WASI, exports a known world whose `info` agrees.
    pub fn load(&self, bytes: &[u8]) -> Result<Plugin, LoadError> {
        let inner = &self.inner;
        let limit = inner.config.max_upload_bytes();
        if bytes.len() > limit {
            return Err(LoadError::TooLarge { bytes: bytes.len(), limit });
        }
        let mut builder = CodeBuilder::new(&inner.engine);
        let hint = builder.wasm_binary(bytes, None).ok().and_then(|b| b.hint());
        match hint {
            Some(CodeHint::Component) => {}
            Some(CodeHint::Module) => return Err(LoadError::NotAComponent),
            None => return Err(LoadError::NotWasm),
        }
        let sha256 = lathe_util::sha256_hex(bytes);
        let component = self.compile_cached(bytes, &sha256)?;
        let pre = inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Imports(format!("{:#}", e)))?;
        let world = WorldPre::detect(&pre).ok_or_else(|| LoadError::UnknownWorld {
            accepted: ACCEPTED_WIT_VERSIONS.join(", "),
            exports: component
                .component_type()
                .exports(&inner.engine)
                .map(|(name, _)| name.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let limits = inner.config.limits_for(world.kind()).clone();
        if bytes.len() > limits.max_component_bytes {
            return Err(LoadError::ComponentTooLarge { kind: world.kind(), bytes: bytes.len(), limit: limits.max_component_bytes });
        }
        let mut plugin = Plugin {
            limits,
            memory_by: LimitSetBy::Host(world.kind()),
            timeout_by: LimitSetBy::Host(world.kind()),
            inner: Arc::new(PluginInner {
                runtime: inner.clone(),
                info: Info {
                    name: "(uploaded plugin)".into(),
                    version: String::new(),
                    kind: world.kind(),
                    description: String::new(),
                    config_schema: serde_json::Value::Null,
                    wit_version: v0_1::VERSION,
                    sha256,
                    size_bytes: bytes.len(),
                },
                pre: world,
            }),
        };
        let raw = {
            let mut inst = Instance {
                plugin: plugin.clone(),
                config: None,
                live: None,
            };
            inst.call(|w, s| w.call_info(s), |_| 0).map_err(|e| match e {
                CallError::StartMemory { .. } | CallError::Start { .. } => LoadError::Start(e),
                e => LoadError::Info(e),
            })?
        };
        let declared: Kind = raw.kind.into();
        if declared != plugin.inner.pre.kind() {
            return Err(LoadError::KindMismatch {
                world: plugin.inner.pre.kind(),
                declared,
            });
        }
        let schema = serde_json::from_str(&raw.config_schema).map_err(|e| LoadError::BadSchema(e.to_string()))?;
        let inner_plugin = Arc::get_mut(&mut plugin.inner).expect("no other handle yet");
        inner_plugin.info.name = raw.name;
        inner_plugin.info.version = raw.version;
        inner_plugin.info.description = raw.description;
        inner_plugin.info.config_schema = schema;
        Ok(plugin)
    }

    fn compile_cached(&self, bytes: &[u8], sha256: &str) -> Result<Component, LoadError> {
        let engine = &self.inner.engine;
        let Some(dir) = &self.inner.config.cache_dir else {
            return Component::from_binary(engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")));
        };
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let path = dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()));
        let cache_err = |error: String| LoadError::Cache { path: path.clone(), error };
        if let Some(c) = Self::map_cached(engine, &path) {
            return Ok(c);
        }
        let component = Component::from_binary(engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        let art = component.serialize().map_err(|e| cache_err(e.to_string()))?;
        std::fs::create_dir_all(dir).map_err(|e| cache_err(e.to_string()))?;
        lathe_util::write_atomic(&path, &art).map_err(|e| cache_err(e.to_string()))?;
        // Served from the file just written, so that instances map its memory image.
        Self::map_cached(engine, &path).ok_or_else(|| cache_err("the entry just written does not load".into()))
    }

    /// The cache entry at `path`, mapped; None (and the entry removed) when it is missing,
    /// damaged or from another engine.
    fn map_cached(engine: &Engine, path: &Path) -> Option<Component> {
        // SAFETY: the file is Lathe's own cache entry: written by `serialize` for exactly
        // these bytes (its name is their sha256) by an engine with the same compatibility
        // hash, and only ever replaced whole by a rename (`write_atomic`), never written in
        // place, so the mapping keeps its contents while in use. wasmtime still checks the
        // artifact's header and engine settings. (Truncating the file from outside Lathe
        // while a plugin runs would fault the process.)
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, path) };
        match loaded {
            Ok(c) => Some(c),
            // A damaged cache entry is recompiled, not trusted (removing a missing one is a
            // no-op).
            Err(_) => {
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }
}

impl Inner {
    fn new_store(&self, limits: &Limits) -> Store<State> {
        let inner = self;
        let stderr = MemoryOutputPipe::new(64 << 10);
        // Nothing granted: no preopened folders, no sockets, no environment, no arguments.
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).build();
        let mut store = Store::new(
            &inner.engine,
            State {
                wasi,
                table: ResourceTable::new(),
                limiter: Limiter {
                    memory_bytes: limits.memory_bytes,
                },
                stderr,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store
    }
}

struct PluginInner {
    runtime: Arc<Inner>,
    info: Info,
    pre: WorldPre<State>,
}

/// A validated, compiled plugin: cheap to clone, `Send + Sync`, makes [`Instance`]s.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
    /// What its calls run under: its world's, or tighter ([`Plugin::with_limits`]).
    limits: Limits,
    /// Who set the memory cap and the deadline, for the errors that hit them.
    memory_by: LimitSetBy,
    timeout_by: LimitSetBy,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("info", &self.inner.info).finish()
    }
}

impl Plugin {
    pub fn info(&self) -> &Info {
        &self.inner.info
    }

    pub fn kind(&self) -> Kind {
        self.inner.info.kind
    }

    /// The limits its calls run under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The same plugin, its calls held to `memory_bytes` and `timeout` where those are
    /// below its world's (a pack's plugin runs with what it asked for, never more than
    /// the host allows).
    pub fn with_limits(mut self, memory_bytes: usize, timeout: std::time::Duration) -> Self {
        if memory_bytes < self.limits.memory_bytes {
            self.limits.memory_bytes = memory_bytes;
            self.memory_by = LimitSetBy::Request;
        }
        if timeout < self.limits.timeout {
            self.limits.timeout = timeout;
            self.timeout_by = LimitSetBy::Request;
        }
        self
    }

    /// A configured instance (`config` is JSON; empty means `{}`).
    pub fn instance(&self, config: &str) -> Result<Instance, CallError> {
        let mut inst = Instance {
            plugin: self.clone(),
            config: Some(config.to_string()),
            live: None,
        };
        inst.ensure_live()?;
        Ok(inst)
    }

    /// Runs `f` on a fresh configured instance on tokio's blocking thread pool, so an async
    /// caller (the server, the job runner) awaits the result without ever blocking its
    /// executor, even while a plugin runs to its deadline. Must be called inside a tokio
    /// runtime.
    pub async fn call_blocking<R, F>(&self, config: &str, f: F) -> Result<R, CallError>
    where
        F: FnOnce(&mut Instance) -> Result<R, CallError> + Send + 'static,
        R: Send + 'static,
    {
        let plugin = self.clone();
        let config = config.to_string();
        let name = self.inner.info.name.clone();
        tokio::task::spawn_blocking(move || f(&mut plugin.instance(&config)?))
            .await
            .unwrap_or_else(|e| Err(CallError::Trap { plugin: name, message: format!("the plugin's thread failed: {e}") }))
    }

    /// Scores many pairs on `threads` instances in parallel, in order.
    pub fn score_batch_parallel<S: AsRef<str> + Sync>(
        &self,
        config: &str,
        predictions: &[S],
        references: &[S],
        threads: usize,
    ) -> Result<Vec<f64>, CallError> {
        let threads = threads.max(1).min(predictions.len().max(1));
        let chunk = predictions.len().div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<f64>, CallError>> = std::thread::scope(|s| {
            let handles: Vec<_> = predictions
                .chunks(chunk)
                .zip(references.chunks(chunk))
                .map(|(p, r)| s.spawn(move || self.instance(config)?.score_batch(p, r)))
                .collect();
            handles.into_iter().map(|h| h.join().expect("scoring thread")).collect()
        });
        let mut out = Vec::with_capacity(predictions.len());
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }
}

/// One configured instance of a plugin. Calls are sequential (`&mut self`); make one
/// instance per thread for parallelism. After a trap the next call starts from a fresh
/// instance (configured again), since a trapped instance may be in any state.
pub struct Instance {
    plugin: Plugin,
    /// None only while `Runtime::load` asks for `info` before anything is configured.
    config: Option<String>,
    live: Option<(Store<State>, World)>,
}

impl Instance {
    fn name(&self) -> String {
        self.plugin.inner.info.name.clone()
    }

    fn ensure_live(&mut self) -> Result<(), CallError> {
        if self.live.is_some() {
            return Ok(());
        }
        let mut store = self.plugin.inner.runtime.new_store(&self.plugin.limits);
        self.arm(&mut store);
        let world = match self.plugin.inner.pre.instantiate(&mut store) {
            Ok(w) => w,
            Err(e) => return Err(self.classify_start(e, &store)),
        };
        self.live = Some((store, world));
        if let Some(config) = &self.config {
            let config = if config.trim().is_empty() { "{}".to_string() } else { config.clone() };
            let res = self.call(|w, s| w.call_configure(s, &config), |_| 0)?;
            if let Err(message) = res {
                self.live = None;
                return Err(CallError::Config { plugin: self.name(), message });
            }
        }
        Ok(())
    }

    /// Re-arms the per-call limits: the deadline and the fuel.
    fn arm(&self, store: &mut Store<State>) {
        let rt = &self.plugin.inner.runtime;
        let limits = &self.plugin.limits;
        let ticks = (limits.timeout.as_millis() / rt.tick.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        if rt.config.fuel {
            let _ = store.set_fuel(limits.fuel.unwrap_or(u64::MAX));
        }
    }

    fn call<R>(
        &mut self,
        f: impl FnOnce(&World, &mut Store<State>) -> wasmtime::Result<R>,
        size: impl FnOnce(&R) -> usize,
    ) -> Result<R, CallError> {
        self.ensure_live()?;
        let (mut store, world) = self.live.take().expect("ensure_live made it");
        self.arm(&mut store);
        match f(&world, &mut store) {
            Ok(r) => {
                self.live = Some((store, world));
                let bytes = size(&r);
                let limit_bytes = self.plugin.limits.max_output_bytes;
                if bytes > limit_bytes {
                    let set_by = LimitSetBy::Host(self.plugin.kind());
                    return Err(CallError::OutputTooLarge { plugin: self.name(), bytes, limit_bytes, set_by });
                }
                Ok(r)
            }
            // The instance is dropped: the next call instantiates afresh.
            Err(e) => Err(self.classify(e, &store)),
        }
    }

    /// Why instantiating failed, before any call ran: the initial memory over the cap, or
    /// what wasmtime said (a table over its limit, a trap in start-up code).
    fn classify_start(&self, e: wasmtime::Error, store: &Store<State>) -> CallError {
        let plugin = self.name();
        if let Some(cap) = e.downcast_ref::<MemoryCapReached>() {
            return CallError::StartMemory { plugin, needs_bytes: cap.desired, limit_bytes: cap.cap, set_by: self.plugin.memory_by };
        }
        let message = match self.classify(e, store) {
            CallError::Trap { message, .. } => message,
            other => other.to_string(),
        };
        CallError::Start { plugin, message }
    }

    fn classify(&self, e: wasmtime::Error, store: &Store<State>) -> CallError {
        let plugin = self.name();
        let limits = &self.plugin.limits;
        if let Some(cap) = e.downcast_ref::<MemoryCapReached>() {
            return CallError::MemoryExhausted { plugin, limit_bytes: cap.cap, set_by: self.plugin.memory_by };
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::Timeout { plugin, limit: limits.timeout, set_by: self.plugin.timeout_by },
            Some(Trap::OutOfFuel) => CallError::OutOfFuel { plugin, fuel: limits.fuel.unwrap_or(u64::MAX) },
            Some(Trap::StackOverflow) => CallError::StackOverflow { plugin },
            Some(Trap::UnreachableCodeReached) => {
                let stderr = String::from_utf8_lossy(&store.data().stderr.contents()).into_owned();
                match stderr.find("panicked at") {
                    Some(i) => CallError::Panic { plugin, message: stderr[i..].trim().to_string() },
                    None => CallError::Trap { plugin, message: "reached `unreachable` (an abort)".into() },
                }
            }
            Some(t) => CallError::Trap { plugin, message: t.to_string() },
            None => CallError::Trap { plugin, message: format!("{}", e.root_cause()) },
        }
    }

    fn wrong_kind(&self, expected: Kind) -> CallError {
        CallError::WrongKind { plugin: self.name(), expected, actual: self.plugin.kind() }
    }

    pub fn score(&mut self, prediction: &str, reference: &str) -> Result<Score, CallError> {
        if self.plugin.kind() != Kind::Scorer {
            return Err(self.wrong_kind(Kind::Scorer));
        }
        self.call(
            |w, s| match w {
                World::Scorer(w) => w.call_score(s, prediction, reference),
                _ => unreachable!("kind checked"),
            },
            |r| r.details.iter().map(|d| d.field.len() + 8).sum::<usize>() + 8,
        )
        .map(Into::into)
    }

    /// Score values of many pairs in one call (the strings travel in one packed buffer).
    pub fn score_batch<S: AsRef<str>>(&mut self, predictions: &[S], references: &[S]) -> Result<Vec<f64>, CallError> {
        if self.plugin.kind() != Kind::Scorer {
            return Err(self.wrong_kind(Kind::Scorer));
        }
        assert_eq!(predictions.len(), references.len(), "one reference per prediction");
        let (p, r) = (v0_1::text_batch(predictions), v0_1::text_batch(references));
        let n = predictions.len();
        let out = self.call(
            |w, s| match w {
                World::Scorer(w) => w.call_score_batch(s, &p, &r),
                _ => unreachable!("kind checked"),
            },
            |v| 8 * v.len(),
        )?;
        if out.len() != n {
            return Err(CallError::Trap {
                plugin: self.name(),
                message: format!("score-batch returned {} scores for {n} pairs", out.len()),
            });
        }
        Ok(out)
    }

    /// Corpus-level metrics over a set, by name.
    pub fn aggregate<S: AsRef<str>>(&mut self, predictions: &[S], references: &[S]) -> Result<Vec<(String, f64)>, CallError> {
        if self.plugin.kind() != Kind::Scorer {
            return Err(self.wrong_kind(Kind::Scorer));
        }
        let (p, r) = (v0_1::text_batch(predictions), v0_1::text_batch(references));
        let out = self.call(
            |w, s| match w {
                World::Scorer(w) => w.call_aggregate(s, &p, &r),
                _ => unreachable!("kind checked"),
            },
            |v| v.iter().map(|d| d.field.len() + 8).sum(),
        )?;
        Ok(out.into_iter().map(|d| (d.field, d.score)).collect())
    }

    pub fn validate(&mut self, output: &str) -> Result<Result<(), Vec<Violation>>, CallError> {
        if self.plugin.kind() != Kind::Validator {
            return Err(self.wrong_kind(Kind::Validator));
        }
        let r = self.call(
            |w, s| match w {
                World::Validator(w) => w.call_validate(s, output),
                _ => unreachable!("kind checked"),
            },
            |r| match r {
                Ok(()) => 0,
                Err(vs) => vs.iter().map(|v| v.path.len() + v.message.len()).sum(),
            },
        )?;
        Ok(r.map_err(|vs| vs.into_iter().map(Into::into).collect()))
    }

    pub fn format(&mut self, record: &str) -> Result<Result<Example, FieldError>, CallError> {
        if self.plugin.kind() != Kind::Formatter {
            return Err(self.wrong_kind(Kind::Formatter));
        }
        let r = self.call(
            |w, s| match w {
                World::Formatter(w) => w.call_format(s, record),
                _ => unreachable!("kind checked"),
            },
            |r| match r {
                Ok(v0_1::wit::Example::Chat(m)) => m.iter().map(|m| m.role.len() + m.content.len()).sum(),
                Ok(v0_1::wit::Example::Completion(pc)) => pc.prompt.len() + pc.completion.len(),
                Err(e) => e.field.len() + e.message.len(),
            },
        )?;
        Ok(r.map(Into::into).map_err(Into::into))
    }

    pub fn build_prompt(&mut self, input: &str, output: &str, reference: Option<&str>) -> Result<Vec<Message>, CallError> {
        if self.plugin.kind() != Kind::Judge {
            return Err(self.wrong_kind(Kind::Judge));
        }
        let r = self.call(
            |w, s| match w {
                World::Judge(w) => w.call_build_prompt(s, input, output, reference),
                _ => unreachable!("kind checked"),
            },
            |m| m.iter().map(|m| m.role.len() + m.content.len()).sum(),
        )?;
        Ok(r.into_iter().map(Into::into).collect())
    }

    pub fn parse_verdict(&mut self, answer: &str) -> Result<Result<Judgment, String>, CallError> {
        if self.plugin.kind() != Kind::Judge {
            return Err(self.wrong_kind(Kind::Judge));
        }
        let r = self.call(
            |w, s| match w {
                World::Judge(w) => w.call_parse_verdict(s, answer),
                _ => unreachable!("kind checked"),
            },
            |r| match r {
                Ok(j) => j.reason.len() + 8,
                Err(e) => e.len(),
            },
        )?;
        Ok(r.map(Into::into))
    }
}
