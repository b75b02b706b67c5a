//! The workflow's settings and their one source of defaults, layered: built-in defaults,
//! then a project's TOML (`[train]`), then `LATHE_TRAIN_*` environment variables, then the
//! request's fields (CLI flags, API body). Each layer is checked as it is applied, so an
//! error names the layer and the key that was wrong.

use lathe_engine::LoraConfig;
use lathe_engine::lora::parse_targets;
use lathe_engine::train::{Schedule, TrainConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{JobError, Result};

/// How a LoRA run trains, as a user sets it. The defaults are the workflow's: rank 16,
/// alpha 32, dropout 0.1 on every linear projection, lr 1e-4, 3 epochs, cosine with
/// warm-up, early stopping after 2 evaluations without improvement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    pub learning_rate: f64,
    /// Learning rates to sweep (each trains a run; the best watched value wins). Empty: no
    /// sweep, `learning_rate` alone.
    pub sweep: Vec<f64>,
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: no cap); the schedule spans them.
    pub max_steps: usize,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// `all`, or a comma-separated list of q, k, v, o, gate, up, down.
    pub targets: String,
    /// Scale by alpha/√rank (rank-stabilised LoRA).
    pub rslora: bool,
    /// Keep the frozen projections as 4-bit blocks and back-propagate layer by layer.
    pub qlora: bool,
    /// Mixed precision: the frozen base in bf16, the LoRA weights in f32 (faster than f32
    /// on GPUs with bf16 tensor cores and on CPUs with AMX tiles or AVX-512 BF16; elsewhere
    /// on the CPU a little slower). Left out of the settings' JSON when off, so run folders
    /// named by the settings keep their names.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bf16: bool,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations:
    /// one layer's alive at a time, for one more forward pass (long sequences or large
    /// batches on a GPU). Left out of the settings' JSON when off, as `bf16`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Evaluate every N optimizer steps (0: each epoch).
    pub eval_every: usize,
    /// Checkpoint every N optimizer steps (0: each epoch).
    pub save_every: usize,
    /// Stop after this many evaluations without improvement (0: never).
    pub patience: usize,
    /// Share of the training version kept aside to watch the run.
    pub validation_fraction: f64,
    /// Validation items scored with the suite's metric at each evaluation (0: loss only).
    pub metric_items: usize,
}

impl Default for TrainSettings {
    fn default() -> Self {
        let c = TrainConfig::default();
        let l = LoraConfig::default();
        Self {
            learning_rate: c.learning_rate,
            sweep: Vec::new(),
            epochs: c.epochs,
            max_steps: c.max_steps,
            rank: l.rank,
            alpha: l.alpha,
            dropout: l.dropout,
            targets: "all".into(),
            rslora: l.rslora,
            qlora: c.qlora,
            bf16: c.bf16,
            gradient_checkpointing: c.gradient_checkpointing,
            batch_size: c.batch_size,
            grad_accum: c.grad_accum,
            max_len: c.max_len,
            schedule: c.schedule,
            warmup_ratio: c.warmup_ratio,
            weight_decay: c.weight_decay,
            max_grad_norm: c.max_grad_norm,
            seed: c.seed,
            eval_every: c.eval_every,
            save_every: c.save_every,
            // The engine as a library does not stop early by default; the workflow does.
            patience: 2,
            validation_fraction: 0.1,
            metric_items: 16,
        }
    }
}

impl TrainSettings {
    /// The engine's configuration, checked.
    pub fn config(&self) -> Result<TrainConfig> {
        let config = TrainConfig {
            lora: LoraConfig {
                rank: self.rank,
                alpha: self.alpha,
                dropout: self.dropout,
                targets: parse_targets(&self.targets).map_err(|e| JobError::Invalid(format!("targets: {e}")))?,
                rslora: self.rslora,
            },
            learning_rate: self.learning_rate,
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_len: self.max_len,
            schedule: self.schedule,
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            patience: self.patience,
            qlora: self.qlora,
            bf16: self.bf16,
            gradient_checkpointing: self.gradient_checkpointing,
            ..TrainConfig::default()
        };
        config.validate().map_err(|e| JobError::Invalid(e.to_string()))?;
        if !(0.0..0.5).contains(&self.validation_fraction) {
            return Err(JobError::Invalid(format!("validation_fraction is {}; it must be in [0, 0.5)", self.validation_fraction)));
        }
        Ok(config)
    }

    /// The learning rates to train with: the sweep, else the one rate.
    pub fn rates(&self) -> Vec<f64> {
        if self.sweep.is_empty() { vec![self.learning_rate] } else { self.sweep.clone() }
    }
}

/// The limits of one plugin world, as an operator sets them: section `plugin_<world>` of
/// the environment (`LATHE_PLUGIN_SCORER_MEMORY_MB=128`, `LATHE_PLUGIN_JUDGE_TIMEOUT_MS=5000`).
/// They are the host's, not a project's: no project TOML can raise them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginLimits {
    /// The largest component of this world an upload may be.
    pub max_component_mb: usize,
    /// The memory one instance may grow to.
    pub memory_mb: usize,
    /// The CPU time of one call.
    pub timeout_ms: u64,
    /// The most one call may return.
    pub max_output_mb: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        let l = lathe_sandbox::Limits::default();
        Self {
            max_component_mb: l.max_component_bytes >> 20,
            memory_mb: l.memory_bytes >> 20,
            timeout_ms: l.timeout.as_millis() as u64,
            max_output_mb: l.max_output_bytes >> 20,
        }
    }
}

impl PluginLimits {
    pub fn limits(&self) -> lathe_sandbox::Limits {
        lathe_sandbox::Limits {
            max_component_bytes: self.max_component_mb << 20,
            memory_bytes: self.memory_mb << 20,
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            max_output_bytes: self.max_output_mb << 20,
            fuel: None,
        }
    }
}

/// The plugin runtime's configuration: each world's limits from `layers` (section
/// `plugin_<world>`), compiled plugins cached in `cache_dir`.
pub fn plugin_runtime_config(layers: &Layers, cache_dir: Option<std::path::PathBuf>) -> Result<lathe_sandbox::RuntimeConfig> {
    let mut worlds = std::collections::BTreeMap::new();
    for kind in lathe_sandbox::Kind::ALL {
        let l: PluginLimits = layers.resolve(&format!("plugin_{kind}"))?;
        worlds.insert(kind, l.limits());
    }
    Ok(lathe_sandbox::RuntimeConfig { cache_dir, worlds, ..Default::default() })
}

/// Where settings come from, lowest layer first after the built-in defaults.
#[derive(Debug, Default, Clone)]
pub struct Layers {
    /// A project's TOML: its name (for errors) and text.
    pub toml: Option<(String, String)>,
    /// Environment variables (`LATHE_<SECTION>_<KEY>`); [`Layers::from_process`] reads the
    /// process's.
    pub env: Vec<(String, String)>,
    /// The request's own fields (CLI flags that were given, an API body).
    pub overrides: Map<String, Value>,
}

impl Layers {
    /// The process's `LATHE_*` environment, and the TOML file at `toml` if it exists.
    pub fn from_process(toml: Option<&std::path::Path>) -> Result<Self> {
        let toml = match toml {
            Some(p) if p.is_file() => {
                Some((p.display().to_string(), std::fs::read_to_string(p).map_err(|e| JobError::io(p, e))?))
            }
            _ => None,
        };
        Ok(Self { toml, env: std::env::vars().filter(|(k, _)| k.starts_with("LATHE_")).collect(), overrides: Map::new() })
    }

    pub fn with_overrides(mut self, overrides: Map<String, Value>) -> Self {
        self.overrides = overrides;
        self
    }

    /// The settings of `section` (`train`): defaults, then each layer.
    pub fn resolve<T: Serialize + DeserializeOwned + Default>(&self, section: &str) -> Result<T> {
        let Value::Object(mut merged) = serde_json::to_value(T::default()).expect("settings serialise") else {
            unreachable!("settings are structs")
        };
        let known: Vec<String> = merged.keys().cloned().collect();
        if let Some((name, text)) = &self.toml {
            let doc: toml::Table = toml::from_str(text).map_err(|e| JobError::Invalid(format!("{name}: {e}")))?;
            if let Some(table) = doc.get(section) {
                let Value::Object(table) = serde_json::to_value(table).expect("TOML is JSON") else {
                    return Err(JobError::Invalid(format!("{name}: [{section}] must be a table")));
                };
                apply::<T>(&mut merged, table, &known, &format!("{name} [{section}]"))?;
            }
        }
        let prefix = format!("LATHE_{}_", section.to_uppercase());
        let mut from_env = Map::new();
        for (k, v) in &self.env {
            if let Some(key) = k.strip_prefix(&prefix) {
                let key = key.to_lowercase();
                let is_list = merged.get(&key).is_some_and(Value::is_array);
                from_env.insert(key, env_value(v, is_list));
            }
        }
        apply::<T>(&mut merged, from_env, &known, &format!("environment ({prefix}*)"))?;
        apply::<T>(&mut merged, self.overrides.clone(), &known, "request")?;
        Ok(serde_json::from_value(Value::Object(merged)).expect("checked as each layer was applied"))
    }
}

fn apply<T: DeserializeOwned>(merged: &mut Map<String, Value>, layer: Map<String, Value>, known: &[String], name: &str) -> Result<()> {
    for (k, v) in layer {
        // The settings type decides what a setting is (its fields deny unknown ones), so a
        // field left out of the defaults' JSON, `bf16` while off, is one too.
        let before = merged.insert(k.clone(), v.clone());
        if let Err(e) = serde_json::from_value::<T>(Value::Object(merged.clone())) {
            match before {
                Some(b) => merged.insert(k.clone(), b),
                None => merged.remove(&k),
            };
            if e.to_string().contains("unknown field") {
                return Err(JobError::Invalid(format!("{name}: unknown setting `{k}`; the settings are {}", known.join(", "))));
            }
            return Err(JobError::Invalid(format!("{name}: `{k}` = {v}: {e}")));
        }
    }
    Ok(())
}

/// An environment value as JSON: a number, boolean or JSON text as itself, a
/// comma-separated list for list settings, anything else as a string.
fn env_value(v: &str, is_list: bool) -> Value {
    if let Ok(parsed) = serde_json::from_str::<Value>(v) {
        return parsed;
    }
    if is_list {
        return Value::Array(
            v.split(',')
                .map(|s| serde_json::from_str(s.trim()).unwrap_or_else(|_| Value::String(s.trim().to_string())))
                .collect(),
        );
    }
    Value::String(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_errors_name_the_layer() {
        let layers = Layers {
            toml: Some(("lathe.toml".into(), "[train]\nrank = 8\nlearning_rate = 5e-4\n".into())),
            env: vec![("LATHE_TRAIN_LEARNING_RATE".into(), "2e-4".into()), ("LATHE_TRAIN_SWEEP".into(), "1e-4,5e-4".into())],
            overrides: serde_json::json!({"epochs": 5}).as_object().unwrap().clone(),
        };
        let s: TrainSettings = layers.resolve("train").unwrap();
        assert_eq!((s.rank, s.learning_rate, s.epochs, s.alpha), (8, 2e-4, 5, 32.0));
        assert_eq!(s.sweep, vec![1e-4, 5e-4]);
        assert_eq!(s.config().unwrap().lora.rank, 8);

        let bad = Layers { toml: Some(("p.toml".into(), "[train]\nrnak = 8\n".into())), ..Layers::default() };
        let e = bad.resolve::<TrainSettings>("train").unwrap_err().to_string();
        assert!(e.contains("p.toml [train]") && e.contains("`rnak`"), "{e}");

        let bad = Layers { env: vec![("LATHE_TRAIN_EPOCHS".into(), "three".into())], ..Layers::default() };
        let e = bad.resolve::<TrainSettings>("train").unwrap_err().to_string();
        assert!(e.contains("environment") && e.contains("`epochs`"), "{e}");
    }

    #[test]
    fn plugin_limits_are_set_per_world() {
        let layers = Layers {
            // A project's TOML is not read for host limits (the caller passes none), but
            // the layer works the same if an operator's file is given.
            toml: Some(("host.toml".into(), "[plugin_judge]\ntimeout_ms = 9000\n".into())),
            env: vec![("LATHE_PLUGIN_SCORER_MEMORY_MB".into(), "128".into()), ("LATHE_PLUGIN_SCORER_MAX_COMPONENT_MB".into(), "48".into())],
            ..Layers::default()
        };
        let c = plugin_runtime_config(&layers, None).unwrap();
        let scorer = c.limits_for(lathe_sandbox::Kind::Scorer);
        assert_eq!((scorer.memory_bytes, scorer.max_component_bytes), (128 << 20, 48 << 20));
        assert_eq!(c.limits_for(lathe_sandbox::Kind::Judge).timeout, std::time::Duration::from_secs(9));
        let validator = c.limits_for(lathe_sandbox::Kind::Validator);
        assert_eq!(validator.memory_bytes, lathe_sandbox::Limits::default().memory_bytes);
        assert_eq!(c.max_upload_bytes(), 48 << 20);

        let bad = Layers { env: vec![("LATHE_PLUGIN_VALIDATOR_MEMORY".into(), "1".into())], ..Layers::default() };
        let e = plugin_runtime_config(&bad, None).unwrap_err().to_string();
        assert!(e.contains("LATHE_PLUGIN_VALIDATOR_") && e.contains("`memory`"), "{e}");
    }

    #[test]
    fn defaults_are_the_workflows() {
        let s = TrainSettings::default();
        assert_eq!((s.rank, s.alpha, s.dropout, s.learning_rate, s.epochs, s.patience), (16, 32.0, 0.1, 1e-4, 3, 2));
        assert!(s.config().is_ok());
    }

    /// Gradient checkpointing reaches the engine, over a full-precision base as under QLoRA,
    /// and names a run folder only when it is on (folders named before it existed keep
    /// their names).
    #[test]
    fn gradient_checkpointing_recomputes_layers_and_is_named_only_when_on() {
        let off = TrainSettings::default();
        assert!(!off.config().unwrap().recompute_layers());
        assert!(!serde_json::to_string(&off).unwrap().contains("gradient_checkpointing"));
        let layers = Layers { env: vec![("LATHE_TRAIN_GRADIENT_CHECKPOINTING".into(), "true".into())], ..Layers::default() };
        let on: TrainSettings = layers.resolve("train").unwrap();
        let c = on.config().unwrap();
        assert!(c.gradient_checkpointing && !c.qlora && c.recompute_layers());
        assert!(serde_json::to_string(&on).unwrap().contains("\"gradient_checkpointing\":true"));
        // bf16 too is a setting a layer can turn on, not only a field.
        let layers = Layers { toml: Some(("lathe.toml".into(), "[train]\nbf16 = true\n".into())), ..Layers::default() };
        assert!(layers.resolve::<TrainSettings>("train").unwrap().config().unwrap().bf16);
        let bad = Layers { env: vec![("LATHE_TRAIN_BF16".into(), "maybe".into())], ..Layers::default() };
        let e = bad.resolve::<TrainSettings>("train").unwrap_err().to_string();
        assert!(e.contains("`bf16`") && !e.contains("unknown setting"), "{e}");
        let qlora = TrainSettings { qlora: true, ..TrainSettings::default() };
        assert!(qlora.config().unwrap().recompute_layers());
    }
}
