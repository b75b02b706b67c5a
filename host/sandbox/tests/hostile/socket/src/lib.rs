//! Tries to open a TCP connection.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

struct Hostile;

impl Scorer for Hostile {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-socket", "0.1.0", "Tries to open a TCP connection.")
    }
    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Hostile)
    }
    #[allow(unreachable_code, unused_variables)]
    fn score(&self, prediction: &str, reference: &str) -> Score {
        let outcome = match std::net::TcpStream::connect(reference) {
            Ok(_) => "connected".to_string(),
            Err(e) => format!("denied: {e}"),
        };
        Score { value: 0.0, details: vec![(outcome, 0.0)] }
    }
}

lathe_plugin_sdk::export_scorer!(Hostile);
