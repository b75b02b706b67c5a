//! The eval harness: a suite (prompt templates, scorer plugins, an optional validator, the
//! gate) run over a held-out set with a model and optional adapter.
//!
//! A run renders each item's prompt through the model's chat template, generates in
//! batches, scores every output with the suite's scorer plugins in the sandbox, validates
//! it, and keeps all of it per item; aggregates carry bootstrap 95 % intervals. The
//! prompted baseline tries every template at every shot count (shots drawn from the
//! training part only) and keeps the best.

pub mod judge;
pub mod regression;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use std::sync::Mutex;

use lathe_engine::{Adapter, CausalLm, Message, SamplingParams, Tokenizer};
use lathe_sandbox::{Kind, Plugin};
use lathe_serving::{ServeConfig, ServeError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::env::Env;
use crate::error::{JobError, Result};
use crate::event::Sink;
use stats::{Comparison, Estimate};

/// How a prompt is built from an item's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTemplate {
    pub name: String,
    /// The system message (none when absent).
    #[serde(default)]
    pub system: Option<String>,
    /// The user message, a minijinja template over `input` (the item's last user message)
    /// and `label`.
    pub user: String,
}

/// A plugin by built-in name (`json-field-match`) or path to a `.wasm` component, with
/// its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    pub plugin: String,
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// The component's sha256 this reference is pinned to: a plugin of that name with
    /// other bytes is refused. Packs pin every reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Tighter limits than the host's for this plugin's calls (a pack's plugins run with
    /// what they asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<CallLimits>,
}

impl PluginRef {
    /// An unpinned reference.
    pub fn new(plugin: impl Into<String>, config: serde_json::Value) -> Self {
        Self { plugin: plugin.into(), config, sha256: None, limits: None }
    }
}

/// The memory of one plugin instance and the time of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallLimits {
    pub memory_mb: u64,
    pub timeout_ms: u64,
}

pub(crate) fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// The bar a model must clear: `metric` (a scorer's declared name, `valid` or `judge`) at
/// least `min`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub metric: String,
    pub min: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub name: String,
    pub templates: Vec<PromptTemplate>,
    pub scorers: Vec<PluginRef>,
    #[serde(default)]
    pub validator: Option<PluginRef>,
    /// An LLM judge whose score (0..1) becomes the `judge` metric.
    #[serde(default)]
    pub judge: Option<judge::JudgeSpec>,
    #[serde(default)]
    pub gate: Option<Gate>,
    /// Shot counts the baseline tries.
    #[serde(default = "default_shots")]
    pub shots: Vec<usize>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// The smallest difference of the gate metric that counts as a change.
    #[serde(default)]
    pub margin: f64,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_shots() -> Vec<usize> {
    vec![0, 3]
}
fn default_max_tokens() -> usize {
    256
}
fn default_batch() -> usize {
    8
}

impl Suite {
    /// Reads and checks a suite file (JSON).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| JobError::io(path, e))?;
        Self::from_json(&text).map_err(|e| JobError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Parses and checks a suite.
    pub fn from_json(text: &str) -> Result<Self> {
        let suite: Suite = serde_json::from_str(text).map_err(|e| JobError::Invalid(format!("not a valid eval suite: {e}")))?;
        suite.check()?;
        Ok(suite)
    }

    /// What can be checked without loading plugins; [`Plugins::load`] checks the rest (the
    /// plugins' kinds, and that the gate names a metric they produce).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(JobError::Invalid(format!("suite `{}`: {m}", self.name)));
        if self.templates.is_empty() {
            return bad("no prompt templates".into());
        }
        if self.scorers.is_empty() {
            return bad("no scorers".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for t in &self.templates {
            if !names.insert(&t.name) {
                return bad(format!("two templates are named `{}`", t.name));
            }
            let env = minijinja::Environment::new();
            if let Err(e) = env.template_from_str(&t.user) {
                return bad(format!("template `{}`: the user message does not parse: {e}", t.name));
            }
        }
        if self.batch_size == 0 || self.max_tokens == 0 {
            return bad("batch_size and max_tokens must be ≥ 1".into());
        }
        if let Some(g) = &self.gate
            && !(0.0..=1.0).contains(&g.min)
        {
            return bad(format!("gate.min is {}; metrics are in [0, 1]", g.min));
        }
        Ok(())
    }

    /// The template named `name`, or the first without a name.
    pub fn template(&self, name: Option<&str>) -> Result<&PromptTemplate> {
        match name {
            None => Ok(&self.templates[0]),
            Some(n) => self.templates.iter().find(|t| t.name == n).ok_or_else(|| {
                JobError::Invalid(format!(
                    "the suite `{}` has no template `{n}`; it has {}",
                    self.name,
                    self.templates.iter().map(|t| format!("`{}`", t.name)).collect::<Vec<_>>().join(", ")
                ))
            }),
        }
    }
}

/// One held-out item: the conversation before the answer, and the reference answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub input: String,
    pub reference: String,
    #[serde(default)]
    pub label: Option<String>,
}

impl Item {
    /// The last user message is the input; the final assistant message the reference.
    pub fn from_example(e: &lathe_data::Example) -> Result<Self> {
        let input = e
            .context()
            .iter()
            .rev()
            .find(|m| m.role == lathe_data::Role::User)
            .map(|m| m.content.clone())
            .ok_or_else(|| JobError::invalid("an eval item needs a user message before the answer"))?;
        Ok(Self {
            input,
            reference: e.target().to_string(),
            label: e.label.clone(),
        })
    }
}

/// Plugins loaded once for a suite, each metric under the name its plugin declares.
pub struct Plugins {
    scorers: Vec<(String, Plugin, String)>,
    validator: Option<(String, Plugin, String)>,
    judge: Option<Mutex<judge::Judge>>,
    primary: String,
}

impl Plugins {
    /// Loads the suite's scorers and validator and checks the suite against them: the
    /// gate must name a metric they produce.
    pub fn load(env: &Env, suite: &Suite) -> Result<Self> {
        let scorers = suite
            .scorers
            .iter()
            .map(|r| {
                let p = env.plugin_ref(&r.plugin, r.sha256.as_deref(), r.limits, Kind::Scorer)?;
                Ok((p.info().name.clone(), p, r.config.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let validator = match &suite.validator {
            Some(r) => {
                let p = env.plugin_ref(&r.plugin, r.sha256.as_deref(), r.limits, Kind::Validator)?;
                Some((p.info().name.clone(), p, r.config.to_string()))
            }
            None => None,
        };
        let mut plugins = Self { primary: scorers[0].0.clone(), scorers, validator, judge: None };
        let produced = plugins.metric_names(suite.judge.is_some());
        if let Some(g) = &suite.gate {
            if !produced.contains(&g.metric) {
                return Err(JobError::Invalid(format!(
                    "suite `{}`: the gate names the metric `{}`, which no scorer produces; its metrics are {}",
                    suite.name,
                    g.metric,
                    produced.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
                )));
            }
            plugins.primary = g.metric.clone();
        }
        Ok(plugins)
    }

    /// Also loads the suite's judge, if it has one: its model on the environment's device
    /// (or its endpoint), verdicts cached in the environment's judge cache.
    pub fn load_with_judge(env: &Env, suite: &Suite) -> Result<Self> {
        let mut plugins = Self::load(env, suite)?;
        if let Some(spec) = &suite.judge {
            let backend = judge::Judge::backend_for(spec, env.device())?;
            let j = judge::Judge::new(env, spec.clone(), backend, judge::VerdictCache::open(&env.judge_cache())?)?;
            plugins.judge = Some(Mutex::new(j));
        }
        Ok(plugins)
    }

    /// Uses `judge` for the `judge` metric.
    pub fn with_judge(mut self, judge: judge::Judge) -> Self {
        self.judge = Some(Mutex::new(judge));
        self
    }

    /// Plugin name → sha256 of every plugin loaded, the judge's included.
    pub fn hashes(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = self.scorers.iter().chain(self.validator.iter()).map(|(n, p, _)| (n.clone(), p.info().sha256.clone())).collect();
        if let Some(j) = &self.judge {
            let j = j.lock().expect("judge lock");
            out.insert(j.spec.plugin.clone(), j.plugin_sha256.clone());
        }
        out
    }

    /// The metric that decides: the gate's, else the first scorer's.
    pub fn primary_metric(&self) -> &str {
        &self.primary
    }

    /// Every metric a run with these plugins reports.
    pub fn metric_names(&self, with_judge: bool) -> Vec<String> {
        let mut names: Vec<String> = self.scorers.iter().map(|(n, _, _)| n.clone()).collect();
        if self.validator.is_some() {
            names.push("valid".into());
        }
        if with_judge {
            names.push("judge".into());
        }
        names
    }

    /// (hits, misses) of the judge's verdict cache.
    pub fn judge_cache_stats(&self) -> Option<(usize, usize)> {
        self.judge.as_ref().map(|j| {
            let j = j.lock().expect("judge lock");
            (j.cache.hits, j.cache.misses)
        })
    }
}

/// What one item got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub index: usize,
    pub input: String,
    /// The rendered prompt text the model saw.
    pub prompt: String,
    pub output: String,
    pub reference: String,
    /// Scorer name → score.
    pub scores: BTreeMap<String, f64>,
    /// Scorer name → per-field details.
    pub details: BTreeMap<String, Vec<(String, f64)>>,
    /// None without a validator.
    pub valid: Option<bool>,
    #[serde(default)]
    pub violations: Vec<String>,
}

impl ItemResult {
    /// Why the judge scored this output as it did, where a judge ran.
    pub fn judge_reason(&self) -> Option<String> {
        self.details.get("judge")?.first().map(|(reason, _)| reason.clone())
    }
}

/// A complete run: what was evaluated, every item, and the aggregates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRun {
    /// sha256 of the run's inputs (model, adapter, suite, template, shots, items).
    pub id: String,
    pub suite: String,
    pub model: String,
    pub adapter: Option<String>,
    pub template: String,
    pub shots: usize,
    pub dataset: Option<String>,
    pub items: Vec<ItemResult>,
    /// Metric → mean with its 95 % interval (`valid` is the validator pass rate).
    pub metrics: BTreeMap<String, Estimate>,
    pub primary_metric: String,
    pub gate: Option<Gate>,
    pub passed_gate: Option<bool>,
    pub examples_per_s: f64,
    /// Plugin name → sha256 of the component that scored, validated or judged this run.
    #[serde(default)]
    pub plugins: BTreeMap<String, String>,
    /// Set-level values each scorer computes over all items (`<scorer>/<key>`: macro-F1,
    /// per-class F1, `confusion/<reference>/<prediction>` counts, ...).
    #[serde(default)]
    pub aggregates: BTreeMap<String, f64>,
}

impl EvalRun {
    pub fn primary(&self) -> f64 {
        self.metrics.get(&self.primary_metric).map_or(f64::NAN, |e| e.mean)
    }

    /// The per-item values of `metric`, in item order.
    pub fn values(&self, metric: &str) -> Vec<f64> {
        self.items
            .iter()
            .map(|i| {
                if metric == "valid" {
                    f64::from(u8::from(i.valid.unwrap_or(false)))
                } else {
                    i.scores.get(metric).copied().unwrap_or(0.0)
                }
            })
            .collect()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("runs serialise");
        lathe_util::write_atomic(path, text.as_bytes()).map_err(|e| JobError::io(path, e))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| JobError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| JobError::Invalid(format!("{}: not an eval run: {e}", path.display())))
    }
}

/// The model under evaluation.
pub struct Subject<'a> {
    pub model: &'a CausalLm,
    pub tokenizer: &'a Tokenizer,
    pub adapter: Option<&'a Adapter>,
    /// How the run names the model and adapter (paths or versions).
    pub model_name: String,
    pub adapter_name: Option<String>,
}

impl<'a> Subject<'a> {
    /// A loaded model without an adapter.
    pub fn base(m: &'a lathe_engine::LoadedModel, model_name: impl Into<String>) -> Self {
        Self {
            model: &m.model,
            tokenizer: &m.tokenizer,
            adapter: None,
            model_name: model_name.into(),
            adapter_name: None,
        }
    }

    /// The same model through `adapter`.
    pub fn with_adapter(&self, adapter: &'a Adapter, adapter_name: impl Into<String>) -> Self {
        Self {
            model: self.model,
            tokenizer: self.tokenizer,
            adapter: Some(adapter),
            model_name: self.model_name.clone(),
            adapter_name: Some(adapter_name.into()),
        }
    }
}

/// Renders the chat for `item`: the template's system message, `shots` solved examples
/// as earlier turns, then the item.
pub fn render_messages(template: &PromptTemplate, shots: &[Item], item: &Item) -> Result<Vec<Message>> {
    let env = minijinja::Environment::new();
    let tmpl = env.template_from_str(&template.user)?;
    let user = |it: &Item| -> Result<String> {
        Ok(tmpl.render(minijinja::context! { input => &it.input, label => &it.label })?)
    };
    let mut messages = Vec::new();
    if let Some(s) = &template.system {
        messages.push(Message::new("system", s.clone()));
    }
    for s in shots {
        messages.push(Message::new("user", user(s)?));
        messages.push(Message::new("assistant", s.reference.clone()));
    }
    messages.push(Message::new("user", user(item)?));
    Ok(messages)
}

/// Runs `suite` with one template and shot set over `items`, reporting generation progress
/// under `step` and stopping between batches when the job is cancelled.
#[allow(clippy::too_many_arguments)]
pub fn run(
    subject: &Subject<'_>,
    suite: &Suite,
    plugins: &Plugins,
    template: &PromptTemplate,
    shots: &[Item],
    items: &[Item],
    dataset: Option<String>,
    sink: &dyn Sink,
    step: &str,
) -> Result<EvalRun> {
    let started = Instant::now();
    let params = SamplingParams {
        max_tokens: suite.max_tokens,
        ..SamplingParams::default()
    };
    let mut prompts = Vec::with_capacity(items.len());
    let mut prompt_texts = Vec::with_capacity(items.len());
    for item in items {
        let messages = render_messages(template, shots, item)?;
        prompt_texts.push(subject.tokenizer.apply_chat_template(&messages, true)?);
        prompts.push(subject.tokenizer.encode_chat(&messages, true)?);
    }
    // Continuous batching: up to `batch_size` sequences at once, a finished one replaced at
    // the next step; prompts that share a prefix (system prompt, shots) share its cache.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let seqs = suite.batch_size.max(1);
    let blocks = seqs * (longest + params.max_tokens).div_ceil(lathe_engine::model::paged::BLOCK_TOKENS);
    let config = ServeConfig {
        max_seqs: seqs,
        kv_cache_bytes: (blocks + seqs) * lathe_engine::KvPool::block_bytes(&subject.model.config),
        ..ServeConfig::default()
    };
    let mut done = 0;
    let gens = lathe_serving::generate_all(
        subject.model,
        subject.tokenizer,
        subject.adapter,
        &prompts,
        &params,
        &config,
        &mut |_| {
            done += 1;
            if done % 4 == 0 || done == items.len() {
                sink.progress(step, done, items.len(), "items");
            }
        },
        &|| sink.check_cancelled().is_err(),
    )
    .map_err(|e| match e {
        ServeError::Cancelled => JobError::Cancelled,
        other => JobError::Engine(lathe_engine::EngineError::Generation(other.to_string())),
    })?;
    let outputs: Vec<String> = gens.into_iter().map(|g| g.text.trim().to_string()).collect();

    let mut results: Vec<ItemResult> = items
        .iter()
        .enumerate()
        .map(|(i, it)| ItemResult {
            index: i,
            input: it.input.clone(),
            prompt: std::mem::take(&mut prompt_texts[i]),
            output: outputs[i].clone(),
            reference: it.reference.clone(),
            scores: BTreeMap::new(),
            details: BTreeMap::new(),
            valid: None,
            violations: Vec::new(),
        })
        .collect();
    let call_err = |plugin: &str, item: usize| {
        let plugin = plugin.to_string();
        move |source| JobError::PluginCall { plugin, item, source }
    };
    let mut aggregates = BTreeMap::new();
    for (name, plugin, config) in &plugins.scorers {
        let mut inst = plugin.instance(config).map_err(call_err(name, 0))?;
        for r in &mut results {
            let s = inst.score(&r.output, &r.reference).map_err(call_err(name, r.index))?;
            if !(s.value.is_finite() && (0.0..=1.0).contains(&s.value)) {
                return Err(JobError::BadScore { plugin: name.clone(), item: r.index, value: s.value });
            }
            r.scores.insert(name.clone(), s.value);
            r.details.insert(name.clone(), s.details);
        }
        // What only a whole set has (macro-F1, a confusion matrix), as the scorer computes it.
        let (preds, refs): (Vec<&str>, Vec<&str>) = results.iter().map(|r| (r.output.as_str(), r.reference.as_str())).unzip();
        for (key, value) in inst.aggregate(&preds, &refs).map_err(call_err(name, 0))? {
            aggregates.insert(format!("{name}/{key}"), value);
        }
    }
    if let Some((name, plugin, config)) = &plugins.validator {
        let mut inst = plugin.instance(config).map_err(call_err(name, 0))?;
        for r in &mut results {
            match inst.validate(&r.output).map_err(call_err(name, r.index))? {
                Ok(()) => r.valid = Some(true),
                Err(v) => {
                    r.valid = Some(false);
                    r.violations = v.into_iter().map(|v| format!("{}: {}", v.path, v.message)).collect();
                }
            }
        }
    }
    if let Some(judge) = &plugins.judge {
        let mut judge = judge.lock().expect("judge lock");
        for r in &mut results {
            let v = judge.score(&r.input, &r.output, Some(&r.reference))?;
            r.scores.insert("judge".into(), v.score);
            r.details.insert("judge".into(), vec![(v.reason, v.score)]);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    let mut run = EvalRun {
        id: String::new(),
        suite: suite.name.clone(),
        model: subject.model_name.clone(),
        adapter: subject.adapter_name.clone(),
        template: template.name.clone(),
        shots: shots.len(),
        dataset,
        items: results,
        metrics: BTreeMap::new(),
        primary_metric: plugins.primary_metric().to_string(),
        gate: suite.gate.clone(),
        passed_gate: None,
        examples_per_s: items.len() as f64 / elapsed.max(1e-9),
        plugins: plugins.hashes(),
        aggregates,
    };
    let names = plugins.metric_names(plugins.judge.is_some());
    for (k, name) in names.iter().enumerate() {
        let est = stats::bootstrap_mean(&run.values(name), stats::DEFAULT_RESAMPLES, 17 + k as u64);
        run.metrics.insert(name.clone(), est);
    }
    run.passed_gate = suite.gate.as_ref().map(|g| run.metrics.get(&g.metric).is_some_and(|e| e.mean >= g.min));
    run.id = run_id(&run);
    Ok(run)
}

fn run_id(run: &EvalRun) -> String {
    let mut h = Sha256::new();
    h.update(run.suite.as_bytes());
    h.update(run.model.as_bytes());
    h.update(run.adapter.as_deref().unwrap_or("").as_bytes());
    h.update(run.template.as_bytes());
    h.update(run.shots.to_le_bytes());
    for i in &run.items {
        h.update(i.prompt.as_bytes());
        h.update(i.output.as_bytes());
    }
    lathe_util::hex(&h.finalize()[..8])
}

/// Every (template, shots) the baseline tried, and the one it keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    pub tried: Vec<BaselineTrial>,
    pub best: EvalRun,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineTrial {
    pub template: String,
    pub shots: usize,
    pub metric: Estimate,
}

/// Evaluates the base model with every template at every shot count (shots are the first
/// examples of `train_pool`, never held-out items) and keeps the best by the primary
/// metric. Each trial's generation reports progress under `baseline.<template>.<k>shot`
/// and its result as a log line.
pub fn baseline(
    subject: &Subject<'_>,
    suite: &Suite,
    plugins: &Plugins,
    train_pool: &[Item],
    items: &[Item],
    dataset: Option<String>,
    sink: &dyn Sink,
) -> Result<Baseline> {
    let mut tried = Vec::new();
    let mut best: Option<EvalRun> = None;
    for template in &suite.templates {
        for &k in &suite.shots {
            if k > train_pool.len() {
                return Err(JobError::Invalid(format!(
                    "{k}-shot prompts need {k} training examples; the training part has {}",
                    train_pool.len()
                )));
            }
            let step = format!("baseline.{}.{k}shot", template.name);
            let run = run(subject, suite, plugins, template, &train_pool[..k], items, dataset.clone(), sink, &step)?;
            let trial = BaselineTrial {
                template: template.name.clone(),
                shots: k,
                metric: run.metrics[&run.primary_metric],
            };
            sink.info(format!(
                "{} · {k}-shot: {} {:.3} [{:.3}, {:.3}]",
                trial.template, run.primary_metric, trial.metric.mean, trial.metric.ci_low, trial.metric.ci_high
            ));
            tried.push(trial);
            if best.as_ref().is_none_or(|b| run.primary() > b.primary()) {
                best = Some(run);
            }
        }
    }
    Ok(Baseline {
        tried,
        best: best.ok_or_else(|| JobError::invalid("the suite has no templates or shot counts"))?,
    })
}

/// One item whose primary score changed between two runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemDiff {
    pub index: usize,
    pub input: String,
    /// The rendered prompts each model saw (template and shots may differ).
    #[serde(default)]
    pub baseline_prompt: String,
    #[serde(default)]
    pub candidate_prompt: String,
    pub reference: String,
    pub baseline_output: String,
    pub candidate_output: String,
    pub baseline_score: f64,
    pub candidate_score: f64,
    /// The judge's reasons for each output, where a judge scored them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_judge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_judge: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunComparison {
    pub metric: String,
    pub baseline: String,
    pub candidate: String,
    pub comparison: Comparison,
    /// Items whose score changed, largest change first.
    pub diffs: Vec<ItemDiff>,
}

/// Compares two runs over the same items on `metric`.
pub fn compare(baseline: &EvalRun, candidate: &EvalRun, metric: &str, margin: f64) -> Result<RunComparison> {
    if baseline.items.len() != candidate.items.len()
        || baseline.items.iter().zip(&candidate.items).any(|(a, b)| a.reference != b.reference || a.input != b.input)
    {
        return Err(JobError::Invalid(format!(
            "runs {} and {} were not made on the same items; compare runs of one held-out set",
            baseline.id, candidate.id
        )));
    }
    if !baseline.metrics.contains_key(metric) || !candidate.metrics.contains_key(metric) {
        return Err(JobError::Invalid(format!(
            "metric `{metric}` is not in both runs (they have: {})",
            baseline.metrics.keys().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
        )));
    }
    let a = baseline.values(metric);
    let b = candidate.values(metric);
    let comparison = stats::compare_paired(&a, &b, margin, stats::DEFAULT_RESAMPLES, 29);
    let mut diffs: Vec<ItemDiff> = baseline
        .items
        .iter()
        .zip(&candidate.items)
        .zip(a.iter().zip(&b))
        .filter(|(_, (x, y))| (*x - *y).abs() > 1e-12)
        .map(|((bi, ci), (&x, &y))| ItemDiff {
            index: bi.index,
            input: bi.input.clone(),
            baseline_prompt: bi.prompt.clone(),
            candidate_prompt: ci.prompt.clone(),
            reference: bi.reference.clone(),
            baseline_output: bi.output.clone(),
            candidate_output: ci.output.clone(),
            baseline_score: x,
            candidate_score: y,
            baseline_judge: bi.judge_reason(),
            candidate_judge: ci.judge_reason(),
        })
        .collect();
    diffs.sort_by(|x, y| (y.candidate_score - y.baseline_score).abs().total_cmp(&(x.candidate_score - x.baseline_score).abs()));
    Ok(RunComparison {
        metric: metric.to_string(),
        baseline: baseline.id.clone(),
        candidate: candidate.id.clone(),
        comparison,
        diffs,
    })
}

/// The items of a training version (for shots and fine-tuning).
pub fn train_items(store: &lathe_data::Datasets, id: &str) -> Result<Vec<Item>> {
    let set = lathe_data::TrainingSet::open(store, id)?;
    set.examples()?.map(|e| Item::from_example(&e?)).collect()
}

/// The items of a held-out version: only the eval harness reads these.
pub fn heldout_items(store: &lathe_data::Datasets, id: &str) -> Result<Vec<Item>> {
    let set = lathe_data::HeldOut::open(store, id)?;
    set.examples()?.map(|e| Item::from_example(&e?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, outputs: &[(&str, f64, Option<&str>)]) -> EvalRun {
        let items = outputs
            .iter()
            .enumerate()
            .map(|(index, (output, score, reason))| ItemResult {
                index,
                input: format!("question {index}"),
                prompt: format!("{id} prompt for question {index}"),
                output: output.to_string(),
                reference: "yes".into(),
                scores: BTreeMap::from([("judge".to_string(), *score)]),
                details: reason.map(|r| BTreeMap::from([("judge".to_string(), vec![(r.to_string(), *score)])])).unwrap_or_default(),
                valid: None,
                violations: vec![],
            })
            .collect();
        EvalRun {
            id: id.into(),
            suite: "s".into(),
            model: "m".into(),
            adapter: None,
            template: "t".into(),
            shots: 0,
            dataset: None,
            items,
            metrics: BTreeMap::from([("judge".to_string(), Estimate { mean: 0.5, ci_low: 0.0, ci_high: 1.0, n: 2 })]),
            primary_metric: "judge".into(),
            gate: None,
            passed_gate: None,
            examples_per_s: 1.0,
            plugins: BTreeMap::new(),
            aggregates: BTreeMap::new(),
        }
    }

    #[test]
    fn diffs_carry_prompts_and_the_judges_reasons() {
        let base = run("aa", &[("no", 0.0, Some("says no where yes was asked")), ("yes", 1.0, Some("right"))]);
        let tuned = run("bb", &[("yes", 1.0, Some("matches the reference")), ("yes", 1.0, Some("right"))]);
        let c = compare(&base, &tuned, "judge", 0.0).unwrap();
        assert_eq!(c.diffs.len(), 1, "only the item that changed");
        let d = &c.diffs[0];
        assert_eq!((d.baseline_judge.as_deref(), d.candidate_judge.as_deref()), (Some("says no where yes was asked"), Some("matches the reference")));
        assert_eq!((d.baseline_prompt.as_str(), d.candidate_prompt.as_str()), ("aa prompt for question 0", "bb prompt for question 0"));
        let html = report::Report { comparison: Some(c), ..Default::default() }.html();
        assert!(html.contains("judge: matches the reference"), "{html}");

        // Without a judge, no reasons and nothing in the JSON.
        let plain = compare(&run("cc", &[("no", 0.0, None), ("yes", 1.0, None)]), &tuned, "judge", 0.0).unwrap();
        assert_eq!(plain.diffs[0].baseline_judge, None);
        assert!(!serde_json::to_string(&plain.diffs[0]).unwrap().contains("baseline_judge"));
    }
}
