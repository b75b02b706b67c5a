//! Needs 48 MiB of memory before its first call: a zeroed static that large (in the
//! module's initial memory, not in its bytes), as a plugin that embeds a big table would.
use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};

static mut HOARD: [u8; 48 << 20] = [0; 48 << 20];

struct Hostile;

impl Scorer for Hostile {
    fn info() -> PluginInfo {
        PluginInfo::new("hostile-big-start", "0.1.0", "Needs 48 MiB of memory to start.")
    }
    fn new(_config: &Value) -> Result<Self, String> {
        Ok(Hostile)
    }
    fn score(&self, prediction: &str, _reference: &str) -> Score {
        // Reads the static so that it stays.
        let hoard = std::hint::black_box(&raw const HOARD);
        // SAFETY: one byte inside the static, read once; nothing writes it.
        let byte = unsafe { (*hoard)[prediction.len() % (48 << 20)] };
        Score::of(f64::from(byte))
    }
}

lathe_plugin_sdk::export_scorer!(Hostile);
