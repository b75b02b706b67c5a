//! Parity with Hugging Face transformers on the real SmolLM2-135M-Instruct Q4_1 GGUF
//! (`tests/fixtures/smollm2`, made by `scripts/make_reference.py`).

use lathe_engine::generate::{argmax, logits_to_host};
use lathe_engine::{KvCache, Logits, Message, SamplingParams, Step};
use serde_json::Value;

use crate::common::*;

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Logits are compared within 5e-4 absolute (their scale is ~10-30). Both sides compute in
/// f32 from the same dequantized weights; what differs is summation order (burn's gemm vs
/// PyTorch's kernels) accumulated over 30 layers, measured at 3e-5..7e-5 here, so the
/// bound leaves ~7x headroom for other CPUs' kernels. A wrong rotary layout, norm, mask or
/// dequantization moves logits by whole units.
const LOGIT_TOLERANCE: f32 = 5e-4;

#[test]
fn tokenizer_and_template_match_transformers() {
    let m = load_smollm2();
    let r = reference();
    for case in ["plain", "json"] {
        let c = &r["cases"][case];
        let text = c["text"].as_str().unwrap();
        assert_eq!(m.tokenizer.encode(text, true).unwrap(), ids(&c["ids_add_special_default"]), "{case}");
        assert_eq!(m.tokenizer.encode(text, false).unwrap(), ids(&c["ids_add_special_false"]), "{case}");
    }
    let messages: Vec<Message> = serde_json::from_value(r["messages"].clone()).unwrap();
    let rendered = m.tokenizer.apply_chat_template(&messages, true).unwrap();
    let expected = std::fs::read_to_string(fixture_dir().join("chat_rendered.txt")).unwrap();
    assert_eq!(rendered, expected);
    assert_eq!(
        m.tokenizer.encode_chat(&messages, true).unwrap(),
        ids(&r["cases"]["chat"]["input_ids"])
    );
    assert_eq!(m.tokenizer.bos_token.as_ref().unwrap().1, 1);
    assert_eq!(m.tokenizer.stop_ids, vec![2]);
}

#[test]
fn last_position_logits_match_transformers() {
    let m = load_smollm2();
    let r = reference();
    for case in ["plain", "json", "chat"] {
        let c = &r["cases"][case];
        let input = ids(&c["input_ids"]);
        let mut cache = KvCache::new(m.model.config.num_layers);
        let logits = m.model.forward(&Step::single(&input, 0), &mut cache, Logits::Last);
        let ours = logits_to_host(logits).unwrap();
        let theirs = read_npy_f32(&fixture_dir().join(format!("{case}_last_logits.npy")));
        let diff = max_abs_diff(&ours, &theirs);
        eprintln!("{case}: max |Δlogit| = {diff:e}");
        assert!(diff < LOGIT_TOLERANCE, "{case}: max |Δlogit| = {diff}");
        assert_eq!(argmax(&ours), c["top20_ids"][0].as_u64().unwrap() as u32, "{case}");
    }
}

#[test]
fn greedy_continuation_is_identical() {
    let m = load_smollm2();
    let r = reference();
    let c = &r["cases"]["chat"];
    let params = SamplingParams {
        max_tokens: 32,
        ignore_eos: true,
        ..Default::default()
    };
    let mut streamed = String::new();
    let out = lathe_engine::generate(&m.model, &m.tokenizer, &[ids(&c["input_ids"])], &params, &mut |_, t| {
        streamed.push_str(t)
    })
    .unwrap();
    assert_eq!(out[0].token_ids, ids(&c["greedy32_ids"]));
    assert_eq!(streamed, out[0].text);
}

#[test]
fn a_batch_of_different_lengths_matches_each_prompt_alone() {
    let m = load_smollm2();
    let r = reference();
    let prompts: Vec<Vec<u32>> = ["plain", "json", "chat"]
        .iter()
        .map(|c| ids(&r["cases"][c]["input_ids"]))
        .collect();
    let params = SamplingParams {
        max_tokens: 12,
        ignore_eos: true,
        ..Default::default()
    };
    let batched = lathe_engine::generate(&m.model, &m.tokenizer, &prompts, &params, &mut |_, _| {}).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let alone = lathe_engine::generate(&m.model, &m.tokenizer, std::slice::from_ref(p), &params, &mut |_, _| {}).unwrap();
        assert_eq!(alone[0].token_ids, b.token_ids);
    }
    // And the padded prefill gives each row its own logits: `plain` is the shortest, so
    // its row is the most padded.
    let theirs = read_npy_f32(&fixture_dir().join("plain_last_logits.npy"));
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let mut step = Step { batch: 3, seq: longest, tokens: vec![], positions: vec![], valid: vec![] };
    for p in &prompts {
        let pad = longest - p.len();
        step.tokens.extend(std::iter::repeat_n(2, pad).chain(p.iter().copied()));
        step.positions.extend(std::iter::repeat_n(0, pad).chain(0..p.len() as i64));
        step.valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
    }
    let mut cache = KvCache::new(m.model.config.num_layers);
    let all = logits_to_host(m.model.forward(&step, &mut cache, Logits::Last)).unwrap();
    let vocab = m.model.config.vocab_size;
    assert!(prompts[0].len() < longest);
    let diff = max_abs_diff(&all[..vocab], &theirs);
    assert!(diff < LOGIT_TOLERANCE, "padded row: max |Δlogit| = {diff}");
}

/// The prompt's last logits after prefilling all but 7 tokens and decoding those one by one.
fn decode_last_seven(m: &lathe_engine::LoadedModel, input: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(m.model.config.num_layers);
    let split = input.len() - 7;
    m.model.forward(&Step::single(&input[..split], 0), &mut cache, Logits::Last);
    let mut last = None;
    for (i, &t) in input.iter().enumerate().skip(split) {
        last = Some(m.model.forward(&Step::single(&[t], i), &mut cache, Logits::Last));
    }
    logits_to_host(last.unwrap()).unwrap()
}

#[test]
fn decode_steps_on_quantized_blocks_match_transformers() {
    // Single-token steps take the quantized-block kernel (≤ quant::MAX_ROWS rows), the
    // prefill the dense gemm: both must land on transformers' logits.
    let m = load_smollm2();
    let r = reference();
    let ours = decode_last_seven(&m, &ids(&r["cases"]["plain"]["input_ids"]));
    let theirs = read_npy_f32(&fixture_dir().join("plain_last_logits.npy"));
    let diff = max_abs_diff(&ours, &theirs);
    eprintln!("decode path: max |Δlogit| = {diff:e}");
    assert!(diff < LOGIT_TOLERANCE, "decode path: max |Δlogit| = {diff}");
}

/// One sequence's `tokens` as a paged step of its own (room reserved first), as generation
/// runs it: the last token's logits.
fn one_paged_step(m: &lathe_engine::LoadedModel, pool: &mut lathe_engine::KvPool, cache: &mut lathe_engine::SeqCache, tokens: &[u32], adapter: Option<&lathe_engine::Adapter>, prompt_len: usize) -> Vec<f32> {
    assert!(cache.reserve(pool, tokens.len()));
    m.model.forward_paged(&mut [lathe_engine::SeqStep { tokens, cache, adapter, prompt_len }], pool).unwrap()
}

#[test]
fn decode_with_int8_activations_stays_near_transformers() {
    // The switch is process-wide; nextest runs each test in a process of its own.
    lathe_engine::quant::set_int8_activations(true);
    let m = load_smollm2();
    let r = reference();
    // The last seven tokens as sampled ones (past the prompt) through the paged path, as
    // generation decodes; the tensor path (`forward`) multiplies given tokens in f32.
    let input = ids(&r["cases"]["plain"]["input_ids"]);
    let split = input.len() - 7;
    let mut pool = lathe_engine::KvPool::new(&m.model.config, 16);
    let mut cache = lathe_engine::SeqCache::new(0);
    let mut ours = Vec::new();
    for (at, end) in std::iter::once((0, split)).chain((split..input.len()).map(|i| (i, i + 1))) {
        ours = one_paged_step(&m, &mut pool, &mut cache, &input[at..end], None, split);
    }
    let theirs = read_npy_f32(&fixture_dir().join("plain_last_logits.npy"));
    let diff = max_abs_diff(&ours, &theirs);
    eprintln!("decode with 8-bit activations: max |Δlogit| = {diff:e}");
    // Rounding the activations moves the largest of the 49,152 logits by about one unit
    // (1.26 measured; llama.cpp, which rounds the same way, is 0.70 away on this case) and
    // keeps the ranking at the top; a broken kernel scrambles them by many units.
    assert!(diff > LOGIT_TOLERANCE, "the 8-bit path was taken");
    assert!(diff < 2.5, "max |Δlogit| = {diff}");
    assert_eq!(argmax(&ours), argmax(&theirs));
    // Greedy decoding follows transformers' continuation (a near tie may flip late).
    let c = &r["cases"]["chat"];
    let params = SamplingParams { max_tokens: 32, ignore_eos: true, ..Default::default() };
    let out = lathe_engine::generate(&m.model, &m.tokenizer, &[ids(&c["input_ids"])], &params, &mut |_, _| {}).unwrap();
    let want = ids(&c["greedy32_ids"]);
    let same = out[0].token_ids.iter().zip(&want).take_while(|(a, b)| a == b).count();
    eprintln!("greedy with 8-bit activations: the first {same} of 32 tokens equal transformers'");
    assert!(same >= 16, "{:?} vs {want:?}", out[0].token_ids);
}

/// A prompt's logits through the exact product against the f32 path's: float rounding on
/// the FMA kernels (8.6e-5 measured on this fixture), the split-bf16 products on AMX tiles
/// (6.5e-4; `quant/amx.rs`). Both far from 8-bit activations, which move them by about 1.
fn prompt_tolerance() -> f32 {
    if lathe_engine::quant::cpu_kernel() == Ok("amx") { 2e-3 } else { LOGIT_TOLERANCE }
}

/// With 8-bit activations a token's numerics go by its position, not by its step: the
/// prompt's rows multiply at f32's precision (its logits are the f32 path's within
/// [`prompt_tolerance`]: they go through the exact product instead of the dense copy), the sampled tokens' in 8 bits,
/// and a sampled token decoded beside another sequence's 20-token prompt (a step past
/// `quant::MAX_ROWS` rows, where f32 rows would go through the gemm) gives the same bits
/// as decoded alone.
#[test]
fn int8_rows_go_by_position_not_by_step() {
    use lathe_engine::{KvPool, SeqCache, SeqStep};
    let m = load_smollm2();
    let r = reference();
    let prompt = ids(&r["cases"]["chat"]["input_ids"]);
    let sampled = ids(&r["cases"]["chat"]["greedy32_ids"])[..4].to_vec();
    let other = ids(&r["cases"]["plain"]["input_ids"]);
    assert!(other.len() > lathe_engine::quant::MAX_ROWS);
    let vocab = m.model.config.vocab_size;
    // The prompt, then each sampled token in a step of its own or beside `other`'s prompt;
    // the logits of every step of the first sequence.
    let run = |beside: bool| -> Vec<Vec<f32>> {
        let mut pool = KvPool::new(&m.model.config, 64);
        let (mut a, mut b) = (SeqCache::new(0), SeqCache::new(0));
        let mut out = Vec::new();
        let all: Vec<u32> = prompt.iter().chain(&sampled).copied().collect();
        let mut at = 0;
        for (k, end) in std::iter::once(prompt.len()).chain((1..=sampled.len()).map(|i| prompt.len() + i)).enumerate() {
            assert!(a.reserve(&mut pool, end - at));
            let mut rows = vec![SeqStep { tokens: &all[at..end], cache: &mut a, adapter: None, prompt_len: prompt.len() }];
            if beside && k == 1 {
                assert!(b.reserve(&mut pool, other.len()));
                rows.push(SeqStep { tokens: &other, cache: &mut b, adapter: None, prompt_len: other.len() });
            }
            let logits = m.model.forward_paged(&mut rows, &mut pool).unwrap();
            out.push(logits[..vocab].to_vec());
            at = end;
        }
        out
    };
    lathe_engine::quant::set_int8_activations(false);
    let exact = run(false);
    lathe_engine::quant::set_int8_activations(true);
    let (alone, beside) = (run(false), run(true));
    let diff = max_abs_diff(&alone[0], &exact[0]);
    assert!(diff < prompt_tolerance(), "the prompt multiplies at f32's precision whatever is asked: max |Δlogit| {diff}");
    assert!(alone[1..].iter().zip(&exact[1..]).all(|(a, e)| max_abs_diff(a, e) > LOGIT_TOLERANCE), "sampled tokens multiply in 8 bits");
    assert_eq!(beside, alone, "a sampled token's logits do not depend on its step");
}

/// With 8-bit sampled tokens, a prompt's rows are the same bits however its step is cut:
/// computed whole, from the prefix cache on (only the tail), in uneven pieces, or beside
/// another prompt. So are the sampled tokens after it: a repeated request answers the same
/// (8-bit rounding would turn a prompt's one-ulp difference into another code, and under a
/// JSON grammar a near tie into another token). With an adapter too, whose rows beside
/// another sequence's through the same adapter are one product.
#[test]
fn with_8_bit_tokens_a_prompt_gives_the_same_bits_however_its_step_is_cut() {
    use lathe_engine::model::paged::BLOCK_TOKENS;
    use lathe_engine::{KvPool, SeqCache, SeqStep};
    lathe_engine::quant::set_int8_activations(true);
    let m = load_smollm2();
    let r = reference();
    let prompt: Vec<u32> = ids(&r["cases"]["plain"]["input_ids"]).into_iter().chain(ids(&r["cases"]["chat"]["input_ids"])).collect();
    let other = ids(&r["cases"]["plain"]["input_ids"]);
    assert!(prompt.len() > 2 * BLOCK_TOKENS + 1);
    let vocab = m.model.config.vocab_size;
    // The prompt in pieces ending at `cuts` (from the pool's prefix cache on when `cached`,
    // beside `other`'s prompt in the first step when `beside`), then six greedy tokens one
    // a step: the logits after the prompt and after each token.
    let run = |pool: &mut KvPool, cuts: &[usize], cached: bool, beside: bool, adapter: Option<&lathe_engine::Adapter>| -> Vec<Vec<f32>> {
        let mut cache = SeqCache::new(u64::from(adapter.is_some()));
        let mut at = if cached { cache.attach_prefix(pool, &prompt) } else { 0 };
        assert_eq!(at > 0, cached);
        let mut tokens = prompt.clone();
        let mut out = Vec::new();
        let mut ends: Vec<usize> = cuts.iter().copied().filter(|&c| c > at).collect();
        ends.push(prompt.len());
        for (k, end) in ends.into_iter().enumerate() {
            assert!(cache.reserve(pool, end - at));
            let mut b = SeqCache::new(0);
            let mut rows = vec![SeqStep { tokens: &tokens[at..end], cache: &mut cache, adapter, prompt_len: prompt.len() }];
            if beside && k == 0 {
                assert!(b.reserve(pool, other.len()));
                rows.push(SeqStep { tokens: &other, cache: &mut b, adapter, prompt_len: other.len() });
            }
            let logits = m.model.forward_paged(&mut rows, pool).unwrap();
            b.release(pool);
            if end == prompt.len() {
                out.push(logits[..vocab].to_vec());
            }
            at = end;
        }
        for _ in 0..6 {
            tokens.push(argmax(out.last().unwrap()));
            let logits = one_paged_step(&m, pool, &mut cache, &tokens[at..], adapter, prompt.len());
            out.push(logits);
            at += 1;
        }
        cache.release(pool);
        out
    };
    let adapter = lathe_engine::tiny::random_adapter(&m.model.config, 8, 3, &crate::common::device());
    for adapter in [None, Some(&adapter)] {
        let mut pool = KvPool::new(&m.model.config, 64);
        let whole = run(&mut pool, &[], false, false, adapter);
        let from_cache = run(&mut pool, &[], true, false, adapter);
        assert!(pool.prefix_hits() >= 2, "the second request reused the first's blocks");
        assert_eq!(from_cache, whole, "the prompt's tail alone, after its cached blocks");
        let mut fresh = KvPool::new(&m.model.config, 64);
        assert_eq!(run(&mut fresh, &[1, 6, 23], false, false, adapter), whole, "the prompt in pieces of 1, 5, 17 and the rest");
        let mut fresh = KvPool::new(&m.model.config, 64);
        assert_eq!(run(&mut fresh, &[], false, true, adapter), whole, "beside another prompt");
    }
}

/// A step longer than a pass ([`lathe_engine::model::paged::PASS_TOKENS`]) runs as several
/// passes, each row's tokens in order: the logits of every row's last token, and the
/// greedy tokens decoded after them, are the same bits as in one pass, whether a pass
/// cuts a prompt in the middle, ends on a row's last token, or holds rows that start in
/// it.
#[test]
fn a_step_in_passes_gives_the_same_bits_as_one_pass() {
    use lathe_engine::{KvPool, SeqCache, SeqStep};
    lathe_engine::quant::set_int8_activations(true);
    let m = load_smollm2();
    let r = reference();
    let prompts = [ids(&r["cases"]["plain"]["input_ids"]), ids(&r["cases"]["chat"]["input_ids"]), ids(&r["cases"]["plain"]["input_ids"])[..5].to_vec()];
    let vocab = m.model.config.vocab_size;
    // The three prompts as one step in passes of `pass` tokens, then four greedy tokens
    // for each row, one step each: every step's logits.
    let run = |pass: usize| -> Vec<Vec<f32>> {
        let mut pool = KvPool::new(&m.model.config, 64);
        let mut caches: Vec<SeqCache> = (0..3).map(|_| SeqCache::new(0)).collect();
        let mut tokens: Vec<Vec<u32>> = prompts.to_vec();
        let mut out = Vec::new();
        let mut at = vec![0; 3];
        for _ in 0..5 {
            let mut rows = Vec::new();
            for (((cache, t), a), p) in caches.iter_mut().zip(&tokens).zip(&at).zip(&prompts) {
                assert!(cache.reserve(&mut pool, t.len() - a));
                rows.push(SeqStep { tokens: &t[*a..], cache, adapter: None, prompt_len: p.len() });
            }
            let logits = m.model.forward_paged_by(&mut rows, &mut pool, pass).unwrap();
            drop(rows);
            for (i, t) in tokens.iter_mut().enumerate() {
                at[i] = t.len();
                t.push(argmax(&logits[i * vocab..(i + 1) * vocab]));
            }
            out.push(logits);
        }
        out
    };
    let total: usize = prompts.iter().map(Vec::len).sum();
    let whole = run(total);
    for pass in [1, 7, prompts[0].len(), prompts[0].len() + 3, total - 1] {
        assert!(pass < total);
        assert!(run(pass) == whole, "passes of {pass} tokens give other bits than one pass");
    }
}
