//! The scheduler on real models: requests that run together give what each gives alone,
//! through their own adapters, when the cache runs short, and when clients go away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lathe_engine::config::Architecture;
use lathe_engine::generate::generate_with;
use lathe_engine::tiny::{random_adapter, write_tiny};
use lathe_engine::{Adapter, Device, FinishReason, LoadedModel, Message, SamplingParams};
use lathe_serving::{AdapterRef, Event, Request, Scheduler, ServeConfig, ServeError, Usage};

mod grammar;
mod smollm2;

fn device() -> Device {
    Device::flex()
}

struct Tiny {
    _dir: tempfile::TempDir,
    model: Arc<LoadedModel>,
    /// PEFT folders of three random adapters.
    adapters: Vec<AdapterRef>,
}

fn tiny() -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let t = write_tiny(dir.path(), Architecture::Llama, 21).unwrap();
    let model = Arc::new(lathe_engine::load(&t.gguf, &device()).unwrap());
    let adapters = (1..=3)
        .map(|i| {
            let path = dir.path().join(format!("adapter-{i}"));
            random_adapter(&t.config, 4, i, &device()).save_peft(&path, "tiny").unwrap();
            AdapterRef { key: format!("adapter-{i}"), dir: path }
        })
        .collect();
    Tiny { _dir: dir, model, adapters }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 3 + (i * 53 + seed * 17) % 250).collect()
}

/// What one request produced: its token ids, the text streamed piece by piece, and the
/// final event.
#[derive(Debug, PartialEq)]
struct Outcome {
    ids: Vec<u32>,
    streamed: String,
    text: String,
    finish: FinishReason,
    usage: Usage,
}

fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Outcome {
    let (mut ids, mut streamed) = (Vec::new(), String::new());
    loop {
        match rx.blocking_recv().expect("the stream ends with Done") {
            Event::Token { id, text, .. } => {
                ids.push(id);
                streamed.push_str(&text);
            }
            Event::Done { finish, text, usage } => return Outcome { ids, streamed, text, finish, usage },
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

fn request(prompt: Vec<u32>, params: SamplingParams, adapter: Option<&AdapterRef>) -> Request {
    Request {
        prompt,
        params,
        adapter: adapter.cloned(),
        logprobs: None,
        json_schema: None,
    }
}

/// The plain engine's batch-of-one generation, the reference every served request meets.
fn reference(model: &LoadedModel, adapter: Option<&Path>, prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
    let adapter = adapter.map(|d| Adapter::load_peft(d, &model.model.config, &device()).unwrap());
    let g = generate_with(&model.model, adapter.as_ref(), &model.tokenizer, &[prompt.to_vec()], params, &mut |_, _| {}).unwrap();
    g[0].token_ids.clone()
}

#[test]
fn mixed_adapters_in_one_batch_each_equal_that_adapter_alone() {
    let t = tiny();
    let s = Scheduler::start(t.model.clone(), ServeConfig::default());
    let params = greedy(24);
    // Eight requests over the base and three adapters, submitted at once.
    let jobs: Vec<(Vec<u32>, Option<&AdapterRef>)> = (0..8).map(|i| (prompt(i, 5 + 3 * i as usize), [None, Some(&t.adapters[0]), Some(&t.adapters[1]), Some(&t.adapters[2])][i as usize % 4])).collect();
    let streams: Vec<_> = jobs.iter().map(|(p, a)| s.submit(request(p.clone(), params.clone(), *a)).unwrap()).collect();
    let outs: Vec<Outcome> = streams.into_iter().map(collect).collect();
    for ((p, a), out) in jobs.iter().zip(&outs) {
        let want = reference(&t.model, a.map(|a| a.dir.as_path()), p, &params);
        assert_eq!(out.ids, want, "adapter {:?}, prompt of {}", a.map(|a| &a.key), p.len());
        assert_eq!(out.finish, FinishReason::Length);
        assert_eq!(out.streamed, out.text, "the streamed pieces add up to the text");
        assert_eq!(out.usage.completion_tokens, 24);
    }
    assert_ne!(reference(&t.model, None, &jobs[1].0, &params), outs[1].ids, "the adapter changes the output");
    assert!(s.metrics().generation_tokens.load(Ordering::Relaxed) >= 8 * 24);
}

#[test]
fn with_room_for_one_adapter_the_others_wait_their_turn() {
    let t = tiny();
    let config = ServeConfig {
        max_loras: 1,
        ..ServeConfig::default()
    };
    let s = Scheduler::start(t.model.clone(), config);
    let params = greedy(12);
    let streams: Vec<_> = t.adapters.iter().map(|a| s.submit(request(prompt(4, 9), params.clone(), Some(a))).unwrap()).collect();
    for (a, rx) in t.adapters.iter().zip(streams) {
        assert_eq!(collect(rx).ids, reference(&t.model, Some(&a.dir), &prompt(4, 9), &params));
    }
}

#[test]
fn a_short_cache_preempts_and_recomputes_without_changing_outputs() {
    let t = tiny();
    let block = lathe_engine::KvPool::block_bytes(&t.model.model.config);
    // Six blocks (96 tokens) for four requests of 10 + 30 tokens each: they cannot all
    // hold their blocks at once.
    let config = ServeConfig {
        kv_cache_bytes: 6 * block,
        ..ServeConfig::default()
    };
    let s = Scheduler::start(t.model.clone(), config);
    let params = greedy(30);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(10 + i, 10)).collect();
    let streams: Vec<_> = prompts.iter().map(|p| s.submit(request(p.clone(), params.clone(), None)).unwrap()).collect();
    for (p, rx) in prompts.iter().zip(streams) {
        assert_eq!(collect(rx).ids, reference(&t.model, None, p, &params));
    }
    assert!(s.metrics().preemptions.load(Ordering::Relaxed) > 0, "the cache was short");
    eventually("every block given back", || s.metrics().kv_usage_permille.load(Ordering::Relaxed) == 0);
}

#[test]
fn a_client_that_goes_away_frees_its_place() {
    let t = tiny();
    let s = Scheduler::start(t.model.clone(), ServeConfig::default());
    let mut rx = s.submit(request(prompt(1, 8), greedy(400), None)).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    drop(rx);
    // The next request still runs, and the dropped one is counted as aborted.
    let out = collect(s.submit(request(prompt(2, 8), greedy(4), None)).unwrap());
    assert_eq!(out.ids.len(), 4);
    eventually("the dropped request counted as aborted", || s.metrics().finished_abort.load(Ordering::Relaxed) == 1);
}

/// Metrics are published after the step that sent the last event: wait for them.
fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("never: {what}");
}

#[test]
fn requests_that_cannot_run_are_refused_with_the_reason() {
    let t = tiny();
    let s = Scheduler::start(t.model.clone(), ServeConfig::default());
    let too_long = s.submit(request(prompt(1, 500), greedy(100), None)).unwrap_err();
    assert!(matches!(&too_long, ServeError::Invalid(m) if m.contains("maximum context length is 512") && m.contains("500 in the prompt")), "{too_long}");
    let empty = s.submit(request(Vec::new(), greedy(4), None)).unwrap_err();
    assert!(empty.to_string().contains("empty"), "{empty}");
    let bad = SamplingParams { top_p: Some(1.5), ..greedy(4) };
    assert!(s.submit(request(prompt(1, 4), bad, None)).unwrap_err().to_string().contains("top_p"));
    let missing = AdapterRef { key: "gone".into(), dir: PathBuf::from("/nonexistent/adapter") };
    let mut rx = s.submit(request(prompt(1, 4), greedy(4), Some(&missing))).unwrap();
    match rx.blocking_recv() {
        Some(Event::Failed(m)) => assert!(m.contains("adapter `gone`"), "{m}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    // And it keeps serving.
    assert_eq!(collect(s.submit(request(prompt(1, 4), greedy(3), None)).unwrap()).ids.len(), 3);
}

#[test]
fn an_adapter_trained_under_another_chat_template_is_refused() {
    let t = tiny();
    let s = Scheduler::start(t.model.clone(), ServeConfig::default());
    let adapter = &t.adapters[0];
    // No training record (an imported PEFT folder): served.
    assert_eq!(collect(s.submit(request(prompt(1, 4), greedy(2), Some(adapter))).unwrap()).ids.len(), 2);
    let record = |sha: &str| std::fs::write(adapter.dir.join("run.json"), serde_json::json!({ "tokenizer_template_sha256": sha }).to_string()).unwrap();
    record(&lathe_serving::template_sha256(&t.model.tokenizer));
    assert_eq!(collect(s.submit(request(prompt(1, 4), greedy(2), Some(adapter))).unwrap()).ids.len(), 2);
    let mut other = t.model.tokenizer.clone();
    other.chat_template = Some("{% for m in messages %}{{ m.content }}{% endfor %}".into());
    record(&lathe_serving::template_sha256(&other));
    let refused = s.submit(request(prompt(1, 4), greedy(2), Some(adapter))).unwrap_err();
    assert!(matches!(&refused, ServeError::Invalid(m) if m.contains("adapter `adapter-1` was trained with the chat template")), "{refused}");
}

#[test]
fn logprobs_are_a_distribution_and_greedy_picks_the_best() {
    let t = tiny();
    let s = Scheduler::start(t.model.clone(), ServeConfig::default());
    let mut r = request(prompt(3, 6), greedy(5), None);
    r.logprobs = Some(5);
    let mut rx = s.submit(r).unwrap();
    let mut seen = 0;
    while let Some(Event::Token { id, logprob, .. }) = rx.blocking_recv() {
        let lp = logprob.expect("asked for logprobs");
        assert_eq!(lp.token, id);
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0].0, id, "greedy takes the most likely token");
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let mass: f32 = lp.top.iter().map(|(_, l)| l.exp()).sum();
        assert!(lp.logprob <= 0.0 && mass <= 1.0 + 1e-4, "{lp:?}");
        seen += 1;
    }
    assert_eq!(seen, 5);
}

/// Messages in SmolLM2's chat template.
pub fn chat(model: &LoadedModel, user: &str) -> Vec<u32> {
    let messages = [Message { role: "system".into(), content: "You are a concise assistant.".into() }, Message { role: "user".into(), content: user.into() }];
    model.tokenizer.encode_chat(&messages, true).unwrap()
}
