//! Model configuration: a serde mirror of Hugging Face `config.json` (every field optional
//! where Hugging Face has a default) and the plain, normalized [`ModelConfig`] the model
//! code uses. GGUF metadata normalizes to the same type.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    #[serde(rename = "LlamaForCausalLM")]
    Llama,
    #[serde(rename = "MistralForCausalLM")]
    Mistral,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
        }
    }

    fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
        }
    }
}

/// How rotary frequencies are adjusted for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (Hugging Face `"linear"`).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors, as GGUF stores them (`rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// The normalized configuration the model code reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Mistral: each token attends to at most this many previous tokens (itself included).
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Rotary inverse frequencies (`head_dim / 2` of them) after scaling.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(div) => base
                .iter()
                .zip(div)
                .map(|(f, d)| f / f64::from(*d))
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Every weight tensor of the model, by Hugging Face name, with its `[out, in]` shape.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv, ff) = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        );
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for i in 0..self.num_layers {
            let p = format!("model.layers.{i}");
            out.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.mlp.gate_proj.weight"), vec![ff, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![ff, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, ff]),
            ]);
        }
        out.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        out
    }

    fn check(self, source: &Path) -> Result<Self> {
        let bad = |field: &str, detail: String| EngineError::Unsupported {
            path: source.into(),
            field: field.into(),
            detail,
        };
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} query heads cannot be grouped over {} key/value heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", format!("{} is not a positive even number", self.head_dim)));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
        ] {
            if v == 0 {
                return Err(bad(name, "must be positive".into()));
            }
        }
        Ok(self)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::Malformed {
            path: path.into(),
            format: "config.json",
            detail: e.to_string(),
        })?;
        hf.into_config(path)
    }

    /// Reads the `{arch}.*` keys of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let arch_name = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| EngineError::Missing {
                path: path.into(),
                field: "general.architecture".into(),
            })?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            other => {
                return Err(EngineError::Unsupported {
                    path: path.into(),
                    field: "general.architecture".into(),
                    detail: format!("`{other}`; Lathe runs `llama` and `mistral`"),
                });
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| -> Result<usize> {
            let full = key(k);
            g.get(&full)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or(EngineError::Missing {
                    path: path.into(),
                    field: full,
                })
        };
        let opt_f = |k: &str| g.get(&key(k)).and_then(|v| v.as_f64());
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or(EngineError::Missing {
                    path: path.into(),
                    field: key("vocab_size"),
                })?,
        };
        let rope_scaling = if let Some(info) = g.tensor_info("rope_freqs.weight") {
            let (_, f) = g.tensor_f32(&info.name.clone())?;
            RopeScaling::Factors(f)
        } else {
            match g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
                None | Some("none") => RopeScaling::None,
                Some("linear") => RopeScaling::Linear {
                    factor: opt_f("rope.scaling.factor").unwrap_or(1.0),
                },
                Some(other) => {
                    return Err(EngineError::Unsupported {
                        path: path.into(),
                        field: key("rope.scaling.type"),
                        detail: format!("`{other}`; Lathe supports none, linear and llama3 factors"),
                    });
                }
            }
        };
        ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
            head_dim: int("attention.key_length")
                .or_else(|_| int("rope.dimension_count"))
                .unwrap_or(hidden_size / num_heads.max(1)),
            max_position_embeddings: int("context_length").unwrap_or(4096),
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: opt_f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: g.tensor_info("output.weight").is_none(),
            sliding_window: int("attention.sliding_window").ok(),
        }
        .check(path)
    }

    /// The Hugging Face `config.json` for this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = w.into();
        }
        match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Factors(_) => {}
            RopeScaling::Linear { factor } => {
                v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                v["rope_scaling"] = serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                })
            }
        }
        v
    }
}

/// Hugging Face `config.json`, as Llama and Mistral checkpoints write it.
#[derive(Debug, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: String,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

impl HfConfig {
    fn into_config(self, path: &Path) -> Result<ModelConfig> {
        let unsupported = |field: &str, detail: String| EngineError::Unsupported {
            path: path.into(),
            field: field.into(),
            detail,
        };
        let arch_name = self
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| match self.model_type.as_deref() {
                Some("llama") => Some("LlamaForCausalLM".into()),
                Some("mistral") => Some("MistralForCausalLM".into()),
                _ => None,
            })
            .ok_or_else(|| EngineError::Missing {
                path: path.into(),
                field: "architectures".into(),
            })?;
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            other => {
                return Err(unsupported(
                    "architectures",
                    format!("`{other}`; Lathe runs LlamaForCausalLM and MistralForCausalLM"),
                ));
            }
        };
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(unsupported("hidden_act", format!("`{act}`; Llama and Mistral use silu")));
        }
        if self.attention_bias == Some(true) || self.mlp_bias == Some(true) {
            return Err(unsupported(
                "attention_bias",
                "projections with biases are not supported".into(),
            ));
        }
        let max_pos = self.max_position_embeddings.unwrap_or(2048);
        let rope_scaling = match self.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_str() {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: s.factor.unwrap_or(1.0),
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                },
                other => {
                    return Err(unsupported(
                        "rope_scaling.rope_type",
                        format!("`{other}`; Lathe supports default, linear and llama3"),
                    ));
                }
            },
        };
        ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            max_position_embeddings: max_pos,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            sliding_window: match architecture {
                Architecture::Mistral => self.sliding_window,
                Architecture::Llama => None,
            },
        }
        .check(path)
    }
}
