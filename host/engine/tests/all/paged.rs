//! The paged forward pass: rows packed into one step, each with its own cache blocks and
//! adapter, compute what each sequence computes alone through the plain forward pass.

use lathe_engine::config::Architecture;
use lathe_engine::generate::logits_to_host;
use lathe_engine::model::paged::{BLOCK_TOKENS, KvPool, SeqCache, SeqStep};
use lathe_engine::tiny::{random_adapter, write_tiny};
use lathe_engine::{Adapter, CausalLm, KvCache, Logits, Step};

use crate::common::{device, max_abs_diff};

/// Logits of every position of `tokens` alone, through the plain forward pass.
fn alone(m: &CausalLm, adapter: Option<&Adapter>, tokens: &[u32]) -> Vec<f32> {
    logits_to_host(m.forward_with(&Step::single(tokens, 0), &mut KvCache::default(), Logits::All, adapter)).unwrap()
}

fn sequence(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 3 + (i * 37 + seed * 101) % 250).collect()
}

#[test]
fn packed_rows_with_their_own_adapters_match_each_row_alone() {
    for arch in [Architecture::Llama, Architecture::Mistral] {
        let dir = tempfile::tempdir().unwrap();
        let tiny = write_tiny(dir.path(), arch, 11).unwrap();
        let m = CausalLm::load(tiny.config.clone(), &tiny.weights, &device()).unwrap();
        let vocab = m.config.vocab_size;
        let (a1, a2) = (random_adapter(&m.config, 4, 1, &device()), random_adapter(&m.config, 4, 2, &device()));
        let adapters = [None, Some(&a1), Some(&a1), Some(&a2)];
        // Long enough to cross blocks and Mistral's window of 8.
        let seqs: Vec<Vec<u32>> = (0..4).map(|r| sequence(r, 20 + 7 * r as usize)).collect();
        let want: Vec<Vec<f32>> = seqs.iter().zip(adapters).map(|(s, a)| alone(&m, a, s)).collect();
        assert!(max_abs_diff(&want[1], &alone(&m, None, &seqs[1])) > 1e-3, "the adapter changes the logits");

        let mut pool = KvPool::new(&m.config, 64);
        let mut caches: Vec<SeqCache> = (0..4).map(SeqCache::new).collect();
        // Row r joins at step r with a prompt of 5 + r tokens, then adds one token a step:
        // every step mixes a prompt with single decode tokens.
        let mut done = vec![0usize; 4];
        for step in 0..64 {
            let mut spans = Vec::new();
            for r in 0..4 {
                if step < r || done[r] == seqs[r].len() {
                    continue;
                }
                let n = if done[r] == 0 { 5 + r } else { 1 };
                spans.push((r, done[r], n));
            }
            if spans.is_empty() {
                break;
            }
            let mut rows: Vec<SeqStep<'_>> = Vec::new();
            let mut rest: &mut [SeqCache] = &mut caches;
            let mut base = 0;
            for &(r, at, n) in &spans {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(r - base);
                let (cache, tail) = tail.split_first_mut().unwrap();
                rest = tail;
                base = r + 1;
                assert!(cache.reserve(&mut pool, n));
                rows.push(SeqStep { tokens: &seqs[r][at..at + n], cache, adapter: adapters[r], prompt_len: 5 + r });
            }
            let logits = m.forward_paged(&mut rows, &mut pool).unwrap();
            for (k, &(r, at, n)) in spans.iter().enumerate() {
                let p = at + n - 1;
                let diff = max_abs_diff(&logits[k * vocab..(k + 1) * vocab], &want[r][p * vocab..(p + 1) * vocab]);
                assert!(diff < 1e-4, "{arch:?} row {r} position {p}: max |Δlogit| {diff}");
                done[r] += n;
            }
        }
        assert_eq!(done, seqs.iter().map(Vec::len).collect::<Vec<_>>());
    }
}

#[test]
fn a_shared_prefix_is_computed_once_and_gives_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Llama, 5).unwrap();
    let m = CausalLm::load(tiny.config.clone(), &tiny.weights, &device()).unwrap();
    let vocab = m.config.vocab_size;
    let prefix = sequence(9, 2 * BLOCK_TOKENS + 3);
    let with = |tail: &[u32]| prefix.iter().chain(tail).copied().collect::<Vec<u32>>();
    let (first, second) = (with(&[7, 8, 9]), with(&[40, 41]));
    let mut pool = KvPool::new(&m.config, 8);

    let run = |pool: &mut KvPool, tokens: &[u32], salt: u64| {
        let mut cache = SeqCache::new(salt);
        let cached = cache.attach_prefix(pool, tokens);
        assert!(cache.reserve(pool, tokens.len() - cached));
        let logits = m.forward_paged(&mut [SeqStep { tokens: &tokens[cached..], cache: &mut cache, adapter: None, prompt_len: tokens.len() }], pool).unwrap();
        (cache, cached, logits)
    };
    let (mut c1, cached, _) = run(&mut pool, &first, 0);
    assert_eq!(cached, 0);
    let (mut c2, cached, logits) = run(&mut pool, &second, 0);
    assert_eq!(cached, 2 * BLOCK_TOKENS, "both full blocks of the shared prefix are reused");
    assert_eq!(pool.prefix_hits(), 2);
    let p = second.len() - 1;
    let diff = max_abs_diff(&logits, &alone(&m, None, &second)[p * vocab..(p + 1) * vocab]);
    assert!(diff < 1e-4, "max |Δlogit| {diff}");
    // Another adapter (salt) shares nothing.
    let (mut c3, cached, _) = run(&mut pool, &second, 1);
    assert_eq!(cached, 0);

    // Released blocks stay cached until the pool needs them.
    for c in [&mut c1, &mut c2, &mut c3] {
        c.release(&mut pool);
    }
    assert_eq!(pool.available(), pool.capacity());
    let (mut c4, cached, _) = run(&mut pool, &first, 0);
    assert_eq!(cached, 2 * BLOCK_TOKENS);
    c4.release(&mut pool);
}

#[test]
fn a_full_pool_refuses_without_taking_anything() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Llama, 5).unwrap();
    let mut pool = KvPool::new(&tiny.config, 3);
    let mut a = SeqCache::new(0);
    assert!(a.reserve(&mut pool, 2 * BLOCK_TOKENS));
    let mut b = SeqCache::new(0);
    assert!(!b.reserve(&mut pool, 2 * BLOCK_TOKENS), "two blocks asked, one left");
    assert_eq!(pool.available(), 1);
    assert!(b.reserve(&mut pool, BLOCK_TOKENS));
    a.release(&mut pool);
    assert_eq!(pool.available(), 2);
}
