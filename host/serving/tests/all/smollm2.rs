//! The scheduler on the real SmolLM2: concurrent streams with a shared system prompt.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use lathe_serving::{Scheduler, ServeConfig};

use crate::{chat, collect, device, greedy, reference, request};

pub(crate) fn smollm2() -> Arc<lathe_engine::LoadedModel> {
    let path = std::env::var_os("LATHE_SMOLLM2")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.exists(), "{} is missing: run scripts/setup.sh first", path.display());
    Arc::new(lathe_engine::load(&path, &device()).unwrap())
}

#[test]
fn concurrent_streams_each_equal_their_greedy_single_request_output() {
    streams_equal_their_single_request_outputs();
}

/// The same with 8-bit activations for the sampled tokens (the commands' default): their
/// rows multiply the same way whatever shares the step, and the prompts' f32 rows through
/// the exact product, so streams still equal their answers alone.
#[test]
fn with_8_bit_activations_concurrent_streams_each_equal_their_single_request_output() {
    lathe_engine::quant::set_int8_activations(true);
    streams_equal_their_single_request_outputs();
}

fn streams_equal_their_single_request_outputs() {
    let model = smollm2();
    let s = Scheduler::start(model.clone(), ServeConfig::default());
    let questions = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about invoices.", "What is 12 times 12?", "Say hello in Spanish.", "Why is the sky blue? Answer in one sentence."];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| chat(&model, q)).collect();
    let params = greedy(32);
    let params = lathe_engine::SamplingParams { ignore_eos: false, ..params };
    // Staggered: some join while others are mid-stream.
    let mut streams = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        streams.push(s.submit(request(p.clone(), params.clone(), None)).unwrap());
        if i % 2 == 1 {
            std::thread::sleep(std::time::Duration::from_millis(150));
        }
    }
    let outs: Vec<_> = streams.into_iter().map(collect).collect();
    for (p, out) in prompts.iter().zip(&outs) {
        assert_eq!(out.ids, reference(&model, None, p, &params), "{}", out.text);
        assert!(!out.text.is_empty());
    }
    assert!(outs[0].text.contains("Paris"), "{}", outs[0].text);
    // The system prompt's full blocks were computed once and then shared.
    assert!(outs.iter().skip(1).any(|o| o.usage.cached_tokens > 0), "{:?}", outs.iter().map(|o| o.usage).collect::<Vec<_>>());
    assert!(s.metrics().prefix_hits.load(Ordering::Relaxed) > 0);
}
