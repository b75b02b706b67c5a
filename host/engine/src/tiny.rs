//! Tiny random Llama and Mistral models, written by the code itself, for fast tests that
//! exercise the real loading paths (GGUF and Hugging Face folders) without a download.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::Result;
use crate::export::{MemoryWeights, write_gguf, write_hf_folder};
use crate::gguf::{GgmlType, GgufFile, Value};
use crate::tokenizer::Tokenizer;

pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const MERGES: [(&str, &str); 4] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")];

/// GPT-2's reversible byte → printable character map, in byte order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// The `tokenizer.*` GGUF keys of the tiny byte-level BPE: 3 special tokens, 256 bytes,
/// and a handful of merges.
pub fn tokenizer_meta() -> Vec<(String, Value)> {
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_chars().into_iter().map(String::from));
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < SPECIAL_TOKENS.len() { 3 } else { 1 }))
        .collect();
    let s = |v: &str| Value::String(v.into());
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(MERGES.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), s(CHATML_TEMPLATE)),
    ]
}

pub fn tiny_vocab_size() -> usize {
    SPECIAL_TOKENS.len() + 256 + MERGES.len()
}

/// A tiny configuration: 2 layers, hidden 64, 4 query heads over 2 KV heads.
pub fn tiny_config(architecture: Architecture) -> ModelConfig {
    ModelConfig {
        architecture,
        vocab_size: tiny_vocab_size(),
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        max_position_embeddings: 512,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: match architecture {
            Architecture::Llama => RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            },
            Architecture::Mistral => RopeScaling::None,
        },
        tie_word_embeddings: architecture == Architecture::Llama,
        sliding_window: (architecture == Architecture::Mistral).then_some(8),
    }
}

/// Random weights for `config`: projections ~ U(-0.15, 0.15), norms near 1.
pub fn random_weights(config: &ModelConfig, seed: u64) -> MemoryWeights {
    random_weights_within(config, seed, 0.15)
}

/// Random weights for `config`: projections ~ U(-bound, bound), norms near 1.
fn random_weights_within(config: &ModelConfig, seed: u64, bound: f32) -> MemoryWeights {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = MemoryWeights::default();
    for (name, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 1 {
            (0..n).map(|_| 1.0 + rng.random_range(-0.1..0.1)).collect()
        } else {
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        w.tensors.insert(name, (shape, data));
    }
    w
}

/// Writes a Hugging Face folder (`config.json`, `model.safetensors`, tokenizer) of
/// `config`'s shape with random weights scaled like a fresh checkpoint: uniform with standard
/// deviation 0.02 (Hugging Face's `initializer_range`), so activations stay finite through
/// many layers. For benchmarks and device checks at sizes no fixture has.
pub fn write_synthetic(dir: &Path, config: &ModelConfig, tokenizer: &Tokenizer, seed: u64) -> Result<()> {
    write_hf_folder(dir, config, &synthetic_weights(config, seed), tokenizer)
}

/// The weights [`write_synthetic`] writes: uniform with standard deviation 0.02.
pub fn synthetic_weights(config: &ModelConfig, seed: u64) -> MemoryWeights {
    random_weights_within(config, seed, 0.02 * 3f32.sqrt())
}

/// Paths of one tiny model written in both formats.
pub struct TinyModel {
    pub config: ModelConfig,
    pub weights: MemoryWeights,
    pub gguf: std::path::PathBuf,
    pub hf_folder: std::path::PathBuf,
}

/// Writes a tiny random model into `dir` as `model.gguf` (f32) and `hf/`.
pub fn write_tiny(dir: &Path, architecture: Architecture, seed: u64) -> Result<TinyModel> {
    let config = tiny_config(architecture);
    let weights = random_weights(&config, seed);
    std::fs::create_dir_all(dir).map_err(|e| crate::error::EngineError::io(dir, e))?;
    let gguf = dir.join("model.gguf");
    write_gguf(&gguf, &config, &weights, &tokenizer_meta(), GgmlType::F32)?;
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&gguf)?)?;
    let hf_folder = dir.join("hf");
    write_hf_folder(&hf_folder, &config, &weights, &tokenizer)?;
    Ok(TinyModel {
        config,
        weights,
        gguf,
        hf_folder,
    })
}

/// A LoRA adapter over every projection whose matrices are all nonzero, so that it
/// visibly changes what the model computes: for tests and benchmarks of serving through
/// adapters.
pub fn random_adapter(config: &ModelConfig, rank: usize, seed: u64, device: &crate::Device) -> crate::Adapter {
    let lora = crate::LoraConfig {
        rank,
        ..crate::LoraConfig::default()
    };
    let mut a = crate::Adapter::init(lora, config, seed, device);
    let mut rng = StdRng::seed_from_u64(seed);
    for p in a.params_mut() {
        let dims = p.dims();
        let vals: Vec<f32> = (0..dims[0] * dims[1]).map(|_| rng.random_range(-0.1..0.1)).collect();
        *p = burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(vals, dims), device);
    }
    a
}
