//! JSON-schema constrained decoding (OpenAI's `response_format`): before each sample a
//! request's token mask comes from llguidance's Earley parser over its schema, and only
//! tokens that keep the output a valid prefix of a matching document may be drawn. The
//! end-of-sequence token is allowed exactly when the document is complete.
//!
//! One [`Grammars`] per model holds llguidance's view of the vocabulary (every token's
//! bytes, built from the model's own tokenizer) and the compiled schemas, cached by their
//! text so a schema that many requests share is compiled once.
//!
//! Separators are fixed (`", "` and `": "`, no free whitespace): a small model offered
//! free whitespace inside a document can spend its whole budget on newlines.

use std::sync::{Arc, Mutex};

use lathe_engine::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

/// Compiled schemas kept for reuse.
const CACHED_SCHEMAS: usize = 64;

/// llguidance's view of a model's vocabulary, and the schemas compiled against it.
pub struct Grammars {
    factory: ParserFactory,
    /// Schema text → a matcher at its start, most recently used last.
    cache: Mutex<Vec<(String, Matcher)>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab", &self.factory.tok_env().tok_trie().vocab_size()).finish()
    }
}

/// The tokenizer as llguidance sees it: a trie of every token's bytes (special tokens
/// behind llguidance's marker byte, ids the tokenizer lacks left empty so they are never
/// allowed), and byte tokenization for the text a grammar forces.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // llguidance asks for text it has already checked; a lossy decode only matters for
        // a split character, which then tokenizes as its replacement.
        self.tokenizer.encode(&String::from_utf8_lossy(s), false).unwrap_or_default()
    }
}

impl Grammars {
    /// llguidance's vocabulary for `tokenizer` over a model with `vocab_size` logits.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self, String> {
        let json = tokenizer.to_hf_json().map_err(|e| e.to_string())?;
        let json: Value = serde_json::from_str(&json).map_err(|e| format!("the tokenizer's JSON: {e}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("constrained decoding needs each token's bytes: {e}"))?;
        if words.len() > vocab_size {
            return Err(format!("the tokenizer has {} tokens but the model only {vocab_size} logits", words.len()));
        }
        words.resize(vocab_size, Vec::new());
        let eos = tokenizer.stop_ids.first().copied().ok_or("the tokenizer has no end-of-sequence token")?;
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&tokenizer.stop_ids);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory, cache: Mutex::new(Vec::new()) })
    }

    /// A fresh matcher for output that must be JSON matching `schema`; a schema llguidance
    /// cannot compile is an error naming why.
    pub fn matcher(&self, schema: &Value) -> Result<Matcher, String> {
        let key = schema.to_string();
        let mut cache = self.cache.lock().expect("grammar cache lock");
        if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
            let entry = cache.remove(i);
            let fresh = entry.1.deep_clone();
            cache.push(entry);
            return Ok(fresh);
        }
        drop(cache);
        let mut schema = schema.clone();
        if let Value::Object(map) = &mut schema {
            map.insert(
                "x-guidance".into(),
                serde_json::json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " }),
            );
        }
        let parser = self.factory.create_parser(TopLevelGrammar::from_json_schema(schema)).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        let fresh = matcher.deep_clone();
        let mut cache = self.cache.lock().expect("grammar cache lock");
        if cache.len() == CACHED_SCHEMAS {
            cache.remove(0);
        }
        cache.push((key, matcher));
        Ok(fresh)
    }
}

/// Masks out (to −∞) every logit `allowed` forbids. False when nothing is allowed.
pub(crate) fn apply_mask(logits: &mut [f32], allowed: &SimpleVob) -> bool {
    let mut any = false;
    for (t, l) in logits.iter_mut().enumerate() {
        if allowed.is_allowed(t as u32) {
            any = true;
        } else {
            *l = f32::NEG_INFINITY;
        }
    }
    any
}
