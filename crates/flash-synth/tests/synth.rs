//! End-to-end tests of `flash_synth::synth` on the tiny presets, and the
//! shapes of the real presets (computed, not written).

use flash_format::safetensors::{read_header, ShardIndex, INDEX_FILE};
use flash_format::DType;
use flash_synth::{
    presets, spec, synth, tensor_data, tokenizer, Arch, SynthError, SynthOptions, SynthTensor,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// (arch, size, total params, non-embedding params) of the real models, from
/// their model cards / safetensors metadata.
const REAL: [(Arch, &str, f64, f64); 8] = [
    (Arch::Qwen3, "0.6b", 0.596e9, 0.44e9),
    (Arch::Qwen3, "1.7b", 1.72e9, 1.4e9),
    (Arch::Qwen3, "4b", 4.02e9, 3.6e9),
    (Arch::Qwen3, "8b", 8.19e9, 6.95e9),
    (Arch::Qwen3, "14b", 14.8e9, 13.2e9),
    (Arch::Qwen3, "32b", 32.8e9, 31.2e9),
    (Arch::Llama, "1b", 1.236e9, 0.973e9),
    (Arch::Llama, "8b", 8.03e9, 6.98e9),
];

#[test]
fn presets_match_the_real_parameter_counts() {
    for (arch, size, total, non_embed) in REAL {
        let s = spec(arch, size).unwrap();
        s.validate().unwrap();
        let p = s.param_count() as f64;
        let ne = s.non_embedding_param_count() as f64;
        assert!(
            (p / total - 1.0).abs() < 0.02,
            "{arch} {size}: {p} vs {total}"
        );
        assert!(
            (ne / non_embed - 1.0).abs() < 0.02,
            "{arch} {size}: {ne} vs {non_embed}"
        );
    }
    // Exact parameter counts of two real models (their published sizes).
    assert_eq!(
        spec(Arch::Llama, "8b").unwrap().param_count(),
        8_030_261_248
    );
    assert_eq!(
        spec(Arch::Llama, "1b").unwrap().param_count(),
        1_235_814_400
    );
    assert_eq!(
        spec(Arch::Qwen3, "8b").unwrap().param_count(),
        8_190_735_360
    );
    assert_eq!(
        spec(Arch::Qwen3, "0.6b").unwrap().param_count(),
        596_049_920
    );
    // Every preset is listed and builds.
    let all = presets();
    assert_eq!(all.len(), 10);
    for (arch, size) in all {
        spec(arch, size).unwrap().validate().unwrap();
    }
}

#[test]
fn real_configs_are_the_published_ones() {
    let q = spec(Arch::Qwen3, "8b").unwrap();
    assert_eq!(
        (
            q.shape.hidden_size,
            q.shape.intermediate_size,
            q.shape.num_hidden_layers
        ),
        (4096, 12288, 36)
    );
    assert_eq!(
        (
            q.shape.num_attention_heads,
            q.shape.num_key_value_heads,
            q.shape.head_dim
        ),
        (32, 8, 128)
    );
    assert_eq!(
        (q.shape.vocab_size, q.max_position_embeddings),
        (151_936, 40_960)
    );
    assert!(!q.shape.tie_word_embeddings && q.rope_theta == 1e6 && q.rms_norm_eps == 1e-6);
    assert!(spec(Arch::Qwen3, "0.6b").unwrap().shape.tie_word_embeddings);
    let l = spec(Arch::Llama, "1b").unwrap();
    assert_eq!(
        (
            l.shape.hidden_size,
            l.shape.intermediate_size,
            l.shape.num_hidden_layers
        ),
        (2048, 8192, 16)
    );
    assert_eq!(
        (
            l.shape.num_attention_heads,
            l.shape.num_key_value_heads,
            l.shape.head_dim
        ),
        (32, 8, 64)
    );
    assert!(l.shape.tie_word_embeddings && l.rope_theta == 500_000.0);
    let rs = l.rope_scaling.as_ref().unwrap();
    assert_eq!(
        (
            rs.factor,
            rs.low_freq_factor,
            rs.high_freq_factor,
            rs.original_max_position_embeddings
        ),
        (32.0, 1.0, 4.0, 8192)
    );
    let l8 = spec(Arch::Llama, "8b").unwrap();
    assert_eq!(l8.rope_scaling.unwrap().factor, 8.0);
    assert!(!l8.shape.tie_word_embeddings);

    let c = q.config_json(DType::BF16);
    assert_eq!(c["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(c["model_type"], "qwen3");
    assert_eq!(c["torch_dtype"], "bfloat16");
    assert!(c["rope_scaling"].is_null());
    let c = l.config_json(DType::F16);
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(c["torch_dtype"], "float16");
}

#[test]
fn names_and_sizes_parse() {
    assert_eq!("qwen3".parse::<Arch>().unwrap(), Arch::Qwen3);
    assert_eq!("Llama3".parse::<Arch>().unwrap(), Arch::Llama);
    assert_eq!("llama".parse::<Arch>().unwrap(), Arch::Llama);
    assert!(matches!(
        "gpt2".parse::<Arch>(),
        Err(SynthError::UnknownArch { .. })
    ));
    assert_eq!(spec(Arch::Qwen3, "8B").unwrap().size, "8b");
    let err = spec(Arch::Llama, "70b").unwrap_err().to_string();
    assert!(err.contains("70b") && err.contains("tiny, 1b, 8b"), "{err}");
}

/// Tensor name -> (dtype, shape).
type Shapes = BTreeMap<String, (DType, Vec<u64>)>;

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every (tensor name, dtype, shape) of the folder, checking each header,
/// plus the list of safetensors files.
fn tensors_in(dir: &Path) -> (Shapes, Vec<PathBuf>) {
    let index = dir.join(INDEX_FILE);
    let files: Vec<PathBuf> = if index.exists() {
        let idx = ShardIndex::read(&index).unwrap();
        idx.shards().into_iter().map(|s| dir.join(s)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = BTreeMap::new();
    for f in &files {
        let h = read_header(f).unwrap();
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        for t in h.tensors {
            assert!(
                out.insert(t.name.clone(), (t.dtype, t.shape)).is_none(),
                "{}",
                t.name
            );
        }
    }
    (out, files)
}

fn expected(tensors: &[SynthTensor]) -> Shapes {
    tensors
        .iter()
        .map(|t| (t.spec.name.clone(), (t.spec.dtype, t.spec.shape.clone())))
        .collect()
}

#[test]
fn tiny_models_write_a_complete_folder() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in Arch::ALL {
        let s = spec(arch, "tiny").unwrap();
        let out = tmp.path().join(format!("{arch}-tiny"));
        let report = synth(&s, &out, &SynthOptions::default()).unwrap();
        assert_eq!(report.dir, out);
        let names: BTreeSet<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let want: BTreeSet<String> = [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .map(String::from)
        .into();
        assert_eq!(names, want, "{arch}");
        let listed: BTreeSet<String> = report
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(listed, want);
        let sizes: u64 = report
            .files
            .iter()
            .map(|p| p.metadata().unwrap().len())
            .sum();
        assert_eq!(sizes, report.total_bytes);

        let t = s.tensors(DType::BF16);
        let (found, _) = tensors_in(&out);
        assert_eq!(found, expected(&t));
        assert_eq!(report.tensors, t.len());
        assert_eq!(report.params, s.param_count());
        assert_eq!(report.data_bytes, s.param_count() * 2);
        assert_eq!(
            found.contains_key("lm_head.weight"),
            !s.shape.tie_word_embeddings
        );
        let has_qk_norm = found.contains_key("model.layers.0.self_attn.q_norm.weight");
        assert_eq!(has_qk_norm, arch == Arch::Qwen3);

        // The data is what tensor_data says, in spec order.
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let h = read_header(&out.join("model.safetensors")).unwrap();
        for st in &t {
            let e = h.tensors.iter().find(|e| e.name == st.spec.name).unwrap();
            let at = (h.data_start() + e.begin) as usize;
            let data = &bytes[at..at + e.len() as usize];
            assert_eq!(
                data,
                tensor_data(0, st).unwrap().as_slice(),
                "{}",
                st.spec.name
            );
        }
        // Norms are ones (bf16 0x3F80).
        let norm = h
            .tensors
            .iter()
            .find(|e| e.name == "model.norm.weight")
            .unwrap();
        let at = (h.data_start() + norm.begin) as usize;
        assert_eq!(&bytes[at..at + 2], &[0x80, 0x3f]);

        // Config and tokenizer agree on the special ids, all inside the vocab.
        let config = read_json(&out.join("config.json"));
        let tok = read_json(&out.join("tokenizer.json"));
        let vocab = config["vocab_size"].as_u64().unwrap();
        assert_eq!(vocab, tokenizer::vocab_size(arch));
        let added: BTreeMap<String, u64> = tok["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["content"].as_str().unwrap().to_string(),
                    t["id"].as_u64().unwrap(),
                )
            })
            .collect();
        let (bos, eos) = match arch {
            Arch::Qwen3 => ("<|endoftext|>", "<|im_end|>"),
            Arch::Llama => ("<|begin_of_text|>", "<|eot_id|>"),
        };
        assert_eq!(config["bos_token_id"].as_u64(), Some(added[bos]));
        let eos_ids: Vec<u64> = match &config["eos_token_id"] {
            Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap()).collect(),
            v => vec![v.as_u64().unwrap()],
        };
        assert!(eos_ids.contains(&added[eos]));
        assert!(added.values().all(|&id| id < vocab));
        assert_eq!(
            tok["model"]["vocab"].as_object().unwrap().len() + added.len(),
            vocab as usize
        );
        let tc = read_json(&out.join("tokenizer_config.json"));
        let template = tc["chat_template"].as_str().unwrap();
        assert!(template.contains(match arch {
            Arch::Qwen3 => "<|im_start|>",
            Arch::Llama => "<|start_header_id|>",
        }));
        let g = read_json(&out.join("generation_config.json"));
        assert_eq!(g["bos_token_id"], config["bos_token_id"]);

        // No temporary folder is left beside the output.
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
    }
}

fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn same_seed_same_bytes_other_seed_other_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let s = spec(Arch::Llama, "tiny").unwrap();
    let opts = |seed| SynthOptions {
        seed,
        ..SynthOptions::default()
    };
    synth(&s, &tmp.path().join("a"), &opts(42)).unwrap();
    // A different thread count must not change the bytes.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| synth(&s, &tmp.path().join("b"), &opts(42)))
        .unwrap();
    synth(&s, &tmp.path().join("c"), &opts(43)).unwrap();
    let (a, b, c) = (
        files_of(&tmp.path().join("a")),
        files_of(&tmp.path().join("b")),
        files_of(&tmp.path().join("c")),
    );
    assert_eq!(a, b);
    assert_ne!(a["model.safetensors"], c["model.safetensors"]);
    assert_eq!(a["config.json"], c["config.json"]);
}

#[test]
fn small_shards_get_a_valid_index() {
    let tmp = tempfile::tempdir().unwrap();
    let s = spec(Arch::Qwen3, "tiny").unwrap();
    let out = tmp.path().join("sharded");
    let calls = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let (c2, l2) = (calls.clone(), last.clone());
    let opts = SynthOptions {
        seed: 3,
        max_shard_bytes: 64 * 1024,
        dtype: DType::F32,
        progress: Some(Arc::new(move |done, total| {
            assert!(done <= total);
            c2.fetch_add(1, Ordering::Relaxed);
            l2.store(done, Ordering::Relaxed);
        })),
    };
    let report = synth(&s, &out, &opts).unwrap();
    let t = s.tensors(DType::F32);
    let total: u64 = t.iter().map(SynthTensor::bytes).sum();
    assert_eq!(last.load(Ordering::Relaxed), total);
    let index = ShardIndex::read(&out.join(INDEX_FILE)).unwrap();
    let shards = index.shards();
    // At least one call per file written.
    assert!(calls.load(Ordering::Relaxed) >= shards.len() as u64);
    assert!(shards.len() >= 3, "{shards:?}");
    assert_eq!(
        shards[0],
        format!("model-00001-of-{:05}.safetensors", shards.len())
    );
    assert_eq!(
        index.metadata.as_ref().unwrap()["total_size"].as_u64(),
        Some(total)
    );
    assert_eq!(report.data_bytes, total);
    assert!(!out.join("model.safetensors").exists());

    let (found, files) = tensors_in(&out);
    assert_eq!(found, expected(&t));
    assert_eq!(index.weight_map.len(), t.len());
    for f in &files {
        let h = read_header(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(h.data_len() <= 64 * 1024 || h.tensors.len() == 1);
        for e in &h.tensors {
            assert_eq!(index.weight_map[&e.name], name);
        }
    }
    // Every shard and the index are in the report.
    assert_eq!(report.files.len(), shards.len() + 1 + 4);
}

#[test]
fn refuses_a_non_empty_out_and_reuses_an_empty_one() {
    let tmp = tempfile::tempdir().unwrap();
    let s = spec(Arch::Qwen3, "tiny").unwrap();
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let err = synth(&s, &full, &SynthOptions::default()).unwrap_err();
    assert!(matches!(err, SynthError::OutExists { .. }), "{err}");
    assert!(err.to_string().contains("full"));
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");

    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        synth(&s, &file, &SynthOptions::default()),
        Err(SynthError::OutExists { .. })
    ));

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    synth(&s, &empty, &SynthOptions::default()).unwrap();
    assert!(empty.join("config.json").exists());

    let nested = tmp.path().join("a/b/c");
    synth(&s, &nested, &SynthOptions::default()).unwrap();
    assert!(nested.join("model.safetensors").exists());

    let bad = SynthOptions {
        dtype: DType::I8,
        ..SynthOptions::default()
    };
    assert!(matches!(
        synth(&s, &tmp.path().join("i8"), &bad),
        Err(SynthError::UnsupportedDType(DType::I8))
    ));
    assert!(!tmp.path().join("i8").exists());
    let leftovers = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn invalid_specs_are_refused() {
    let mut s = spec(Arch::Llama, "tiny").unwrap();
    s.shape.vocab_size = 100;
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("vocab_size 100"), "{err}");
    let mut s = spec(Arch::Llama, "tiny").unwrap();
    s.shape.num_key_value_heads = 3;
    assert!(s.validate().is_err());
}

#[test]
fn multi_chunk_files_match_tensor_data_on_any_thread_count() {
    // Big enough that files span several 8 MiB chunks and the embedding
    // crosses an RNG block (4 Mi elements).
    let mut s = spec(Arch::Llama, "tiny").unwrap();
    s.size = "small".into();
    s.shape.hidden_size = 512;
    s.shape.vocab_size = 9000;
    s.shape.intermediate_size = 1024;
    s.shape.num_attention_heads = 8;
    s.shape.num_key_value_heads = 4;
    s.shape.head_dim = 64;
    let tmp = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        seed: 11,
        max_shard_bytes: 12_000_000,
        ..SynthOptions::default()
    };
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let four = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    one.install(|| synth(&s, &tmp.path().join("one"), &opts))
        .unwrap();
    four.install(|| synth(&s, &tmp.path().join("four"), &opts))
        .unwrap();
    let (a, b) = (
        files_of(&tmp.path().join("one")),
        files_of(&tmp.path().join("four")),
    );
    assert!(a == b);

    let dir = tmp.path().join("one");
    let (found, files) = tensors_in(&dir);
    let t = s.tensors(DType::BF16);
    assert_eq!(found, expected(&t));
    assert!(files.len() >= 2);
    let longest = files.iter().map(|f| f.metadata().unwrap().len()).max();
    assert!(longest.unwrap() > 8 << 20, "a file spans several chunks");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let h = read_header(&f).unwrap();
        for e in &h.tensors {
            let st = t.iter().find(|x| x.spec.name == e.name).unwrap();
            let at = (h.data_start() + e.begin) as usize;
            let data = &bytes[at..at + e.len() as usize];
            assert!(
                data == tensor_data(11, st).unwrap().as_slice(),
                "{}",
                e.name
            );
        }
    }
}
