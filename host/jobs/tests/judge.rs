//! The judge with a local model: whatever the model answers is parsed by the plugin, and
//! every verdict (readable or not) is cached under its key.

use lathe_engine::config::Architecture;
use lathe_jobs::eval::judge::{Judge, JudgeModel, JudgeSpec, LocalJudge, VerdictCache};

#[test]
fn a_local_judge_answers_and_the_cache_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = lathe_engine::tiny::write_tiny(dir.path(), Architecture::Llama, 5).unwrap();
    let model = lathe_engine::load(&tiny.gguf, &lathe_engine::Device::flex()).unwrap();
    let env = lathe_jobs::Env::new(dir.path(), lathe_engine::Device::flex());
    let spec = JudgeSpec {
        plugin: "llm-judge".into(),
        sha256: None,
        limits: None,
        config: serde_json::json!({}),
        model: JudgeModel::Local { path: tiny.gguf.clone() },
        seed: 3,
        max_tokens: 8,
        response_format: None,
    };
    let cache_path = dir.path().join("cache.jsonl");
    let mut judge = Judge::new(&env, spec.clone(), Box::new(LocalJudge { model }), VerdictCache::open(&cache_path).unwrap()).unwrap();
    // A random tiny model does not answer `{"score": n}`: the verdict scores 0 and says why.
    let v = judge.score("say hi", "hi", Some("hi")).unwrap();
    assert_eq!(v.score, 0.0);
    assert!(v.reason.starts_with("unreadable verdict"), "{}", v.reason);
    assert_eq!((judge.cache.hits, judge.cache.misses), (0, 1));
    let again = judge.score("say hi", "hi", Some("hi")).unwrap();
    assert_eq!(again, v);
    assert_eq!((judge.cache.hits, judge.cache.misses), (1, 1));
    // A different output is a different key.
    judge.score("say hi", "hello", Some("hi")).unwrap();
    assert_eq!(judge.cache.misses, 2);

    // The cache file survives: a new judge replays both verdicts without its model.
    struct Refuses;
    impl lathe_jobs::eval::judge::JudgeBackend for Refuses {
        fn complete(&mut self, _: &[lathe_engine::Message], _: u64, _: usize) -> lathe_jobs::Result<String> {
            Err(lathe_jobs::JobError::Judge("the cache should have answered".into()))
        }
    }
    let mut replay = Judge::new(&env, spec, Box::new(Refuses), VerdictCache::open(&cache_path).unwrap()).unwrap();
    assert_eq!(replay.score("say hi", "hi", Some("hi")).unwrap(), v);
    replay.score("say hi", "hello", Some("hi")).unwrap();
    assert_eq!((replay.cache.hits, replay.cache.misses), (2, 0));
}

/// A response format constrains an endpoint's answers, so its verdicts are cached apart from
/// the same model's unconstrained ones; a local judge, which cannot be constrained, refuses it.
#[test]
fn a_response_format_keys_the_cache_and_needs_an_endpoint() {
    let endpoint = JudgeSpec {
        plugin: "llm-judge".into(),
        sha256: None,
        limits: None,
        config: serde_json::json!({}),
        model: JudgeModel::OpenAi { base_url: "http://127.0.0.1:9/v1".into(), model: "grader".into(), api_key_env: None },
        seed: 0,
        max_tokens: 8,
        response_format: None,
    };
    let constrained = JudgeSpec { response_format: Some(serde_json::json!({"type": "json_object"})), ..endpoint.clone() };
    assert_ne!(endpoint.cache_name(), constrained.cache_name());
    assert!(Judge::backend_for(&constrained, &lathe_engine::Device::flex()).is_ok());
    let local = JudgeSpec { model: JudgeModel::Local { path: "judge.gguf".into() }, ..constrained };
    let e = Judge::backend_for(&local, &lathe_engine::Device::flex()).err().expect("refused").to_string();
    assert!(e.contains("response_format") && e.contains("local judge"), "{e}");
}
