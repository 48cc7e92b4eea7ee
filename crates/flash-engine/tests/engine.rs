//! The CPU engine on tiny synthesized checkpoints: KV-cache consistency,
//! teacher forcing, generation, config and weight errors.

use flash_engine::{
    generate, Backend, CpuModel, CpuOptions, EngineError, FinishReason, GenerateOptions, Message,
    ModelConfig, SamplingParams, TextTokenizer,
};
use flash_format::DType;
use flash_load::LoadOptions;
use flash_synth::{spec, synth, Arch, SynthOptions};
use std::path::{Path, PathBuf};

fn tiny(arch: Arch, dtype: DType, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{arch}-{dtype}"));
    let opts = SynthOptions {
        seed: 5,
        dtype,
        ..Default::default()
    };
    synth(&spec(arch, "tiny").unwrap(), &out, &opts).unwrap();
    out
}

fn load(dir: &Path) -> CpuModel {
    CpuModel::load(dir, &LoadOptions::default(), &CpuOptions::default())
        .unwrap()
        .0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const TOKENS: [u32; 12] = [5, 300, 17, 42, 99, 256, 1, 318, 77, 140, 12, 200];

#[test]
fn kv_cache_decode_equals_prefill() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in Arch::ALL {
        let mut m = load(&tiny(arch, DType::BF16, tmp.path()));
        let n = TOKENS.len();
        // Prefill of n tokens ...
        let full = m.forward(&TOKENS, 0).unwrap().to_vec();
        assert_eq!(m.position(), n);
        // ... equals prefill of n-1, then decode of 1.
        m.reset();
        assert_eq!(m.position(), 0);
        m.forward(&TOKENS[..n - 1], 0).unwrap();
        let step = m.forward(&TOKENS[n - 1..], n - 1).unwrap().to_vec();
        let d = max_abs_diff(&full, &step);
        assert!(d < 1e-5, "{arch}: prefill vs decode differ by {d}");
        // One token at a time from the start gives the same, too.
        m.reset();
        let mut last = Vec::new();
        for (i, t) in TOKENS.iter().enumerate() {
            last = m.forward(&[*t], i).unwrap().to_vec();
        }
        assert!(max_abs_diff(&full, &last) < 1e-5, "{arch}: token by token");
        // Rewinding to a shorter prefix recomputes the same.
        let again = m.forward(&TOKENS[6..], 6).unwrap().to_vec();
        assert!(max_abs_diff(&full, &again) < 1e-5, "{arch}: rewind");
        // A different last token changes the logits (the check can fail).
        let other = m.forward(&[TOKENS[n - 1] + 1], n - 1).unwrap().to_vec();
        assert!(
            max_abs_diff(&full, &other) > 1e-4,
            "{arch}: logits ignore the token"
        );
    }
}

#[test]
fn forward_all_is_teacher_forced_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load(&tiny(Arch::Llama, DType::F32, tmp.path()));
    let v = m.config().vocab_size;
    let all = m.forward_all(&TOKENS, 0).unwrap();
    assert_eq!(all.len(), TOKENS.len() * v);
    m.reset();
    for (i, t) in TOKENS.iter().enumerate() {
        let row = m.forward(&[*t], i).unwrap();
        let d = max_abs_diff(&all[i * v..(i + 1) * v], row);
        assert!(d < 1e-5, "position {i}: {d}");
    }
}

#[test]
fn forward_rejects_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(Arch::Qwen3, DType::BF16, tmp.path());
    let mut m = CpuModel::load(
        &dir,
        &LoadOptions::default(),
        &CpuOptions {
            max_seq_len: Some(8),
        },
    )
    .unwrap()
    .0;
    assert!(matches!(m.forward(&[], 0), Err(EngineError::Invalid(_))));
    let e = m.forward(&[320], 0).unwrap_err().to_string();
    assert!(e.contains("320") && e.contains("vocabulary"), "{e}");
    assert!(matches!(
        m.forward(&[1, 2, 3], 2),
        Err(EngineError::Invalid(_))
    ));
    assert!(matches!(
        m.forward(&[1; 9], 0),
        Err(EngineError::ContextFull { needed: 9, max: 8 })
    ));
    m.forward(&[1; 8], 0).unwrap();
}

#[test]
fn config_errors_name_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let e = ModelConfig::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");

    let dir = tiny(Arch::Qwen3, DType::BF16, tmp.path());
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("Qwen3ForCausalLM", "MambaForCausalLM")).unwrap();
    let e = ModelConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains("MambaForCausalLM") && e.contains("config.json"),
        "{e}"
    );
    assert!(
        e.contains("Qwen3ForCausalLM"),
        "lists what is supported: {e}"
    );

    std::fs::write(&path, text.replace("\"hidden_size\"", "\"hidden\"")).unwrap();
    let e = ModelConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("hidden_size"), "{e}");

    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut bad = v.clone();
    bad["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    let e = ModelConfig::from_json_str(&bad.to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("yarn"), "{e}");
    let mut bad = v;
    bad["num_key_value_heads"] = serde_json::json!(3);
    let e = ModelConfig::from_json_str(&bad.to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_key_value_heads"), "{e}");
}

/// A special token id too large for a token is refused by name, not cut to
/// 32 bits (2^32 + 1 would have become id 1); `generation_config.json`'s
/// ids pass the same checks as `config.json`'s, and its errors name it.
#[test]
fn special_token_ids_are_checked_in_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(Arch::Qwen3, DType::BF16, tmp.path());
    let cfg_path = dir.join("config.json");
    let gen_path = dir.join("generation_config.json");
    let (cfg_text, gen_text) = (
        std::fs::read_to_string(&cfg_path).unwrap(),
        std::fs::read_to_string(&gen_path).unwrap(),
    );
    let mut v: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    v["eos_token_id"] = serde_json::json!([2, (1u64 << 32) + 1]);
    let e = ModelConfig::from_json_str(&v.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("eos_token_id 4294967297 is not a token id"),
        "{e}"
    );

    let vocab = v["vocab_size"].as_u64().unwrap();
    let mut g: serde_json::Value = serde_json::from_str(&gen_text).unwrap();
    g["eos_token_id"] = serde_json::json!(vocab);
    std::fs::write(&gen_path, g.to_string()).unwrap();
    let e = ModelConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json") && e.contains(&format!("special token id {vocab}")),
        "{e}"
    );
    g["eos_token_id"] = serde_json::json!(u64::MAX);
    std::fs::write(&gen_path, g.to_string()).unwrap();
    let e = ModelConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("not a token id"),
        "{e}"
    );
    // Values that are not ids are left out, as Hugging Face does.
    g["eos_token_id"] = serde_json::json!(["</s>", -1]);
    std::fs::write(&gen_path, g.to_string()).unwrap();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    assert!(cfg.generation.eos_token_ids.is_empty());
}

#[test]
fn config_reads_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let q = ModelConfig::from_dir(&tiny(Arch::Qwen3, DType::BF16, tmp.path())).unwrap();
    assert_eq!(q.arch, flash_engine::Arch::Qwen3);
    assert!(q.tie_word_embeddings && q.rope_scaling.is_none());
    assert_eq!(q.head_dim, 16);
    // <|im_end|> from config.json, <|endoftext|> added by generation_config.json.
    assert_eq!(q.eos_token_ids.len(), 2);
    assert_eq!(q.generation.top_k, Some(20));
    assert_eq!(q.generation.do_sample, Some(true));
    let l = ModelConfig::from_dir(&tiny(Arch::Llama, DType::BF16, tmp.path())).unwrap();
    assert!(matches!(
        l.rope_scaling,
        Some(flash_engine::RopeScaling::Llama3 { factor, .. }) if factor == 32.0
    ));
    assert!(!l.tie_word_embeddings);
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(Arch::Llama, DType::BF16, tmp.path());
    // Claim a larger MLP than the weights have.
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"intermediate_size\": 128", "\"intermediate_size\": 256"),
    )
    .unwrap();
    let e = CpuModel::load(&dir, &LoadOptions::default(), &CpuOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight"), "{e}");
    assert!(e.contains("256"), "{e}");
    // Say the model is tied although it stores lm_head: lm_head is used.
    // Say it is Qwen3: q_norm is missing.
    std::fs::write(&path, text.replace("LlamaForCausalLM", "Qwen3ForCausalLM")).unwrap();
    let e = CpuModel::load(&dir, &LoadOptions::default(), &CpuOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("q_norm") && e.contains("missing"), "{e}");
}

#[test]
fn generation_is_deterministic_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(Arch::Qwen3, DType::BF16, tmp.path());
    let mut m = load(&dir);
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let text = tok
        .apply_chat_template(&[Message::new("user", "Hello world")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    );
    let prompt = tok.encode(&text, false).unwrap();
    let opts = GenerateOptions {
        max_tokens: 20,
        sampling: SamplingParams {
            temperature: 0.9,
            seed: Some(4),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut streamed = String::new();
    let a = generate(&mut m, &tok, &prompt, &opts, &mut |s| {
        streamed.push_str(s);
        true
    })
    .unwrap();
    assert_eq!(a.token_ids.len(), 20);
    assert_eq!(a.finish_reason, FinishReason::Length);
    assert_eq!(streamed, a.text);
    assert_eq!(a.text, tok.decode(&a.token_ids, true).unwrap());
    let b = generate(&mut m, &tok, &prompt, &opts, &mut |_| true).unwrap();
    assert_eq!(a.token_ids, b.token_ids);

    // The first generated token as EOS: generation stops before it.
    let eos = GenerateOptions {
        eos_token_ids: vec![a.token_ids[0]],
        ..opts.clone()
    };
    let c = generate(&mut m, &tok, &prompt, &eos, &mut |_| true).unwrap();
    assert_eq!(c.finish_reason, FinishReason::Eos);
    assert!(c.token_ids.is_empty());

    // The callback can cancel.
    let mut calls = 0;
    let d = generate(&mut m, &tok, &prompt, &opts, &mut |_| {
        calls += 1;
        calls < 3
    })
    .unwrap();
    assert_eq!(d.finish_reason, FinishReason::Cancelled);
    assert!(d.token_ids.len() < 20);
}

#[test]
fn engine_bytes_hold_the_kv_cache_and_grow_with_the_context() {
    let spec = spec(Arch::Qwen3, "8b").unwrap();
    let cfg = ModelConfig::from_json_str(&spec.config_json(DType::BF16).to_string()).unwrap();
    // Qwen3-8B: 36 layers, 8 KV heads of 128; bf16 keys and values.
    let kv = |positions: u64| 36 * 2 * 8 * positions * 128 * 2;
    let o = flash_engine::GpuOptions::default();
    let base = o.engine_bytes(&cfg);
    let fixed = kv(4096) + flash_engine::ENGINE_LIBRARY_BYTES;
    assert!(
        base > fixed && base < fixed + (128 << 20),
        "{base}: the 4096-position cache, the libraries and activations for 512 tokens"
    );
    let long = flash_engine::GpuOptions {
        max_seq_len: Some(8192),
        ..o.clone()
    }
    .engine_bytes(&cfg);
    // Twice the positions: one more cache and one more pair of RoPE tables
    // (f32 cos and sin of head_dim / 2 per position).
    assert_eq!(long - base, kv(4096) + 2 * 4096 * 64 * 4);
    // A context no machine holds saturates the count (its reservation is
    // refused by name) instead of wrapping around to a small one.
    let huge = flash_engine::GpuOptions {
        max_seq_len: Some(usize::MAX / 4),
        ..o
    }
    .engine_bytes(&cfg);
    assert_eq!(huge, u64::MAX);
}
