//! rouge-l: ROUGE-L F-measure over lowercased whitespace tokens.

use lathe_metrics::text::rouge_l;
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct RougeL;

impl Scorer for RougeL {
    fn info() -> PluginInfo {
        PluginInfo::new("rouge-l", env!("CARGO_PKG_VERSION"), "ROUGE-L F-measure (longest common subsequence of tokens)")
    }

    fn new(config: &Value) -> Result<Self, String> {
        lathe_plugin_sdk::no_options(config)?;
        Ok(RougeL)
    }

    fn score(&self, prediction: &str, reference: &str) -> Score {
        Score::of(rouge_l(prediction, reference))
    }
}

lathe_plugin_sdk::export_scorer!(RougeL);
