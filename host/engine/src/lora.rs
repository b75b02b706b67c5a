//! LoRA adapters: `y = x·W + s·dropout(x)·A·B` on any subset of a decoder layer's seven
//! projections, with the base `W` frozen.
//!
//! `A` is `[in, rank]` and `B` is `[rank, out]` (burn's `x·W` orientation; PEFT stores the
//! transposes). `A` starts uniform in ±1/√in and `B` at zero, as PEFT initialises them, so
//! a fresh adapter leaves the model unchanged. The scale `s` is `alpha / rank`, or
//! `alpha / √rank` with rsLoRA.
//!
//! Adapters are saved in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`
//! with PEFT's key names) and can be merged into the base weights for export.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::export::MemoryWeights;
use crate::model::CausalLm;

/// A projection inside a decoder layer that an adapter can wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The module name as Hugging Face and PEFT spell it (`q_proj`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The path inside a decoder layer (`self_attn.q_proj`).
    pub fn path(self) -> String {
        let block = match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            _ => "mlp",
        };
        format!("{block}.{}", self.name())
    }

    /// `(in, out)` features of the projection.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (h, q, kv, m) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        match self {
            Self::Q => (h, q),
            Self::K | Self::V => (h, kv),
            Self::O => (q, h),
            Self::Gate | Self::Up => (h, m),
            Self::Down => (m, h),
        }
    }

    /// Parses `q`, `q_proj` or `self_attn.q_proj`; `all` is handled by [`parse_targets`].
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.rsplit('.').next().unwrap_or(s);
        let s = s.strip_suffix("_proj").unwrap_or(s);
        Some(match s {
            "q" => Self::Q,
            "k" => Self::K,
            "v" => Self::V,
            "o" => Self::O,
            "gate" => Self::Gate,
            "up" => Self::Up,
            "down" => Self::Down,
            _ => return None,
        })
    }
}

/// Parses a comma-separated target list (`q,v`, `all`, `all-linear`).
pub fn parse_targets(list: &str) -> std::result::Result<Vec<Target>, String> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "all" || part == "all-linear" {
            out.extend(Target::ALL);
            continue;
        }
        out.push(Target::parse(part).ok_or_else(|| {
            format!("unknown LoRA target `{part}` (expected q, k, v, o, gate, up, down or all)")
        })?);
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err("no LoRA targets given".into());
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// Scale by `alpha / √rank` instead of `alpha / rank` (rank-stabilised LoRA).
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.1,
            targets: Target::ALL.to_vec(),
            rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// One adapted projection's factors.
#[derive(Debug)]
pub struct LoraPair {
    /// `[in, rank]`
    pub a: Tensor<2>,
    /// `[rank, out]`
    pub b: Tensor<2>,
    /// `a` and `b` on the host, copied by the first host forward pass (serving) that needs
    /// them. A clone starts without, and [`Adapter::params_mut`] drops them: change the
    /// factors of an adapter that served only through it.
    host: std::sync::OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl LoraPair {
    pub fn new(a: Tensor<2>, b: Tensor<2>) -> Self {
        Self { a, b, host: std::sync::OnceLock::new() }
    }

    /// `a` (`[in, rank]`) and `b` (`[rank, out]`) row-major on the host.
    pub(crate) fn host(&self) -> (&[f32], &[f32]) {
        let (a, b) = self.host.get_or_init(|| (host_vec(self.a.clone()), host_vec(self.b.clone())));
        (a, b)
    }
}

impl Clone for LoraPair {
    fn clone(&self) -> Self {
        Self::new(self.a.clone(), self.b.clone())
    }
}

/// The adapted projections of one decoder layer.
#[derive(Debug, Clone, Default)]
pub struct LayerAdapter {
    pub pairs: Vec<(Target, LoraPair)>,
}

impl LayerAdapter {
    pub fn get(&self, target: Target) -> Option<&LoraPair> {
        self.pairs.iter().find(|(t, _)| *t == target).map(|(_, p)| p)
    }
}

/// A LoRA adapter over every decoder layer of one model.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    pub layers: Vec<LayerAdapter>,
}

/// A host copy of a parameter: shape and row-major f32 values.
pub type HostParam = (Vec<usize>, Vec<f32>);

impl Adapter {
    /// A fresh adapter: `A` uniform in ±1/√in from `seed`, `B` zero.
    pub fn init(config: LoraConfig, model: &ModelConfig, seed: u64, device: &Device) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let r = config.rank;
        let layers = (0..model.num_layers)
            .map(|_| LayerAdapter {
                pairs: config
                    .targets
                    .iter()
                    .map(|&t| {
                        let (fan_in, out) = t.dims(model);
                        let bound = 1.0 / (fan_in as f32).sqrt();
                        let a: Vec<f32> = (0..fan_in * r).map(|_| rng.random_range(-bound..bound)).collect();
                        let pair = LoraPair::new(Tensor::from_data(TensorData::new(a, [fan_in, r]), device), Tensor::zeros([r, out], device));
                        (t, pair)
                    })
                    .collect(),
            })
            .collect();
        Self { config, layers }
    }

    /// Parameters by name (`layers.3.self_attn.q_proj.lora_A`), in a fixed order.
    pub fn params(&self) -> Vec<(String, &Tensor<2>)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (t, p) in &layer.pairs {
                out.push((format!("layers.{i}.{}.lora_A", t.path()), &p.a));
                out.push((format!("layers.{i}.{}.lora_B", t.path()), &p.b));
            }
        }
        out
    }

    /// Mutable parameters in the order of [`params`](Self::params).
    pub fn params_mut(&mut self) -> Vec<&mut Tensor<2>> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                l.pairs.iter_mut().flat_map(|(_, p)| {
                    p.host.take();
                    [&mut p.a, &mut p.b]
                })
            })
            .collect()
    }

    /// A copy whose weights require gradients, for a training step through burn's autodiff
    /// graph (GPUs; the CPU step is [`crate::train::host_grads`]).
    pub fn tracked(&self) -> Self {
        let mut out = self.clone();
        for p in out.params_mut() {
            *p = p.clone().inner().autodiff().require_grad();
        }
        out
    }

    /// A copy outside any autodiff graph, for inference between training steps.
    pub fn detached(&self) -> Self {
        let mut out = self.clone();
        for p in out.params_mut() {
            *p = p.clone().inner();
        }
        out
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(|(_, t)| t.dims().iter().product::<usize>()).sum()
    }

    /// Every parameter copied to the host, by name (burn orientation).
    pub fn to_host(&self) -> BTreeMap<String, HostParam> {
        self.params()
            .into_iter()
            .map(|(n, t)| (n, (t.dims().to_vec(), host_vec(t.clone()))))
            .collect()
    }

    /// Replaces every parameter with the host copy of the same name.
    pub fn load_host(&mut self, params: &BTreeMap<String, HostParam>, device: &Device) -> Result<()> {
        let names: Vec<String> = self.params().into_iter().map(|(n, _)| n).collect();
        for (name, slot) in names.iter().zip(self.params_mut()) {
            let (shape, data) = params.get(name).ok_or_else(|| EngineError::Missing {
                path: "adapter".into(),
                field: name.clone(),
            })?;
            if shape.as_slice() != slot.dims() {
                return Err(EngineError::Unsupported {
                    path: "adapter".into(),
                    field: name.clone(),
                    detail: format!("shape {shape:?}, expected {:?}", slot.dims()),
                });
            }
            *slot = Tensor::from_data(TensorData::new(data.clone(), [shape[0], shape[1]]), device);
        }
        Ok(())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` as Hugging Face PEFT
    /// lays them out (`base_model.model.model.layers.N.….lora_A.weight`, `[rank, in]`).
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let c = &self.config;
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "use_rslora": c.rslora,
            "target_modules": c.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "revision": null,
        });
        let text = serde_json::to_string_pretty(&cfg).expect("JSON serializes");
        crate::error::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;

        let mut tensors = BTreeMap::new();
        for (name, (shape, data)) in self.to_host() {
            let (rows, cols) = (shape[0], shape[1]);
            tensors.insert(format!("base_model.model.model.{name}.weight"), (vec![cols, rows], transpose(&data, rows, cols)));
        }
        let meta = [("format".to_string(), "pt".to_string())].into();
        let bytes = crate::export::safetensors_f32(&tensors, Some(meta)).map_err(|e| EngineError::Malformed {
            path: dir.join("adapter_model.safetensors"),
            format: "safetensors",
            detail: e,
        })?;
        crate::error::write_atomic(&dir.join("adapter_model.safetensors"), &bytes)
    }

    /// Reads an adapter written by [`save_peft`](Self::save_peft) or by Hugging Face peft.
    pub fn load_peft(dir: &Path, model: &ModelConfig, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
        let raw: PeftConfig = serde_json::from_str(&text).map_err(|e| EngineError::Malformed {
            path: cfg_path.clone(),
            format: "adapter_config.json",
            detail: e.to_string(),
        })?;
        if raw.peft_type != "LORA" {
            return Err(EngineError::Unsupported {
                path: cfg_path,
                field: "peft_type".into(),
                detail: format!("`{}`; only LORA adapters are supported", raw.peft_type),
            });
        }
        let targets = raw
            .target_modules
            .iter()
            .map(|m| {
                Target::parse(m).ok_or_else(|| EngineError::Unsupported {
                    path: cfg_path.clone(),
                    field: "target_modules".into(),
                    detail: format!("`{m}` is not a Llama/Mistral projection"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let config = LoraConfig {
            rank: raw.r,
            alpha: raw.lora_alpha,
            dropout: raw.lora_dropout,
            targets,
            rslora: raw.use_rslora,
        };
        let st_path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&st_path).map_err(|e| EngineError::io(&st_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| EngineError::Malformed {
            path: st_path.clone(),
            format: "safetensors",
            detail: e.to_string(),
        })?;
        let mut adapter = Self::init(config, model, 0, device);
        let mut params = BTreeMap::new();
        for (name, _) in adapter.params() {
            let key = format!("base_model.model.model.{name}.weight");
            let view = st.tensor(&key).map_err(|_| EngineError::Missing {
                path: st_path.clone(),
                field: key.clone(),
            })?;
            let data = crate::weights::view_to_f32(&view, &st_path, &key)?;
            let shape = view.shape();
            if shape.len() != 2 {
                return Err(EngineError::Unsupported {
                    path: st_path,
                    field: key,
                    detail: format!("shape {shape:?} is not a matrix"),
                });
            }
            let (rows, cols) = (shape[0], shape[1]);
            params.insert(name, (vec![cols, rows], transpose(&data, rows, cols)));
        }
        adapter.load_host(&params, device)?;
        Ok(adapter)
    }

    /// The base model's weights with this adapter folded in (`W + s·(A·B)ᵀ` in Hugging
    /// Face's `[out, in]` layout), ready for [`crate::export`].
    pub fn merge(&self, model: &CausalLm) -> MemoryWeights {
        let mut weights = model.to_memory_weights();
        let s = self.config.scale() as f32;
        for (i, layer) in self.layers.iter().enumerate() {
            for (t, pair) in &layer.pairs {
                let name = format!("model.layers.{i}.{}.weight", t.path());
                let delta = host_vec(pair.a.clone().matmul(pair.b.clone()).transpose());
                let (_, w) = weights.tensors.get_mut(&name).expect("every projection is exported");
                for (w, d) in w.iter_mut().zip(delta) {
                    *w += s * d;
                }
            }
        }
        weights
    }
}

#[derive(Deserialize)]
struct PeftConfig {
    peft_type: String,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    use_rslora: bool,
}

pub(crate) fn host_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.inner().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 tensor")
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}
