//! A fine-tuning run as the workflow wants it: training examples rendered with the eval
//! suite's prompt template (so the adapter learns the prompt it will be evaluated and
//! served with), a validation slice carved from the training part for the held-out loss
//! and the task metric while training (the held-out set stays with the eval harness),
//! early stopping on that metric, and an optional learning-rate sweep that keeps the
//! winner.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lathe_engine::train::{Encoded, Progress, RunInfo, TrainConfig, TrainOutcome, Trainer, encode_chat};
use lathe_engine::{Adapter, CausalLm, Message, Tokenizer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::eval::{self, Item, Plugins, PromptTemplate, Subject, Suite};

/// What to train and how to watch it.
pub struct Spec<'a> {
    pub model: &'a CausalLm,
    pub tokenizer: &'a Tokenizer,
    pub model_name: String,
    pub model_sha256: String,
    pub suite: &'a Suite,
    pub plugins: &'a Plugins,
    pub template: &'a PromptTemplate,
    pub config: TrainConfig,
    /// The dataset version trained on.
    pub dataset: String,
    /// Validation items scored with the task metric while training (generation-based);
    /// 0 turns the metric off and early stopping watches the validation loss.
    pub metric_items: usize,
}

/// The chat an item trains as: the template's prompt, then the reference as the answer.
pub fn training_messages(template: &PromptTemplate, item: &Item) -> Result<Vec<Message>> {
    let mut m = eval::render_messages(template, &[], item)?;
    m.push(Message::new("assistant", item.reference.clone()));
    Ok(m)
}

/// sha256 of a string, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Splits off the validation slice: every `k`-th item of the training part, at least
/// `min` of them.
pub fn validation_split(items: &[Item], fraction: f64, min: usize) -> (Vec<Item>, Vec<Item>) {
    let n = ((items.len() as f64 * fraction).round() as usize).max(min).min(items.len() / 2);
    if n == 0 {
        return (items.to_vec(), Vec::new());
    }
    let step = items.len() as f64 / n as f64;
    let picked: std::collections::BTreeSet<usize> = (0..n).map(|i| (i as f64 * step) as usize).collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, it) in items.iter().enumerate() {
        if picked.contains(&i) { val.push(it.clone()) } else { train.push(it.clone()) }
    }
    (train, val)
}

fn encode_all(tokenizer: &Tokenizer, template: &PromptTemplate, items: &[Item], max_len: usize) -> Result<Vec<Encoded>> {
    items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let messages = training_messages(template, it)?;
            encode_chat(tokenizer, &messages, max_len).with_context(|| format!("training example {i}"))
        })
        .collect()
}

/// Trains one adapter into `out_dir`.
pub fn train(
    spec: &Spec<'_>,
    train_items: &[Item],
    validation: &[Item],
    out_dir: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(&Progress),
    on_eval: &mut dyn FnMut(usize, f64),
) -> Result<TrainOutcome> {
    if train_items.is_empty() {
        bail!("the training part is empty");
    }
    let c = &spec.config;
    let train = encode_all(spec.tokenizer, spec.template, train_items, c.max_len)?;
    let heldout = encode_all(spec.tokenizer, spec.template, validation, c.max_len)?;
    let template_text = spec.tokenizer.chat_template.clone().unwrap_or_default();
    let info = RunInfo {
        config: c.clone(),
        dataset: spec.dataset.clone(),
        base_model: spec.model_name.clone(),
        base_model_sha256: spec.model_sha256.clone(),
        chat_template_sha256: sha256_hex(format!("{template_text}\n--prompt--\n{:?}", spec.template).as_bytes()),
        train_examples: train.len(),
        heldout_examples: heldout.len(),
    };
    let trainer = Trainer {
        model: spec.model,
        tokenizer: spec.tokenizer,
        info,
        train,
        heldout,
        out_dir: out_dir.into(),
    };
    let metric_items: Vec<Item> = validation.iter().take(spec.metric_items).cloned().collect();
    let mut metric = |model: &CausalLm, adapter: &Adapter| -> lathe_engine::Result<f64> {
        let subject = Subject {
            model,
            tokenizer: spec.tokenizer,
            adapter: Some(adapter),
            model_name: spec.model_name.clone(),
            adapter_name: Some("(training)".into()),
        };
        let run = eval::run(&subject, spec.suite, spec.plugins, spec.template, &[], &metric_items, None, &mut |_, _| {})
            .map_err(|e| lathe_engine::EngineError::Generation(format!("task metric: {e:#}")))?;
        let v = run.primary();
        on_eval(run.items.len(), v);
        Ok(v)
    };
    let metric: Option<&mut lathe_engine::train::MetricFn<'_>> = if metric_items.is_empty() { None } else { Some(&mut metric) };
    Ok(trainer.run(resume, metric, on_step)?)
}

/// One learning rate of a sweep and how it did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    pub learning_rate: f64,
    pub out_dir: PathBuf,
    /// The watched value (task metric, else minus the validation loss) at its best step.
    pub best_value: Option<f64>,
    pub best_step: Option<usize>,
    pub final_loss: f64,
}

/// Trains once per learning rate into `out_dir/lr-<lr>` and returns every point with the
/// index of the winner (best watched value).
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    spec: &Spec<'_>,
    rates: &[f64],
    train_items: &[Item],
    validation: &[Item],
    out_dir: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(f64, &Progress),
    on_eval: &mut dyn FnMut(usize, f64),
) -> Result<(Vec<SweepPoint>, usize, Vec<TrainOutcome>)> {
    if rates.is_empty() {
        bail!("no learning rates to sweep");
    }
    let mut points = Vec::new();
    let mut outcomes = Vec::new();
    for &lr in rates {
        let spec_lr = Spec {
            config: TrainConfig {
                learning_rate: lr,
                ..spec.config.clone()
            },
            model_name: spec.model_name.clone(),
            model_sha256: spec.model_sha256.clone(),
            dataset: spec.dataset.clone(),
            ..*spec
        };
        let dir = if rates.len() == 1 { out_dir.to_path_buf() } else { out_dir.join(format!("lr-{lr:e}")) };
        let out = train(&spec_lr, train_items, validation, &dir, resume, &mut |p| on_step(lr, p), on_eval)?;
        points.push(SweepPoint {
            learning_rate: lr,
            out_dir: dir,
            best_value: out.best_value,
            best_step: out.best_step,
            final_loss: out.history.last().map_or(f64::NAN, |r| r.loss),
        });
        outcomes.push(out);
    }
    let winner = points
        .iter()
        .enumerate()
        .max_by(|(_, a), (_, b)| {
            let key = |p: &SweepPoint| p.best_value.unwrap_or(-p.final_loss);
            key(a).total_cmp(&key(b))
        })
        .map(|(i, _)| i)
        .expect("at least one rate");
    Ok((points, winner, outcomes))
}
