//! Tiny random Llama and Mistral models written in both formats load back and compute
//! what the in-memory model they were written from computes.

use lathe_engine::config::Architecture;
use lathe_engine::generate::logits_to_host;
use lathe_engine::tiny::write_tiny;
use lathe_engine::{CausalLm, KvCache, Logits, SamplingParams, Step};

use crate::common::{device, max_abs_diff};

fn logits(model: &CausalLm, tokens: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(model.config.num_layers);
    logits_to_host(model.forward(&Step::single(tokens, 0), &mut cache, Logits::All)).unwrap()
}

const TOKENS: [u32; 20] = [5, 80, 81, 90, 100, 3, 44, 200, 201, 7, 9, 11, 250, 13, 17, 19, 23, 29, 31, 37];

#[test]
fn written_models_load_back_with_the_same_logits() {
    for arch in [Architecture::Llama, Architecture::Mistral] {
        let dir = tempfile::tempdir().unwrap();
        let tiny = write_tiny(dir.path(), arch, 42).unwrap();
        let device = device();
        let original = CausalLm::load(tiny.config.clone(), &tiny.weights, &device).unwrap();
        let want = logits(&original, &TOKENS);
        for path in [&tiny.hf_folder, &tiny.gguf] {
            let loaded = lathe_engine::load(path, &device).unwrap();
            assert_eq!(loaded.model.config.architecture, arch);
            let got = logits(&loaded.model, &TOKENS);
            let diff = max_abs_diff(&want, &got);
            assert!(diff < 1e-5, "{arch:?} from {}: max |Δlogit| = {diff}", path.display());
        }
    }
}

#[test]
fn kv_cache_steps_match_a_full_forward() {
    for arch in [Architecture::Llama, Architecture::Mistral] {
        let dir = tempfile::tempdir().unwrap();
        let tiny = write_tiny(dir.path(), arch, 7).unwrap();
        let m = CausalLm::load(tiny.config.clone(), &tiny.weights, &device()).unwrap();
        let full = logits(&m, &TOKENS);
        let vocab = m.config.vocab_size;
        let mut cache = KvCache::new(m.config.num_layers);
        let first = logits_to_host(m.forward(&Step::single(&TOKENS[..5], 0), &mut cache, Logits::All)).unwrap();
        assert!(max_abs_diff(&first, &full[..5 * vocab]) < 1e-5);
        for (i, &t) in TOKENS.iter().enumerate().skip(5) {
            let l = logits_to_host(m.forward(&Step::single(&[t], i), &mut cache, Logits::Last)).unwrap();
            let diff = max_abs_diff(&l, &full[i * vocab..(i + 1) * vocab]);
            assert!(diff < 1e-4, "{arch:?} position {i}: {diff}");
        }
    }
}

#[test]
fn mistral_sliding_window_limits_what_a_token_sees() {
    // Window 8 over 2 layers: the last of 20 positions sees back to position 19 - 2·7 = 5,
    // so changing token 0 must not change its logits, unless the window is removed.
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Mistral, 3).unwrap();
    assert_eq!(tiny.config.sliding_window, Some(8));
    let mut other = TOKENS;
    other[0] = 250;
    let last = |cfg: lathe_engine::ModelConfig, tokens: &[u32]| {
        let m = CausalLm::load(cfg, &tiny.weights, &device()).unwrap();
        let mut cache = KvCache::new(m.config.num_layers);
        logits_to_host(m.forward(&Step::single(tokens, 0), &mut cache, Logits::Last)).unwrap()
    };
    let windowed = tiny.config.clone();
    assert_eq!(last(windowed.clone(), &TOKENS), last(windowed, &other));
    let full = lathe_engine::ModelConfig { sliding_window: None, ..tiny.config.clone() };
    assert!(max_abs_diff(&last(full.clone(), &TOKENS), &last(full, &other)) > 1e-4);
}

#[test]
fn sampling_is_reproducible_and_stops_on_strings() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Llama, 5).unwrap();
    let m = lathe_engine::load(&tiny.gguf, &device()).unwrap();
    let prompt = m.tokenizer.encode("the thin tin", false).unwrap();
    let params = SamplingParams { temperature: 0.9, top_p: Some(0.95), top_k: Some(50), seed: 9, max_tokens: 24, ignore_eos: true, ..Default::default() };
    let run = |p: &SamplingParams| lathe_engine::generate(&m.model, &m.tokenizer, std::slice::from_ref(&prompt), p, &mut |_, _| {}).unwrap().remove(0);
    let a = run(&params);
    assert_eq!(a.token_ids.len(), 24);
    assert_eq!(a, run(&params));
    assert_ne!(a.token_ids, run(&SamplingParams { seed: 10, ..params.clone() }).token_ids);
    // Stop on a piece of the text the unconstrained run produced.
    let cut: String = a.text.chars().skip(3).take(2).collect();
    let stopped = run(&SamplingParams { stop: vec![cut.clone()], ..params.clone() });
    assert_eq!(stopped.finish_reason, lathe_engine::FinishReason::Stop);
    assert!(!stopped.text.contains(&cut) && a.text.starts_with(&stopped.text), "{:?} / {:?}", stopped.text, a.text);
}

#[test]
fn sharded_safetensors_load_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Mistral, 11).unwrap();
    let hf = &tiny.hf_folder;
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        std::fs::write(hf.join(&file), safetensors::serialize(views, None).unwrap()).unwrap();
        for n in *part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(hf.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let device = device();
    let original = CausalLm::load(tiny.config.clone(), &tiny.weights, &device).unwrap();
    let loaded = lathe_engine::load(hf, &device).unwrap();
    assert!(max_abs_diff(&logits(&original, &TOKENS), &logits(&loaded.model, &TOKENS)) < 1e-5);
}

#[test]
fn quantized_gguf_weights_stay_close_on_both_paths() {
    use lathe_engine::export::write_gguf;
    use lathe_engine::gguf::GgmlType;
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Llama, 13).unwrap();
    let device = device();
    let want = logits(&CausalLm::load(tiny.config.clone(), &tiny.weights, &device).unwrap(), &TOKENS);
    let vocab = tiny.config.vocab_size;
    // Bounds at ~2x what each format measured here with these uniform random weights
    // (F16 2.3e-3, Q8_0 0.05, Q4 0.72-0.75): coarser formats cost more, and a block
    // layout bug costs far more than any of them.
    for (ty, tol) in [(GgmlType::F16, 5e-3), (GgmlType::Q8_0, 0.1), (GgmlType::Q4_1, 1.5), (GgmlType::Q4_0, 1.5)] {
        let path = dir.path().join(format!("{}.gguf", ty.name()));
        write_gguf(&path, &tiny.config, &tiny.weights, &lathe_engine::tiny::tokenizer_meta(), ty).unwrap();
        let m = lathe_engine::load(&path, &device).unwrap().model;
        // Prefill (dense gemm over dequantized weights) ...
        let dense = logits(&m, &TOKENS);
        let diff = max_abs_diff(&want, &dense);
        assert!(diff < tol, "{ty:?}: max |Δlogit| {diff} ≥ {tol}");
        // ... and single-token steps (the quantized-block kernel) agree with each other.
        let mut cache = KvCache::new(m.config.num_layers);
        for (i, &t) in TOKENS.iter().enumerate() {
            let l = logits_to_host(m.forward(&Step::single(&[t], i), &mut cache, Logits::Last)).unwrap();
            let d = max_abs_diff(&l, &dense[i * vocab..(i + 1) * vocab]);
            assert!(d < 1e-4, "{ty:?} position {i}: decode vs prefill {d}");
        }
    }
}

#[test]
fn the_test_device_computes_what_the_cpu_computes() {
    // On the CPU pass this compares the CPU with itself; the GPU pass of scripts/test.sh runs
    // it on Vulkan, and `lathe bench parity --device cuda` runs the same check on NVIDIA.
    for arch in [Architecture::Llama, Architecture::Mistral] {
        let dir = tempfile::tempdir().unwrap();
        let tiny = write_tiny(dir.path(), arch, 11).unwrap();
        let cpu = lathe_engine::load(&tiny.gguf, &lathe_engine::Device::flex()).unwrap();
        let other = lathe_engine::load(&tiny.gguf, &device()).unwrap();
        let p = lathe_engine::parity::compare(&cpu.model, &other.model, &cpu.tokenizer, &TOKENS, 12).unwrap();
        assert_eq!(p.positions, TOKENS.len());
        assert_eq!(p.greedy_cpu.len(), 12, "greedy decoding ignores the end of sequence here");
        assert!(p.holds(1e-4), "{arch:?}: {p:?}");
        assert_eq!(p.argmax_agreement, 1.0, "{arch:?}: {p:?}");
    }
}

/// A model written as Q4_K_M (Q4_K, with Q6_K for the head and some value and down
/// projections) loads with dense copies beside its blocks, or, for inference
/// (`load_blocks`), with the blocks alone; both compute the same logits at every step (a
/// 20-token prompt through the expanded panels), near the f32 model's, and generate the
/// same greedy tokens.
#[test]
fn a_q4_k_m_model_computes_alike_from_its_blocks_alone() {
    use lathe_engine::export::{q4_k_m_type, write_gguf};
    use lathe_engine::gguf::{GgmlType, GgufFile};
    use lathe_engine::model::set_dense_copy_limit;
    for arch in [Architecture::Llama, Architecture::Mistral] {
        let dir = tempfile::tempdir().unwrap();
        // K-quants need rows of whole 256-value blocks.
        let config = lathe_engine::ModelConfig {
            hidden_size: 256,
            intermediate_size: 512,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            ..lathe_engine::tiny::tiny_config(arch)
        };
        let weights = lathe_engine::tiny::random_weights(&config, 21);
        let path = dir.path().join("model.gguf");
        write_gguf(&path, &config, &weights, &lathe_engine::tiny::tokenizer_meta(), GgmlType::Q4_K).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let head = if config.tie_word_embeddings { "token_embd.weight" } else { "output.weight" };
        assert_eq!(file.tensor_info(head).unwrap().dtype, GgmlType::Q6_K, "{arch:?}");
        assert_eq!(file.tensor_info("blk.0.attn_q.weight").unwrap().dtype, GgmlType::Q4_K, "{arch:?}");
        // Of two layers, the last is in the widened eighth.
        assert_eq!(q4_k_m_type("model.layers.1.mlp.down_proj.weight", &config), GgmlType::Q6_K);
        assert_eq!(q4_k_m_type("model.layers.0.mlp.down_proj.weight", &config), GgmlType::Q4_K);

        let device = device();
        let f32_logits = logits(&CausalLm::load(config.clone(), &weights, &device).unwrap(), &TOKENS);
        set_dense_copy_limit(usize::MAX);
        let with_copies = lathe_engine::load(&path, &device).unwrap();
        set_dense_copy_limit(1 << 30);
        let blocks_alone = lathe_engine::load_blocks(&path, &device).unwrap();
        assert!(with_copies.model.dense_projection_bytes() > 0, "{arch:?}");
        // Blocks are kept on the CPU only (a GPU holds the expanded weights).
        if blocks_alone.model.on_host() {
            assert_eq!(blocks_alone.model.dense_projection_bytes(), 0, "{arch:?}");
        }

        let want = logits(&with_copies.model, &TOKENS);
        let got = logits(&blocks_alone.model, &TOKENS);
        assert!(max_abs_diff(&want, &got) < 1e-3, "{arch:?}: blocks alone vs dense copies {}", max_abs_diff(&want, &got));
        // Near the f32 model as Q4_1 is (its 32-value blocks have exact f16 scales, where
        // Q4_K rounds its sub-blocks' to 6 bits): a layout bug costs far more.
        let q4_1 = dir.path().join("q4_1.gguf");
        write_gguf(&q4_1, &config, &weights, &lathe_engine::tiny::tokenizer_meta(), GgmlType::Q4_1).unwrap();
        let q4_1 = max_abs_diff(&f32_logits, &logits(&lathe_engine::load(&q4_1, &device).unwrap().model, &TOKENS));
        let k = max_abs_diff(&f32_logits, &got);
        assert!(k < 1.5 * q4_1, "{arch:?}: Q4_K_M {k} vs Q4_1 {q4_1}");
        let vocab = config.vocab_size;
        let mut cache = KvCache::new(config.num_layers);
        for (i, &t) in TOKENS.iter().enumerate() {
            let l = logits_to_host(blocks_alone.model.forward(&Step::single(&[t], i), &mut cache, Logits::Last)).unwrap();
            let d = max_abs_diff(&l, &want[i * vocab..(i + 1) * vocab]);
            assert!(d < 1e-3, "{arch:?} position {i}: decode from blocks vs prefill with copies {d}");
        }
        let prompt = with_copies.tokenizer.encode("the thin tin", false).unwrap();
        let greedy = SamplingParams { max_tokens: 12, ignore_eos: true, ..Default::default() };
        let run = |m: &lathe_engine::LoadedModel| lathe_engine::generate(&m.model, &m.tokenizer, std::slice::from_ref(&prompt), &greedy, &mut |_, _| {}).unwrap().remove(0).token_ids;
        assert_eq!(run(&blocks_alone), run(&with_copies), "{arch:?}");
    }
}

/// A LoRA training step's loss and gradients on the test device (burn's autodiff graph:
/// wgpu in the GPU pass of scripts/test.sh) equal those of the step CPU training takes
/// (`host_grads`, written out by hand on host buffers).
#[test]
fn lora_gradients_on_the_test_device_equal_the_cpus() {
    use lathe_engine::train::{Encoded, batch_loss};
    let dir = tempfile::tempdir().unwrap();
    let tiny = write_tiny(dir.path(), Architecture::Llama, 13).unwrap();
    // Two rows of different lengths, so padding is masked too.
    let examples = [
        Encoded { tokens: TOKENS.to_vec(), target: (0..TOKENS.len()).map(|i| i >= 4).collect() },
        Encoded { tokens: TOKENS[3..15].to_vec(), target: vec![true; 12] },
    ];
    let refs: Vec<&Encoded> = examples.iter().collect();
    let run = |device: &lathe_engine::Device| {
        let m = lathe_engine::load(&tiny.gguf, device).unwrap();
        let adapter = lathe_engine::tiny::random_adapter(&m.model.config, 4, 5, device).tracked();
        let (loss, n) = batch_loss(&m.model, &refs, &adapter, false).unwrap();
        let value = loss.clone().into_data().convert::<f32>().try_to_vec::<f32>().unwrap()[0];
        let mut g = loss.backward();
        let grads: Vec<(String, Vec<f32>)> = adapter
            .params()
            .into_iter()
            .map(|(name, p)| (name, p.grad_remove(&mut g).unwrap().into_data().convert::<f32>().try_to_vec::<f32>().unwrap()))
            .collect();
        (value, n, grads)
    };
    let cpu = lathe_engine::load(&tiny.gguf, &lathe_engine::Device::flex()).unwrap();
    let adapter = lathe_engine::tiny::random_adapter(&cpu.model.config, 4, 5, &lathe_engine::Device::flex());
    let (cpu_loss, grads) = lathe_engine::train::host_grads(&cpu.model, &refs, &adapter, false, 0, 1.0, false).unwrap();
    let cpu_loss = cpu_loss as f32;
    let cpu: Vec<(String, Vec<f32>)> = adapter.params().into_iter().map(|(n, _)| n).zip(grads.into_iter().map(|g| g.into_data().try_to_vec::<f32>().unwrap())).collect();
    let (loss, n, other) = run(&device());
    assert_eq!(n, examples.iter().map(|e| e.target[1..].iter().filter(|&&t| t).count()).sum::<usize>());
    assert!((loss - cpu_loss).abs() <= 1e-4 * cpu_loss.abs(), "loss {loss} vs the CPU's {cpu_loss}");
    assert_eq!(other.len(), cpu.len());
    for ((name, want), (_, got)) in cpu.iter().zip(&other) {
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{name} got no gradient");
        let d = max_abs_diff(want, got);
        assert!(d <= 1e-3 * scale, "{name}: {d} against a largest gradient of {scale}");
    }
}
