//! The two parsers that read untrusted bytes, `safetensors::parse_bytes` and
//! `Manifest::parse`, fed random bytes and random mutations of valid input:
//! they return `Ok` or `Err` and never panic, and whatever they accept keeps
//! the invariants the loader plans reads from.
//!
//! The cargo-fuzz targets in `fuzz/` do the same, unbounded, on nightly.

use flash_format::manifest::{
    self, ChecksumSpec, DataFile, Manifest, Source, TensorRecord, ALIGNMENT, CHECKSUM_ALGORITHM,
    FORMAT_NAME, FORMAT_VERSION,
};
use flash_format::safetensors::{build_header, parse_bytes, Header, TensorSpec};
use flash_format::DType;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};

/// What the loader relies on in an accepted safetensors file.
fn check_header(bytes: &[u8], h: &Header) {
    let prefix = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(h.header_len, prefix);
    assert!(h.data_start() <= bytes.len() as u64);
    let data_len = bytes.len() as u64 - h.data_start();
    assert_eq!(h.data_len(), data_len, "tensors tile the data area exactly");
    let mut names = HashSet::new();
    let mut cursor = 0u64;
    for t in &h.tensors {
        assert!(names.insert(&t.name), "{:?} twice", t.name);
        assert_ne!(t.name, "__metadata__");
        assert!(
            t.begin <= t.end && t.end <= data_len,
            "{t:?} outside {data_len} bytes"
        );
        assert_eq!(t.dtype.byte_len(&t.shape), Some(t.end - t.begin), "{t:?}");
        if t.begin != t.end {
            assert!(
                t.begin >= cursor,
                "{t:?} overlaps the previous tensor (ends at {cursor})"
            );
            cursor = t.end;
        }
    }
    // Each tensor's bytes can be sliced out.
    for t in &h.tensors {
        let _ = &bytes[(h.data_start() + t.begin) as usize..(h.data_start() + t.end) as usize];
    }
}

/// What the loader relies on in an accepted manifest.
fn check_manifest(m: &Manifest) {
    assert!(m.alignment.is_power_of_two() && m.alignment >= 8);
    assert!(m.checksum.chunk_size > 0 && m.checksum.chunk_size % m.alignment == 0);
    for f in &m.files {
        assert!(manifest::is_plain_file_name(&f.name));
        assert_eq!(
            f.checksums.len() as u64,
            f.size.div_ceil(m.checksum.chunk_size)
        );
    }
    // Names are unique within a rank, and every rank holds the same names.
    let ranks = m.ranks();
    let mut names = HashSet::new();
    let mut by_file: BTreeMap<u32, Vec<&TensorRecord>> = BTreeMap::new();
    for t in &m.tensors {
        let f = &m.files[t.file as usize];
        assert!(f.rank < ranks);
        assert!(names.insert((f.rank, t.name.as_str())));
        if let Some(d) = t.split_dim {
            assert!(ranks > 1 && (d as usize) < t.shape.len(), "{t:?}");
        }
        assert_eq!(t.dtype.byte_len(&t.shape), Some(t.length));
        assert_eq!(t.offset % m.alignment, 0);
        assert!(
            t.offset.checked_add(t.length).is_some_and(|e| e <= f.size),
            "{t:?} past {}",
            f.size
        );
        by_file.entry(t.file).or_default().push(t);
    }
    for list in by_file.values_mut() {
        list.retain(|t| t.length > 0);
        list.sort_by_key(|t| t.offset);
        for w in list.windows(2) {
            assert!(
                w[0].offset + w[0].length <= w[1].offset,
                "{:?} and {:?} overlap",
                w[0].name,
                w[1].name
            );
        }
    }
    for r in 0..ranks {
        for (_, name) in names.iter().filter(|(rank, _)| *rank == 0) {
            assert!(names.contains(&(r, *name)), "{name:?} missing in rank {r}");
        }
        for (alias, target) in &m.aliases {
            assert!(!names.contains(&(r, alias.as_str())) && names.contains(&(r, target.as_str())));
        }
        // Each rank's view is a valid model of its own.
        let view = m.rank_view(r).expect("the rank exists");
        view.validate().expect("a rank's view is valid");
        assert_eq!(view.ranks(), 1);
        assert_eq!(view.tensors.len() * ranks as usize, m.tensors.len());
    }
    assert!(m.rank_view(ranks).is_none());
    // Accepted means stable: it serializes and re-parses to the same value.
    let again = Manifest::parse(m.to_json().as_bytes()).expect("an accepted manifest re-parses");
    assert_eq!(&again, m);
}

fn try_header(bytes: &[u8]) -> bool {
    match parse_bytes(bytes) {
        Ok(h) => {
            check_header(bytes, &h);
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

fn try_manifest(bytes: &[u8]) -> bool {
    match Manifest::parse(bytes) {
        Ok(m) => {
            check_manifest(&m);
            true
        }
        Err(e) => {
            assert!(!e.is_empty());
            false
        }
    }
}

fn file_from(json: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json);
    v.extend_from_slice(data);
    v
}

fn arb_dtype() -> impl Strategy<Value = DType> {
    proptest::sample::select(DType::ALL.to_vec())
}

/// A tensor spec whose shape fills whole bytes (sub-byte types included).
fn arb_spec() -> impl Strategy<Value = (DType, Vec<u64>)> {
    (arb_dtype(), proptest::collection::vec(0u64..5, 0..4)).prop_map(|(d, mut shape)| {
        if d.byte_len(&shape).is_none() {
            shape.push(8);
        }
        (d, shape)
    })
}

/// A valid safetensors file of random tensors (random names, order,
/// metadata), as built by the crate's own writer.
fn arb_valid_file() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(arb_spec(), 0..6),
        proptest::collection::btree_map("[a-z]{0,3}", "[ -~]{0,4}", 0..3),
        any::<u8>(),
    )
        .prop_map(|(specs, metadata, seed)| {
            let specs: Vec<TensorSpec> = specs
                .into_iter()
                .enumerate()
                .map(|(i, (dtype, shape))| TensorSpec {
                    name: format!("t{i}.{}", seed % 7),
                    dtype,
                    shape,
                })
                .collect();
            let (json, lens) = build_header(&specs, &metadata).unwrap();
            let data: Vec<u8> = (0..lens.iter().sum::<u64>())
                .map(|i| i as u8 ^ seed)
                .collect();
            file_from(&json, &data)
        })
}

/// Bytes that make JSON interesting when spliced in.
fn arb_splice() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\\",
            "0",
            "-1",
            "1e400",
            "18446744073709551615",
            "18446744073709551616",
            "null",
            "\"__metadata__\"",
            "\"BF16\"",
            "\"F4\"",
            "\"data_offsets\"",
            "\"shape\"",
            "\u{0}",
            "\u{ff}",
            "\u{1F600}",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 1..4),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
    Truncate(Index),
    /// Overwrites the 8-byte length prefix.
    Prefix(u64),
    Append(Vec<u8>),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        3 => (any::<Index>(), arb_splice()).prop_map(|(i, s)| Mutation::Insert(i, s)),
        2 => (any::<Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => prop_oneof![Just(u64::MAX), Just(100_000_001u64), Just(0u64), 0u64..2000].prop_map(Mutation::Prefix),
        1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        if let Mutation::Insert(_, s) | Mutation::Append(s) = m {
            bytes.extend_from_slice(s);
        }
        return;
    }
    match m {
        Mutation::Flip(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] ^= b;
        }
        Mutation::Insert(i, s) => {
            let at = i.index(bytes.len() + 1);
            bytes.splice(at..at, s.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let at = i.index(bytes.len());
            let end = (at + n).min(bytes.len());
            bytes.drain(at..end);
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Mutation::Prefix(p) => {
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&p.to_le_bytes());
            }
        }
        Mutation::Append(s) => bytes.extend_from_slice(s),
    }
}

/// Mutations inside the JSON header that keep the length prefix consistent,
/// so they reach the JSON parser and the checks after it.
fn mutate_header_keeping_prefix(file: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let (mut json, data) = (file[8..8 + len].to_vec(), &file[8 + len..]);
    for m in muts {
        apply(&mut json, m);
    }
    file_from(&json, data)
}

/// Paths to every leaf of a JSON value.
fn leaves(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, c) in o {
                path.push(json!(k));
                leaves(c, path, out);
                path.pop();
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, c) in a.iter().enumerate() {
                path.push(json!(i));
                leaves(c, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn leaf_mut<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match k {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

/// Values that probe the checks: boundaries, wrong types, other dtypes.
fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => any::<u64>().prop_map(|n| json!(n)),
        3 => (0u64..70_000).prop_map(|n| json!(n)),
        1 => Just(json!(u64::MAX)),
        1 => Just(json!(u64::MAX - 4095)),
        1 => Just(json!(-1)),
        1 => Just(json!(1.5)),
        1 => Just(Value::Null),
        1 => Just(json!([])),
        1 => Just(json!({})),
        2 => arb_dtype().prop_map(|d| json!(d.name())),
        1 => Just(json!("..")),
        1 => Just(json!("a/b")),
        1 => Just(json!("model.flash.json")),
        1 => "[0-9a-f]{16}".prop_map(|s| json!(s)),
        1 => "[ -~]{0,6}".prop_map(|s| json!(s)),
    ]
}

/// Replaces random leaves of a JSON document with probing values.
fn mutate_json(v: &mut Value, edits: &[(Index, Value)]) {
    for (i, new) in edits {
        let mut all = Vec::new();
        leaves(v, &mut Vec::new(), &mut all);
        if all.is_empty() {
            return;
        }
        *leaf_mut(v, &all[i.index(all.len())]) = new.clone();
    }
}

/// A file's header as JSON, and its data area.
fn split(file: &[u8]) -> (Value, Vec<u8>) {
    let len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&file[8..8 + len]).unwrap(),
        file[8 + len..].to_vec(),
    )
}

fn tensor_names(header: &Value) -> Vec<String> {
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

/// A valid manifest of random tensors laid out as the data writer does.
fn arb_manifest() -> impl Strategy<Value = Manifest> {
    (
        proptest::collection::vec(arb_spec(), 0..5),
        0usize..3,
        1u64..4,
        any::<bool>(),
    )
        .prop_map(|(specs, n_aliases, chunks, two_ranks)| {
            let chunk = ALIGNMENT * chunks;
            let mut offset = 0u64;
            let mut tensors = Vec::new();
            for (i, (dtype, shape)) in specs.into_iter().enumerate() {
                let length = dtype.byte_len(&shape).unwrap();
                tensors.push(TensorRecord {
                    name: format!("t{i}"),
                    dtype,
                    shape,
                    file: 0,
                    offset,
                    length,
                    checksum: manifest::checksum_hex(i as u64 * 0x9e37_79b9),
                    encoding: None,
                    split_dim: None,
                });
                offset = manifest::align_up(offset + length, ALIGNMENT);
            }
            let size = offset;
            let aliases = (0..n_aliases.min(tensors.len()))
                .map(|i| (format!("alias{i}"), tensors[i].name.clone()))
                .collect();
            let data_file = |name: &str, rank| DataFile {
                name: name.into(),
                size,
                rank,
                checksums: (0..size.div_ceil(chunk))
                    .map(manifest::checksum_hex)
                    .collect(),
            };
            let mut files = vec![data_file("data-00000.bin", 0)];
            if two_ranks {
                // A second rank holding the same names in its own file,
                // every other tensor with a dimension split along its first.
                files.push(data_file("data-r1-00000.bin", 1));
                files[0].name = "data-r0-00000.bin".into();
                for (i, t) in tensors.iter_mut().enumerate() {
                    if i % 2 == 0 && !t.shape.is_empty() {
                        t.split_dim = Some(0);
                    }
                }
                let copies: Vec<TensorRecord> = tensors
                    .iter()
                    .map(|t| TensorRecord {
                        file: 1,
                        ..t.clone()
                    })
                    .collect();
                tensors.extend(copies);
            }
            let m = Manifest {
                format: FORMAT_NAME.into(),
                version: FORMAT_VERSION,
                model_id: "prop/model".into(),
                source: Source {
                    kind: "local".into(),
                    path: Some("/x".into()),
                    ..Default::default()
                },
                architecture: Some("Arch".into()),
                dtype: Some(DType::BF16),
                alignment: ALIGNMENT,
                checksum: ChecksumSpec {
                    algorithm: CHECKSUM_ALGORITHM.into(),
                    chunk_size: chunk,
                },
                files,
                tensors,
                aliases,
                metadata: BTreeMap::new(),
                extra_files: vec!["config.json".into()],
            };
            m.validate().expect("the generator builds valid manifests");
            m
        })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        try_header(&bytes);
        try_manifest(&bytes);
    }

    #[test]
    fn random_bytes_behind_a_consistent_prefix(
        json in proptest::collection::vec(any::<u8>(), 0..200),
        data in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        try_header(&file_from(&json, &data));
    }

    #[test]
    fn valid_files_are_accepted(file in arb_valid_file()) {
        prop_assert!(try_header(&file), "refused a file its own writer built");
    }

    #[test]
    fn byte_mutations_of_a_valid_file(
        file in arb_valid_file(),
        muts in proptest::collection::vec(arb_mutation(), 1..4),
    ) {
        let mut whole = file.clone();
        for m in &muts {
            apply(&mut whole, m);
        }
        try_header(&whole);
        try_header(&mutate_header_keeping_prefix(&file, &muts));
    }

    #[test]
    fn json_mutations_of_a_valid_header(
        file in arb_valid_file(),
        edits in proptest::collection::vec((any::<Index>(), arb_value()), 1..3),
        data_delta in -8i64..8,
    ) {
        let (mut v, mut data) = split(&file);
        mutate_json(&mut v, &edits);
        data.resize((data.len() as i64 + data_delta).max(0) as usize, 0xAB);
        try_header(&file_from(&serde_json::to_vec(&v).unwrap(), &data));
    }

    #[test]
    fn any_tensor_order_in_the_data_area_is_accepted(
        file in arb_valid_file(),
        keys in proptest::collection::vec(any::<u32>(), 6),
    ) {
        let (mut v, data) = split(&file);
        let mut names = tensor_names(&v);
        names.sort_by_key(|n| keys[n[1..n.find('.').unwrap()].parse::<usize>().unwrap()]);
        let mut cursor = 0;
        for n in &names {
            let o = &mut v[n.as_str()]["data_offsets"];
            let len = o[1].as_u64().unwrap() - o[0].as_u64().unwrap();
            *o = json!([cursor, cursor + len]);
            cursor += len;
        }
        let bytes = file_from(&serde_json::to_vec(&v).unwrap(), &data);
        let h = parse_bytes(&bytes).expect("a re-tiled data area is valid");
        check_header(&bytes, &h);
        let mut got: Vec<_> = h.tensors.iter().map(|t| (t.name.clone(), t.dtype.name(), t.shape.clone())).collect();
        got.sort();
        let mut want: Vec<_> = names
            .iter()
            .map(|n| {
                let e = &v[n.as_str()];
                let shape: Vec<u64> = e["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
                (n.clone(), e["dtype"].as_str().unwrap(), shape)
            })
            .collect();
        want.sort();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn moving_one_tensor_is_refused(file in arb_valid_file(), pick in any::<Index>(), delta in 1u64..64, back in any::<bool>()) {
        let (mut v, data) = split(&file);
        let names: Vec<String> = tensor_names(&v)
            .into_iter()
            .filter(|n| v[n.as_str()]["data_offsets"][0] != v[n.as_str()]["data_offsets"][1])
            .collect();
        if names.is_empty() {
            return Ok(()); // nothing to move
        }
        let o = &mut v[names[pick.index(names.len())].as_str()]["data_offsets"];
        let (b, e) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
        *o = if back && b >= delta { json!([b - delta, e - delta]) } else { json!([b + delta, e + delta]) };
        // The data area was tiled exactly: a moved tensor overlaps, leaves a
        // hole or runs past the end.
        let bytes = file_from(&serde_json::to_vec(&v).unwrap(), &data);
        prop_assert!(!try_header(&bytes), "accepted a moved tensor: {}", v);
    }

    #[test]
    fn valid_manifests_round_trip(m in arb_manifest()) {
        prop_assert!(try_manifest(m.to_json().as_bytes()));
    }

    #[test]
    fn json_mutations_of_a_valid_manifest(
        m in arb_manifest(),
        edits in proptest::collection::vec((any::<Index>(), arb_value()), 1..4),
    ) {
        let mut v = serde_json::to_value(&m).unwrap();
        mutate_json(&mut v, &edits);
        try_manifest(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn byte_mutations_of_a_valid_manifest(
        m in arb_manifest(),
        muts in proptest::collection::vec(arb_mutation(), 1..4),
    ) {
        let mut bytes = m.to_json().into_bytes();
        for mu in &muts {
            if !matches!(mu, Mutation::Prefix(_)) {
                apply(&mut bytes, mu);
            }
        }
        try_manifest(&bytes);
    }
}

/// Hand-picked inputs near the arithmetic edges (offset + length overflow,
/// element-count overflow, header length at the limit).
#[test]
fn edge_cases() {
    let cases: &[&str] = &[
        r#"{"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}"#,
        r#"{"a":{"dtype":"U64","shape":[4611686018427387904,4],"data_offsets":[0,0]}}"#,
        r#"{"a":{"dtype":"F4","shape":[1],"data_offsets":[0,0]}}"#,
        r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
        r#"{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[0],"data_offsets":[1,1]},"c":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#,
        r#"{"__metadata__":null}"#,
        r#"{"__metadata__":{"a":"b"},"__metadata__":{"a":"b"}}"#,
        r#"{}"#,
        "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}   \n\t",
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} trailing"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#,
    ];
    for json in cases {
        for data_len in [0usize, 1, 2, 8] {
            try_header(&file_from(json.as_bytes(), &vec![0; data_len]));
        }
    }
    // Zero-size tensors anywhere in the data area, and at its very end.
    let ok = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"z":{"dtype":"BF16","shape":[0,9],"data_offsets":[2,2]}}"#;
    assert!(try_header(&file_from(ok.as_bytes(), &[1, 2])));
    let mut huge = (u64::MAX).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(!try_header(&huge));
    for n in 0..8 {
        assert!(!try_header(&vec![0; n]));
    }
    // An empty header with an empty data area is a valid (empty) file.
    assert!(try_header(&file_from(b"{}", &[])));
    assert!(
        !try_header(&file_from(b"{}", &[0])),
        "a data area no tensor covers is a hole"
    );
}
