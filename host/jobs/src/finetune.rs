//! A fine-tuning run as the workflow wants it: training examples rendered with the eval
//! suite's prompt template (so the adapter learns the prompt it will be evaluated and
//! served with), a validation slice carved from the training part for the held-out loss
//! and the task metric while training (the held-out set stays with the eval harness),
//! early stopping on that metric, and an optional learning-rate sweep that keeps the
//! winner.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use lathe_engine::train::{Encoded, RunInfo, TrainConfig, TrainOutcome, Trainer, encode_chat};
use lathe_engine::{Adapter, CausalLm, EngineError, Message, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{JobError, Result};
use crate::eval::{self, Item, Plugins, PromptTemplate, Subject, Suite};
use crate::event::{NullSink, Sink};

/// What to train and how to watch it (the parts a pipeline has loaded).
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
            encode_chat(tokenizer, &messages, max_len).map_err(|e| JobError::Invalid(format!("training example {i}: {e}")))
        })
        .collect()
}

/// Trains one adapter into `out_dir`. Every optimizer step emits `train/loss`,
/// `train/lr` and `train/tokens_per_s` points and progress under `step`; every evaluation
/// a `validation/<metric>` point. A cancelled job checkpoints and ends with
/// [`JobError::Cancelled`]; `resume` continues from the latest checkpoint.
pub fn train(spec: &Spec<'_>, train_items: &[Item], validation: &[Item], out_dir: &Path, resume: bool, sink: &dyn Sink, step: &str) -> Result<TrainOutcome> {
    if train_items.is_empty() {
        return Err(JobError::invalid("the training part is empty"));
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
        chat_template_sha256: lathe_util::sha256_hex(format!("{template_text}\n--prompt--\n{:?}", spec.template).as_bytes()),
        tokenizer_template_sha256: Some(lathe_serving::template_sha256(spec.tokenizer)),
        train_examples: train.len(),
        heldout_examples: heldout.len(),
    };
    let keep = |dir: &Path| sink.checkpoint(dir);
    let trainer = Trainer {
        model: spec.model,
        tokenizer: spec.tokenizer,
        info,
        train,
        heldout,
        out_dir: out_dir.into(),
        on_checkpoint: Some(&keep),
    };
    let metric_items: Vec<Item> = validation.iter().take(spec.metric_items).cloned().collect();
    let watched = format!("validation/{}", spec.plugins.primary_metric());
    // The step the trainer is at, for the metric points the evaluation callback emits.
    let at_step = std::cell::Cell::new(0);
    let mut metric = |model: &CausalLm, adapter: &Adapter| -> lathe_engine::Result<f64> {
        let subject = Subject {
            model,
            tokenizer: spec.tokenizer,
            adapter: Some(adapter),
            model_name: spec.model_name.clone(),
            adapter_name: Some("(training)".into()),
        };
        let run = eval::run(&subject, spec.suite, spec.plugins, spec.template, &[], &metric_items, None, &NullSink, "")
            .map_err(|e| EngineError::Generation(format!("task metric: {e}")))?;
        sink.metric(&watched, at_step.get(), run.primary());
        Ok(run.primary())
    };
    let metric: Option<&mut lathe_engine::train::MetricFn<'_>> = if metric_items.is_empty() { None } else { Some(&mut metric) };
    let outcome = trainer.run(resume, metric, &mut |p| {
        let r = &p.record;
        at_step.set(r.step);
        sink.metric("train/loss", r.step, r.loss);
        sink.metric("train/lr", r.step, r.lr);
        sink.metric("train/tokens_per_s", r.step, p.tokens_per_s);
        sink.progress(step, r.step, p.total_steps, "steps");
        if sink.cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    });
    let outcome = match outcome {
        Err(EngineError::Interrupted { .. }) => return Err(JobError::Cancelled),
        other => other?,
    };
    for e in &outcome.evals {
        if let Some(l) = e.heldout_loss {
            sink.metric("validation/loss", e.step, l);
        }
    }
    Ok(outcome)
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

/// Trains once per learning rate into `out_dir/lr-<lr>` (or `out_dir` for one rate) and
/// returns every point with the index of the winner (best watched value).
pub fn sweep(
    spec: &Spec<'_>,
    rates: &[f64],
    train_items: &[Item],
    validation: &[Item],
    out_dir: &Path,
    resume: bool,
    sink: &dyn Sink,
) -> Result<(Vec<SweepPoint>, usize, Vec<TrainOutcome>)> {
    if rates.is_empty() {
        return Err(JobError::invalid("no learning rates to sweep"));
    }
    let mut points = Vec::new();
    let mut outcomes = Vec::new();
    for &lr in rates {
        let spec_lr = Spec {
            config: TrainConfig { learning_rate: lr, ..spec.config.clone() },
            model_name: spec.model_name.clone(),
            model_sha256: spec.model_sha256.clone(),
            dataset: spec.dataset.clone(),
            ..*spec
        };
        let (dir, step) = if rates.len() == 1 {
            (out_dir.to_path_buf(), "train".to_string())
        } else {
            (out_dir.join(format!("lr-{lr:e}")), format!("train.lr-{lr:e}"))
        };
        sink.started(&step, format!("LoRA r{} at lr {lr:.1e}", spec.config.lora.rank));
        let out = train(&spec_lr, train_items, validation, &dir, resume, sink, &step)?;
        let point = SweepPoint {
            learning_rate: lr,
            out_dir: dir,
            best_value: out.best_value,
            best_step: out.best_step,
            final_loss: out.history.last().map_or(f64::NAN, |r| r.loss),
        };
        sink.finished(
            &step,
            format!(
                "{} steps, final loss {:.4}, best {} at step {}{}",
                out.steps,
                point.final_loss,
                point.best_value.map_or("—".into(), |v| format!("{v:.4}")),
                point.best_step.map_or("—".into(), |s| s.to_string()),
                if out.stopped_early { " (stopped early)" } else { "" }
            ),
        );
        points.push(point);
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
