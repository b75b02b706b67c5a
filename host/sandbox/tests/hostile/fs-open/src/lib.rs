//! Tries to read the host's files.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct Hostile;

impl Scorer for Hostile {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-fs-open", "0.1.0", "Tries to read the host's files.")
    }
    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Hostile)
    }
    #[allow(unreachable_code, unused_variables)]
    fn score(&self, prediction: &str, reference: &str) -> Score {
        // Reports what it managed to read in the detail name.
        let outcome = match std::fs::read_to_string(reference) {
            Ok(text) => format!("read {} bytes", text.len()),
            Err(e) => format!("denied: {e}"),
        };
        let listed = match std::fs::read_dir("/") {
            Ok(entries) => format!("listed {} entries", entries.count()),
            Err(e) => format!("denied: {e}"),
        };
        Score { value: 0.0, details: vec![(outcome, 0.0), (listed, 0.0), (format!("env: {}", std::env::vars().count()), 0.0)] }
    }
}

lathe_plugin_sdk::export_scorer!(Hostile);
