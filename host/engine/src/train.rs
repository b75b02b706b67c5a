//! LoRA fine-tuning: batches of chats → masked next-token loss → AdamW on the adapter only.
//!
//! - The loss covers the assistant's tokens only. Each example is tokenized the way
//!   inference will see it: the prompt rendered by the model's chat template with the
//!   generation prompt, then the assistant's text as the template continues it (its
//!   end-of-turn token included, so the model learns to stop).
//! - The base model stays outside the autodiff graph; only the adapter's `A` and `B`
//!   require gradients, so frozen weights cannot change.
//! - Batches are built by length bucketing: each epoch shuffles with the run's seed, sorts
//!   windows of examples by length and cuts them into batches, so padding stays small.
//! - AdamW (decoupled weight decay), linear warm-up then cosine or linear decay, global
//!   gradient-norm clipping, gradient accumulation.
//! - Checkpoints (adapter, optimizer moments, trainer state, the run description) are
//!   written to a temporary folder and renamed into place; a run resumed from one follows
//!   the same loss curve as one never stopped: the data order and dropout masks derive
//!   from (seed, epoch, step), not from state that a crash loses.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::lora::{Adapter, HostParam, LoraConfig};
use crate::model::{CausalLm, KvCache, Step};
use crate::tokenizer::{Message, Tokenizer};

mod backprop;
#[cfg(target_arch = "x86_64")]
mod panels;
pub use backprop::{host_grads, supports as host_step_supports};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Everything that decides what a run computes. Saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    pub learning_rate: f64,
    pub epochs: usize,
    /// Stop after this many optimizer steps even if epochs remain (the schedule spans
    /// them); 0 means no cap.
    pub max_steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Longer examples are cut to this many tokens (the prompt kept whole where possible).
    pub max_len: usize,
    pub schedule: Schedule,
    /// Fraction of the optimizer steps spent warming up linearly from zero.
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Held-out loss every this many optimizer steps (0: once per epoch).
    pub eval_every: usize,
    /// Checkpoint every this many optimizer steps (0: once per epoch).
    pub save_every: usize,
    /// Stop after this many evaluations without improving the watched metric (0: never).
    pub patience: usize,
    /// Checkpoints kept besides the best one.
    pub keep_checkpoints: usize,
    /// QLoRA: the caller keeps the frozen projections as 4-bit blocks
    /// ([`CausalLm::quantize_base`]), and each layer is recomputed as with
    /// `gradient_checkpointing`.
    pub qlora: bool,
    /// Train over a bf16 base ([`CausalLm::bf16_base`]): mixed precision, the frozen
    /// products in bf16 (on tensor cores on a GPU, on AMX tiles on a CPU that has them).
    pub bf16: bool,
    /// Keep only each decoder layer's input and recompute the layer before its backward pass
    /// ([`host_grads`] on the CPU, [`layerwise_grads`] elsewhere), over any base. One layer's
    /// activations are alive at a time instead of all of them, for one more forward pass
    /// (the whole graph of a 1.1B Llama at batch 8 × 1024 did not fit an 80 GB H100,
    /// BENCHMARKS.md). Left out of `run.json` when off, as binaries before it wrote it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lora: LoraConfig::default(),
            learning_rate: 1e-4,
            epochs: 3,
            max_steps: 0,
            batch_size: 4,
            grad_accum: 1,
            max_len: 512,
            schedule: Schedule::Cosine,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            save_every: 0,
            patience: 0,
            keep_checkpoints: 2,
            qlora: false,
            bf16: false,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    /// Whether the backward pass recomputes each layer from its input.
    pub fn recompute_layers(&self) -> bool {
        self.qlora || self.gradient_checkpointing
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::Generation(format!("training config: {m}")));
        if self.lora.rank == 0 {
            return bad("lora.rank must be ≥ 1");
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return bad("lora.dropout must be in [0, 1)");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad("learning_rate must be > 0");
        }
        if self.epochs == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return bad("epochs, batch_size and grad_accum must be ≥ 1");
        }
        if self.max_len < 2 {
            return bad("max_len must be ≥ 2");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio must be in [0, 1)");
        }
        Ok(())
    }

    /// The learning rate at optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = (self.warmup_ratio * total as f64).ceil() as usize;
        if step < warmup {
            return self.learning_rate * (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.learning_rate,
            Schedule::Linear => self.learning_rate * (1.0 - progress),
            Schedule::Cosine => self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// One tokenized training example: `target[i]` says whether token `i` is predicted by the
/// loss (an assistant token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    pub target: Vec<bool>,
}

impl Encoded {
    pub fn num_targets(&self) -> usize {
        self.target.iter().filter(|&&t| t).count()
    }
}

/// Tokenizes a chat for training. Every assistant turn is a target; the text before it is
/// the prompt exactly as the template renders it with the generation prompt, and the
/// assistant's tokens are what the template writes after that prompt.
pub fn encode_chat(tokenizer: &Tokenizer, messages: &[Message], max_len: usize) -> Result<Encoded> {
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(EngineError::Template("the example has no assistant message to learn".into()));
    }
    let mut tokens = Vec::new();
    let mut target = Vec::new();
    let mut rendered = String::new();
    let mut push = |text: &str, is_target: bool, tokens: &mut Vec<u32>| -> Result<()> {
        let ids = tokenizer.encode(text, false)?;
        target.extend(std::iter::repeat_n(is_target, ids.len()));
        tokens.extend(ids);
        Ok(())
    };
    let prefix_err = |what: &str| {
        EngineError::Template(format!(
            "the chat template does not render {what} as a prefix of the full conversation, so the prompt cannot be masked"
        ))
    };
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let prompt = tokenizer.apply_chat_template(&messages[..i], true)?;
        let full = tokenizer.apply_chat_template(&messages[..=i], false)?;
        let new_prompt = prompt.strip_prefix(rendered.as_str()).ok_or_else(|| prefix_err("the earlier turns"))?;
        let answer = full.strip_prefix(prompt.as_str()).ok_or_else(|| prefix_err("the prompt"))?;
        push(new_prompt, false, &mut tokens)?;
        push(answer, true, &mut tokens)?;
        rendered = full;
    }
    tokens.truncate(max_len);
    target.truncate(max_len);
    Ok(Encoded { tokens, target })
}

/// The description of a run saved beside each checkpoint, so an adapter can always be
/// traced to what made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub config: TrainConfig,
    /// The dataset version trained on (content address), as the caller names it.
    pub dataset: String,
    pub base_model: String,
    /// sha256 of the base model file(s).
    pub base_model_sha256: String,
    /// sha256 of the chat template text with the suite's prompt template.
    pub chat_template_sha256: String,
    /// sha256 of the tokenizer's own chat template alone: serving refuses the adapter
    /// behind a base whose template differs. None in runs from before it was recorded.
    #[serde(default)]
    pub tokenizer_template_sha256: Option<String>,
    pub train_examples: usize,
    pub heldout_examples: usize,
}

/// One point of the loss curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

/// One evaluation during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: usize,
    pub epoch: usize,
    pub heldout_loss: Option<f64>,
    /// The watched task metric (higher is better), when a metric callback was given.
    pub metric: Option<f64>,
}

/// What the trainer reports after every optimizer step.
#[derive(Debug, Clone)]
pub struct Progress {
    pub record: StepRecord,
    pub total_steps: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// Trainer state that a checkpoint restores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    step: usize,
    /// Best watched value so far (held-out metric, else minus held-out loss).
    best: Option<f64>,
    best_step: Option<usize>,
    bad_evals: usize,
    history: Vec<StepRecord>,
    evals: Vec<EvalRecord>,
    stopped_early: bool,
}

/// The outcome of [`Trainer::run`].
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub steps: usize,
    pub history: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub best_step: Option<usize>,
    pub best_value: Option<f64>,
    pub stopped_early: bool,
    /// Folder of the best adapter (PEFT layout), or of the last one without evaluations.
    pub adapter_dir: PathBuf,
}

/// A task-metric evaluation: scores the adapter as it stands (higher is better).
pub type MetricFn<'a> = dyn FnMut(&CausalLm, &Adapter) -> Result<f64> + 'a;

pub struct Trainer<'a> {
    pub model: &'a CausalLm,
    pub tokenizer: &'a Tokenizer,
    pub info: RunInfo,
    pub train: Vec<Encoded>,
    pub heldout: Vec<Encoded>,
    /// Where checkpoints, `metrics.jsonl` and the final adapter go.
    pub out_dir: PathBuf,
    /// Called with each checkpoint folder once it is complete (to keep it beyond this
    /// machine, say); an error stops the run with [`EngineError::CheckpointKept`].
    pub on_checkpoint: Option<&'a CheckpointFn<'a>>,
}

/// See [`Trainer::on_checkpoint`].
pub type CheckpointFn<'a> = dyn Fn(&Path) -> std::result::Result<(), String> + 'a;

/// AdamW's moments, kept in runs of parameters ([`Adapter::params`] order) that are
/// updated together as one flat tensor: every parameter in one run on a GPU, where each
/// operation is a kernel launch (one by one, each parameter cost 17 launches more a step:
/// some 3,900 for the 1.1B's 224 parameters); each parameter alone on the CPU, where it
/// stays in cache through its dozen operations (one flat run streamed them all through
/// memory a dozen times: 1.6 -> 1.9 s a step on SmolLM2's shape).
struct Optimizer {
    shapes: Vec<[usize; 2]>,
    runs: Vec<std::ops::Range<usize>>,
    m: Vec<Tensor<1>>,
    v: Vec<Tensor<1>>,
}

impl Optimizer {
    /// Zero moments for parameters of these shapes, in one run (`together`) or one each.
    fn new(shapes: Vec<[usize; 2]>, together: bool, device: &Device) -> Self {
        let runs: Vec<_> = if together { std::iter::once(0..shapes.len()).collect() } else { (0..shapes.len()).map(|i| i..i + 1).collect() };
        let zeros: Vec<Tensor<1>> = runs.iter().map(|r| Tensor::zeros([shapes[r.clone()].iter().map(|[a, b]| a * b).sum::<usize>()], device)).collect();
        Self { shapes, runs, m: zeros.clone(), v: zeros }
    }

    /// `ts` (parameters or gradients in order) as one flat tensor per run.
    fn flat(&self, ts: Vec<Tensor<2>>) -> Vec<Tensor<1>> {
        let mut ts = ts.into_iter();
        self.runs
            .iter()
            .map(|r| {
                let mut run: Vec<Tensor<1>> = ts.by_ref().take(r.len()).map(|t| t.flatten(0, 1)).collect();
                // A run of one is a view of its parameter; `cat` would copy it.
                if run.len() == 1 { run.pop().expect("one") } else { Tensor::cat(run, 0) }
            })
            .collect()
    }

    /// One flat tensor per run cut back into one tensor per parameter (views, no copies).
    fn split(&self, flat: &[Tensor<1>]) -> Vec<Tensor<2>> {
        self.runs
            .iter()
            .zip(flat)
            .flat_map(|(r, f)| {
                let mut at = 0;
                self.shapes[r.clone()].iter().map(move |&[a, b]| {
                    at += a * b;
                    f.clone().narrow(0, at - a * b, a * b).reshape([a, b])
                })
            })
            .collect()
    }
}

/// One AdamW step (decoupled weight decay) over `params` with `grads` clipped to a global
/// norm of `c.max_grad_norm`: the new parameters and the norm before clipping. One read
/// from the device (the norm) for all the parameters.
fn adamw(c: &TrainConfig, opt: &mut Optimizer, params: Vec<Tensor<2>>, grads: Vec<Tensor<2>>, lr: f64, t: usize) -> Result<(Vec<Tensor<2>>, f64)> {
    if params.is_empty() {
        return Ok((params, 0.0));
    }
    let grads = opt.flat(grads);
    let squares: Vec<Tensor<1>> = grads.iter().map(|g| g.clone().powi_scalar(2).sum()).collect();
    let norm = scalar(Tensor::cat(squares, 0).sum())?.sqrt();
    let clip = if c.max_grad_norm > 0.0 && norm > c.max_grad_norm { c.max_grad_norm / (norm + 1e-6) } else { 1.0 };
    let (b1, b2) = (c.beta1, c.beta2);
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    let params = opt.flat(params);
    let mut updated = Vec::with_capacity(params.len());
    for (((p, g), m), v) in params.into_iter().zip(grads).zip(&mut opt.m).zip(&mut opt.v) {
        let g = g.mul_scalar(clip);
        *m = m.clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        *v = v.clone().mul_scalar(b2) + g.powi_scalar(2).mul_scalar(1.0 - b2);
        let update = m.clone().div_scalar(bc1) / v.clone().div_scalar(bc2).sqrt().add_scalar(c.eps);
        updated.push(p.mul_scalar(1.0 - lr * c.weight_decay) - update.mul_scalar(lr));
    }
    Ok((opt.split(&updated), norm))
}

impl<'a> Trainer<'a> {
    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        let c = &self.info.config;
        self.train.len().div_ceil(c.batch_size).div_ceil(c.grad_accum).max(1)
    }

    pub fn total_steps(&self) -> usize {
        let all = self.steps_per_epoch() * self.info.config.epochs;
        match self.info.config.max_steps {
            0 => all,
            cap => all.min(cap),
        }
    }

    /// Trains from scratch, or from the latest checkpoint in `out_dir` when `resume`.
    /// `on_step` sees every optimizer step; when it breaks, the run checkpoints where it
    /// stands and ends with [`EngineError::Interrupted`], so a later `resume` continues.
    pub fn run(
        &self,
        resume: bool,
        mut metric: Option<&mut MetricFn<'_>>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<TrainOutcome> {
        let c = &self.info.config;
        c.validate()?;
        if self.train.is_empty() {
            return Err(EngineError::Generation("no training examples".into()));
        }
        let device = self.model.device().clone();
        let ckpt_root = self.out_dir.join("checkpoints");
        std::fs::create_dir_all(&ckpt_root).map_err(|e| EngineError::io(&ckpt_root, e))?;

        let mut adapter = Adapter::init(c.lora.clone(), &self.model.config, c.seed, &device);
        let mut opt = Optimizer::new(adapter.params().iter().map(|(_, p)| p.dims()).collect(), !self.model.on_host(), &device);
        let mut state = State::default();
        if resume && let Some(dir) = latest_checkpoint(&ckpt_root)? {
            state = self.load_checkpoint(&dir, &mut adapter, &mut opt)?;
        }
        let mut adapter = adapter.tracked();
        // The metrics log holds exactly the steps the state knows of.
        self.rewrite_metrics(&state)?;

        let per_epoch = self.steps_per_epoch();
        let total = self.total_steps();
        let started = Instant::now();
        let mut tokens_seen = 0usize;
        while state.step < total && !state.stopped_early {
            let epoch = state.step / per_epoch;
            let batches = self.epoch_batches(epoch);
            let in_epoch = state.step % per_epoch;
            let group = &batches[in_epoch * c.grad_accum..((in_epoch + 1) * c.grad_accum).min(batches.len())];
            let targets: usize = group.iter().flatten().map(|&i| self.train[i].num_targets()).sum();
            let mut grads: Vec<Option<Tensor<2>>> = vec![None; opt.shapes.len()];
            let mut loss_sum = 0.0;
            for (k, batch) in group.iter().enumerate() {
                let micro_seed = mix(c.seed, (state.step * c.grad_accum + k) as u64);
                let examples: Vec<&Encoded> = batch.iter().map(|&i| &self.train[i]).collect();
                let scale = 1.0 / targets.max(1) as f64;
                let micro: Vec<Option<Tensor<2>>> = if backprop::supports(self.model) {
                    let Some((loss, g)) = backprop::host_grads(self.model, &examples, &adapter, true, micro_seed, scale, c.recompute_layers()) else {
                        continue;
                    };
                    loss_sum += loss;
                    g.into_iter().map(Some).collect()
                } else if c.recompute_layers() {
                    let Some((loss, g)) = layerwise_grads(self.model, &examples, &adapter, true, micro_seed, scale)? else {
                        continue;
                    };
                    loss_sum += loss;
                    g.into_iter().map(Some).collect()
                } else {
                    device.seed(micro_seed);
                    let Some((loss, _)) = self.loss(&examples, &adapter, true) else {
                        continue;
                    };
                    let scaled = loss.clone().mul_scalar(scale);
                    loss_sum += scalar(loss)?;
                    let mut g = scaled.backward();
                    adapter.params().iter().map(|(_, p)| p.grad_remove(&mut g)).collect()
                };
                tokens_seen += examples.iter().map(|e| e.tokens.len()).sum::<usize>();
                for (slot, d) in grads.iter_mut().zip(micro) {
                    if let Some(d) = d {
                        *slot = Some(match slot.take() {
                            Some(acc) => acc + d,
                            None => d,
                        });
                    }
                }
            }
            let grads: Vec<Tensor<2>> = grads
                .into_iter()
                .zip(&opt.shapes)
                .map(|(g, &shape)| g.unwrap_or_else(|| Tensor::zeros(shape, &device)))
                .collect();
            let lr = c.lr_at(state.step, total);
            let grad_norm = self.apply_adamw(&mut adapter, &mut opt, grads, lr, state.step + 1)?;
            let record = StepRecord {
                step: state.step + 1,
                epoch,
                loss: loss_sum / targets.max(1) as f64,
                lr,
                grad_norm,
                tokens: targets,
            };
            state.step += 1;
            self.append_metrics(&serde_json::json!({"train": &record}))?;
            state.history.push(record.clone());
            let elapsed = started.elapsed().as_secs_f64();
            let flow = on_step(&Progress {
                record,
                total_steps: total,
                tokens_per_s: tokens_seen as f64 / elapsed.max(1e-9),
                elapsed_s: elapsed,
            });
            if flow.is_break() {
                self.save_checkpoint(&ckpt_root, &adapter, &opt, &state)?;
                return Err(EngineError::Interrupted { step: state.step });
            }

            let end_of_epoch = state.step % per_epoch == 0 || state.step == total;
            let eval_now = if c.eval_every > 0 { state.step % c.eval_every == 0 || state.step == total } else { end_of_epoch };
            if eval_now && (!self.heldout.is_empty() || metric.is_some()) {
                self.evaluate(&adapter, &mut metric, &mut state)?;
            }
            let save_now = if c.save_every > 0 { state.step % c.save_every == 0 } else { end_of_epoch };
            if save_now || state.step == total || state.stopped_early {
                self.save_checkpoint(&ckpt_root, &adapter, &opt, &state)?;
            }
        }
        self.finish(&adapter, &state)
    }

    /// The micro-batches of one epoch (indices into `train`), deterministic in (seed, epoch).
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let c = &self.info.config;
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(c.seed, 1_000_003 + epoch as u64));
        order.shuffle(&mut rng);
        let window = c.batch_size * 16;
        let mut batches = Vec::new();
        for chunk in order.chunks(window) {
            let mut chunk = chunk.to_vec();
            chunk.sort_by_key(|&i| std::cmp::Reverse(self.train[i].tokens.len()));
            batches.extend(chunk.chunks(c.batch_size).map(<[usize]>::to_vec));
        }
        batches.shuffle(&mut rng);
        batches
    }

    fn loss(&self, examples: &[&Encoded], adapter: &Adapter, train: bool) -> Option<(Tensor<1>, usize)> {
        batch_loss(self.model, examples, adapter, train)
    }

    /// Mean held-out loss per target token, without dropout or gradients.
    pub fn heldout_loss(&self, adapter: &Adapter) -> Result<Option<f64>> {
        let c = &self.info.config;
        let adapter = adapter.detached();
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in self.heldout.chunks(c.batch_size) {
            let examples: Vec<&Encoded> = chunk.iter().collect();
            if let Some((loss, k)) = self.loss(&examples, &adapter, false) {
                sum += scalar(loss)?;
                n += k;
            }
        }
        Ok((n > 0).then(|| sum / n as f64))
    }

    /// Clips, then applies one AdamW update; returns the gradient norm before clipping.
    fn apply_adamw(&self, adapter: &mut Adapter, opt: &mut Optimizer, grads: Vec<Tensor<2>>, lr: f64, t: usize) -> Result<f64> {
        let params = adapter.params().into_iter().map(|(_, p)| p.clone().inner()).collect();
        let (params, norm) = adamw(&self.info.config, opt, params, grads, lr, t)?;
        for (slot, p) in adapter.params_mut().into_iter().zip(params) {
            *slot = p;
        }
        *adapter = adapter.tracked();
        Ok(norm)
    }

    fn evaluate(&self, adapter: &Adapter, metric: &mut Option<&mut MetricFn<'_>>, state: &mut State) -> Result<()> {
        let c = &self.info.config;
        let per_epoch = self.steps_per_epoch();
        let heldout_loss = self.heldout_loss(adapter)?;
        let value = match metric {
            Some(f) => Some(f(self.model, &adapter.detached())?),
            None => None,
        };
        let record = EvalRecord {
            step: state.step,
            epoch: (state.step - 1) / per_epoch,
            heldout_loss,
            metric: value,
        };
        self.append_metrics(&serde_json::json!({"eval": &record}))?;
        state.evals.push(record);
        // Watch the task metric when there is one, else the held-out loss.
        let Some(watched) = value.or(heldout_loss.map(|l| -l)) else {
            return Ok(());
        };
        if state.best.is_none_or(|b| watched > b) {
            state.best = Some(watched);
            state.best_step = Some(state.step);
            state.bad_evals = 0;
            let best = self.out_dir.join("best");
            write_dir_atomic(&best, |tmp| {
                adapter.save_peft(tmp, &self.info.base_model)?;
                self.write_run_info(tmp)
            })?;
        } else {
            state.bad_evals += 1;
            if c.patience > 0 && state.bad_evals >= c.patience {
                state.stopped_early = true;
            }
        }
        Ok(())
    }

    fn write_run_info(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.info).expect("run info serializes");
        crate::error::write_atomic(&dir.join("run.json"), text.as_bytes())
    }

    fn save_checkpoint(&self, root: &Path, adapter: &Adapter, opt: &Optimizer, state: &State) -> Result<()> {
        let dir = root.join(format!("step-{:08}", state.step));
        write_dir_atomic(&dir, |tmp| {
            adapter.save_peft(tmp, &self.info.base_model)?;
            let mut moments = BTreeMap::new();
            for (((name, _), m), v) in adapter.params().into_iter().zip(opt.split(&opt.m)).zip(opt.split(&opt.v)) {
                moments.insert(format!("{name}.m"), host(&m));
                moments.insert(format!("{name}.v"), host(&v));
            }
            let bytes = crate::export::safetensors_f32(&moments, None).map_err(|detail| EngineError::Malformed {
                path: tmp.join("optimizer.safetensors"),
                format: "safetensors",
                detail,
            })?;
            crate::error::write_atomic(&tmp.join("optimizer.safetensors"), &bytes)?;
            let text = serde_json::to_string_pretty(state).expect("state serializes");
            crate::error::write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
            self.write_run_info(tmp)
        })?;
        // Older checkpoints go once the new one is complete.
        let mut all = list_checkpoints(root)?;
        all.sort();
        let keep = self.info.config.keep_checkpoints.max(1);
        if all.len() > keep {
            for old in &all[..all.len() - keep] {
                let _ = std::fs::remove_dir_all(old);
            }
        }
        match self.on_checkpoint {
            Some(keep) => keep(&dir).map_err(|detail| EngineError::CheckpointKept { path: dir, detail }),
            None => Ok(()),
        }
    }

    fn load_checkpoint(&self, dir: &Path, adapter: &mut Adapter, opt: &mut Optimizer) -> Result<State> {
        let run_path = dir.join("run.json");
        let text = std::fs::read_to_string(&run_path).map_err(|e| EngineError::io(&run_path, e))?;
        let saved: RunInfo = serde_json::from_str(&text).map_err(|e| malformed(&run_path, e))?;
        if saved != self.info {
            return Err(EngineError::Unsupported {
                path: run_path,
                field: "run".into(),
                detail: "the checkpoint was made with a different config, dataset or base model; start a new run or pass the same settings".into(),
            });
        }
        let device = self.model.device();
        let loaded = Adapter::load_peft(dir, &self.model.config, device)?;
        *adapter = loaded;
        let path = dir.join("optimizer.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| malformed(&path, e))?;
        let mut moments = [Vec::new(), Vec::new()];
        for ((name, _), &[r, c]) in adapter.params().into_iter().zip(&opt.shapes) {
            for (suffix, each) in ["m", "v"].into_iter().zip(&mut moments) {
                let key = format!("{name}.{suffix}");
                let view = st.tensor(&key).map_err(|_| EngineError::Missing {
                    path: path.clone(),
                    field: key.clone(),
                })?;
                let data = crate::weights::view_to_f32(&view, &path, &key)?;
                if data.len() != r * c {
                    return Err(EngineError::Malformed {
                        path: path.clone(),
                        format: "safetensors",
                        detail: format!("`{key}` holds {} values where the adapter's parameter has {r} x {c}", data.len()),
                    });
                }
                each.push(data);
            }
        }
        let [m, v] = moments.map(|values| opt.flat(values.into_iter().zip(&opt.shapes).map(|(x, &s)| Tensor::from_data(TensorData::new(x, s), device)).collect()));
        (opt.m, opt.v) = (m, v);
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| EngineError::io(&sp, e))?;
        serde_json::from_str(&text).map_err(|e| malformed(&sp, e))
    }

    fn metrics_path(&self) -> PathBuf {
        self.out_dir.join("metrics.jsonl")
    }

    fn append_metrics(&self, line: &serde_json::Value) -> Result<()> {
        use std::io::Write;
        let path = self.metrics_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| EngineError::io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| EngineError::io(&path, e))
    }

    /// Rewrites `metrics.jsonl` from the state: a resumed run drops the lines its killed
    /// predecessor wrote after the checkpoint.
    fn rewrite_metrics(&self, state: &State) -> Result<()> {
        let mut text = String::new();
        let mut evals = state.evals.iter().peekable();
        for r in &state.history {
            text.push_str(&serde_json::json!({"train": r}).to_string());
            text.push('\n');
            while let Some(e) = evals.next_if(|e| e.step <= r.step) {
                text.push_str(&serde_json::json!({"eval": e}).to_string());
                text.push('\n');
            }
        }
        crate::error::write_atomic(&self.metrics_path(), text.as_bytes())
    }

    fn finish(&self, adapter: &Adapter, state: &State) -> Result<TrainOutcome> {
        let last = self.out_dir.join("last");
        write_dir_atomic(&last, |tmp| {
            adapter.save_peft(tmp, &self.info.base_model)?;
            self.write_run_info(tmp)
        })?;
        let best = self.out_dir.join("best");
        let adapter_dir = if state.best_step.is_some() && best.exists() { best } else { last };
        Ok(TrainOutcome {
            steps: state.step,
            history: state.history.clone(),
            evals: state.evals.clone(),
            best_step: state.best_step,
            best_value: state.best,
            stopped_early: state.stopped_early,
            adapter_dir,
        })
    }
}

/// Summed negative log-likelihood of the target tokens of `examples` and their count;
/// `None` when none of them has a target left after truncation.
/// A padded batch and, for each target token, the hidden-state row that predicts it.
struct Batch {
    step: Step,
    rows: Vec<i64>,
    labels: Vec<i64>,
}

fn make_batch(examples: &[&Encoded]) -> Option<Batch> {
    let b = examples.len();
    let s = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let mut step = Step {
        batch: b,
        seq: s,
        tokens: vec![0; b * s],
        positions: (0..b).flat_map(|_| 0..s as i64).collect(),
        valid: vec![false; b * s],
    };
    // Row t of the hidden states predicts token t + 1.
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (r, e) in examples.iter().enumerate() {
        for (t, &tok) in e.tokens.iter().enumerate() {
            step.tokens[r * s + t] = tok;
            step.valid[r * s + t] = true;
            if t > 0 && e.target[t] {
                rows.push((r * s + t - 1) as i64);
                labels.push(i64::from(tok));
            }
        }
    }
    (!rows.is_empty()).then_some(Batch { step, rows, labels })
}

/// The summed negative log-likelihood of the batch's targets given the last hidden states.
fn head_nll(model: &CausalLm, batch: &Batch, hidden: Tensor<3>) -> Tensor<1> {
    let device = model.device();
    let [b, s, h] = hidden.dims();
    let n = batch.rows.len();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(batch.rows.clone(), [n]), device);
    let picked = hidden.reshape([b * s, h]).select(0, rows).reshape([1, n, h]);
    let logits = model.head(picked).reshape([n, model.config.vocab_size]);
    let labels = Tensor::<2, Int>::from_data(TensorData::new(batch.labels.clone(), [n, 1]), device);
    log_softmax(logits, 1).gather(1, labels).sum().neg()
}

/// Summed negative log-likelihood of the target tokens of `examples` and their count;
/// `None` when none of them has a target left after truncation.
pub fn batch_loss(model: &CausalLm, examples: &[&Encoded], adapter: &Adapter, train: bool) -> Option<(Tensor<1>, usize)> {
    let batch = make_batch(examples)?;
    let hidden = model.hidden(&batch.step, &mut KvCache::default(), Some(adapter), train);
    let n = batch.rows.len();
    Some((head_nll(model, &batch, hidden), n))
}

/// The loss of `examples` and the gradient of `scale × loss` for every adapter parameter
/// (in [`Adapter::params`] order), back-propagated one decoder layer at a time: a first
/// pass keeps only each layer's input; the backward pass re-runs one layer with autodiff,
/// pulls the gradient through it and frees it. Peak memory holds one layer's graph and
/// one layer's expanded weights instead of all of them, which is what makes a 4-bit base
/// (QLoRA) pay off. Dropout masks are reseeded per layer from `seed`, so both passes
/// draw the same ones.
pub fn layerwise_grads(
    model: &CausalLm,
    examples: &[&Encoded],
    adapter: &Adapter,
    train: bool,
    seed: u64,
    scale: f64,
) -> Result<Option<(f64, Vec<Tensor<2>>)>> {
    let Some(batch) = make_batch(examples) else {
        return Ok(None);
    };
    let device = model.device();
    let ctx = model.layer_context(&batch.step);
    let frozen = adapter.detached();
    let layers = model.layers.len();
    let mut inputs = Vec::with_capacity(layers + 1);
    let mut x = model.embed(&batch.step);
    for l in 0..layers {
        device.seed(mix(seed, l as u64));
        inputs.push(x.clone());
        x = model.layer(l, x, &ctx, Some(&frozen), train);
    }
    let top = x.autodiff().require_grad();
    let nll = head_nll(model, &batch, top.clone());
    let loss = scalar(nll.clone())?;
    let mut g = nll.mul_scalar(scale).backward();
    let mut upstream = top.grad(&g).expect("the last hidden state takes part in the loss");
    drop(g);

    let per_layer = adapter.layers.first().map_or(0, |l| l.pairs.len() * 2);
    let mut grads: Vec<Tensor<2>> = frozen.params().iter().map(|(_, p)| p.zeros_like()).collect();
    for l in (0..layers).rev() {
        let mut tracked = frozen.clone();
        for (_, pair) in &mut tracked.layers[l].pairs {
            pair.a = pair.a.clone().autodiff().require_grad();
            pair.b = pair.b.clone().autodiff().require_grad();
        }
        let xin = inputs.pop().expect("one input per layer").autodiff().require_grad();
        device.seed(mix(seed, l as u64));
        let out = model.layer(l, xin.clone(), &ctx, Some(&tracked), train);
        g = (out * upstream.clone()).sum().backward();
        for (k, (_, pair)) in tracked.layers[l].pairs.iter().enumerate() {
            if let Some(d) = pair.a.grad(&g) {
                grads[l * per_layer + 2 * k] = d;
            }
            if let Some(d) = pair.b.grad(&g) {
                grads[l * per_layer + 2 * k + 1] = d;
            }
        }
        if l > 0 {
            upstream = xin.grad(&g).expect("the layer input takes part in its output");
        }
    }
    Ok(Some((loss, grads)))
}

/// The newest complete checkpoint under `root` (`step-N` folders; temporaries ignored).
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    let mut all = list_checkpoints(root)?;
    all.sort();
    Ok(all.pop())
}

fn list_checkpoints(root: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| EngineError::io(root, e))?;
        let name = e.file_name();
        if name.to_str().is_some_and(|n| n.starts_with("step-")) {
            out.push(e.path());
        }
    }
    Ok(out)
}

/// Writes a folder that appears whole or not at all ([`lathe_util::StagedDir`]).
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staged = lathe_util::StagedDir::new(dir).map_err(|e| EngineError::io(dir, e))?;
    fill(staged.path())?;
    staged.commit().map_err(|e| EngineError::io(dir, e))
}

fn malformed(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Malformed {
        path: path.into(),
        format: "checkpoint",
        detail: e.to_string(),
    }
}

fn host(t: &Tensor<2>) -> HostParam {
    (t.dims().to_vec(), crate::lora::host_vec(t.clone()))
}

/// The first value of `t`, read back from the device. This read is where a GPU's failures
/// in the work queued before it surface (cubecl runs kernels asynchronously), so they come
/// back as an error that says what happened, not as a panic.
fn scalar(t: Tensor<1>) -> Result<f64> {
    let data = t.inner().try_into_data().map_err(|e| {
        let mut why = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            why = format!("{why}: {c}");
            cause = c.source();
        }
        let hint = if why.contains("out of device memory") {
            ". The GPU ran out of memory: start the run again with a lower batch_size or max_len, or with gradient_checkpointing (each layer recomputed in the backward pass) or qlora"
        } else {
            ""
        };
        EngineError::Step(format!("it failed on the device: {why}{hint}"))
    })?;
    Ok(f64::from(data.convert::<f32>().try_to_vec::<f32>().map_err(|e| EngineError::Step(format!("reading a loss: {e:?}")))?[0]))
}

/// SplitMix64 of `a` and `b`: independent seeds for each (run, step).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(MIX[0]);
    z = (z ^ (z >> 30)).wrapping_mul(MIX[1]);
    z = (z ^ (z >> 27)).wrapping_mul(MIX[2]);
    z ^ (z >> 31)
}

/// [`mix`]'s multipliers (SplitMix64's), shared with the dropout masks' vector draw.
const MIX: [u64; 3] = [0x9E37_79B9_7F4A_7C15, 0xBF58_476D_1CE4_E5B9, 0x94D0_49BB_1331_11EB];

#[cfg(test)]
mod tests {
    use super::*;

    /// The flat update equals AdamW written out element by element (PyTorch's `AdamW`
    /// formula: decoupled weight decay, bias-corrected moments), over parameters of several
    /// shapes, with the global norm clipped and not, for three steps, with the moments in
    /// one run (a GPU's layout) and one per parameter (the CPU's).
    #[test]
    fn the_flat_adamw_step_is_adamw_on_every_parameter() {
        let device = Device::default();
        let shapes = vec![[3, 4], [4, 2], [1, 5]];
        let value = |k: usize, i: usize, step: usize| ((k * 31 + i * 7 + step * 13) % 17) as f32 / 8.0 - 1.0;
        for (max_grad_norm, together) in [(0.0, true), (0.5, true), (0.5, false)] {
            let c = TrainConfig { weight_decay: 0.1, max_grad_norm, ..TrainConfig::default() };
            let mut opt = Optimizer::new(shapes.clone(), together, &device);
            let mut params: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(k, [r, cols])| (0..r * cols).map(|i| value(k, i, 0)).collect()).collect();
            let mut tensors: Vec<Tensor<2>> = params.iter().zip(&shapes).map(|(p, &s)| Tensor::from_data(TensorData::new(p.clone(), s), &device)).collect();
            let (mut m, mut v): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (params.iter().map(|p| vec![0.0; p.len()]).collect(), params.iter().map(|p| vec![0.0; p.len()]).collect());
            for t in 1..=3 {
                let lr = 1e-2 * t as f64;
                let grads: Vec<Vec<f32>> = params.iter().enumerate().map(|(k, p)| (0..p.len()).map(|i| value(k + 5, i, t)).collect()).collect();
                let gt = grads.iter().zip(&shapes).map(|(g, &s)| Tensor::from_data(TensorData::new(g.clone(), s), &device)).collect();
                let (next, norm) = adamw(&c, &mut opt, tensors, gt, lr, t).unwrap();
                // The reference, in f64.
                let want_norm = grads.iter().flatten().map(|&g| f64::from(g).powi(2)).sum::<f64>().sqrt();
                assert!((norm - want_norm).abs() < 1e-5 * want_norm, "norm {norm} against {want_norm}");
                let clip = if max_grad_norm > 0.0 && want_norm > max_grad_norm { max_grad_norm / (want_norm + 1e-6) } else { 1.0 };
                for k in 0..params.len() {
                    for i in 0..params[k].len() {
                        let g = f64::from(grads[k][i]) * clip;
                        m[k][i] = c.beta1 * m[k][i] + (1.0 - c.beta1) * g;
                        v[k][i] = c.beta2 * v[k][i] + (1.0 - c.beta2) * g * g;
                        let mhat = m[k][i] / (1.0 - c.beta1.powi(t as i32));
                        let vhat = v[k][i] / (1.0 - c.beta2.powi(t as i32));
                        let p = f64::from(params[k][i]) * (1.0 - lr * c.weight_decay) - lr * mhat / (vhat.sqrt() + c.eps);
                        params[k][i] = p as f32;
                    }
                }
                for (k, (got, want)) in next.iter().zip(&params).enumerate() {
                    assert_eq!(got.dims(), shapes[k]);
                    let got = crate::lora::host_vec(got.clone());
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "step {t}, parameter {k}[{i}]: {g} against {w} (clip {clip})");
                    }
                }
                tensors = next;
            }
            // A checkpoint stores the moments per parameter and loads them back into runs.
            for moments in [&opt.m, &opt.v] {
                let back = opt.flat(opt.split(moments));
                for (a, b) in back.into_iter().zip(moments) {
                    assert_eq!(crate::lora::host_vec(a), crate::lora::host_vec(b.clone()));
                }
            }
        }
    }
}
