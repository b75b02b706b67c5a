//! Training pipelines: a LoRA/QLoRA run (or a learning-rate sweep) on a training version,
//! watched by an eval suite, and exports of its adapter.

use std::path::PathBuf;

use lathe_engine::gguf::{GgmlType, GgufFile};
use lathe_engine::train::TrainOutcome;
use lathe_engine::{Adapter, LoadedModel};
use serde::{Deserialize, Serialize};

use crate::env::{Env, model_sha256};
use crate::error::{JobError, Result};
use crate::eval::{self, Plugins, Suite};
use crate::event::Sink;
use crate::finetune::{self, SweepPoint};
use crate::settings::TrainSettings;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// The base model: a GGUF file or a Hugging Face folder.
    pub model: PathBuf,
    /// The training version (id or name).
    pub data: String,
    /// The eval suite: its template shapes the training examples and its primary metric
    /// drives early stopping. Lathe does not train without one.
    pub suite: Suite,
    /// Which of the suite's templates to train with (default: the first).
    #[serde(default)]
    pub template: Option<String>,
    /// Output folder (checkpoints, metrics.jsonl, best/ and last/). Default:
    /// `runs/<data version>-<settings hash>` under the environment.
    #[serde(default)]
    pub out: Option<PathBuf>,
    #[serde(default)]
    pub settings: TrainSettings,
    /// Continue from the latest checkpoint in `out`.
    #[serde(default)]
    pub resume: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainJobOutcome {
    pub out_dir: PathBuf,
    /// The winning run's best adapter (PEFT folder).
    pub adapter_dir: PathBuf,
    pub points: Vec<SweepPoint>,
    pub winner: usize,
    pub runs: Vec<TrainOutcome>,
    pub dataset: String,
}

impl TrainJobOutcome {
    pub fn best(&self) -> &TrainOutcome {
        &self.runs[self.winner]
    }
}

/// Loads what a training run needs: the model (its own copy for QLoRA, which quantizes
/// it), the items, the plugins.
pub fn train(env: &Env, spec: &TrainSpec, sink: &dyn Sink) -> Result<TrainJobOutcome> {
    let config = spec.settings.config()?;
    spec.suite.check()?;
    let template = spec.suite.template(spec.template.as_deref())?;
    let store = env.datasets()?;
    let data_id = store.resolve(&spec.data)?;
    let items = eval::train_items(&store, &data_id)?;
    let (train_items, validation) = finetune::validation_split(&items, spec.settings.validation_fraction, 8);
    let plugins = Plugins::load(env, &spec.suite)?;

    let owned;
    let shared;
    let m: &LoadedModel = if config.qlora || config.bf16 {
        let mut m = env.load_model_by(&spec.model, lathe_engine::training_loader(config.qlora, config.bf16))?;
        let freed = m.model.training_base(config.qlora, config.bf16)?;
        if config.qlora {
            sink.info(format!("QLoRA: the frozen projections are 4-bit blocks; {:.0} MiB of f32 copies dropped", freed as f64 / (1 << 20) as f64));
        }
        if config.bf16 {
            let kept = if config.qlora {
                "the 4-bit blocks expanded to bf16 for each product".to_string()
            } else {
                format!("{:.1} MiB of projections", m.model.dense_projection_bytes() as f64 / (1 << 20) as f64)
            };
            sink.info(format!("bf16: the frozen base multiplies in bf16 ({kept}), the LoRA weights stay f32"));
        }
        owned = m;
        &owned
    } else {
        shared = env.model(&spec.model)?;
        &shared
    };
    let out_dir = match &spec.out {
        Some(o) => o.clone(),
        None => {
            let key = serde_json::to_string(&(&spec.settings, &template.name, &spec.suite.name)).expect("settings serialise");
            env.train_dir().join(format!("{}-{}", &data_id[..12], &lathe_util::sha256_hex(key.as_bytes())[..8]))
        }
    };
    let fspec = finetune::Spec {
        model: &m.model,
        tokenizer: &m.tokenizer,
        model_name: spec.model.display().to_string(),
        model_sha256: model_sha256(&spec.model)?,
        suite: &spec.suite,
        plugins: &plugins,
        template,
        config,
        dataset: data_id.clone(),
        metric_items: spec.settings.metric_items,
    };
    sink.info(format!(
        "training on {} examples ({} kept to watch the run) of {}; LoRA r{} on {} ({} parameters)",
        train_items.len(),
        validation.len(),
        &data_id[..16],
        fspec.config.lora.rank,
        spec.settings.targets,
        Adapter::init(fspec.config.lora.clone(), &m.model.config, 0, env.device()).num_params()
    ));
    let rates = spec.settings.rates();
    let (points, winner, runs) = finetune::sweep(&fspec, &rates, &train_items, &validation, &out_dir, spec.resume, sink)?;
    if points.len() > 1 {
        sink.info(format!("sweep winner: lr {:.1e}", points[winner].learning_rate));
    }
    let adapter_dir = runs[winner].adapter_dir.clone();
    sink.artifact("adapter", &adapter_dir);
    Ok(TrainJobOutcome { out_dir, adapter_dir, points, winner, runs, dataset: data_id })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    /// A copy of the adapter (adapter_config.json + adapter_model.safetensors).
    Peft,
    /// The merged model as a Hugging Face folder.
    Hf,
    /// The merged model as GGUF, for llama.cpp.
    #[serde(rename = "gguf-f16")]
    GgufF16,
    #[serde(rename = "gguf-q8_0")]
    GgufQ8_0,
    #[serde(rename = "gguf-q4_1")]
    GgufQ4_1,
    /// llama.cpp's Q4_K_M: Q4_K blocks, Q6_K for the head and some value and down
    /// projections (widths that are not whole 256-value blocks fall back to Q8_0).
    #[serde(rename = "gguf-q4_k_m")]
    GgufQ4KM,
}

impl ExportFormat {
    /// The name the CLI and the API take (`gguf-q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Peft => "peft",
            Self::Hf => "hf",
            Self::GgufF16 => "gguf-f16",
            Self::GgufQ8_0 => "gguf-q8_0",
            Self::GgufQ4_1 => "gguf-q4_1",
            Self::GgufQ4KM => "gguf-q4_k_m",
        }
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = JobError;

    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.into()))
            .map_err(|_| JobError::Invalid(format!("export format `{s}`: expected peft, hf, gguf-f16, gguf-q8_0, gguf-q4_1 or gguf-q4_k_m")))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    /// The base model the adapter was trained on.
    pub model: PathBuf,
    /// A PEFT adapter folder (`best/`, `last/` or a checkpoint).
    pub adapter: PathBuf,
    pub format: ExportFormat,
    pub out: PathBuf,
}

pub fn export(env: &Env, spec: &ExportSpec, sink: &dyn Sink) -> Result<PathBuf> {
    let m = env.model(&spec.model)?;
    let adapter = Adapter::load_peft(&spec.adapter, &m.model.config, env.device())?;
    sink.started("export", format!("export {}", spec.format.name()));
    if let Some(parent) = spec.out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| JobError::io(parent, e))?;
    }
    let gguf_type = match spec.format {
        ExportFormat::Peft => {
            adapter.save_peft(&spec.out, &spec.model.display().to_string())?;
            None
        }
        ExportFormat::Hf => {
            let merged = adapter.merge(&m.model);
            lathe_engine::export::write_hf_folder(&spec.out, &m.model.config, &merged, &m.tokenizer)?;
            None
        }
        ExportFormat::GgufF16 => Some(GgmlType::F16),
        ExportFormat::GgufQ8_0 => Some(GgmlType::Q8_0),
        ExportFormat::GgufQ4_1 => Some(GgmlType::Q4_1),
        ExportFormat::GgufQ4KM => Some(GgmlType::Q4_K),
    };
    if let Some(t) = gguf_type {
        if !spec.model.is_file() {
            return Err(JobError::Invalid(format!(
                "GGUF export copies the tokenizer from a GGUF base model; {} is a folder (export `hf` instead)",
                spec.model.display()
            )));
        }
        let base = GgufFile::open(&spec.model)?;
        let merged = adapter.merge(&m.model);
        lathe_engine::export::write_gguf(&spec.out, &m.model.config, &merged, &base.tokenizer_meta(), t)?;
    }
    sink.artifact("export", &spec.out);
    sink.finished("export", format!("{} written to {}", spec.format.name(), spec.out.display()));
    Ok(spec.out.clone())
}

/// A fine-tuning job as the OpenAI API asks for one: a training file, a base model and
/// settings. The workflow still holds: the file is imported, deduplicated and split (its
/// held-out part is kept for the suite), and the adapter trains on the training part,
/// watched by the project's eval suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FineTuneSpec {
    pub file: PathBuf,
    /// The file's name as the user knows it.
    #[serde(default)]
    pub source_name: Option<String>,
    /// The uploaded file's id, for callers that name files by id (the OpenAI API).
    #[serde(default)]
    pub training_file: Option<String>,
    pub model: PathBuf,
    pub suite: Suite,
    #[serde(default)]
    pub template: Option<String>,
    /// Share of the file held out for evaluation.
    #[serde(default = "default_heldout")]
    pub heldout: f64,
    pub out: PathBuf,
    #[serde(default)]
    pub settings: TrainSettings,
}

fn default_heldout() -> f64 {
    0.15
}

#[derive(Debug, Clone, Serialize)]
pub struct FineTuneOutcome {
    pub imported: String,
    pub train_version: String,
    pub heldout_version: String,
    #[serde(flatten)]
    pub train: TrainJobOutcome,
}

pub fn fine_tune(env: &Env, spec: &FineTuneSpec, sink: &dyn Sink) -> Result<FineTuneOutcome> {
    use super::data::{CurateSpec, ImportSpec, SplitSpec};
    let imported = super::data::import(env, &ImportSpec { file: spec.file.clone(), source_name: spec.source_name.clone(), ..ImportSpec::default() }, sink)?;
    let curated = super::data::curate(env, &CurateSpec { version: imported.version.clone(), dedupe: true, ..CurateSpec::default() }, sink)?;
    let split = super::data::split(
        env,
        &SplitSpec { version: curated.version, heldout: spec.heldout, seed: spec.settings.seed, stratify: true, name: None },
        sink,
    )?;
    let train = train(
        env,
        &TrainSpec {
            model: spec.model.clone(),
            data: split.train.clone(),
            suite: spec.suite.clone(),
            template: spec.template.clone(),
            out: Some(spec.out.clone()),
            settings: spec.settings.clone(),
            resume: true,
        },
        sink,
    )?;
    Ok(FineTuneOutcome { imported: imported.version, train_version: split.train, heldout_version: split.heldout, train })
}
