//! Tokenization (the `tokenizers` crate) and chat templates (minijinja), from a Hugging
//! Face folder (`tokenizer.json`, `tokenizer_config.json`) or from GGUF metadata
//! (`tokenizer.ggml.*`, `tokenizer.chat_template`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, Value};

/// One chat message, as OpenAI and Hugging Face templates know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
    pub bos_token: Option<(String, u32)>,
    pub eos_token: Option<(String, u32)>,
    pub pad_token_id: Option<u32>,
    /// Every id that ends generation (the EOS token, `<|eot_id|>` and the like).
    pub stop_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab", &self.vocab_size())
            .finish()
    }
}

/// Llama 3's pre-tokenization split (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    fn err(&self, detail: impl std::fmt::Display) -> EngineError {
        EngineError::Tokenizer {
            source_name: self.source.clone(),
            detail: detail.to_string(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; `add_special` applies the model's BOS/EOS convention.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| self.err(e))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders the model's chat template as Hugging Face's `apply_chat_template` does
    /// (Jinja with `trim_blocks` and `lstrip_blocks`, `raise_exception`, Python string
    /// methods).
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            EngineError::Template(format!("{} has no chat template", self.source))
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_ref().map_or("", |t| &t.0),
            self.eos_token.as_ref().map_or("", |t| &t.0),
        )
    }

    /// The ids of a chat, rendered by the template and tokenized without adding special
    /// tokens (the template writes them).
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// The tokenizer as Hugging Face's `tokenizer.json` text.
    pub fn to_hf_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| self.err(e))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens)
    /// into a Hugging Face folder.
    pub fn write_hf_files(&self, folder: &Path) -> Result<()> {
        crate::error::write_atomic(&folder.join("tokenizer.json"), self.to_hf_json()?.as_bytes())?;
        let mut cfg = serde_json::json!({ "tokenizer_class": "PreTrainedTokenizerFast" });
        if let Some((t, _)) = &self.bos_token {
            cfg["bos_token"] = t.clone().into();
        }
        if let Some((t, _)) = &self.eos_token {
            cfg["eos_token"] = t.clone().into();
        }
        if let Some(t) = self.pad_token_id.and_then(|i| self.id_to_token(i)) {
            cfg["pad_token"] = t.into();
        }
        if let Some(t) = &self.chat_template {
            cfg["chat_template"] = t.clone().into();
        }
        let text = serde_json::to_string_pretty(&cfg).expect("JSON value serializes");
        crate::error::write_atomic(&folder.join("tokenizer_config.json"), text.as_bytes())
    }

    /// From a Hugging Face folder: `tokenizer.json`, plus `tokenizer_config.json` for the
    /// chat template and special tokens when present.
    pub fn from_hf_folder(folder: &Path) -> Result<Self> {
        let tj = folder.join("tokenizer.json");
        if !tj.exists() {
            return Err(EngineError::Missing {
                path: folder.into(),
                field: "tokenizer.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| EngineError::Malformed {
            path: tj.clone(),
            format: "tokenizer.json",
            detail: e.to_string(),
        })?;
        let cfg_path = folder.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| EngineError::Malformed {
                path: cfg_path.clone(),
                format: "tokenizer_config.json",
                detail: e.to_string(),
            })?
        } else {
            serde_json::Value::Null
        };
        // A token is a plain string or an AddedToken object with `content`.
        let token = |key: &str| -> Option<(String, u32)> {
            let v = &cfg[key];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            Some((s.to_string(), inner.token_to_id(s)?))
        };
        let chat_template = match &cfg["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str().map(String::from)),
            _ => {
                let jinja = folder.join("chat_template.jinja");
                std::fs::read_to_string(jinja).ok()
            }
        };
        let (bos_token, eos_token) = (token("bos_token"), token("eos_token"));
        let mut stop_ids: Vec<u32> = eos_token.iter().map(|t| t.1).collect();
        // generation_config.json may list several end-of-turn ids.
        if let Ok(text) = std::fs::read_to_string(folder.join("generation_config.json"))
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            match &v["eos_token_id"] {
                serde_json::Value::Number(n) => stop_ids.extend(n.as_u64().map(|n| n as u32)),
                serde_json::Value::Array(a) => stop_ids.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32)),
                _ => {}
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            pad_token_id: token("pad_token").map(|t| t.1),
            inner,
            source: folder.display().to_string(),
            bos_token,
            eos_token,
            stop_ids,
            chat_template,
        })
    }

    /// From GGUF metadata: a byte-level BPE (`tokenizer.ggml.model = gpt2`) with its
    /// pre-tokenizer chosen by `tokenizer.ggml.pre`, or a SentencePiece BPE (`llama`: Llama 2,
    /// Mistral) from its pieces and scores; special tokens from the token types.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let missing = |field: &str| EngineError::Missing {
            path: path.into(),
            field: field.into(),
        };
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| missing("tokenizer.ggml.model"))?;
        let strings = |key: &str| -> Result<Vec<String>> {
            g.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| missing(key))?
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| EngineError::Malformed {
                    path: path.into(),
                    format: "GGUF",
                    detail: format!("`{key}` is not an array of strings"),
                })
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let mut inner = match model {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                byte_level_bpe(g, &tokens, merges)?
            }
            "llama" => {
                let scores: Vec<f32> = g
                    .get("tokenizer.ggml.scores")
                    .and_then(Value::as_array)
                    .ok_or_else(|| missing("tokenizer.ggml.scores"))?
                    .iter()
                    .map(|v| v.as_f64().map(|f| f as f32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| EngineError::Malformed {
                        path: path.into(),
                        format: "GGUF",
                        detail: "`tokenizer.ggml.scores` is not an array of numbers".into(),
                    })?;
                let add_space_prefix = g
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                sentencepiece_bpe(path, &tokens, &scores, &types, add_space_prefix)?
            }
            other => {
                return Err(EngineError::Unsupported {
                    path: path.into(),
                    field: "tokenizer.ggml.model".into(),
                    detail: format!(
                        "`{other}`; Lathe builds byte-level BPE (`gpt2`) and SentencePiece BPE \
                         (`llama`) tokenizers from GGUF"
                    ),
                });
            }
        };
        // Control (3) and user-defined (4) tokens are matched whole in the input text.
        let added: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, 3 | 4))
            .map(|(i, t)| AddedToken::from(tokens[i].clone(), *t == 3))
            .collect();
        inner.add_special_tokens(&added);

        let id = |key: &str| g.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let named = |key: &str| id(key).and_then(|i| Some((tokens.get(i as usize)?.clone(), i)));
        let bos_token = named("tokenizer.ggml.bos_token_id");
        let eos_token = named("tokenizer.ggml.eos_token_id");
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let (true, Some((bos, bos_id))) = (add_bos, &bos_token) {
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos}:0 $A:0"))
                .and_then(|b| b.try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1")))
                .map_err(|e| EngineError::Template(e.to_string()))?
                .special_tokens(vec![(bos.clone(), *bos_id)])
                .build()
                .map_err(|e| EngineError::Template(e.to_string()))?;
            inner.with_post_processor(Some(post));
        }
        let mut stop_ids: Vec<u32> = eos_token.iter().map(|t| t.1).collect();
        stop_ids.extend(id("tokenizer.ggml.eot_token_id"));
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            inner,
            source: path.display().to_string(),
            bos_token,
            eos_token,
            pad_token_id: id("tokenizer.ggml.padding_token_id"),
            stop_ids,
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }
}

/// A byte-level BPE (GPT-2 style) tokenizer from GGUF's vocabulary and merges, with the
/// pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_bpe(g: &GgufFile, tokens: &[String], merges: Vec<String>) -> Result<tokenizers::Tokenizer> {
    let path = g.path();
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(EngineError::Malformed {
                path: path.into(),
                format: "GGUF",
                detail: format!("merge `{m}` in tokenizer.ggml.merges has no space"),
            }),
        })
        .collect::<Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| EngineError::Malformed {
            path: path.into(),
            format: "GGUF",
            detail: format!("tokenizer.ggml.tokens/merges do not form a BPE model: {e}"),
        })?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        "default" | "gpt2" | "gpt-2" => {
            inner.with_pre_tokenizer(Some(byte_level));
        }
        "smollm" | "starcoder" | "refact" => {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        }
        "llama-bpe" | "llama3" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| EngineError::Tokenizer {
                source_name: path.display().to_string(),
                detail: e.to_string(),
            })?;
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        other => {
            return Err(EngineError::Unsupported {
                path: path.into(),
                field: "tokenizer.ggml.pre".into(),
                detail: format!("pre-tokenizer `{other}`; Lathe knows default, gpt2, smollm, starcoder, llama-bpe"),
            });
        }
    }
    inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    Ok(inner)
}

/// A SentencePiece BPE tokenizer (Llama 2, Mistral) from GGUF's pieces and scores.
///
/// SentencePiece merges, at each step, the adjacent pair whose concatenation is the piece
/// with the highest score. As BPE merges that is: every split of a piece into two pieces,
/// ranked by the piece's score. Spaces become `▁` with one in front (`add_space_prefix`),
/// characters outside the vocabulary fall back to their UTF-8 bytes (`<0xNN>` pieces).
fn sentencepiece_bpe(
    path: &Path,
    tokens: &[String],
    scores: &[f32],
    types: &[u64],
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as Decoders, strip::Strip};
    use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};
    let malformed = |detail: String| EngineError::Malformed {
        path: path.into(),
        format: "GGUF",
        detail,
    };
    if scores.len() != tokens.len() {
        return Err(malformed(format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    // Normal (1) and user-defined (4) pieces take part in merges; unknown, control and byte
    // pieces do not.
    let mergeable = |i: usize| matches!(types.get(i).copied().unwrap_or(1), 1 | 4);
    let index: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().filter(|&(i, _)| mergeable(i)).map(|(i, t)| (t.as_str(), i)).collect();
    let mut ranked: Vec<(usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate().filter(|&(i, _)| mergeable(i)) {
        for (k, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (index.get(&piece[..k]), index.get(&piece[k..])) {
                ranked.push((id, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| scores[b.0].total_cmp(&scores[a.0]).then(a.cmp(b)));
    let merges = ranked.into_iter().map(|(_, l, r)| (tokens[l].clone(), tokens[r].clone())).collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let unk = types.iter().position(|&t| t == 2).map(|i| tokens[i].clone());
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk);
    }
    let bpe = bpe
        .build()
        .map_err(|e| malformed(format!("tokenizer.ggml.tokens/scores do not form a BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let to_space = Replace::new(" ", "▁").map_err(|e| malformed(e.to_string()))?;
    let mut normalizers = vec![to_space.into()];
    let mut decoders = vec![
        Replace::new("▁", " ").map_err(|e| malformed(e.to_string()))?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        normalizers.insert(0, Prepend::new("▁".into()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_normalizer(Some(Normalizers::new(normalizers)));
    inner.with_decoder(Some(Decoders::new(decoders)));
    Ok(inner)
}

/// Renders a Hugging Face chat template.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| EngineError::Template(describe(&e)))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| EngineError::Template(describe(&e)))
}

/// A minijinja error with its line, and the template's own message for `raise_exception`.
fn describe(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail(), e.line()) {
        (minijinja::ErrorKind::InvalidOperation, Some(d), _) => d.to_string(),
        (_, _, Some(line)) => format!("{e} (template line {line})"),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_python_isms_render() {
        let t = "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
                 [{{ m.role.upper() }}] {{ m.content.strip() }}\n{% endfor %}\
                 {% if add_generation_prompt %}{{ bos_token }}{% endif %}";
        let msgs = [Message::new("system", "skip me"), Message::new("user", "  hi  ")];
        assert_eq!(render_chat_template(t, &msgs, true, "<s>", "</s>").unwrap(), "[USER] hi\n<s>");
    }

    #[test]
    fn raise_exception_reaches_the_caller() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
        let err = render_chat_template(t, &[Message::new("assistant", "x")], false, "", "").unwrap_err();
        assert!(err.to_string().contains("Conversation must start with user"), "{err}");
    }
}
