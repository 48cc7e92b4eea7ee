//! Compressed models on the CPU: import with compression, load, subsets,
//! verify, export, and corrupted chunks found and named.

use flash_format::manifest::{ChunkCodec, Manifest};
use flash_format::safetensors::{self as st, TensorSpec};
use flash_format::DType;
use flash_load::{load_to_host, IoMode, LoadError, LoadOptions, ModelSource};
use flash_store::{ImportOptions, ModelName, Store};
use std::collections::BTreeMap;
use std::path::Path;

fn spec(name: &str, dtype: DType, shape: &[u64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// Normal-looking values (a sum of uniforms) scaled by `std`, as `dtype`
/// bytes: the exponent statistics of trained weights.
fn normal_bytes(dtype: DType, n: usize, std: f32, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f32 / (1u64 << 53) as f32
    };
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        let v = ((0..12).map(|_| uniform()).sum::<f32>() - 6.0) * std;
        match dtype {
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            _ => unreachable!(),
        }
    }
    out
}

fn checkpoint() -> Vec<(TensorSpec, Vec<u8>)> {
    let mut v = vec![
        // Several chunks and a short last one.
        (
            spec("model.embed_tokens.weight", DType::BF16, &[1000, 300]),
            normal_bytes(DType::BF16, 300_000, 0.02, 1),
        ),
        (
            spec("model.layers.0.mlp.up_proj.weight", DType::F32, &[300, 400]),
            normal_bytes(DType::F32, 120_000, 0.05, 2),
        ),
        (
            spec(
                "model.layers.0.self_attn.o_proj.weight",
                DType::F16,
                &[256, 300],
            ),
            normal_bytes(DType::F16, 76_800, 0.02, 3),
        ),
        // Too small to encode.
        (
            spec("model.norm.weight", DType::BF16, &[300]),
            normal_bytes(DType::BF16, 300, 1.0, 4),
        ),
        (spec("ids", DType::I64, &[5]), (0..40u8).collect()),
    ];
    // A tied copy, stored once.
    v.push((
        spec("lm_head.weight", DType::BF16, &[1000, 300]),
        v[0].1.clone(),
    ));
    v
}

fn write_checkpoint(dir: &Path, tensors: &[(TensorSpec, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let items: Vec<(TensorSpec, &[u8])> = tensors
        .iter()
        .map(|(s, b)| (s.clone(), b.as_slice()))
        .collect();
    st::write_file(&dir.join("model.safetensors"), &items, &BTreeMap::new()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["Qwen3ForCausalLM"]}"#,
    )
    .unwrap();
}

fn opts() -> LoadOptions {
    LoadOptions {
        threads: 3,
        chunk_bytes: 256 << 10,
        io: IoMode::Auto,
        ..Default::default()
    }
}

fn import(store: &Store, src: &Path, model: &str, compress: bool) -> ModelName {
    let n: ModelName = model.parse().unwrap();
    store
        .import(
            src,
            &n,
            &ImportOptions {
                compress,
                ..Default::default()
            },
        )
        .unwrap();
    n
}

/// Every tensor of `tensors` is in `model`, byte for byte.
fn assert_holds(model: &flash_load::HostModel, tensors: &[(TensorSpec, Vec<u8>)]) {
    for (s, bytes) in tensors {
        assert_eq!(
            model.get(&s.name).unwrap().1,
            bytes.as_slice(),
            "{}",
            s.name
        );
    }
}

#[test]
fn compressed_models_load_verify_and_export_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let tensors = checkpoint();
    write_checkpoint(&src, &tensors);
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let packed = import(&store, &src, "test/packed", true);
    let plain = import(&store, &src, "test/plain", false);

    // The manifest: version 2, the float tensors encoded, the small and
    // integer ones verbatim; the model takes fewer bytes on disk.
    let m = Manifest::read(&store.existing(&packed).unwrap()).unwrap();
    assert_eq!(m.version, 2);
    let encoded = |name: &str| {
        m.tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .encoding
            .clone()
    };
    let emb = encoded("model.embed_tokens.weight").expect("bf16 encoded");
    assert_eq!(emb.chunks.len(), 300_000usize.div_ceil(65536));
    assert!(emb.chunks.iter().all(|c| c.0 == ChunkCodec::Rans));
    let ratio = emb.stored_length as f64 / 600_000.0;
    assert!(ratio <= 0.69, "bf16 stored at {ratio:.3} of its size");
    assert!(encoded("model.layers.0.mlp.up_proj.weight").is_some());
    assert!(encoded("model.layers.0.self_attn.o_proj.weight").is_some());
    assert!(encoded("model.norm.weight").is_none());
    assert!(encoded("ids").is_none());
    assert_eq!(
        Manifest::read(&store.existing(&plain).unwrap())
            .unwrap()
            .version,
        1
    );
    let info = store.info(&packed).unwrap();
    assert!(info.compressed);
    assert!(info.stored_bytes < info.size, "{info:?}");
    assert_eq!(info.size, store.info(&plain).unwrap().size);

    // Every tensor loads byte-exact, whole and as subsets (an alias of an
    // encoded tensor included).
    let source = ModelSource::open(&store.existing(&packed).unwrap()).unwrap();
    let (model, _) = load_to_host(&source, None, &opts()).unwrap();
    for (s, bytes) in &tensors {
        let (view, got) = model.get(&s.name).unwrap();
        assert_eq!(view.shape, s.shape);
        assert_eq!(got, bytes.as_slice(), "{}", s.name);
    }
    let only = |t: &str| t == "lm_head.weight" || t == "model.norm.weight";
    let (model, _) = load_to_host(&source, Some(&only), &opts()).unwrap();
    assert_eq!(model.tensors().len(), 2);
    assert_eq!(model.get("lm_head.weight").unwrap().1, &tensors[0].1[..]);

    // The memory tier's way: the stored image (compressed bytes as stored),
    // decoded later, whole or in ranges, gives the same bytes.
    let plan = flash_load::LoadPlan::new(&source, None).unwrap();
    // With larger windows, a window spans tensors (the encoded tensors
    // follow each other in the file and in the destination): its chunks of
    // several tensors and layouts decode into the right places.
    let wide = LoadOptions {
        chunk_bytes: 4 << 20,
        ..opts()
    };
    let spanning = plan
        .jobs(wide.chunk_bytes, Some(wide.threads))
        .iter()
        .filter(|j| {
            let c = flash_load::decode::job_chunks(&plan, j);
            c.first().map(|f| f.tensor) != c.last().map(|l| l.tensor)
        })
        .count();
    assert!(spanning > 0, "no window spans two tensors");
    let (model, _) = load_to_host(&source, None, &wide).unwrap();
    assert_holds(&model, &tensors);
    let stored = plan.stored_image();
    assert!(
        plan.image_len < plan.dest_len,
        "{} vs {}",
        plan.image_len,
        plan.dest_len
    );
    let mut image = vec![0u8; stored.dest_len as usize];
    flash_load::execute(&stored, &flash_load::HostSink::new(&mut image), &opts()).unwrap();
    let mut decoded = vec![0u8; plan.dest_len as usize];
    flash_load::decode::decode_image(&plan, &image, &mut decoded).unwrap();
    for (s, bytes) in &tensors {
        let t = plan.tensors.iter().find(|t| t.name == s.name).unwrap();
        let got = &decoded[t.offset as usize..(t.offset + t.length) as usize];
        assert_eq!(got, bytes.as_slice(), "{}", s.name);
    }
    // A range cutting chunks in the middle.
    let t = plan
        .tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap();
    let (a, b) = (t.offset + 100_001, t.offset + 400_003);
    let mut part = vec![0u8; (b - a) as usize];
    flash_load::decode::decode_range(&plan, &image, a..b, &mut part).unwrap();
    assert_eq!(part, &tensors[0].1[100_001..400_003]);

    // Importing the compressed folder again (uncompressed) decodes it.
    let again = store
        .import(
            &store.existing(&packed).unwrap(),
            &"test/again".parse().unwrap(),
            &ImportOptions::default(),
        )
        .unwrap();
    let source = ModelSource::open(&again.path).unwrap();
    let (model, _) = load_to_host(&source, None, &opts()).unwrap();
    assert_holds(&model, &tensors);

    // Verify decodes every chunk.
    let report = store.verify(&packed, &opts(), None).unwrap();
    assert!(report.ok(), "{:?}", report.bad);

    // Export gives the same safetensors as exporting the plain import, and
    // the source's tensors.
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    store.export(&packed, &a, 5_000_000_000, &opts()).unwrap();
    store.export(&plain, &b, 5_000_000_000, &opts()).unwrap();
    let fa = std::fs::read(a.join("model.safetensors")).unwrap();
    assert_eq!(fa, std::fs::read(b.join("model.safetensors")).unwrap());
    let back = ModelSource::open(&a).unwrap();
    let (model, _) = load_to_host(&back, None, &opts()).unwrap();
    assert_holds(&model, &tensors);
}

#[test]
fn a_corrupted_chunk_is_named_by_load_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_checkpoint(&src, &checkpoint());
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let n = import(&store, &src, "test/packed", true);
    let dir = store.existing(&n).unwrap();
    let m = Manifest::read(&dir).unwrap();
    let t = m
        .tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap();
    let e = t.encoding.as_ref().unwrap();
    // Chunk 1 starts after chunk 0, at a multiple of 16.
    let chunk1 = t.offset + e.chunks[0].1.div_ceil(16) * 16;
    let path = dir.join(&m.files[t.file as usize].name);
    let mut data = std::fs::read(&path).unwrap();
    // A byte of lane 0's state: the stream can no longer end at L.
    data[(chunk1 + 9) as usize] ^= 0x40;
    std::fs::write(&path, &data).unwrap();

    let source = ModelSource::open(&dir).unwrap();
    let err = match load_to_host(&source, None, &opts()) {
        Err(e) => e,
        Ok(_) => panic!("a corrupted chunk loaded"),
    };
    match &err {
        LoadError::Decode { tensor, chunk, .. } => {
            assert_eq!(tensor, "model.embed_tokens.weight");
            assert_eq!(*chunk, 1);
        }
        other => panic!("unexpected error {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("model.embed_tokens.weight") && msg.contains("chunk 1"),
        "{msg}"
    );

    let report = store.verify(&n, &opts(), None).unwrap();
    assert!(!report.ok());
    let decoded: Vec<_> = report
        .bad
        .iter()
        .filter(|b| b.encoded_chunk.is_some())
        .collect();
    assert_eq!(decoded.len(), 1, "{:?}", report.bad);
    assert_eq!(decoded[0].encoded_chunk, Some(1));
    assert_eq!(
        decoded[0].tensors,
        vec!["model.embed_tokens.weight".to_string()]
    );
    // The stored bytes' checksum of that file chunk differs too.
    assert!(report.bad.iter().any(|b| b.encoded_chunk.is_none()));
}
