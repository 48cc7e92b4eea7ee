//! Tensor-parallel imports on the CPU: Qwen3, Llama 3 and Qwen2 shapes
//! split into 2 and 4 ranks. Every rank's bytes are compared with the part
//! vLLM's parallel layers load, computed here independently (vLLM's shard
//! formulas on the config, the part copied element by element); ranks load
//! through the normal pipeline, verify, export alone or gathered back
//! whole (the same files as the model imported whole), and shapes that do
//! not divide are refused with nothing left in the store.

use flash_format::manifest::Manifest;
use flash_format::safetensors::{self as st, TensorSpec};
use flash_format::DType;
use flash_load::{load_placed, load_to_host, Device, DeviceMap, IoMode, LoadOptions, ModelSource};
use flash_store::{ImportOptions, ModelName, Store, StoreError};
use flash_synth::{Arch, SynthOptions};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

fn name(s: &str) -> ModelName {
    s.parse().unwrap()
}

fn opts() -> LoadOptions {
    LoadOptions {
        threads: 2,
        chunk_bytes: 8192,
        io: IoMode::Auto,
        ..Default::default()
    }
}

/// The attention shape of a checkpoint, from its config.json.
#[derive(Debug, Clone, Copy)]
struct Attn {
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
}

fn attn_of(dir: &Path) -> Attn {
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let heads = c["num_attention_heads"].as_u64().unwrap();
    let kv_heads = c["num_key_value_heads"].as_u64().unwrap_or(heads);
    let head_dim = c["head_dim"]
        .as_u64()
        .unwrap_or(c["hidden_size"].as_u64().unwrap() / heads);
    Attn {
        heads,
        kv_heads,
        head_dim,
    }
}

/// The layer kinds a test saw, to check that it covered them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    QkvWeight,
    QkvBias,
    MlpColumn,
    Row,
    Vocab,
    Replicated,
}

/// What rank `rank` of `n` holds of tensor `name` (of `shape`) in vLLM:
/// `(dimension, first index, count)`, or `None` when every rank holds it
/// whole. Written from vLLM's layers, not from flash's rules:
/// `QKVParallelLinear` (q: `num_heads / tp` heads of `head_size` rows
/// from `rank * that`, k and v the same with the key/value heads),
/// `MergedColumnParallelLinear` (gate, up: `size / tp` rows),
/// `RowParallelLinear` (o, down: `input_size / tp` columns; the bias
/// added once, so whole), `VocabParallelEmbedding` and `ParallelLMHead`
/// (the vocabulary padded to a multiple of 64, then `padded / tp` rows per
/// rank, the last clipped to the real vocabulary).
fn vllm_part(
    name: &str,
    shape: &[u64],
    a: Attn,
    rank: u64,
    n: u64,
) -> (Kind, Option<(usize, u64, u64)>) {
    let mut it = name.rsplit('.');
    let (param, module) = (it.next().unwrap(), it.next().unwrap());
    match (module, param) {
        ("q_proj" | "k_proj" | "v_proj", _) => {
            let heads = if module == "q_proj" {
                a.heads
            } else {
                a.kv_heads
            };
            let size = heads / n * a.head_dim;
            let kind = if param == "bias" {
                Kind::QkvBias
            } else {
                Kind::QkvWeight
            };
            (kind, Some((0, rank * size, size)))
        }
        ("gate_proj" | "up_proj", _) => {
            let size = shape[0] / n;
            (Kind::MlpColumn, Some((0, rank * size, size)))
        }
        ("o_proj" | "down_proj", "weight") => {
            let size = shape[1] / n;
            (Kind::Row, Some((1, rank * size, size)))
        }
        ("embed_tokens" | "lm_head", _) => {
            let padded = shape[0].div_ceil(64) * 64;
            let per = padded / n;
            let start = rank * per;
            (Kind::Vocab, Some((0, start, per.min(shape[0] - start))))
        }
        _ => (Kind::Replicated, None),
    }
}

/// Indices `[start, start + count)` of dimension `dim` of a row-major
/// tensor, copied one element at a time.
fn slice_elements(
    full: &[u8],
    elem: usize,
    shape: &[u64],
    dim: usize,
    start: u64,
    count: u64,
) -> Vec<u8> {
    let mut part_shape = shape.to_vec();
    part_shape[dim] = count;
    let n: u64 = part_shape.iter().product();
    let mut out = Vec::with_capacity(n as usize * elem);
    let mut idx = vec![0u64; shape.len()];
    for _ in 0..n {
        let mut linear = 0u64;
        for (k, &i) in idx.iter().enumerate() {
            let coord = if k == dim { i + start } else { i };
            linear = linear * shape[k] + coord;
        }
        let at = linear as usize * elem;
        out.extend_from_slice(&full[at..at + elem]);
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < part_shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

/// Checks model `n` (imported from `src` into `tp` ranks) against the
/// source: each rank holds every name once, with vLLM's part of it;
/// returns the layer kinds seen.
fn check_ranks(store: &Store, n: &ModelName, src: &Path, tp: u32) -> BTreeSet<Kind> {
    let attn = attn_of(src);
    let source = ModelSource::open(src).unwrap();
    let (full, _) = load_to_host(&source, None, &opts()).unwrap();
    let dir = store.existing(n).unwrap();

    let m = Manifest::read(&dir).unwrap();
    assert_eq!(m.ranks(), tp);
    assert_eq!(store.info(n).unwrap().ranks, tp);
    assert_eq!(store.info(n).unwrap().tensor_count, full.tensors().len());
    for f in &m.files {
        assert!(f.name.starts_with(&format!("data-r{}-", f.rank)), "{f:?}");
    }
    // One load of the whole folder is refused, naming the ranks.
    let e = ModelSource::open(&dir).unwrap_err().to_string();
    assert!(e.contains(&format!("{tp} tensor-parallel ranks")), "{e}");
    let e = ModelSource::open_rank(&dir, tp).unwrap_err().to_string();
    assert!(e.contains(&format!("not rank {tp}")), "{e}");
    assert_eq!(ModelSource::ranks(&dir).unwrap(), tp);

    let mut kinds = BTreeSet::new();
    for rank in 0..tp {
        let rs = ModelSource::open_rank(&dir, rank).unwrap();
        // The rank reads its own files only.
        for f in &rs.files {
            let fname = f.path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(fname.starts_with(&format!("data-r{rank}-")), "{fname}");
        }
        let (host, _) = load_to_host(&rs, None, &opts()).unwrap();
        let names: HashSet<&str> = host.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names.len(),
            host.tensors().len(),
            "rank {rank}: a name twice"
        );
        assert_eq!(host.tensors().len(), full.tensors().len(), "rank {rank}");
        for t in full.tensors() {
            let whole = full.get(&t.name).unwrap().1;
            let (view, got) = host
                .get(&t.name)
                .unwrap_or_else(|| panic!("rank {rank} lacks {}", t.name));
            assert_eq!(view.dtype, t.dtype);
            let (kind, part) = vllm_part(&t.name, &t.shape, attn, rank as u64, tp as u64);
            kinds.insert(kind);
            match part {
                None => {
                    assert_eq!(view.shape, t.shape, "{}", t.name);
                    assert!(got == whole, "rank {rank}: {} is not whole", t.name);
                }
                Some((dim, start, count)) => {
                    let mut shape = t.shape.clone();
                    shape[dim] = count;
                    assert_eq!(view.shape, shape, "rank {rank}: shape of {}", t.name);
                    let elem = (t.dtype.bits() / 8) as usize;
                    let want = slice_elements(whole, elem, &t.shape, dim, start, count);
                    assert!(
                        got == want.as_slice(),
                        "rank {rank}: {} is not vLLM's part [{start}, +{count}) of dim {dim}",
                        t.name
                    );
                }
            }
        }
        // The placement path loads the rank as well.
        let placed = load_placed(&rs, &DeviceMap::single(Device::Cpu), &[], &opts()).unwrap();
        let on_host = placed.host.expect("placed on the host");
        for t in host.tensors() {
            assert!(on_host.get(&t.name).unwrap().1 == host.get(&t.name).unwrap().1);
        }
        // An export of the rank is its tensors as safetensors.
        let outside = tempfile::tempdir().unwrap();
        let out = outside.path().join(format!("rank{rank}"));
        store
            .export_rank(n, rank, &out, 5_000_000_000, &opts())
            .unwrap();
        let back = ModelSource::open(&out).unwrap();
        let (exported, _) = load_to_host(&back, None, &opts()).unwrap();
        assert_eq!(exported.tensors().len(), host.tensors().len());
        for t in host.tensors() {
            let (v, b) = exported.get(&t.name).unwrap();
            assert_eq!(v.shape, t.shape);
            assert!(
                b == host.get(&t.name).unwrap().1,
                "export of rank {rank}: {}",
                t.name
            );
        }
        assert!(out.join("config.json").is_file());
    }
    assert!(store.verify(n, &opts(), None).unwrap().ok());
    kinds
}

/// Gathers model `split` back whole and compares the files with the
/// export of `whole` (the same source imported in one rank), byte for
/// byte, and every tensor with the source; when `same_files`, the
/// source's files too (a source laid out as flash exports).
fn check_gathered(
    store: &Store,
    split: &ModelName,
    whole: &ModelName,
    src: &Path,
    tmp: &Path,
    same_files: bool,
) {
    let a = tmp.join("gathered");
    let b = tmp.join("whole");
    store.export(split, &a, 5_000_000_000, &opts()).unwrap();
    store.export(whole, &b, 5_000_000_000, &opts()).unwrap();
    let list = |d: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    };
    let (fa, fb) = (list(&a), list(&b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(
            v == &fb[k],
            "{k} differs between the gathered and the whole export"
        );
    }
    if same_files {
        assert!(fa == list(src), "the round trip changed the source's files");
    }
    let source = ModelSource::open(src).unwrap();
    let (want, _) = load_to_host(&source, None, &opts()).unwrap();
    let (got, _) = load_to_host(&ModelSource::open(&a).unwrap(), None, &opts()).unwrap();
    assert_eq!(got.tensors().len(), want.tensors().len());
    for t in want.tensors() {
        let (v, bytes) = got.get(&t.name).unwrap();
        assert_eq!(v.shape, t.shape);
        assert!(
            bytes == want.get(&t.name).unwrap().1,
            "{} after the round trip",
            t.name
        );
    }
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

fn synth(arch: Arch, heads: Option<(usize, usize)>, dir: &Path) -> PathBuf {
    let mut spec = flash_synth::spec(arch, "tiny").unwrap();
    if let Some((a, kv)) = heads {
        spec.shape.num_attention_heads = a;
        spec.shape.num_key_value_heads = kv;
    }
    flash_synth::synth(&spec, dir, &SynthOptions::default()).unwrap();
    dir.to_path_buf()
}

/// Writes a small Qwen2-shaped checkpoint: q/k/v biases, a tied LM head
/// stored twice (an alias in each rank), and layer 0's o_proj equal to its
/// q_proj (identical bytes split differently: never an alias).
fn qwen2(dir: &Path, heads: u64, kv_heads: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (h, inter, vocab, layers) = (32u64, 48u64, 128u64, 2);
    let hd = h / heads;
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![heads * hd, h]),
            ("self_attn.q_proj.bias", vec![heads * hd]),
            ("self_attn.k_proj.weight", vec![kv_heads * hd, h]),
            ("self_attn.k_proj.bias", vec![kv_heads * hd]),
            ("self_attn.v_proj.weight", vec![kv_heads * hd, h]),
            ("self_attn.v_proj.bias", vec![kv_heads * hd]),
            ("self_attn.o_proj.weight", vec![h, heads * hd]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            specs.push((format!("{p}.{n}"), s));
        }
    }
    specs.push(("model.norm.weight".into(), vec![h]));
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let spec = TensorSpec {
                name,
                dtype: DType::BF16,
                shape,
            };
            let len = spec.dtype.byte_len(&spec.shape).unwrap() as usize;
            let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let bytes = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            (spec, bytes)
        })
        .collect();
    let q = tensors
        .iter()
        .position(|(s, _)| s.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let o = tensors
        .iter()
        .position(|(s, _)| s.name == "model.layers.0.self_attn.o_proj.weight")
        .unwrap();
    tensors[o].1 = tensors[q].1.clone();
    let lm_head = TensorSpec {
        name: "lm_head.weight".into(),
        dtype: DType::BF16,
        shape: vec![vocab, h],
    };
    tensors.push((lm_head, tensors[0].1.clone()));
    // In name order, with the metadata flash writes: the layout of an
    // export, so that the round trip can be compared with the file itself.
    tensors.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let items: Vec<(TensorSpec, &[u8])> = tensors
        .iter()
        .map(|(s, b)| (s.clone(), b.as_slice()))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    st::write_file(&dir.join("model.safetensors"), &items, &meta).unwrap();
    let config = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    dir.to_path_buf()
}

/// Imports `src` whole and into each of `tps` ranks, and checks them all.
fn round_trips(src: &Path, tps: &[u32], compress: bool, same_files: bool) -> BTreeSet<Kind> {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let o = ImportOptions {
        compress,
        ..Default::default()
    };
    let whole = name("test/whole");
    let report = store.import(src, &whole, &o).unwrap();
    assert_eq!(report.ranks, 1);
    let mut kinds = BTreeSet::new();
    for &tp in tps {
        let n = name(&format!("test/tp{tp}"));
        let report = store.import_tp(src, &n, &o, tp).unwrap();
        assert_eq!(report.ranks, tp);
        assert_eq!(report.compressed, compress, "compression applies per rank");
        if compress {
            // Every rank holds compressed tensors.
            let m = store.manifest(&n).unwrap();
            for r in 0..tp {
                assert!(
                    m.rank_view(r).unwrap().is_encoded(),
                    "rank {r} stored plain"
                );
            }
        }
        kinds.extend(check_ranks(&store, &n, src, tp));
        check_gathered(&store, &n, &whole, src, tmp.path(), same_files);
    }
    kinds
}

const ALL_KINDS: [Kind; 5] = [
    Kind::QkvWeight,
    Kind::MlpColumn,
    Kind::Row,
    Kind::Vocab,
    Kind::Replicated,
];

#[test]
fn qwen3_in_two_and_four_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(Arch::Qwen3, None, &tmp.path().join("q2"));
    let kinds = round_trips(&src, &[2], false, false);
    assert!(ALL_KINDS.iter().all(|k| kinds.contains(k)), "{kinds:?}");
    // Four ranks need four key/value heads.
    let src = synth(Arch::Qwen3, Some((8, 4)), &tmp.path().join("q4"));
    round_trips(&src, &[2, 4], false, false);
}

#[test]
fn llama_in_two_and_four_ranks_compressed() {
    let tmp = tempfile::tempdir().unwrap();
    let src = synth(Arch::Llama, None, &tmp.path().join("l2"));
    let kinds = round_trips(&src, &[2], true, false);
    assert!(ALL_KINDS.iter().all(|k| kinds.contains(k)), "{kinds:?}");
    let src = synth(Arch::Llama, Some((8, 4)), &tmp.path().join("l4"));
    round_trips(&src, &[4], false, false);
}

/// Whether one of `a`, `b` is stored as an alias of the other.
fn linked(m: &Manifest, a: &str, b: &str) -> bool {
    m.aliases.get(a).map(String::as_str) == Some(b)
        || m.aliases.get(b).map(String::as_str) == Some(a)
}

#[test]
fn qwen2_with_biases_and_a_tied_head() {
    let tmp = tempfile::tempdir().unwrap();
    let src = qwen2(&tmp.path().join("a"), 4, 2);
    // Laid out as flash exports, the source comes back byte for byte.
    let kinds = round_trips(&src, &[2], false, true);
    assert!(kinds.contains(&Kind::QkvBias), "{kinds:?}");
    assert!(ALL_KINDS.iter().all(|k| kinds.contains(k)), "{kinds:?}");
    let src = qwen2(&tmp.path().join("b"), 4, 4);
    round_trips(&src, &[2, 4], false, true);

    // The tied head is an alias in every rank; o_proj, equal to q_proj in
    // the checkpoint but split along the other dimension, is not.
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let n = name("test/qwen2-tp2");
    store
        .import_tp(&src, &n, &ImportOptions::default(), 2)
        .unwrap();
    let m = store.manifest(&n).unwrap();
    let (q, o) = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    );
    assert!(linked(&m, "lm_head.weight", "model.embed_tokens.weight"));
    assert!(!linked(&m, q, o));
    assert_eq!(m.tensors.len(), 2 * (m.tensor_count() - m.aliases.len()));
    let split: BTreeMap<(u32, &str), Option<u32>> = m
        .tensors
        .iter()
        .map(|t| ((m.rank_of(t), t.name.as_str()), t.split_dim))
        .collect();
    assert_eq!(
        split[&(1, "model.layers.0.self_attn.o_proj.weight")],
        Some(1)
    );
    assert_eq!(split[&(1, "model.layers.0.self_attn.q_proj.bias")], Some(0));
    assert_eq!(split[&(0, "model.norm.weight")], None);
}

#[test]
fn a_flash_source_alias_split_unlike_its_target_is_stored() {
    // Imported whole, o_proj (equal to q_proj) becomes an alias of q_proj;
    // imported from there into 2 ranks, it must be split along dim 1, so
    // it is read and stored as a tensor of its own.
    let tmp = tempfile::tempdir().unwrap();
    let src = qwen2(&tmp.path().join("src"), 4, 2);
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let whole = name("test/whole");
    store
        .import(&src, &whole, &ImportOptions::default())
        .unwrap();
    let (q, o) = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    );
    assert!(linked(&store.manifest(&whole).unwrap(), q, o));
    let n = name("test/from-flash");
    store
        .import_tp(
            &store.existing(&whole).unwrap(),
            &n,
            &ImportOptions::default(),
            2,
        )
        .unwrap();
    let m = store.manifest(&n).unwrap();
    assert!(!linked(&m, q, o));
    assert!(
        linked(&m, "lm_head.weight", "model.embed_tokens.weight"),
        "a tied head split alike stays an alias"
    );
    check_ranks(&store, &n, &src, 2);
}

/// Asserts that importing `src` into `tp` ranks is refused with a
/// `Split` error containing every one of `words`, and leaves nothing.
fn refused(src: &Path, tp: u32, words: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&root).unwrap();
    let n = name("test/refused");
    let e = store
        .import_tp(src, &n, &ImportOptions::default(), tp)
        .unwrap_err();
    assert!(matches!(e, StoreError::Split { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("test/refused") && msg.contains(&format!("{tp} tensor-parallel ranks")),
        "{msg}"
    );
    for w in words {
        assert!(msg.contains(w), "{msg:?} lacks {w:?}");
    }
    assert!(!store.contains(&n));
    assert!(store.list().unwrap().is_empty());
    for sub in ["models", "tmp"] {
        assert_eq!(
            std::fs::read_dir(root.join(sub)).unwrap().count(),
            0,
            "{sub}/ is not empty"
        );
    }
}

#[test]
fn shapes_that_do_not_divide_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Tiny Qwen3 and Llama: 4 heads, 2 key/value heads.
    let q = synth(Arch::Qwen3, None, &tmp.path().join("q"));
    refused(
        &q,
        4,
        &[
            "num_attention_heads 4",
            "num_key_value_heads 2",
            "divisible by 4",
        ],
    );
    refused(&q, 3, &["divisible by 3"]);
    let l = synth(Arch::Llama, None, &tmp.path().join("l"));
    refused(&l, 4, &["num_key_value_heads 2"]);
    refused(&l, 0, &["at least 1"]);
    // A vocabulary that 2 does not divide.
    let mut spec = flash_synth::spec(Arch::Qwen3, "tiny").unwrap();
    spec.shape.vocab_size = 321;
    let v = tmp.path().join("v");
    flash_synth::synth(&spec, &v, &SynthOptions::default()).unwrap();
    refused(&v, 2, &["vocabulary", "321", "model.embed_tokens.weight"]);
    // An MLP width that 4 does not divide (heads and vocabulary do).
    let mut spec = flash_synth::spec(Arch::Llama, "tiny").unwrap();
    spec.shape.num_attention_heads = 8;
    spec.shape.num_key_value_heads = 4;
    spec.shape.intermediate_size = 130;
    let w = tmp.path().join("w");
    flash_synth::synth(&spec, &w, &SynthOptions::default()).unwrap();
    refused(&w, 4, &["gate_proj", "130"]);
    // A tensor of two dimensions flash does not know: refused; the same
    // checkpoint splits once it is one-dimensional.
    let odd = qwen2(&tmp.path().join("odd"), 4, 2);
    let mut items = Vec::new();
    let h = st::read_header(&odd.join("model.safetensors")).unwrap();
    let bytes = std::fs::read(odd.join("model.safetensors")).unwrap();
    for t in &h.tensors {
        let at = (h.data_start() + t.begin) as usize;
        items.push((
            TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            },
            bytes[at..at + t.len() as usize].to_vec(),
        ));
    }
    let extra = |shape: Vec<u64>| {
        let spec = TensorSpec {
            name: "model.layers.0.self_attn.qkv_proj.weight".into(),
            dtype: DType::BF16,
            shape,
        };
        let len = spec.dtype.byte_len(&spec.shape).unwrap() as usize;
        (spec, vec![1u8; len])
    };
    for (shape, ok) in [(vec![6u64, 4], false), (vec![24u64], true)] {
        let mut all = items.clone();
        all.push(extra(shape));
        let list: Vec<(TensorSpec, &[u8])> =
            all.iter().map(|(s, b)| (s.clone(), b.as_slice())).collect();
        st::write_file(&odd.join("model.safetensors"), &list, &BTreeMap::new()).unwrap();
        if ok {
            let t2 = tempfile::tempdir().unwrap();
            let store = Store::open(t2.path()).unwrap();
            store
                .import_tp(&odd, &name("test/ok"), &ImportOptions::default(), 2)
                .unwrap();
        } else {
            refused(&odd, 2, &["qkv_proj", "not a layer"]);
        }
    }
}
