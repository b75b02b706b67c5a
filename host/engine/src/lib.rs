//! Lathe's model engine: Llama and Mistral decoders in burn, weights from GGUF files or
//! Hugging Face folders, tokenizers and chat templates, and batched generation.
//!
//! It knows nothing of HTTP, SQL or WebAssembly: the CLI, the jobs and the server use it
//! as a plain library.

pub mod config;
pub mod device;
pub mod export;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod model;
pub mod parity;
pub mod quant;
pub mod team;
pub mod tiny;
pub mod tokenizer;
pub mod train;
pub mod weights;

use std::path::{Path, PathBuf};

pub use burn::tensor::Device;
pub use config::{Architecture, ModelConfig};
pub use error::{EngineError, Result};
pub use generate::{FinishReason, Generation, SamplingParams, generate};
pub use lora::{Adapter, LoraConfig, Target};
pub use model::paged::{KvPool, SeqCache, SeqStep};
pub use model::{CausalLm, KvCache, Logits, Step};
pub use tokenizer::{Message, Tokenizer};
pub use train::{TrainConfig, Trainer};

/// The format a model was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gguf,
    HuggingFace,
}

/// A model ready to run: weights on a device, tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub source: PathBuf,
    pub format: Format,
}

/// Loads a `.gguf` file or a Hugging Face folder (`config.json`, `*.safetensors`,
/// `tokenizer.json`). Quantized weights keep f32 copies beside their blocks up to
/// [`model::dense_copy_limit`]: training reads them.
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_within(path, device, model::dense_copy_limit(), false)
}

/// [`load`] for training over a bf16 base: each frozen projection (and the head) is stored
/// in bf16 as soon as it is read, as [`CausalLm::bf16_base`] stores them after [`load`]
/// (the same bits), so loading never holds the whole model in f32. A 7B model's f32
/// projections take 26 GB, more than a 24 GB machine has; in bf16 they take 13.
pub fn load_bf16_base(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_within(path, device, model::dense_copy_limit(), true)
}

/// The loader for a training run's frozen base: over a bf16 base alone its projections
/// go to bf16 as they load ([`load_bf16_base`]); QLoRA quantizes f32 weights, so it
/// loads them f32 ([`load`]), as f32 training does. [`CausalLm::training_base`] then
/// readies what was loaded.
pub fn training_loader(qlora: bool, bf16: bool) -> fn(&Path, &Device) -> Result<LoadedModel> {
    if bf16 && !qlora { load_bf16_base } else { load }
}

/// [`load`] for inference alone: on the CPU, weights that come in quantized blocks keep
/// the blocks alone, so resident memory stays near the file's size (SmolLM2 Q4_1: 152 MiB
/// instead of 662). Decoding multiplies from the blocks either way, and a prompt goes
/// through panels expanded per step as fast as through the copies (BENCHMARKS.md).
pub fn load_blocks(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_within(path, device, 0, false)
}

fn load_within(path: &Path, device: &Device, dense_limit: usize, bf16: bool) -> Result<LoadedModel> {
    let (config, tokenizer) = load_shape(path)?;
    let (model, format) = if path.is_dir() {
        let weights = weights::SafetensorsWeights::open(path)?;
        (CausalLm::load_within(config, &weights, device, dense_limit, bf16)?, Format::HuggingFace)
    } else {
        let file = gguf::GgufFile::open(path)?;
        let weights = weights::GgufWeights {
            file: &file,
            config: &config,
        };
        (CausalLm::load_within(config.clone(), &weights, device, dense_limit, bf16)?, Format::Gguf)
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        source: path.into(),
        format,
    })
}

/// The configuration and tokenizer of a `.gguf` file or a Hugging Face folder, without
/// reading its weights.
pub fn load_shape(path: &Path) -> Result<(ModelConfig, Tokenizer)> {
    let meta = std::fs::metadata(path).map_err(|e| EngineError::io(path, e))?;
    if meta.is_dir() {
        Ok((ModelConfig::from_hf_file(&path.join("config.json"))?, Tokenizer::from_hf_folder(path)?))
    } else {
        let file = gguf::GgufFile::open(path)?;
        Ok((ModelConfig::from_gguf(&file)?, Tokenizer::from_gguf(&file)?))
    }
}
