//! The built-in plugins, each on its edge cases, through the real sandbox.

use lathe_sandbox::{CallError, Kind};

use crate::*;

#[test]
fn every_builtin_loads_and_describes_itself() {
    let rt = runtime();
    for (name, bytes) in lathe_sandbox::BUILTIN_PLUGINS {
        let p = rt.load(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.info().name, *name);
        assert!(p.info().config_schema.is_object(), "{name}");
        assert_eq!(p.info().wit_version, "0.1.0");
    }
}

#[test]
fn exact_match_normalises_as_configured() {
    let rt = runtime();
    let p = builtin(&rt, "exact-match");
    assert_eq!(p.kind(), Kind::Scorer);
    let mut plain = p.instance("{}").unwrap();
    assert_eq!(plain.score("Paris", "Paris").unwrap().value, 1.0);
    assert_eq!(plain.score(" Paris\n", "Paris").unwrap().value, 1.0, "trim is on by default");
    assert_eq!(plain.score("paris", "Paris").unwrap().value, 0.0);
    assert_eq!(plain.score("", "").unwrap().value, 1.0);
    let mut loose = p.instance(r#"{"ignore_case": true, "ignore_punctuation": true, "collapse_whitespace": true}"#).unwrap();
    assert_eq!(loose.score("são  PAULO!", "São Paulo").unwrap().value, 1.0);
    let preds = ["a", "B", "c ", "ü"];
    let refs = ["a", "b", "d", "Ü"];
    assert_eq!(loose.score_batch(&preds, &refs).unwrap(), vec![1.0, 1.0, 0.0, 1.0]);
    assert_eq!(loose.aggregate(&preds, &refs).unwrap(), vec![("mean".to_string(), 0.75)]);
    let e = p.instance(r#"{"ignore_case": "yes"}"#).err().unwrap();
    assert!(matches!(e, CallError::Config { .. }) && e.to_string().contains("ignore_case"), "{e}");
    let e = p.instance(r#"{"typo": true}"#).err().unwrap();
    assert!(e.to_string().contains("unknown option `typo`"), "{e}");
    let e = p.instance("{not json").err().unwrap();
    assert!(e.to_string().contains("not valid JSON"), "{e}");
    let e = plain.validate("x").unwrap_err();
    assert!(matches!(e, CallError::WrongKind { expected: Kind::Validator, .. }), "{e:?}");
}

#[test]
fn token_f1_and_rouge_l_on_edge_cases() {
    let rt = runtime();
    let mut f1 = builtin(&rt, "token-f1").instance("").unwrap();
    assert_eq!(f1.score("The Eiffel Tower!", "eiffel tower").unwrap().value, 1.0);
    assert!((f1.score("red apple", "green apple pie").unwrap().value - 0.4).abs() < 1e-12);
    assert_eq!(f1.score("", "").unwrap().value, 1.0);
    assert_eq!(f1.score("", "x").unwrap().value, 0.0);
    assert_eq!(f1.score("日本 東京", "東京").unwrap().value, 2.0 / 3.0);
    assert!(builtin(&rt, "token-f1").instance(r#"{"x": 1}"#).is_err());
    let mut rl = builtin(&rt, "rouge-l").instance("{}").unwrap();
    assert!((rl.score("police killed the gunman", "police kill the gunman").unwrap().value - 0.75).abs() < 1e-12);
    assert_eq!(rl.score("", "").unwrap().value, 1.0);
    assert_eq!(rl.score("Ünïcode wörds", "ünïcode WÖRDS").unwrap().value, 1.0);
}

#[test]
fn json_field_match_scores_each_field() {
    let rt = runtime();
    let mut m = builtin(&rt, "json-field-match").instance("{}").unwrap();
    let reference = r#"{"vendor": "ACME", "total": 12.5, "address": {"city": "Köln"}}"#;
    let s = m.score(r#"{"vendor": "ACME", "total": 12.50, "address": {"city": "Koeln"}}"#, reference).unwrap();
    assert!((s.value - 2.0 / 3.0).abs() < 1e-12);
    assert!(s.details.contains(&("/address/city".to_string(), 0.0)));
    assert!(s.details.contains(&("/total".to_string(), 1.0)));
    let s = m.score("Sure! Here is the JSON: {", reference).unwrap();
    assert_eq!(s.value, 0.0, "invalid JSON scores 0 on every field");
    assert_eq!(s.details.len(), 3);
    let s = m.score("{}", "not json").unwrap();
    assert!(s.details[0].0.contains("reference is not valid JSON"), "{:?}", s.details);
    let mut only = builtin(&rt, "json-field-match").instance(r#"{"fields": ["vendor"], "ignore_case": true}"#).unwrap();
    assert_eq!(only.score(r#"{"vendor": "acme", "total": 1}"#, reference).unwrap().value, 1.0);
    assert!(builtin(&rt, "json-field-match").instance(r#"{"fields": "vendor"}"#).is_err());
}

#[test]
fn classification_reports_micro_and_macro_f1() {
    let rt = runtime();
    let mut c = builtin(&rt, "classification").instance("{}").unwrap();
    assert_eq!(c.score(" Positive", "positive").unwrap().value, 1.0);
    let preds = ["cat", "Cat ", "dog", "dog", "cat"];
    let refs = ["cat", "cat", "cat", "dog", "bird"];
    let agg: std::collections::HashMap<String, f64> = c.aggregate(&preds, &refs).unwrap().into_iter().collect();
    assert_eq!(agg["accuracy"], 0.6);
    assert!((agg["micro_f1"] - 0.6).abs() < 1e-12);
    assert!((agg["macro_f1"] - 4.0 / 9.0).abs() < 1e-12);
    assert_eq!(agg["f1/bird"], 0.0);
    assert_eq!(c.aggregate::<&str>(&[], &[]).unwrap().iter().find(|m| m.0 == "macro_f1").unwrap().1, 0.0);
}

#[test]
fn regex_extract_pulls_the_answer_out() {
    let rt = runtime();
    let p = builtin(&rt, "regex-extract");
    let mut r = p.instance(r#"{"pattern": "(?i)answer:\\s*(\\S+)"}"#).unwrap();
    assert_eq!(r.score("Let me think... Answer: 42", "42").unwrap().value, 1.0);
    assert_eq!(r.score("Answer: 41", "42").unwrap().value, 0.0);
    let s = r.score("no idea", "42").unwrap();
    assert_eq!((s.value, s.details[0].1), (0.0, 0.0));
    assert_eq!(r.score("ANSWER: Ünïcode", "Ünïcode").unwrap().value, 1.0);
    let e = p.instance(r#"{"pattern": "(unclosed"}"#).err().unwrap();
    assert!(e.to_string().contains("not a valid regex"), "{e}");
    let e = p.instance(r#"{"pattern": "a", "group": 2}"#).err().unwrap();
    assert!(e.to_string().contains("capture groups"), "{e}");
    assert!(p.instance("{}").err().unwrap().to_string().contains("`pattern`"));
}

#[test]
fn json_schema_lists_every_violation() {
    let rt = runtime();
    let p = builtin(&rt, "json-schema");
    assert_eq!(p.kind(), Kind::Validator);
    let config = r#"{"schema": {"type": "object", "required": ["vendor", "total"],
        "properties": {"vendor": {"type": "string", "minLength": 1}, "total": {"type": "number", "minimum": 0}},
        "additionalProperties": false}}"#;
    let mut v = p.instance(config).unwrap();
    assert_eq!(v.validate(r#"{"vendor": "ACME", "total": 3.5}"#).unwrap(), Ok(()));
    let errs = v.validate(r#"{"vendor": "", "total": -1, "extra": true}"#).unwrap().unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"/vendor") && paths.contains(&"/total"), "{errs:?}");
    assert_eq!(errs.len(), 3, "{errs:?}");
    let errs = v.validate("{\"vendor\": ").unwrap().unwrap_err();
    assert_eq!(errs[0].path, "");
    assert!(errs[0].message.contains("not valid JSON"), "{errs:?}");
    let errs = v.validate(r#"{"vendor": "Ærø", "total": "12"}"#).unwrap().unwrap_err();
    assert_eq!(errs[0].path, "/total");
    let e = p.instance(r#"{"schema": {"type": "no-such-type"}}"#).err().unwrap();
    assert!(e.to_string().contains("not a valid JSON Schema"), "{e}");
    assert!(p.instance("{}").err().unwrap().to_string().contains("`schema` is required"));
}

#[test]
fn chat_formatter_maps_fields_and_names_bad_ones() {
    use lathe_sandbox::{Example, Message};
    let rt = runtime();
    let p = builtin(&rt, "chat-formatter");
    assert_eq!(p.kind(), Kind::Formatter);
    let mut f = p.instance(r#"{"user": "ticket.body", "assistant": "label", "system_prompt": "Classify."}"#).unwrap();
    let ex = f.format(r#"{"ticket": {"body": "Mon écran est cassé"}, "label": "hardware"}"#).unwrap().unwrap();
    let msg = |r: &str, c: &str| Message { role: r.into(), content: c.into() };
    assert_eq!(ex, Example::Chat(vec![msg("system", "Classify."), msg("user", "Mon écran est cassé"), msg("assistant", "hardware")]));
    let e = f.format(r#"{"ticket": {}, "label": "x"}"#).unwrap().unwrap_err();
    assert_eq!((e.field.as_str(), e.message.as_str()), ("ticket.body", "missing"));
    let e = f.format(r#"{"ticket": {"body": 7}, "label": "x"}"#).unwrap().unwrap_err();
    assert_eq!(e.message, "must be a string, got a number");
    let e = f.format(r#"{"ticket": {"body": "  "}, "label": "x"}"#).unwrap().unwrap_err();
    assert_eq!(e.message, "is empty");
    let e = f.format("{oops").unwrap().unwrap_err();
    assert!(e.message.contains("not valid JSON"), "{e:?}");
    let mut c = p.instance(r#"{"user": "q", "assistant": "a", "format": "completion"}"#).unwrap();
    assert_eq!(
        c.format(r#"{"q": "2+2?", "a": "4"}"#).unwrap().unwrap(),
        Example::Completion { prompt: "2+2?".into(), completion: "4".into() }
    );
    assert!(p.instance(r#"{"user": "q"}"#).err().unwrap().to_string().contains("`assistant`"));
}

#[test]
fn llm_judge_renders_the_rubric_and_reads_verdicts() {
    let rt = runtime();
    let p = builtin(&rt, "llm-judge");
    assert_eq!(p.kind(), Kind::Judge);
    let mut j = p
        .instance(r#"{"rubric": "Q: {{ input }}\nA: {{ output }}{% if reference %}\nRef: {{ reference }}{% endif %}\nScore {{ min }}-{{ max }}.", "system": "Be strict.", "min": 1, "max": 5}"#)
        .unwrap();
    let msgs = j.build_prompt("2+2?", "4", Some("4")).unwrap();
    assert_eq!(msgs[0].content, "Be strict.");
    assert_eq!(msgs[1].content, "Q: 2+2?\nA: 4\nRef: 4\nScore 1-5.");
    let msgs = j.build_prompt("2+2?", "5", None).unwrap();
    assert_eq!(msgs[1].content, "Q: 2+2?\nA: 5\nScore 1-5.");
    let v = j.parse_verdict(r#"Sure. {"score": 5, "reason": "exact"}"#).unwrap().unwrap();
    assert_eq!((v.score, v.reason.as_str()), (1.0, "exact"));
    let v = j.parse_verdict("Reasoning first.\nScore: 3\n").unwrap().unwrap();
    assert_eq!(v.score, 0.5);
    let e = j.parse_verdict("I cannot decide.").unwrap().unwrap_err();
    assert!(e.contains("no score found"), "{e}");
    let e = j.parse_verdict(r#"{"score": 9}"#).unwrap().unwrap_err();
    assert!(e.contains("outside [1, 5]"), "{e}");
    let e = p.instance(r#"{"rubric": "{% if %}"}"#).err().unwrap();
    assert!(e.to_string().contains("not a valid template"), "{e}");
    let mut default = p.instance("{}").unwrap();
    assert!(default.build_prompt("x", "y", None).unwrap()[0].content.contains("Reply with JSON only"));
}

#[test]
fn compiled_plugins_are_cached_by_hash() {
    let dir = tempfile::tempdir().unwrap();
    let config = || lathe_sandbox::RuntimeConfig { cache_dir: Some(dir.path().into()), ..Default::default() };
    let bytes = lathe_sandbox::builtin("exact-match").unwrap();
    let first = lathe_sandbox::Runtime::new(config()).unwrap().load(bytes).unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1);
    let name = entries[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with(&first.info().sha256) && name.ends_with(".cwasm"), "{name}");
    // A fresh runtime loads from the cache by mapping the entry; replacing the entry (as
    // a rewrite does, by a rename) leaves a plugin that maps it working.
    let cached = lathe_sandbox::Runtime::new(config()).unwrap().load(bytes).unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"garbage").unwrap();
    std::fs::rename(&junk, &entries[0]).unwrap();
    assert_eq!(cached.instance("{}").unwrap().score("a", "a").unwrap().value, 1.0);
    drop(cached);
    // A damaged entry is recompiled, not trusted.
    let mut healed = lathe_sandbox::Runtime::new(config()).unwrap().load(bytes).unwrap().instance("{}").unwrap();
    assert_eq!(healed.score("a", "b").unwrap().value, 0.0);
    assert!(std::fs::metadata(&entries[0]).unwrap().len() > 1000, "rewritten");
}

#[test]
fn batches_run_in_parallel_in_order() {
    let rt = runtime();
    let p = builtin(&rt, "exact-match");
    let preds: Vec<String> = (0..1000).map(|i| format!("item {i}")).collect();
    let refs: Vec<String> = (0..1000).map(|i| format!("item {}", if i % 3 == 0 { i } else { i + 1 })).collect();
    let scores = p.score_batch_parallel("{}", &preds, &refs, 4).unwrap();
    let want: Vec<f64> = (0..1000).map(|i| if i % 3 == 0 { 1.0 } else { 0.0 }).collect();
    assert_eq!(scores, want);
}
