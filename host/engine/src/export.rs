//! Writing models: Hugging Face folders (config.json, model.safetensors, tokenizer files)
//! and GGUF files that llama.cpp loads (llama.cpp names, interleaved q/k rows).

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::gguf::{GgmlType, GgufWriter, Value};
use crate::tokenizer::Tokenizer;
use crate::weights::{HostTensor, WeightSource, gguf_name, permute_qk_rows, qk_heads};

/// Weights held in memory, by Hugging Face name.
#[derive(Debug, Clone, Default)]
pub struct MemoryWeights {
    pub tensors: BTreeMap<String, HostTensor>,
    pub origin: std::path::PathBuf,
}

impl WeightSource for MemoryWeights {
    fn get(&self, name: &str) -> Result<Option<HostTensor>> {
        Ok(self.tensors.get(name).cloned())
    }

    fn origin(&self) -> &Path {
        &self.origin
    }
}

/// Writes `config.json`, the tokenizer files and `model.safetensors` (f32) into `dir`.
pub fn write_hf_folder(dir: &Path, config: &ModelConfig, weights: &MemoryWeights, tokenizer: &Tokenizer) -> Result<()> {
    write_hf_shape(dir, config, tokenizer)?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors_f32(&weights.tensors, Some(meta)).map_err(|detail| EngineError::Malformed {
        path: dir.join("model.safetensors"),
        format: "safetensors",
        detail,
    })?;
    crate::error::write_atomic(&dir.join("model.safetensors"), &st)
}

/// Writes `config.json` and the tokenizer files into `dir`: everything of a Hugging Face
/// folder but its weights.
pub fn write_hf_shape(dir: &Path, config: &ModelConfig, tokenizer: &Tokenizer) -> Result<()> {
    if matches!(config.rope_scaling, RopeScaling::Factors(_)) {
        // config.json has no way to say "these per-frequency divisors".
        return Err(EngineError::Unsupported {
            path: dir.into(),
            field: "rope_scaling".into(),
            detail: "the model's RoPE scaling came from a GGUF `rope_freqs` tensor, which config.json cannot express; export GGUF instead".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let cfg = serde_json::to_string_pretty(&config.to_hf_json()).expect("JSON value serializes");
    crate::error::write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
    tokenizer.write_hf_files(dir)
}

/// Serializes f32 tensors as a safetensors file.
pub fn safetensors_f32(
    tensors: &BTreeMap<String, HostTensor>,
    meta: Option<std::collections::HashMap<String, String>>,
) -> std::result::Result<Vec<u8>, String> {
    let bytes: BTreeMap<&str, (Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            (k.as_str(), (shape.clone(), data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, (shape, data))| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (*k, v))
                .map_err(|e| e.to_string())
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    safetensors::serialize(views, meta).map_err(|e| e.to_string())
}

/// The type llama.cpp's Q4_K_M gives the 2-D weight `name` (Hugging Face naming): Q6_K for
/// the output head (the embedding, when tied) and, in the first and last eighth of the
/// layers and every third one between, for the value and down projections; Q4_K elsewhere.
pub fn q4_k_m_type(name: &str, config: &ModelConfig) -> GgmlType {
    let n = config.num_layers;
    let more_bits = |i: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
    let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()?.parse::<usize>().ok());
    let head = name == "lm_head.weight" || (config.tie_word_embeddings && name == "model.embed_tokens.weight");
    let widened = matches!(layer, Some(i) if more_bits(i)) && (name.ends_with("self_attn.v_proj.weight") || name.ends_with("mlp.down_proj.weight"));
    if head || widened { GgmlType::Q6_K } else { GgmlType::Q4_K }
}

/// Writes a GGUF file: architecture metadata, `tokenizer_meta` (the `tokenizer.*` keys),
/// and the weights, 2-D projections as `matrix_type`, norms as F32. `Q4_K` writes
/// llama.cpp's Q4_K_M mix ([`q4_k_m_type`]).
pub fn write_gguf(
    path: &Path,
    config: &ModelConfig,
    weights: &MemoryWeights,
    tokenizer_meta: &[(String, Value)],
    matrix_type: GgmlType,
) -> Result<()> {
    let arch = match config.architecture {
        Architecture::Llama => "llama",
        Architecture::Mistral => "mistral",
    };
    let mut w = GgufWriter::new();
    let u = |v: usize| Value::U32(v as u32);
    w.meta("general.architecture", Value::String(arch.into()))
        .meta("general.alignment", Value::U32(32))
        .meta(format!("{arch}.block_count"), u(config.num_layers))
        .meta(format!("{arch}.context_length"), u(config.max_position_embeddings))
        .meta(format!("{arch}.embedding_length"), u(config.hidden_size))
        .meta(format!("{arch}.feed_forward_length"), u(config.intermediate_size))
        .meta(format!("{arch}.attention.head_count"), u(config.num_heads))
        .meta(format!("{arch}.attention.head_count_kv"), u(config.num_kv_heads))
        .meta(format!("{arch}.attention.key_length"), u(config.head_dim))
        .meta(format!("{arch}.attention.value_length"), u(config.head_dim))
        .meta(format!("{arch}.rope.dimension_count"), u(config.head_dim))
        .meta(format!("{arch}.rope.freq_base"), Value::F32(config.rope_theta as f32))
        .meta(
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        )
        .meta(format!("{arch}.vocab_size"), u(config.vocab_size));
    if let Some(win) = config.sliding_window {
        w.meta(format!("{arch}.attention.sliding_window"), u(win));
    }
    if let RopeScaling::Linear { factor } = config.rope_scaling {
        w.meta(format!("{arch}.rope.scaling.type"), Value::String("linear".into()))
            .meta(format!("{arch}.rope.scaling.factor"), Value::F32(factor as f32));
    }
    for (k, v) in tokenizer_meta {
        w.meta(k.clone(), v.clone());
    }
    if !matches!(config.rope_scaling, RopeScaling::None | RopeScaling::Linear { .. }) {
        // llama.cpp takes per-frequency divisors as a tensor.
        let base = ModelConfig {
            rope_scaling: RopeScaling::None,
            ..config.clone()
        }
        .rope_inv_freq();
        let divisors: Vec<f32> = base
            .iter()
            .zip(config.rope_inv_freq())
            .map(|(b, s)| (b / s) as f32)
            .collect();
        w.tensor("rope_freqs.weight", &[divisors.len()], GgmlType::F32, &divisors);
    }
    for (name, _) in config.tensor_shapes() {
        let (shape, data) = weights.require(&name)?;
        let gname = gguf_name(&name).expect("every model tensor has a llama.cpp name");
        let data = match qk_heads(&name, config) {
            Some(h) => permute_qk_rows(&data, shape[0], h, false),
            None => data,
        };
        let ty = match (shape.len(), matrix_type) {
            (2, GgmlType::Q4_K) => q4_k_m_type(&name, config),
            (2, ty) => ty,
            _ => GgmlType::F32,
        };
        // A K-quant needs rows of whole 256-value blocks; llama.cpp falls back to a 32-value
        // type where they are not.
        let ty = match ty {
            GgmlType::Q4_K | GgmlType::Q6_K if !shape[1].is_multiple_of(256) => GgmlType::Q8_0,
            ty => ty,
        };
        w.tensor(gname, &shape, ty, &data);
    }
    w.write(path)
}
