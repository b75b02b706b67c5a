//! Where a model's weights come from. Both sources answer by Hugging Face tensor name
//! (`model.layers.3.self_attn.q_proj.weight`) with the Hugging Face layout (`[out, in]`),
//! as f32, so the model code has one loading path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::quant::QMatrix;

/// A tensor as f32 values with its shape (outermost first).
pub type HostTensor = (Vec<usize>, Vec<f32>);

pub trait WeightSource {
    /// The tensor named `name`, or `Ok(None)` when the source has no such tensor.
    fn get(&self, name: &str) -> Result<Option<HostTensor>>;
    /// Where the weights live, for error messages.
    fn origin(&self) -> &Path;

    /// The tensor in its quantized blocks, when the source stores it in a format the
    /// quantized CPU kernel reads (see [`QMatrix`]).
    fn packed(&self, _name: &str) -> Result<Option<QMatrix>> {
        Ok(None)
    }

    fn require(&self, name: &str) -> Result<HostTensor> {
        self.get(name)?.ok_or_else(|| EngineError::Missing {
            path: self.origin().into(),
            field: format!("tensor `{name}`"),
        })
    }
}

/// The llama.cpp name of a Hugging Face Llama/Mistral tensor.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let suffix = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{suffix}"))
}

/// llama.cpp stores the query and key projections with each head's rows interleaved
/// (pairs `(i, i + d/2)` adjacent) for its rotary kernel. `to_hf = true` undoes that, so
/// the model can use Hugging Face's rotate-half rotary embedding; `false` applies it.
/// Rows are `data.len() / rows` elements long (values, or bytes of quantized blocks).
pub fn permute_qk_rows<T: Copy + Default>(data: &[T], rows: usize, heads: usize, to_hf: bool) -> Vec<T> {
    let cols = data.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..half {
            for part in 0..2 {
                let hf_row = h * head_dim + part * half + i;
                let gguf_row = h * head_dim + 2 * i + part;
                let (src, dst) = if to_hf { (gguf_row, hf_row) } else { (hf_row, gguf_row) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Weights read from a GGUF file, renamed and un-permuted to Hugging Face conventions.
pub struct GgufWeights<'a> {
    pub file: &'a GgufFile,
    pub config: &'a ModelConfig,
}

/// How many heads a tensor's rows are interleaved over in llama.cpp's layout, if any.
pub fn qk_heads(name: &str, config: &ModelConfig) -> Option<usize> {
    if name.ends_with("q_proj.weight") {
        Some(config.num_heads)
    } else if name.ends_with("k_proj.weight") {
        Some(config.num_kv_heads)
    } else {
        None
    }
}

impl WeightSource for GgufWeights<'_> {
    fn get(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(gname) = gguf_name(name) else {
            return Ok(None);
        };
        if self.file.tensor_info(&gname).is_none() {
            return Ok(None);
        }
        let (shape, data) = self.file.tensor_f32(&gname)?;
        let heads = qk_heads(name, self.config);
        let data = match (heads, shape.as_slice()) {
            (Some(h), &[rows, _]) => permute_qk_rows(&data, rows, h, true),
            _ => data,
        };
        Ok(Some((shape, data)))
    }

    fn origin(&self) -> &Path {
        self.file.path()
    }

    fn packed(&self, name: &str) -> Result<Option<QMatrix>> {
        let Some(info) = gguf_name(name).and_then(|g| self.file.tensor_info(&g)) else {
            return Ok(None);
        };
        let &[rows, cols] = info.shape.as_slice() else {
            return Ok(None);
        };
        let bytes = self.file.tensor_bytes(info);
        let bytes = match qk_heads(name, self.config) {
            Some(h) => std::borrow::Cow::Owned(permute_qk_rows(bytes, rows, h, true)),
            None => std::borrow::Cow::Borrowed(bytes),
        };
        Ok(QMatrix::from_ggml(info.dtype, &bytes, rows, cols))
    }
}

/// Weights read from one or more `*.safetensors` files of a Hugging Face folder.
pub struct SafetensorsWeights {
    folder: PathBuf,
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(folder: &Path) -> Result<Self> {
        let index_path = folder.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| EngineError::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::Malformed {
                path: index_path.clone(),
                format: "safetensors index",
                detail: e.to_string(),
            })?;
            let map = v["weight_map"].as_object().ok_or_else(|| EngineError::Missing {
                path: index_path.clone(),
                field: "weight_map".into(),
            })?;
            let mut names: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names
        } else {
            vec!["model.safetensors".into()]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for shard in shard_names {
            let path = folder.join(&shard);
            let file = std::fs::File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: read-only map of a model file Lathe does not modify while it is open.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| EngineError::Malformed {
                path: path.clone(),
                format: "safetensors",
                detail: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, map));
        }
        Ok(Self {
            folder: folder.into(),
            files,
            index,
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, map) = &self.files[i];
        let malformed = |detail: String| EngineError::Malformed {
            path: path.clone(),
            format: "safetensors",
            detail,
        };
        let st = SafeTensors::deserialize(map).map_err(|e| malformed(e.to_string()))?;
        let view = st.tensor(name).map_err(|e| malformed(e.to_string()))?;
        let data = view_to_f32(&view, path, name)?;
        Ok(Some((view.shape().to_vec(), data)))
    }

    fn origin(&self) -> &Path {
        &self.folder
    }
}

/// A safetensors tensor's values as f32 (from F32, F16 or BF16).
pub(crate) fn view_to_f32(view: &safetensors::tensor::TensorView<'_>, path: &Path, name: &str) -> Result<Vec<f32>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(EngineError::Unsupported {
                path: path.into(),
                field: format!("tensor `{name}` dtype"),
                detail: format!("{other:?}; Lathe reads F32, F16 and BF16"),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_permutation_round_trips() {
        let (rows, cols, heads) = (8, 3, 2);
        let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let gguf = permute_qk_rows(&data, rows, heads, false);
        assert_ne!(gguf, data);
        // Head 0, head_dim 4: HF rows [0,1 | 2,3] become GGUF rows [0,2,1,3].
        assert_eq!(&gguf[cols..2 * cols], &data[2 * cols..3 * cols]);
        assert_eq!(permute_qk_rows(&gguf, rows, heads, true), data);
    }

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(),
            Some("blk.12.ffn_down.weight")
        );
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.1.unknown.weight"), None);
    }
}
