//! token-f1: SQuAD-style token overlap F1 (lowercased, punctuation and articles dropped).

use lathe_metrics::text::token_f1;
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct TokenF1;

impl Scorer for TokenF1 {
    fn info() -> PluginInfo {
        PluginInfo::new("token-f1", env!("CARGO_PKG_VERSION"), "SQuAD token-overlap F1 between prediction and reference")
    }

    fn new(config: &Value) -> Result<Self, String> {
        lathe_plugin_sdk::no_options(config)?;
        Ok(TokenF1)
    }

    fn score(&self, prediction: &str, reference: &str) -> Score {
        Score::of(token_f1(prediction, reference))
    }

    fn score_value(&self, prediction: &str, reference: &str) -> f64 {
        token_f1(prediction, reference)
    }
}

lathe_plugin_sdk::export_scorer!(TokenF1);
