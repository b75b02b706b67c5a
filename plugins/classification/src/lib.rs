//! classification: accuracy per example (labels compared trimmed, case-insensitively);
//! over a set, accuracy, micro F1, macro F1, each class's F1, and the confusion matrix as
//! `confusion/<reference>/<prediction>` counts (a prediction that is no class: `(other)`).

use lathe_metrics::classification::{accuracy, confusion, report};
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct Classification;

impl Scorer for Classification {
    fn info() -> PluginInfo {
        PluginInfo::new("classification", env!("CARGO_PKG_VERSION"), "Label accuracy; micro and macro F1 over a set")
    }

    fn new(config: &Value) -> Result<Self, String> {
        lathe_plugin_sdk::no_options(config)?;
        Ok(Classification)
    }

    fn score(&self, prediction: &str, reference: &str) -> Score {
        Score::of(accuracy(prediction, reference))
    }

    fn aggregate(&self, pairs: &[(&str, &str)]) -> Vec<(String, f64)> {
        let r = report(pairs.iter().copied());
        let mut out = vec![
            ("accuracy".to_string(), r.accuracy),
            ("micro_f1".to_string(), r.micro_f1),
            ("macro_f1".to_string(), r.macro_f1),
        ];
        out.extend(r.per_class_f1.into_iter().map(|(class, f1)| (format!("f1/{class}"), f1)));
        out.extend(confusion(pairs.iter().copied()).into_iter().map(|((reference, predicted), n)| (format!("confusion/{reference}/{predicted}"), n as f64)));
        out
    }
}

lathe_plugin_sdk::export_scorer!(Classification);
