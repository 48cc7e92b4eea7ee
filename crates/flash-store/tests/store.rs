//! The store end to end on the CPU: import, load, verify, export, faults.

use flash_format::safetensors::{self as st, TensorSpec};
use flash_format::DType;
use flash_load::{load_to_host, IoMode, LoadOptions, ModelSource};
use flash_store::{DtypeChoice, ImportOptions, ModelName, Store, StoreError};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

fn name(s: &str) -> ModelName {
    s.parse().unwrap()
}

/// Writes tensors into `dir` as `shards` safetensors files with an index.
fn write_checkpoint(dir: &Path, tensors: &[(TensorSpec, Vec<u8>)], shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let per = tensors.len().div_ceil(shards).max(1);
    let mut weight_map = BTreeMap::new();
    let chunks: Vec<_> = tensors.chunks(per).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let fname = if chunks.len() == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, chunks.len())
        };
        let items: Vec<(TensorSpec, &[u8])> = chunk
            .iter()
            .map(|(s, b)| (s.clone(), b.as_slice()))
            .collect();
        for (s, _) in chunk.iter() {
            weight_map.insert(s.name.clone(), fname.clone());
        }
        st::write_file(&dir.join(&fname), &items, &BTreeMap::new()).unwrap();
    }
    if chunks.len() > 1 {
        let index = st::ShardIndex {
            metadata: None,
            weight_map,
        };
        std::fs::write(
            dir.join(st::INDEX_FILE),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["Qwen3ForCausalLM"],"torch_dtype":"bfloat16"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
}

fn spec(name: &str, dtype: DType, shape: &[u64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

fn bytes_for(s: &TensorSpec, seed: u8) -> Vec<u8> {
    let n = s.dtype.byte_len(&s.shape).unwrap() as usize;
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sample() -> Vec<(TensorSpec, Vec<u8>)> {
    let specs = [
        spec("model.embed_tokens.weight", DType::BF16, &[300, 64]),
        spec("model.norm.weight", DType::F32, &[64]),
        spec("scalar", DType::F64, &[]),
        spec("empty", DType::BF16, &[0, 8]),
        spec("ids", DType::I64, &[7]),
        spec("fp8", DType::F8_E4M3, &[5000]),
        spec("mask", DType::BOOL, &[3]),
    ];
    let mut v: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), bytes_for(s, i as u8)))
        .collect();
    // A tied copy: same bytes, stored twice in the checkpoint.
    v.push((
        spec("lm_head.weight", DType::BF16, &[300, 64]),
        v[0].1.clone(),
    ));
    v
}

fn opts() -> LoadOptions {
    LoadOptions {
        threads: 3,
        chunk_bytes: 8192,
        io: IoMode::Auto,
        ..Default::default()
    }
}

#[test]
fn import_load_export_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let tensors = sample();
    write_checkpoint(&src, &tensors, 3);
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let n = name("test/tiny");
    let report = store.import(&src, &n, &ImportOptions::default()).unwrap();
    assert_eq!(report.aliases, 1, "the tied copy is stored once");

    let info = store.info(&n).unwrap();
    assert_eq!(info.tensor_count, tensors.len());
    assert_eq!(info.architecture.as_deref(), Some("Qwen3ForCausalLM"));
    assert_eq!(info.dtype, Some(DType::BF16));
    assert_eq!(store.list().unwrap().len(), 1);

    // Every tensor loads byte-exact, from the flash format and from the source folder.
    for dir in [store.existing(&n).unwrap(), src.clone()] {
        let source = ModelSource::open(&dir).unwrap();
        let (model, stats) = load_to_host(&source, None, &opts()).unwrap();
        assert!(stats.bytes_read > 0);
        for (s, bytes) in &tensors {
            let (view, got) = model
                .get(&s.name)
                .unwrap_or_else(|| panic!("{} missing", s.name));
            assert_eq!(view.dtype, s.dtype);
            assert_eq!(view.shape, s.shape);
            assert_eq!(got, bytes.as_slice(), "{} in {}", s.name, dir.display());
        }
    }

    // A subset loads only what it asks for (an alias pulls in its target's bytes).
    let source = ModelSource::open(&store.existing(&n).unwrap()).unwrap();
    let only = |t: &str| t == "lm_head.weight" || t == "scalar";
    let (model, _) = load_to_host(&source, Some(&only), &opts()).unwrap();
    assert_eq!(model.tensors().len(), 2);
    assert_eq!(
        model.get("lm_head.weight").unwrap().1,
        tensors[0].1.as_slice()
    );

    assert!(store.verify(&n, &opts(), None).unwrap().ok());

    let out = tmp.path().join("export");
    let files = store.export(&n, &out, 4000, &opts()).unwrap();
    assert!(files.len() > 1, "small shard size gives several shards");
    let back = ModelSource::open(&out).unwrap();
    let (model, _) = load_to_host(&back, None, &opts()).unwrap();
    for (s, bytes) in &tensors {
        assert_eq!(
            model.get(&s.name).unwrap().1,
            bytes.as_slice(),
            "{} after export",
            s.name
        );
    }
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
    // An export killed half-way (a dead pid's folder) is cleaned by the next one.
    let stale = tmp.path().join(".flash-export-999999999");
    std::fs::create_dir_all(&stale).unwrap();
    store
        .export(&n, &tmp.path().join("export2"), 4000, &opts())
        .unwrap();
    assert!(!stale.exists());
    assert!(
        store.export(&n, &out, 4000, &opts()).is_err(),
        "refuses a non-empty target"
    );
}

#[test]
fn verify_names_the_tensor_with_a_flipped_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_checkpoint(&src, &sample(), 1);
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let n = name("test/flip");
    store.import(&src, &n, &ImportOptions::default()).unwrap();
    let m = store.manifest(&n).unwrap();
    let t = m.tensors.iter().find(|t| t.name == "fp8").unwrap();
    let path = store
        .existing(&n)
        .unwrap()
        .join(&m.files[t.file as usize].name);
    let mut data = std::fs::read(&path).unwrap();
    data[(t.offset + 17) as usize] ^= 0x40;
    std::fs::write(&path, data).unwrap();
    let report = store.verify(&n, &opts(), None).unwrap();
    assert!(!report.ok());
    assert_eq!(report.bad.len(), 1);
    assert_eq!(report.bad[0].tensors, vec!["fp8".to_string()]);
}

#[test]
fn dtype_conversion_leaves_integers() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let vals: Vec<u8> = [1.0f32, -0.5, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let ints: Vec<u8> = [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_checkpoint(
        &src,
        &[
            (spec("w", DType::F32, &[3]), vals),
            (spec("i", DType::I64, &[2]), ints.clone()),
        ],
        1,
    );
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let n = name("test/conv");
    let o = ImportOptions {
        dtype: DtypeChoice::To(DType::BF16),
        ..Default::default()
    };
    store.import(&src, &n, &o).unwrap();
    let (model, _) = load_to_host(
        &ModelSource::open(&store.existing(&n).unwrap()).unwrap(),
        None,
        &opts(),
    )
    .unwrap();
    let (w, wb) = model.get("w").unwrap();
    assert_eq!(w.dtype, DType::BF16);
    assert_eq!(wb, &[0x80, 0x3f, 0x00, 0xbf, 0x40, 0x40]);
    assert_eq!(model.get("i").unwrap().1, ints.as_slice());
    let cfg = std::fs::read_to_string(store.existing(&n).unwrap().join("config.json")).unwrap();
    assert!(cfg.contains("\"torch_dtype\": \"bfloat16\""));
}

#[test]
fn bad_input_changes_nothing_in_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    write_checkpoint(&good, &sample(), 1);
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let n = name("test/keep");
    store.import(&good, &n, &ImportOptions::default()).unwrap();
    let before = std::fs::read(store.existing(&n).unwrap().join("model.flash.json")).unwrap();

    // Truncated shard.
    let bad = tmp.path().join("bad");
    write_checkpoint(&bad, &sample(), 1);
    let f = bad.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let force = ImportOptions {
        force: true,
        ..Default::default()
    };
    let err = store.import(&bad, &n, &force).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    // Index naming a missing shard.
    let bad2 = tmp.path().join("bad2");
    write_checkpoint(&bad2, &sample(), 3);
    std::fs::remove_file(bad2.join("model-00002-of-00003.safetensors")).unwrap();
    let err = store.import(&bad2, &n, &force).unwrap_err().to_string();
    assert!(
        err.contains("model-00002-of-00003.safetensors") && err.contains("missing"),
        "{err}"
    );

    // Bad JSON index.
    let bad3 = tmp.path().join("bad3");
    write_checkpoint(&bad3, &sample(), 2);
    std::fs::write(bad3.join(st::INDEX_FILE), "{nope").unwrap();
    let err = store.import(&bad3, &n, &force).unwrap_err().to_string();
    assert!(err.contains("model.safetensors.index.json"), "{err}");

    // Existing model without --force.
    assert!(matches!(
        store.import(&good, &n, &ImportOptions::default()),
        Err(StoreError::Exists(_))
    ));

    let after = std::fs::read(store.existing(&n).unwrap().join("model.flash.json")).unwrap();
    assert_eq!(before, after);
    assert!(store.verify(&n, &opts(), None).unwrap().ok());
    assert_eq!(
        std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
        0,
        "no temporary left"
    );
}

#[test]
fn remove_and_stale_work_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&root).unwrap();
    // Work of a dead process (pid far above pid_max) is cleaned on open.
    let stale = root.join("tmp").join("import-999999999-1");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("data-00000.bin"), b"half").unwrap();
    let store2 = Store::open(&root).unwrap();
    assert!(!stale.exists());
    let src = tmp.path().join("src");
    write_checkpoint(&src, &sample(), 1);
    let n = name("test/rm");
    store2.import(&src, &n, &ImportOptions::default()).unwrap();
    store.remove(&n).unwrap();
    assert!(matches!(store.info(&n), Err(StoreError::NotFound(_))));
    assert!(store.list().unwrap().is_empty());
}

fn arb_dtype() -> impl Strategy<Value = DType> {
    proptest::sample::select(DType::ALL.to_vec())
}

fn arb_tensor() -> impl Strategy<Value = (DType, Vec<u64>)> {
    (arb_dtype(), proptest::collection::vec(0u64..6, 0..4)).prop_filter_map(
        "whole bytes",
        |(d, mut shape)| {
            // Sub-byte types need an element count that fills whole bytes.
            if d.byte_len(&shape).is_none() {
                shape.push(8);
            }
            d.byte_len(&shape).map(|_| (d, shape))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_checkpoints_survive_import_and_export(
        tensors in proptest::collection::vec((arb_tensor(), any::<u8>()), 1..10),
        shards in 1usize..4,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let items: Vec<(TensorSpec, Vec<u8>)> = tensors
            .iter()
            .enumerate()
            .map(|(i, ((d, shape), seed))| {
                let s = spec(&format!("t{i}"), *d, shape);
                let b = bytes_for(&s, *seed);
                (s, b)
            })
            .collect();
        write_checkpoint(&src, &items, shards);
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let n = name("prop/model");
        store.import(&src, &n, &ImportOptions::default()).unwrap();
        let out = tmp.path().join("out");
        store.export(&n, &out, 64, &opts()).unwrap();
        let back = ModelSource::open(&out).unwrap();
        let (model, _) = load_to_host(&back, None, &opts()).unwrap();
        prop_assert_eq!(model.tensors().len(), items.len());
        for (s, b) in &items {
            let (v, got) = model.get(&s.name).unwrap();
            prop_assert_eq!(v.dtype, s.dtype);
            prop_assert_eq!(&v.shape, &s.shape);
            prop_assert_eq!(got, b.as_slice());
        }
    }
}

/// The store's settings file: files of earlier versions (a plain bool)
/// still read; no choice (auto) is written as no key, and resolves to this
/// machine's default.
#[test]
fn settings_read_old_files_and_auto_defers_to_the_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.settings().unwrap().compress, None, "no file: auto");
    let file = tmp.path().join(flash_store::SETTINGS_FILE);
    for (text, want) in [
        (r#"{"compress": true}"#, Some(true)),
        (r#"{"compress": false}"#, Some(false)),
        ("{}", None),
    ] {
        std::fs::write(&file, text).unwrap();
        let s = store.settings().unwrap();
        assert_eq!(s.compress, want, "{text}");
        assert_eq!(
            s.compress_imports(),
            want.unwrap_or_else(flash_store::nvidia_gpu_present)
        );
    }
    std::fs::write(&file, r#"{"compress": "sometimes"}"#).unwrap();
    let e = store.settings().unwrap_err().to_string();
    assert!(
        e.contains("settings.json") && e.contains("not valid"),
        "{e}"
    );
    store
        .set_settings(&flash_store::StoreSettings { compress: None })
        .unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), "{}");
}
