//! The OpenAI-compatible inference API: `/v1/chat/completions` and `/v1/completions`,
//! streamed as server-sent events or not, over the continuous-batching scheduler
//! (`lathe_serving`). A request names a base model the server was started with, a deploy
//! alias (`<project>/<name>`, see `deployments`), or a fine-tuned model by the id the
//! fine-tuning API gave it (`ft:<base>:<project>:<job>`); an adapter runs over the shared
//! base. Schedulers start on first use, one per base model and one per merged export (an
//! int8 or int4 GGUF runs through the quantized kernels), and run every team's requests
//! together; adapters come and go at run time.
//!
//! A deploy alias whose gating eval suite has a validator plugin checks every answer with
//! it (the hash the eval pinned): each choice carries `validation` (`valid`, `violations`,
//! the plugin and its sha256), in the whole response and in a stream's finishing chunk.
//! `response_format` constrains the tokens; the validator still checks the task's rules.
//!
//! Errors have OpenAI's body and status, with `param` and `code` where OpenAI sets them
//! (`model_not_found`, `context_length_exceeded`), and a bad request never stops the
//! server: it is refused before it reaches the scheduler.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as Sse, Sse as SseBody};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt, stream};
use lathe_engine::{FinishReason, Message, SamplingParams};
use lathe_serving::{AdapterRef, Event, Request, Scheduler, ServeConfig, ServeError, TokenLogprob, Usage};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::UnboundedReceiverStream;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::deployments::Servable;

pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(chat_completions)).routes(routes!(completions))
}

/// Values by key, each made once on first use in a cell of its own, so that making one
/// (loading a model) does not hold up the others.
type Cells<T> = tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<T>>>>;

/// The schedulers this server runs, by model (base name or export id), started on first use.
pub struct Serving {
    config: ServeConfig,
    /// One cell per base model: a model loading does not hold up requests for another.
    started: Cells<Arc<Scheduler>>,
    /// Validators by the eval job that gated a deployment, loaded on first use (a cell
    /// each, as the schedulers).
    validators: Cells<Option<Arc<Validator>>>,
}

/// The validator plugin of a deployment's gating eval suite, as that eval ran it.
pub struct Validator {
    name: String,
    sha256: Option<String>,
    config: String,
    plugin: lathe_sandbox::Plugin,
}

impl Validator {
    /// The choice's `validation` object.
    async fn check(&self, text: &str) -> Value {
        let text = text.to_string();
        let mut v = json!({"plugin": self.name, "sha256": self.sha256});
        match self.plugin.call_blocking(&self.config, move |i| i.validate(&text)).await {
            Ok(Ok(())) => {
                v["valid"] = true.into();
                v["violations"] = json!([]);
            }
            Ok(Err(violations)) => {
                v["valid"] = false.into();
                v["violations"] = violations.iter().map(|x| json!({"path": x.path, "message": x.message})).collect();
            }
            Err(e) => {
                v["valid"] = Value::Null;
                v["error"] = e.to_string().into();
            }
        }
        v
    }
}

impl Serving {
    pub fn new(config: ServeConfig) -> Self {
        Self {
            config,
            started: tokio::sync::Mutex::new(HashMap::new()),
            validators: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The validator the eval job `eval_job_id` ran with, if its suite has one.
    async fn validator(&self, s: &AppState, project_id: &str, eval_job_id: &str) -> ApiResult<Option<Arc<Validator>>> {
        let cell = self.validators.lock().await.entry(eval_job_id.to_string()).or_default().clone();
        let v = cell.get_or_try_init(|| Self::load_validator(s, project_id, eval_job_id)).await?;
        Ok(v.clone())
    }

    async fn load_validator(s: &AppState, project_id: &str, eval_job_id: &str) -> ApiResult<Option<Arc<Validator>>> {
        let job = s.db.job(project_id, eval_job_id).await?;
        let suite: lathe_jobs::eval::Suite = serde_json::from_value(job.spec["suite"].clone()).map_err(|e| ApiError::Internal(format!("eval job `{eval_job_id}`'s suite: {e}")))?;
        let v = match suite.validator {
            None => None,
            Some(r) => {
                let env = s.job_env(&job).await?;
                // The suite's pin when it has one (a pack's suites do), else the job's.
                let (name, pinned, limits) = (r.plugin.clone(), r.sha256.clone(), r.limits);
                let plugin = tokio::task::spawn_blocking(move || env.plugin_ref(&name, pinned.as_deref(), limits, lathe_sandbox::Kind::Validator))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(|e| ApiError::Internal(format!("the deployment's validator: {e}")))?;
                Some(Arc::new(Validator { sha256: Some(plugin.info().sha256.clone()), name: r.plugin, config: r.config.to_string(), plugin }))
            }
        };
        Ok(v)
    }

    /// The scheduler of a model (a configured base or a merged export), loading it the
    /// first time, quantized weights as their blocks alone (serving needs no f32 copies).
    async fn scheduler(&self, s: &AppState, model: &Weights) -> ApiResult<Arc<Scheduler>> {
        let cell = self.started.lock().await.entry(model.name.clone()).or_default().clone();
        let sch = cell
            .get_or_try_init(|| async {
                let device = lathe_engine::device::parse_device(&s.config.device).map_err(|e| ApiError::Internal(e.to_string()))?;
                let config = self.config.clone();
                let path = model.path.clone();
                let sch = tokio::task::spawn_blocking(move || lathe_engine::load_blocks(&path, &device).map(|m| Scheduler::start(Arc::new(m), config)))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(|e| ApiError::Internal(format!("loading model `{}`: {e}", model.name)))?;
                Ok::<_, ApiError>(Arc::new(sch))
            })
            .await?;
        Ok(sch.clone())
    }

    /// Prometheus text of every started scheduler.
    pub async fn metrics(&self) -> String {
        let started = self.started.lock().await;
        let mut models: Vec<(&str, &lathe_serving::Metrics)> = started.iter().filter_map(|(name, cell)| Some((name.as_str(), &**cell.get()?.metrics()))).collect();
        models.sort_by_key(|(name, _)| *name);
        lathe_serving::metrics::render(&models)
    }
}

/// The weights a scheduler runs: a configured base model, or a merged export (named by
/// its fine-tune id, which is also its `model_name` in `/metrics`).
#[derive(Clone)]
struct Weights {
    name: String,
    path: std::path::PathBuf,
}

/// A model a request may name, resolved: the weights it runs on and its adapter.
struct Served {
    name: String,
    weights: Weights,
    adapter: Option<AdapterRef>,
    /// A deployment's validator.
    validator: Option<Arc<Validator>>,
}

fn model_not_found(name: &str) -> ApiError {
    ApiError::field(StatusCode::NOT_FOUND, format!("The model `{name}` does not exist or you do not have access to it."), "model", Some("model_not_found"))
}

fn base_weights(s: &AppState, base: &str) -> ApiResult<Weights> {
    Ok(Weights { name: base.into(), path: s.model(base)?.to_path_buf() })
}

/// A base model by name, a deploy alias (`<project>/<name>`: the version it serves now),
/// or a fine-tuned model (`ft:<base>:<project>:<job>`: a training job's adapter, or an
/// export job's merged weights), of the caller's team.
async fn resolve(s: &AppState, caller: &Caller, name: &str) -> ApiResult<Served> {
    if s.config.models.contains_key(name) {
        return Ok(Served { name: name.into(), weights: base_weights(s, name)?, adapter: None, validator: None });
    }
    let project = |pname: &str| {
        let pname = pname.to_string();
        async move { Ok::<_, ApiError>(s.db.projects(&caller.team_id).await?.into_iter().find(|p| p.name == pname)) }
    };
    let mut validator = None;
    let (job_id, base, p) = if let Some(rest) = name.strip_prefix("ft:") {
        let mut parts = rest.rsplitn(3, ':');
        let (Some(job_id), Some(pname), Some(base)) = (parts.next(), parts.next(), parts.next()) else { return Err(model_not_found(name)) };
        let Some(p) = project(pname).await? else { return Err(model_not_found(name)) };
        (job_id.to_string(), Some(base.to_string()), p)
    } else if let Some((pname, alias)) = name.split_once('/') {
        let Some(p) = project(pname).await? else { return Err(model_not_found(name)) };
        let Ok(d) = s.db.deployment(&p.id, alias).await else { return Err(model_not_found(name)) };
        if let Some(e) = &d.eval_job_id {
            validator = s.serving.validator(s, &p.id, e).await?;
        }
        match d.job_id {
            None => return Ok(Served { name: name.into(), weights: base_weights(s, &d.model)?, adapter: None, validator }),
            Some(j) => (j, None, p),
        }
    } else {
        return Err(model_not_found(name));
    };
    let Ok(job) = s.db.job(&p.id, &job_id).await else { return Err(model_not_found(name)) };
    let Some(what) = Servable::of(s, &job) else { return Err(model_not_found(name)) };
    if base.is_some_and(|b| b != what.base()) {
        return Err(model_not_found(name));
    }
    // A succeeded job's outcome never changes: its id names one version.
    let (weights, adapter) = match what {
        Servable::Adapter { base, dir } => (base_weights(s, &base)?, Some(AdapterRef { key: job.id.clone(), dir })),
        Servable::Merged { base, path, .. } => (Weights { name: format!("ft:{base}:{}:{}", p.name, job.id), path }, None),
    };
    Ok(Served { name: name.into(), weights, adapter, validator })
}

/// `stop`: a string or a list of up to four.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// What both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    #[serde(default)]
    stop: Stop,
    seed: Option<u64>,
    n: Option<usize>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// `text`, `json_object` or `json_schema`: see [`json_schema`].
    response_format: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The body as JSON, with serde's message (field, line, column) as a 400.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

impl Common {
    /// The sampling parameters and choice count, OpenAI's defaults filled in.
    fn params(&self, prompt_len: usize, limit: usize) -> ApiResult<(SamplingParams, usize)> {
        for (param, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::field(StatusCode::BAD_REQUEST, format!("`{param}` is not supported by this server; leave it at 0"), param, None));
            }
        }
        let n = self.n.unwrap_or(1);
        if !(1..=16).contains(&n) {
            return Err(ApiError::field(StatusCode::BAD_REQUEST, format!("`n` must be between 1 and 16, got {n}"), "n", None));
        }
        let stop = match &self.stop {
            Stop::None => Vec::new(),
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::field(StatusCode::BAD_REQUEST, "`stop` takes up to 4 non-empty strings".into(), "stop", None));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens).unwrap_or(limit.saturating_sub(prompt_len).max(1));
        if max_tokens == 0 {
            return Err(ApiError::field(StatusCode::BAD_REQUEST, "`max_tokens` must be at least 1".into(), "max_tokens", None));
        }
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.filter(|&p| p != 1.0),
            seed: self.seed.unwrap_or_else(rand_seed),
            max_tokens,
            stop,
            ..SamplingParams::default()
        };
        params.validate().map_err(|e| {
            let param = if e.to_string().contains("top_p") { "top_p" } else { "temperature" };
            ApiError::field(StatusCode::BAD_REQUEST, e.to_string().trim_start_matches("generation failed: ").to_string(), param, None)
        })?;
        Ok((params, n))
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

/// A message's content: a string, or parts of which only text ones are accepted.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
    Null(()),
}

impl Content {
    fn text(self, at: usize) -> ApiResult<String> {
        match self {
            Content::Text(t) => Ok(t),
            Content::Null(()) => Ok(String::new()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t),
                    _ => Err(ApiError::field(StatusCode::BAD_REQUEST, format!("messages[{at}]: only text content parts are supported"), "messages", None)),
                })
                .collect(),
        }
    }
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    tools: Option<Value>,
}

#[derive(Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: PromptInput,
    logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
}

/// `/v1/completions`' prompt: text, several texts, token ids, or several lists of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Which response shape a stream of events becomes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// Everything a response needs besides the events.
struct Reply {
    kind: Kind,
    id: String,
    model: String,
    created: i64,
    stream: bool,
    include_usage: bool,
    /// Prompt texts to echo, per choice (`echo`).
    echo: Vec<String>,
    /// Choices per prompt (`n`): a prompt's tokens count once in the usage.
    per_prompt: usize,
    sch: Arc<Scheduler>,
    validator: Option<Arc<Validator>>,
}

#[utoipa::path(post, path = "/v1/chat/completions", responses((status = 200, description = "a chat completion, or its chunks as server-sent events"), (status = 400, description = "an invalid request, with the OpenAI error body"), (status = 404, description = "no such model")))]
async fn chat_completions(State(s): State<Arc<AppState>>, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let (reply, prompts, submit) = chat(&s, &caller, parse(&body)?).await?;
    respond(reply, prompts, submit).await
}

/// A whole (not streamed) chat completion for a request body, as `/v1/chat/completions`
/// answers it: the web UI's playground.
pub async fn chat_completion(s: &AppState, caller: &Caller, body: Value) -> ApiResult<Value> {
    let mut b: ChatBody = serde_json::from_value(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
    b.common.stream = false;
    let (reply, prompts, submit) = chat(s, caller, b).await?;
    let (choices, events) = submit_all(&reply, prompts, submit).await?;
    whole(reply, choices, events).await
}

/// A chat request checked and resolved: the reply's frame, one prompt per choice, and
/// what each choice's request carries.
async fn chat(s: &AppState, caller: &Caller, b: ChatBody) -> ApiResult<(Reply, Vec<Vec<u32>>, Submit)> {
    if b.tools.is_some() {
        return Err(ApiError::field(StatusCode::BAD_REQUEST, "tool calling is not supported by this server".into(), "tools", None));
    }
    let schema = json_schema(b.common.response_format.as_ref())?;
    if b.messages.is_empty() {
        return Err(ApiError::field(StatusCode::BAD_REQUEST, "`messages` is empty".into(), "messages", None));
    }
    let served = resolve(s, caller, &b.common.model).await?;
    let sch = s.serving.scheduler(s, &served.weights).await?;
    let mut messages = Vec::with_capacity(b.messages.len());
    for (i, m) in b.messages.into_iter().enumerate() {
        if !["system", "user", "assistant", "developer"].contains(&m.role.as_str()) {
            return Err(ApiError::field(StatusCode::BAD_REQUEST, format!("messages[{i}].role `{}` is not one of system, developer, user, assistant", m.role), "messages", None));
        }
        let role = if m.role == "developer" { "system".to_string() } else { m.role };
        messages.push(Message { role, content: m.content.text(i)? });
    }
    let prompt = sch.model().tokenizer.encode_chat(&messages, true).map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, format!("the chat template refused the messages: {e}"), "messages", None))?;
    let top = match (b.logprobs, b.top_logprobs) {
        (false, Some(_)) => return Err(ApiError::field(StatusCode::BAD_REQUEST, "`top_logprobs` needs `logprobs: true`".into(), "top_logprobs", None)),
        (true, Some(k)) if k > 20 => return Err(ApiError::field(StatusCode::BAD_REQUEST, format!("`top_logprobs` must be at most 20, got {k}"), "top_logprobs", None)),
        (true, k) => Some(k.unwrap_or(0)),
        (false, None) => None,
    };
    let (params, n) = b.common.params(prompt.len(), sch.max_request_tokens())?;
    let reply = Reply {
        kind: Kind::Chat,
        id: lathe_store::new_id("chatcmpl"),
        model: served.name.clone(),
        created: now(),
        stream: b.common.stream,
        include_usage: b.common.stream_options.is_some_and(|o| o.include_usage),
        echo: Vec::new(),
        per_prompt: n,
        sch: sch.clone(),
        validator: served.validator.clone(),
    };
    let prompts = vec![prompt; n];
    Ok((reply, prompts, Submit { params, adapter: served.adapter, logprobs: top, json_schema: schema }))
}

#[utoipa::path(post, path = "/v1/completions", responses((status = 200, description = "a text completion, or its chunks as server-sent events"), (status = 400, description = "an invalid request, with the OpenAI error body"), (status = 404, description = "no such model")))]
async fn completions(State(s): State<Arc<AppState>>, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let b: CompletionBody = parse(&body)?;
    if b.suffix.is_some() {
        return Err(ApiError::field(StatusCode::BAD_REQUEST, "`suffix` is not supported by this server".into(), "suffix", None));
    }
    if b.logprobs.is_some_and(|k| k > 5) {
        return Err(ApiError::field(StatusCode::BAD_REQUEST, "`logprobs` must be at most 5".into(), "logprobs", None));
    }
    let schema = json_schema(b.common.response_format.as_ref())?;
    let served = resolve(&s, &caller, &b.common.model).await?;
    let sch = s.serving.scheduler(&s, &served.weights).await?;
    let tok = &sch.model().tokenizer;
    let encode = |t: &str| tok.encode(t, true).map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, format!("the prompt cannot be tokenized: {e}"), "prompt", None));
    let prompts: Vec<Vec<u32>> = match b.prompt {
        PromptInput::Text(t) => vec![encode(&t)?],
        PromptInput::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<ApiResult<_>>()?,
        PromptInput::Tokens(ids) => vec![ids],
        PromptInput::TokenLists(lists) => lists,
    };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::field(StatusCode::BAD_REQUEST, "`prompt` is empty".into(), "prompt", None));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let (params, n) = b.common.params(longest, sch.max_request_tokens())?;
    let echo = match b.echo {
        true => prompts.iter().flat_map(|p| std::iter::repeat_n(tok.decode(p, false).unwrap_or_default(), n)).collect(),
        false => Vec::new(),
    };
    let reply = Reply {
        kind: Kind::Text,
        id: lathe_store::new_id("cmpl"),
        model: served.name.clone(),
        created: now(),
        stream: b.common.stream,
        include_usage: b.common.stream_options.is_some_and(|o| o.include_usage),
        echo,
        per_prompt: n,
        sch: sch.clone(),
        validator: served.validator.clone(),
    };
    let prompts = prompts.into_iter().flat_map(|p| std::iter::repeat_n(p, n)).collect();
    respond(reply, prompts, Submit { params, adapter: served.adapter, logprobs: b.logprobs, json_schema: schema }).await
}

/// The JSON Schema a `response_format` asks the output to match, if any: `json_object` is
/// any object, `json_schema` its `json_schema.schema` (any JSON when absent), as OpenAI's
/// structured outputs. The scheduler compiles it; a schema it cannot is a 400 there.
fn json_schema(format: Option<&Value>) -> ApiResult<Option<Value>> {
    let fault = |m: String| ApiError::field(StatusCode::BAD_REQUEST, m, "response_format", None);
    let Some(format) = format else { return Ok(None) };
    match format["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({ "type": "object" }))),
        Some("json_schema") => {
            let spec = &format["json_schema"];
            let name = spec["name"].as_str().ok_or_else(|| fault("`response_format.json_schema.name` is required".into()))?;
            if !(1..=64).contains(&name.len()) || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(fault(format!("`response_format.json_schema.name` `{name}` must be 1-64 letters, digits, `_` or `-`")));
            }
            match &spec["schema"] {
                Value::Null => Ok(Some(json!({}))),
                schema @ (Value::Object(_) | Value::Bool(_)) => Ok(Some(schema.clone())),
                other => Err(fault(format!("`response_format.json_schema.schema` must be an object, not {other}"))),
            }
        }
        Some(other) => Err(fault(format!("`response_format.type` `{other}` is not one of text, json_object, json_schema"))),
        None => Err(fault("`response_format` needs a `type`".into())),
    }
}

/// What each choice's request carries besides its prompt.
struct Submit {
    params: SamplingParams,
    adapter: Option<AdapterRef>,
    logprobs: Option<usize>,
    json_schema: Option<Value>,
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Submits one request per choice (seeds apart, so `n` samples differ), then answers
/// with the whole response or a stream of chunks.
async fn respond(reply: Reply, prompts: Vec<Vec<u32>>, submit: Submit) -> ApiResult<Response> {
    let (choices, events) = submit_all(&reply, prompts, submit).await?;
    if reply.stream {
        return Ok(SseBody::new(chunks(reply, choices, events)).into_response());
    }
    Ok(Json(whole(reply, choices, events).await?).into_response())
}

/// Submits one request per choice; their events merged, each with its choice's index.
async fn submit_all(reply: &Reply, prompts: Vec<Vec<u32>>, submit: Submit) -> ApiResult<(usize, impl Stream<Item = (usize, Event)> + Unpin + Send + 'static)> {
    let mut streams = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let params = SamplingParams { seed: submit.params.seed.wrapping_add(i as u64), ..submit.params.clone() };
        let request = Request { prompt, params, adapter: submit.adapter.clone(), logprobs: submit.logprobs, json_schema: submit.json_schema.clone() };
        // Compiling a schema is CPU work: off the async threads.
        let sch = reply.sch.clone();
        let submitted = tokio::task::spawn_blocking(move || sch.submit(request)).await.map_err(|e| ApiError::Internal(e.to_string()))?;
        let rx = submitted.map_err(|e| match e {
            ServeError::Invalid(m) if m.contains("maximum context length") => ApiError::field(StatusCode::BAD_REQUEST, m, "messages", Some("context_length_exceeded")),
            ServeError::Invalid(m) => ApiError::bad(m),
            ServeError::Schema(m) => ApiError::field(StatusCode::BAD_REQUEST, format!("`response_format.json_schema.schema` cannot be used: {m}"), "response_format", None),
            ServeError::Stopped | ServeError::Cancelled => ApiError::Internal("the scheduler has stopped".into()),
        })?;
        streams.push(UnboundedReceiverStream::new(rx).map(move |e| (i, e)));
    }
    Ok((streams.len(), stream::select_all(streams)))
}

/// Text of one token for logprobs, and its UTF-8 bytes.
fn token_text(sch: &Scheduler, id: u32) -> String {
    sch.model().tokenizer.decode(&[id], false).unwrap_or_default()
}

fn chat_logprob(sch: &Scheduler, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let t = token_text(sch, id);
        json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
    };
    let mut v = entry(lp.token, lp.logprob);
    v["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
    v
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Adds a choice's usage to the total; prompts shared by `n` choices count once, as
/// OpenAI counts them.
fn add_usage(total: &mut Usage, u: &Usage, first_of_prompt: bool) {
    if first_of_prompt {
        total.prompt_tokens += u.prompt_tokens;
        total.cached_tokens += u.cached_tokens;
    }
    total.completion_tokens += u.completion_tokens;
}

/// The legacy completions `logprobs` object of a choice.
#[derive(Default)]
struct TextLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

impl TextLogprobs {
    fn push(&mut self, sch: &Scheduler, lp: &TokenLogprob, offset: usize) {
        self.tokens.push(token_text(sch, lp.token));
        self.token_logprobs.push(lp.logprob);
        self.top.push(Value::Object(lp.top.iter().map(|&(id, l)| (token_text(sch, id), json!(l))).collect()));
        self.offsets.push(offset);
    }

    fn json(&self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top, "text_offset": self.offsets})
    }
}

/// Collects every choice, then answers once.
async fn whole(reply: Reply, choices: usize, mut events: impl Stream<Item = (usize, Event)> + Unpin) -> ApiResult<Value> {
    let mut texts = vec![String::new(); choices];
    let mut chat_lps: Vec<Vec<Value>> = vec![Vec::new(); choices];
    let mut text_lps: Vec<TextLogprobs> = (0..choices).map(|_| TextLogprobs::default()).collect();
    let mut finish = vec![None; choices];
    let mut usage = Usage::default();
    while let Some((i, e)) = events.next().await {
        match e {
            Event::Token { text, logprob, .. } => {
                if let Some(lp) = logprob {
                    chat_lps[i].push(chat_logprob(&reply.sch, &lp));
                    let offset = reply.echo.get(i).map_or(0, String::len) + texts[i].len();
                    text_lps[i].push(&reply.sch, &lp, offset);
                }
                texts[i].push_str(&text);
            }
            Event::Done { finish: f, text, usage: u } => {
                texts[i] = text;
                finish[i] = Some(f);
                add_usage(&mut usage, &u, i % reply.per_prompt == 0);
            }
            Event::Failed(m) => return Err(ApiError::Internal(m)),
        }
    }
    let mut validations = Vec::with_capacity(choices);
    for text in &texts {
        validations.push(match &reply.validator {
            Some(v) => Some(v.check(text).await),
            None => None,
        });
    }
    let choices: Vec<Value> = (0..choices)
        .map(|i| {
            let fr = finish[i].map(finish_reason);
            let mut choice = match reply.kind {
                Kind::Chat => json!({
                    "index": i, "message": {"role": "assistant", "content": texts[i], "refusal": null},
                    "logprobs": (!chat_lps[i].is_empty()).then(|| json!({"content": chat_lps[i]})),
                    "finish_reason": fr,
                }),
                Kind::Text => json!({
                    "index": i, "text": format!("{}{}", reply.echo.get(i).map_or("", String::as_str), texts[i]),
                    "logprobs": (!text_lps[i].tokens.is_empty()).then(|| text_lps[i].json()),
                    "finish_reason": fr,
                }),
            };
            if let Some(v) = validations[i].take() {
                choice["validation"] = v;
            }
            choice
        })
        .collect();
    let object = if reply.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Ok(json!({
        "id": reply.id, "object": object, "created": reply.created, "model": reply.model,
        "system_fingerprint": fingerprint(), "choices": choices, "usage": usage_json(&usage),
    }))
}

fn fingerprint() -> String {
    format!("lathe-{}", env!("CARGO_PKG_VERSION"))
}

/// The chunks of a streamed response: for chat, a first chunk with the role per choice;
/// then content as it is produced; a last chunk per choice with its finish reason; the
/// usage chunk if asked for; `[DONE]`.
fn chunks(reply: Reply, choices: usize, events: impl Stream<Item = (usize, Event)> + Unpin + Send + 'static) -> impl Stream<Item = Result<Sse, Infallible>> + Send {
    let reply = Arc::new(reply);
    let chunk = {
        let reply = reply.clone();
        move |choices: Value, usage: Option<Value>| {
            let object = if reply.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
            let mut c = json!({"id": reply.id, "object": object, "created": reply.created, "model": reply.model, "system_fingerprint": fingerprint(), "choices": choices});
            if reply.include_usage {
                c["usage"] = usage.unwrap_or(Value::Null);
            }
            Ok(Sse::default().data(c.to_string()))
        }
    };
    let first: Vec<Result<Sse, Infallible>> = match reply.kind {
        Kind::Chat => (0..choices).map(|i| chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None)).collect(),
        Kind::Text => reply.echo.iter().enumerate().map(|(i, e)| chunk(json!([{"index": i, "text": e, "logprobs": null, "finish_reason": null}]), None)).collect(),
    };
    let state = (events, Usage::default(), vec![0usize; choices], false);
    let body = stream::unfold(state, move |(mut events, mut usage, mut offsets, ended)| {
        let reply = reply.clone();
        let chunk = chunk.clone();
        async move {
            if ended {
                return None;
            }
            let Some((i, e)) = events.next().await else {
                let mut tail = Vec::new();
                if reply.include_usage {
                    tail.push(chunk(json!([]), Some(usage_json(&usage))));
                }
                tail.push(Ok(Sse::default().data("[DONE]")));
                return Some((stream::iter(tail), (events, usage, offsets, true)));
            };
            let out = match e {
                Event::Token { text, logprob, .. } => {
                    let piece = match reply.kind {
                        Kind::Chat => {
                            let lp = logprob.map(|lp| json!({"content": [chat_logprob(&reply.sch, &lp)]}));
                            json!([{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}])
                        }
                        Kind::Text => {
                            let lp = logprob.map(|lp| {
                                let mut t = TextLogprobs::default();
                                t.push(&reply.sch, &lp, offsets[i]);
                                t.json()
                            });
                            json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": null}])
                        }
                    };
                    offsets[i] += text.len();
                    vec![chunk(piece, None)]
                }
                Event::Done { finish, usage: u, text } => {
                    add_usage(&mut usage, &u, i % reply.per_prompt == 0);
                    let fr = finish_reason(finish);
                    let mut piece = match reply.kind {
                        Kind::Chat => json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": fr}]),
                        Kind::Text => json!([{"index": i, "text": "", "logprobs": null, "finish_reason": fr}]),
                    };
                    if let Some(v) = &reply.validator {
                        piece[0]["validation"] = v.check(&text).await;
                    }
                    vec![chunk(piece, None)]
                }
                Event::Failed(m) => {
                    // Mid-stream, the status is sent already: the error travels as data.
                    let err = json!({"error": {"message": m, "type": "server_error", "param": null, "code": null}});
                    return Some((stream::iter(vec![Ok(Sse::default().data(err.to_string()))]), (events, usage, offsets, true)));
                }
            };
            Some((stream::iter(out), (events, usage, offsets, false)))
        }
    })
    .flatten();
    stream::iter(first).chain(body)
}
