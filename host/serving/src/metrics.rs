//! What a scheduler counts, rendered in Prometheus' text format under vLLM's metric
//! names and labels, so dashboards made for vLLM work unchanged.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets in seconds, as vLLM's.
const LATENCY_BUCKETS: [f64; 16] = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
const E2E_BUCKETS: [f64; 14] = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Counters and gauges of one scheduler (one served base model).
#[derive(Debug)]
pub struct Metrics {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    /// Per-mille of the KV cache's blocks held by running sequences.
    pub kv_usage_permille: AtomicU64,
    /// LoRA adapters in memory, and loads from disk so far.
    pub loras_held: AtomicU64,
    pub lora_loads: AtomicU64,
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub finished_abort: AtomicU64,
    hist: Mutex<[Histogram; 3]>,
}

const TTFT: usize = 0;
const ITL: usize = 1;
const E2E: usize = 2;

impl Default for Metrics {
    fn default() -> Self {
        Self {
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            kv_usage_permille: AtomicU64::new(0),
            loras_held: AtomicU64::new(0),
            lora_loads: AtomicU64::new(0),
            finished_stop: AtomicU64::new(0),
            finished_length: AtomicU64::new(0),
            finished_abort: AtomicU64::new(0),
            hist: Mutex::new([Histogram::new(&LATENCY_BUCKETS), Histogram::new(&LATENCY_BUCKETS), Histogram::new(&E2E_BUCKETS)]),
        }
    }
}

impl Metrics {
    pub(crate) fn time_to_first_token(&self, s: f64) {
        self.hist.lock().expect("metrics lock")[TTFT].observe(s);
    }

    pub(crate) fn inter_token_latency(&self, s: f64) {
        self.hist.lock().expect("metrics lock")[ITL].observe(s);
    }

    pub(crate) fn e2e_latency(&self, s: f64) {
        self.hist.lock().expect("metrics lock")[E2E].observe(s);
    }
}

/// Renders the metrics of every served model, each series labelled `model_name`.
pub fn render(models: &[(&str, &Metrics)]) -> String {
    let mut out = String::new();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let scalar = |out: &mut String, name: &str, kind: &str, help: &str, value: &dyn Fn(&Metrics) -> String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (model, m) in models {
            let _ = writeln!(out, "{name}{{model_name=\"{}\"}} {}", escape(model), value(m));
        }
    };
    scalar(&mut out, "vllm:num_requests_running", "gauge", "Requests in the running batch.", &|m| load(&m.running).to_string());
    scalar(&mut out, "vllm:num_requests_waiting", "gauge", "Requests waiting to join the batch.", &|m| load(&m.waiting).to_string());
    scalar(&mut out, "vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", &|m| format!("{}", load(&m.kv_usage_permille) as f64 / 1000.0));
    scalar(&mut out, "vllm:prompt_tokens_total", "counter", "Prefill tokens processed.", &|m| load(&m.prompt_tokens).to_string());
    scalar(&mut out, "vllm:generation_tokens_total", "counter", "Generation tokens processed.", &|m| load(&m.generation_tokens).to_string());
    scalar(&mut out, "vllm:num_preemptions_total", "counter", "Sequences preempted (their cache recomputed later) for lack of KV-cache blocks.", &|m| load(&m.preemptions).to_string());
    scalar(&mut out, "vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", &|m| load(&m.prefix_queries).to_string());
    scalar(&mut out, "vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", &|m| load(&m.prefix_hits).to_string());
    scalar(&mut out, "lathe:lora_adapters_held", "gauge", "LoRA adapters in memory (at most max_loras).", &|m| load(&m.loras_held).to_string());
    scalar(&mut out, "lathe:lora_adapter_loads_total", "counter", "LoRA adapters loaded from disk.", &|m| load(&m.lora_loads).to_string());
    let name = "vllm:request_success_total";
    let _ = writeln!(out, "# HELP {name} Finished requests, by finish reason.\n# TYPE {name} counter");
    for (model, m) in models {
        for (reason, c) in [("stop", &m.finished_stop), ("length", &m.finished_length), ("abort", &m.finished_abort)] {
            let _ = writeln!(out, "{name}{{finished_reason=\"{reason}\",model_name=\"{}\"}} {}", escape(model), load(c));
        }
    }
    for (i, name, help) in [
        (TTFT, "vllm:time_to_first_token_seconds", "Time from arrival to the first generated token."),
        (ITL, "vllm:inter_token_latency_seconds", "Time between consecutive generated tokens of a request."),
        (E2E, "vllm:e2e_request_latency_seconds", "Time from arrival to the last token."),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (model, m) in models {
            let h = &m.hist.lock().expect("metrics lock")[i];
            let model = escape(model);
            for (b, c) in h.bounds.iter().zip(&h.counts) {
                let _ = writeln!(out, "{name}_bucket{{le=\"{b}\",model_name=\"{model}\"}} {c}");
            }
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\",model_name=\"{model}\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{model_name=\"{model}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{model_name=\"{model}\"}} {}", h.count);
        }
    }
    out
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
