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
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lathe_engine::generate::generate_with;
use lathe_engine::{Adapter, CausalLm, Message, SamplingParams, Tokenizer};
use lathe_sandbox::{Kind, Plugin, Runtime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
}

pub(crate) fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// The bar a model must clear: `metric` (a scorer's name or `valid`) at least `min`.
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
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let suite: Suite = serde_json::from_str(&text).with_context(|| format!("{}: not a valid eval suite", path.display()))?;
        suite.check().with_context(|| format!("{}", path.display()))?;
        Ok(suite)
    }

    pub fn check(&self) -> Result<()> {
        if self.templates.is_empty() {
            bail!("the suite `{}` has no prompt templates", self.name);
        }
        if self.scorers.is_empty() {
            bail!("the suite `{}` has no scorers", self.name);
        }
        for t in &self.templates {
            let env = minijinja::Environment::new();
            env.template_from_str(&t.user)
                .with_context(|| format!("template `{}`: the user message does not parse", t.name))?;
        }
        Ok(())
    }

    /// The metric that decides: the gate's, else the first scorer's.
    pub fn primary_metric(&self) -> String {
        match &self.gate {
            Some(g) => g.metric.clone(),
            None => scorer_name(&self.scorers[0]),
        }
    }
}

fn scorer_name(r: &PluginRef) -> String {
    Path::new(&r.plugin)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(&r.plugin)
        .to_string()
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
            .context("an eval item needs a user message before the answer")?;
        Ok(Self {
            input,
            reference: e.target().to_string(),
            label: e.label.clone(),
        })
    }
}

/// Plugins loaded once for a suite.
pub struct Plugins {
    scorers: Vec<(String, Plugin, String)>,
    validator: Option<(Plugin, String)>,
    judge: Option<std::cell::RefCell<judge::Judge>>,
}

/// Loads a plugin by built-in name or from a `.wasm` path.
pub fn load_plugin(runtime: &Runtime, name: &str, expected: Kind) -> Result<Plugin> {
    let bytes: std::borrow::Cow<'static, [u8]> = match lathe_sandbox::builtin(name) {
        Some(b) => b.into(),
        None => std::fs::read(name)
            .with_context(|| format!("`{name}` is neither a built-in plugin nor a readable .wasm file"))?
            .into(),
    };
    let plugin = runtime.load(&bytes).with_context(|| format!("loading plugin `{name}`"))?;
    if plugin.kind() != expected {
        bail!("plugin `{name}` is a {}, but a {} is needed here", plugin.kind().name(), expected.name());
    }
    Ok(plugin)
}

impl Plugins {
    pub fn load(runtime: &Runtime, suite: &Suite) -> Result<Self> {
        let scorers = suite
            .scorers
            .iter()
            .map(|r| Ok((scorer_name(r), load_plugin(runtime, &r.plugin, Kind::Scorer)?, r.config.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let validator = match &suite.validator {
            Some(r) => Some((load_plugin(runtime, &r.plugin, Kind::Validator)?, r.config.to_string())),
            None => None,
        };
        Ok(Self { scorers, validator, judge: None })
    }

    /// Also loads the suite's judge, if it has one: its model on `device` (or its
    /// endpoint), verdicts cached in `cache` (JSON lines).
    pub fn load_with_judge(runtime: &Runtime, suite: &Suite, device: &lathe_engine::Device, cache: &Path) -> Result<Self> {
        let mut plugins = Self::load(runtime, suite)?;
        if let Some(spec) = &suite.judge {
            let backend = judge::Judge::backend_for(spec, device)?;
            let j = judge::Judge::new(runtime, spec.clone(), backend, judge::VerdictCache::open(cache)?)?;
            plugins.judge = Some(std::cell::RefCell::new(j));
        }
        Ok(plugins)
    }

    /// Uses `judge` for the `judge` metric.
    pub fn with_judge(mut self, judge: judge::Judge) -> Self {
        self.judge = Some(std::cell::RefCell::new(judge));
        self
    }

    /// (hits, misses) of the judge's verdict cache.
    pub fn judge_cache_stats(&self) -> Option<(usize, usize)> {
        self.judge.as_ref().map(|j| {
            let j = j.borrow();
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
        let text = serde_json::to_string_pretty(self)?;
        lathe_engine::fsutil::write_atomic(path, text.as_bytes())?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not an eval run", path.display()))
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

/// Runs `suite` with one template and shot set over `items`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    subject: &Subject<'_>,
    suite: &Suite,
    plugins: &Plugins,
    template: &PromptTemplate,
    shots: &[Item],
    items: &[Item],
    dataset: Option<String>,
    on_progress: &mut dyn FnMut(usize, usize),
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
    // Similar lengths share a batch: less padding.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut outputs = vec![String::new(); items.len()];
    let mut done = 0;
    for chunk in order.chunks(suite.batch_size.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let gens = generate_with(subject.model, subject.adapter, subject.tokenizer, &batch, &params, &mut |_, _| {})?;
        for (&i, g) in chunk.iter().zip(gens) {
            outputs[i] = g.text.trim().to_string();
        }
        done += chunk.len();
        on_progress(done, items.len());
    }

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
    for (name, plugin, config) in &plugins.scorers {
        let mut inst = plugin.instance(config)?;
        for r in &mut results {
            let s = inst.score(&r.output, &r.reference)?;
            r.scores.insert(name.clone(), s.value);
            r.details.insert(name.clone(), s.details);
        }
    }
    if let Some((plugin, config)) = &plugins.validator {
        let mut inst = plugin.instance(config)?;
        for r in &mut results {
            match inst.validate(&r.output)? {
                Ok(()) => r.valid = Some(true),
                Err(v) => {
                    r.valid = Some(false);
                    r.violations = v.into_iter().map(|v| format!("{}: {}", v.path, v.message)).collect();
                }
            }
        }
    }
    if let Some(judge) = &plugins.judge {
        let mut judge = judge.borrow_mut();
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
        primary_metric: suite.primary_metric(),
        gate: suite.gate.clone(),
        passed_gate: None,
        examples_per_s: items.len() as f64 / elapsed.max(1e-9),
    };
    let mut names: Vec<String> = plugins.scorers.iter().map(|(n, _, _)| n.clone()).collect();
    if plugins.validator.is_some() {
        names.push("valid".into());
    }
    if plugins.judge.is_some() {
        names.push("judge".into());
    }
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
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..16].to_string()
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
/// metric.
#[allow(clippy::too_many_arguments)]
pub fn baseline(
    subject: &Subject<'_>,
    suite: &Suite,
    plugins: &Plugins,
    train_pool: &[Item],
    items: &[Item],
    dataset: Option<String>,
    on_progress: &mut dyn FnMut(&str, usize, usize, usize),
    on_trial: &mut dyn FnMut(&BaselineTrial),
) -> Result<Baseline> {
    let mut tried = Vec::new();
    let mut best: Option<EvalRun> = None;
    for template in &suite.templates {
        for &k in &suite.shots {
            if k > train_pool.len() {
                bail!("{k}-shot prompts need {k} training examples; the training part has {}", train_pool.len());
            }
            let run = run(subject, suite, plugins, template, &train_pool[..k], items, dataset.clone(), &mut |done, total| {
                on_progress(&template.name, k, done, total)
            })?;
            let trial = BaselineTrial {
                template: template.name.clone(),
                shots: k,
                metric: run.metrics[&run.primary_metric],
            };
            on_trial(&trial);
            tried.push(trial);
            if best.as_ref().is_none_or(|b| run.primary() > b.primary()) {
                best = Some(run);
            }
        }
    }
    Ok(Baseline {
        tried,
        best: best.context("the suite has no templates or shot counts")?,
    })
}

/// One item whose primary score changed between two runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemDiff {
    pub index: usize,
    pub input: String,
    pub reference: String,
    pub baseline_output: String,
    pub candidate_output: String,
    pub baseline_score: f64,
    pub candidate_score: f64,
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
        bail!(
            "runs {} and {} were not made on the same items; compare runs of one held-out set",
            baseline.id,
            candidate.id
        );
    }
    if !baseline.metrics.contains_key(metric) || !candidate.metrics.contains_key(metric) {
        bail!("metric `{metric}` is not in both runs (they have: {:?})", baseline.metrics.keys().collect::<Vec<_>>());
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
            reference: bi.reference.clone(),
            baseline_output: bi.output.clone(),
            candidate_output: ci.output.clone(),
            baseline_score: x,
            candidate_score: y,
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

/// Where runs and reports go under a data folder.
pub fn runs_dir(data_root: &Path) -> PathBuf {
    data_root.join("evals")
}

/// The items of a training version (for shots and fine-tuning).
pub fn train_items(store: &lathe_data::Store, id: &str) -> Result<Vec<Item>> {
    let set = lathe_data::TrainingSet::open(store, id)?;
    set.examples()?.map(|e| Item::from_example(&e?)).collect()
}

/// The items of a held-out version: only the eval harness reads these.
pub fn heldout_items(store: &lathe_data::Store, id: &str) -> Result<Vec<Item>> {
    let set = lathe_data::HeldOut::open(store, id)?;
    set.examples()?.map(|e| Item::from_example(&e?)).collect()
}
