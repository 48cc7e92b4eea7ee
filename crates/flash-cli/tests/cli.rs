//! The `flash` binary end to end, on the CPU.
//!
//! Bad input (malformed safetensors, bad indexes, bad names, unknown models)
//! must be refused with exit status 1, one `error:` line on stderr that names
//! the file or model and what is wrong, no panic, and a store left exactly as
//! it was. The happy path must move every byte unchanged: synth -> pull ->
//! export -> pull again. An import killed half-way must leave no model and no
//! temporary files behind.

use flash_format::safetensors as st;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flash");
/// The model every bad-input test imports first and checks afterwards.
const KEEP: &str = "keep/model";

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn command(store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--storage")
        .arg(store)
        .arg("-q")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FLASH_HOME")
        .stdin(Stdio::null());
    c
}

/// Runs `flash --storage STORE -q ARGS...`.
fn flash(store: &Path, args: &[&str]) -> Output {
    command(store, args).output().expect("run flash")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

fn json_out(what: &str, out: Output) -> Value {
    let text = ok(what, out);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {text}"))
}

/// Asserts exit status 1 (not 0, not a panic's 101, not a signal), no panic
/// text, and exactly one non-empty stderr line, starting with `error: ` and
/// containing every needle. Returns that line.
fn assert_clean_error(what: &str, out: &Output, needles: &[&str]) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: exit status {:?}\nstderr: {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{what}: panicked:\n{err}");
    assert!(
        !err.contains("RUST_BACKTRACE"),
        "{what}: panic hint:\n{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one stderr line, got {lines:#?}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("error: "),
        "{what}: {line:?} does not start with \"error: \""
    );
    for n in needles {
        assert!(line.contains(n), "{what}: {line:?} does not mention {n:?}");
    }
    line.to_string()
}

/// The bytes of a safetensors file: 8-byte little-endian header length
/// (`declared`, or the JSON's real length), the JSON, the data area.
fn st_bytes(json: &str, declared: Option<u64>, data: &[u8]) -> Vec<u8> {
    let mut v = declared.unwrap_or(json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.extend_from_slice(data);
    v
}

fn write_st(path: &Path, json: &str, declared: Option<u64>, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, st_bytes(json, declared, data)).unwrap();
}

/// Distinct bytes so no two tensors are stored as one (tied) copy.
fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A valid two-tensor header: `layer.weight` (F32 [2,3], 24 bytes) then
/// `layer.bias` (U8 [4], 4 bytes); 28 bytes of data.
const GOOD_HEADER: &str = r#"{"__metadata__":{"format":"pt"},"layer.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"layer.bias":{"dtype":"U8","shape":[4],"data_offsets":[24,28]}}"#;

fn sharded_checkpoint(dir: &Path) {
    let one = r#"{"layer.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
    let two = r#"{"layer.bias":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    write_st(
        &dir.join("model-00001-of-00002.safetensors"),
        one,
        None,
        &data(24, 1),
    );
    write_st(
        &dir.join("model-00002-of-00002.safetensors"),
        two,
        None,
        &data(4, 2),
    );
    std::fs::write(
        dir.join(st::INDEX_FILE),
        r#"{"metadata":{"total_size":28},"weight_map":{"layer.weight":"model-00001-of-00002.safetensors","layer.bias":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["TestModel"]}"#,
    )
    .unwrap();
}

/// A store holding one imported model, and its manifest as it was.
struct Fixture {
    tmp: tempfile::TempDir,
    store: PathBuf,
    manifest: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let good = tmp.path().join("good");
        write_st(
            &good.join("model.safetensors"),
            GOOD_HEADER,
            None,
            &data(28, 3),
        );
        std::fs::write(
            good.join("config.json"),
            r#"{"architectures":["TestModel"]}"#,
        )
        .unwrap();
        ok(
            "import the good model",
            flash(&store, &["pull", "--from", s(&good), "--name", KEEP]),
        );
        let manifest = std::fs::read(store.join("models/keep/model/model.flash.json")).unwrap();
        Fixture {
            tmp,
            store,
            manifest,
        }
    }

    fn model_dir(&self) -> PathBuf {
        self.store.join("models/keep/model")
    }

    fn manifest_path(&self) -> PathBuf {
        self.model_dir().join("model.flash.json")
    }

    /// A fresh folder for a checkpoint under test.
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Tries to import `dir` over the kept model (`--force`): the strongest
    /// way to check that a refused import destroys nothing.
    fn pull_over(&self, dir: &Path) -> Output {
        flash(
            &self.store,
            &["pull", "--from", s(dir), "--name", KEEP, "--force"],
        )
    }

    fn flash(&self, args: &[&str]) -> Output {
        flash(&self.store, args)
    }

    /// The kept model is byte-for-byte as imported and still verifies; the
    /// store lists only it and holds no temporary or stray folder.
    fn assert_unchanged(&self, what: &str) {
        let now = std::fs::read(self.manifest_path())
            .unwrap_or_else(|e| panic!("{what}: the kept model's manifest is gone: {e}"));
        assert!(now == self.manifest, "{what}: model.flash.json changed");
        ok(&format!("{what}: verify"), self.flash(&["verify", KEEP]));
        let list = json_out(&format!("{what}: list"), self.flash(&["list", "--json"]));
        let ids: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["model_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [KEEP], "{what}: list");
        let tmp_left: Vec<_> = std::fs::read_dir(self.store.join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(tmp_left.is_empty(), "{what}: left in tmp/: {tmp_left:?}");
        let mut top: Vec<String> = std::fs::read_dir(&self.store)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert_eq!(
            top,
            ["models", "tmp", "trash"],
            "{what}: the store's top level"
        );
        let orgs: Vec<_> = std::fs::read_dir(self.store.join("models"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(orgs, ["keep"], "{what}: models/");
    }
}

/// Imports a checkpoint whose only shard is `json` + `data` (header length
/// `declared` when given) over the kept model; expects a clean error naming
/// the shard and every needle, and the store unchanged.
fn refuse_single_file(
    case: &str,
    json: &str,
    declared: Option<u64>,
    data: &[u8],
    needles: &[&str],
) {
    let fx = Fixture::new();
    let dir = fx.dir(case);
    write_st(&dir.join("model.safetensors"), json, declared, data);
    let out = fx.pull_over(&dir);
    let file = dir.join("model.safetensors");
    let mut all = vec![s(&file)];
    all.extend_from_slice(needles);
    assert_clean_error(case, &out, &all);
    fx.assert_unchanged(case);
}

#[test]
fn truncated_file_is_refused() {
    // The header promises 28 bytes of data; the file stops after 26, inside
    // the second tensor.
    refuse_single_file(
        "truncated",
        GOOD_HEADER,
        None,
        &data(26, 0),
        &["layer.bias", "past the data area"],
    );
    // Cut inside the JSON header.
    let whole = st_bytes(GOOD_HEADER, None, &data(28, 0));
    let fx = Fixture::new();
    let dir = fx.dir("cut-header");
    std::fs::write(dir.join("model.safetensors"), &whole[..40]).unwrap();
    let file = dir.join("model.safetensors");
    assert_clean_error(
        "cut header",
        &fx.pull_over(&dir),
        &[s(&file), "past the end of the file (40 bytes)"],
    );
    fx.assert_unchanged("cut header");
}

#[test]
fn error_line_does_not_repeat_its_cause() {
    let fx = Fixture::new();
    let dir = fx.dir("dup");
    let json = r#"{"first":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"second":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
    write_st(&dir.join("model.safetensors"), json, None, &data(6, 0));
    let line = assert_clean_error("overlap", &fx.pull_over(&dir), &["overlap"]);
    assert_eq!(line.matches("overlap").count(), 1, "{line}");
}

#[test]
fn file_shorter_than_the_length_prefix_is_refused() {
    let fx = Fixture::new();
    let dir = fx.dir("short");
    std::fs::write(dir.join("model.safetensors"), [1, 2, 3]).unwrap();
    let file = dir.join("model.safetensors");
    assert_clean_error("short", &fx.pull_over(&dir), &[s(&file), "too short"]);
    fx.assert_unchanged("short");
}

#[test]
fn header_length_past_end_of_file_is_refused() {
    // Declared 10 000 bytes of header in a file of a few hundred.
    refuse_single_file(
        "past-end",
        GOOD_HEADER,
        Some(10_000),
        &data(28, 0),
        &["header length 10000", "past the end"],
    );
}

#[test]
fn huge_header_length_is_refused_before_reading() {
    // 2^40 declared: far over the 100 MB limit (and past the end of the file).
    refuse_single_file(
        "huge",
        GOOD_HEADER,
        Some(1 << 40),
        &data(28, 0),
        &["1099511627776", "exceeds the limit"],
    );
    // Just over the limit.
    refuse_single_file(
        "huge2",
        GOOD_HEADER,
        Some(100_000_001),
        &data(28, 0),
        &["100000001", "exceeds the limit"],
    );
}

#[test]
fn overlapping_offsets_are_refused() {
    let json = r#"{"first":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"second":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
    refuse_single_file(
        "overlap",
        json,
        None,
        &data(6, 0),
        &["\"first\"", "\"second\"", "overlap"],
    );
}

#[test]
fn out_of_range_offsets_are_refused() {
    let json = r#"{"layer.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"layer.bias":{"dtype":"U8","shape":[4],"data_offsets":[24,28]},"far":{"dtype":"U8","shape":[2],"data_offsets":[4000000000,4000000002]}}"#;
    refuse_single_file(
        "out-of-range",
        json,
        None,
        &data(28, 0),
        &["\"far\"", "[4000000000, 4000000002]", "past the data area"],
    );
    // begin > end.
    let json = r#"{"backwards":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#;
    refuse_single_file(
        "backwards",
        json,
        None,
        &data(4, 0),
        &["\"backwards\"", "begin after they end"],
    );
}

#[test]
fn unknown_dtype_is_refused() {
    let json = r#"{"layer.weight":{"dtype":"Q7","shape":[4],"data_offsets":[0,4]}}"#;
    refuse_single_file(
        "dtype",
        json,
        None,
        &data(4, 0),
        &["\"layer.weight\"", "unknown dtype", "\"Q7\""],
    );
}

#[test]
fn bad_json_header_is_refused() {
    refuse_single_file(
        "json",
        r#"{"layer.weight":{"dtype":"#,
        None,
        &data(4, 0),
        &["not valid JSON"],
    );
    let fx = Fixture::new();
    let dir = fx.dir("not-utf8");
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let file = dir.join("model.safetensors");
    assert_clean_error("not-utf8", &fx.pull_over(&dir), &[s(&file), "UTF-8"]);
    fx.assert_unchanged("not-utf8");
}

#[test]
fn bad_json_index_is_refused() {
    let fx = Fixture::new();
    let dir = fx.dir("bad-index");
    sharded_checkpoint(&dir);
    std::fs::write(dir.join(st::INDEX_FILE), "{nope").unwrap();
    let index = dir.join(st::INDEX_FILE);
    assert_clean_error(
        "bad index",
        &fx.pull_over(&dir),
        &[s(&index), "not a valid index"],
    );
    fx.assert_unchanged("bad index");

    // Valid JSON, but a shard name that leaves the folder.
    let dir = fx.dir("escaping-index");
    sharded_checkpoint(&dir);
    std::fs::write(
        dir.join(st::INDEX_FILE),
        r#"{"weight_map":{"layer.weight":"../good/model.safetensors"}}"#,
    )
    .unwrap();
    let index = dir.join(st::INDEX_FILE);
    assert_clean_error(
        "escaping index",
        &fx.pull_over(&dir),
        &[s(&index), "not a plain file name"],
    );
    fx.assert_unchanged("escaping index");
}

#[test]
fn index_naming_a_missing_shard_is_refused() {
    let fx = Fixture::new();
    let dir = fx.dir("missing-shard");
    sharded_checkpoint(&dir);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert_clean_error(
        "missing shard",
        &fx.pull_over(&dir),
        &[
            st::INDEX_FILE,
            "model-00002-of-00002.safetensors",
            "missing",
        ],
    );
    fx.assert_unchanged("missing shard");
}

#[test]
fn names_that_would_escape_the_store_are_refused() {
    let fx = Fixture::new();
    let good = fx.tmp.path().join("good");
    for name in [
        "../x",
        "/abs/x",
        "a/b/c",
        "a/..",
        "../../x/y",
        "./x",
        "a/.b",
        "a\\b/c",
        "a/b:../c",
    ] {
        let out = fx.flash(&["pull", "--from", s(&good), "--name", name]);
        assert_clean_error(
            &format!("pull --name {name}"),
            &out,
            &[&format!("{name:?}"), "invalid model name"],
        );
        for cmd in ["info", "rm", "verify"] {
            let out = fx.flash(&[cmd, name]);
            assert_clean_error(
                &format!("{cmd} {name}"),
                &out,
                &[&format!("{name:?}"), "invalid model name"],
            );
        }
        let out = fx.flash(&["export", name, "--to", s(&fx.tmp.path().join("never"))]);
        assert_clean_error(
            &format!("export {name}"),
            &out,
            &[&format!("{name:?}"), "invalid model name"],
        );
        fx.assert_unchanged(name);
    }
    // Nothing was written beside the store or its parent either.
    let mut beside: Vec<String> = std::fs::read_dir(fx.tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert_eq!(beside, ["good", "store"]);
}

#[test]
fn unknown_model_is_an_error_for_info_rm_verify_export() {
    let fx = Fixture::new();
    for args in [
        vec!["info", "nope/missing"],
        vec!["info", "nope/missing", "--json"],
        vec!["rm", "nope/missing"],
        vec!["verify", "nope/missing"],
        vec![
            "export",
            "nope/missing",
            "--to",
            s(&fx.tmp.path().join("never")),
        ],
        // Same org as the kept model, other name; and the kept name at a revision.
        vec!["info", "keep/other"],
        vec!["rm", "keep/model:v2"],
    ] {
        let what = args.join(" ");
        let out = fx.flash(&args);
        assert_clean_error(&what, &out, &[args[1], "not in the store"]);
        assert!(
            out.stdout.is_empty(),
            "{what}: printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        fx.assert_unchanged(&what);
    }
    assert!(
        !fx.tmp.path().join("never").exists(),
        "a failed export created its target"
    );
}

#[test]
fn flipped_byte_fails_verify_and_names_the_tensor() {
    let fx = Fixture::new();
    let m: Value = serde_json::from_slice(&fx.manifest).unwrap();
    let t = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "layer.weight")
        .unwrap();
    let file = m["files"][t["file"].as_u64().unwrap() as usize]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let path = fx.model_dir().join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[t["offset"].as_u64().unwrap() as usize + 5] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();

    let out = fx.flash(&["verify", KEEP]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify of a corrupt model: {:?}\n{err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one bad chunk, one line: {lines:#?}");
    for n in [KEEP, file.as_str(), "checksum mismatch", "layer.weight"] {
        assert!(
            lines[0].contains(n),
            "{:?} does not mention {n:?}",
            lines[0]
        );
    }
    assert!(
        !lines[0].contains("layer.bias"),
        "the intact tensor is named: {}",
        lines[0]
    );

    let out = fx.flash(&["verify", KEEP, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = report["bad"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{report}");
    assert_eq!(bad[0]["file"], file.as_str());
    assert_eq!(bad[0]["tensors"], serde_json::json!(["layer.weight"]));

    // Verify reports; it does not repair or touch the manifest.
    assert!(std::fs::read(fx.manifest_path()).unwrap() == fx.manifest);
}

#[test]
fn damaged_store_files_are_reported_not_panicked_on() {
    let fx = Fixture::new();
    let m: Value = serde_json::from_slice(&fx.manifest).unwrap();
    let file = m["files"][0]["name"].as_str().unwrap().to_string();
    let path = fx.model_dir().join(&file);
    let size = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(size - 100)
        .unwrap();
    let out = fx.flash(&["verify", KEEP]);
    assert_clean_error(
        "verify of a truncated data file",
        &out,
        &[&file, &format!("{} bytes", size - 100), &format!("{size}")],
    );

    std::fs::write(fx.manifest_path(), "{\"format\":").unwrap();
    for cmd in ["verify", "info"] {
        let out = fx.flash(&[cmd, KEEP]);
        assert_clean_error(
            &format!("{cmd} with a bad manifest"),
            &out,
            &["model.flash.json", "not a valid manifest"],
        );
    }
    // list skips the unreadable model (with a warning) instead of failing.
    let out = fx.flash(&["list", "--json"]);
    assert!(!stderr(&out).contains("panicked"));
    assert_eq!(json_out("list", out), serde_json::json!([]));
}

#[test]
fn pull_over_an_existing_name_needs_force() {
    let fx = Fixture::new();
    let other = fx.dir("other");
    write_st(
        &other.join("model.safetensors"),
        r#"{"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#,
        None,
        &[9, 8, 7],
    );
    let out = fx.flash(&["pull", "--from", s(&other), "--name", KEEP]);
    assert_clean_error("pull without --force", &out, &[KEEP, "--force"]);
    fx.assert_unchanged("pull without --force");
    // The same name given positionally.
    let out = fx.flash(&["pull", KEEP, "--from", s(&other)]);
    assert_clean_error("pull NAME --from without --force", &out, &[KEEP, "--force"]);
    fx.assert_unchanged("pull NAME --from without --force");
    // With --force it replaces the model.
    ok(
        "pull --force",
        fx.flash(&["pull", "--from", s(&other), "--name", KEEP, "--force"]),
    );
    let info = json_out("info", fx.flash(&["info", KEEP, "--json"]));
    assert_eq!(info["tensor_count"], 1);
    ok("verify after --force", fx.flash(&["verify", KEEP]));
}

#[test]
fn pull_from_a_folder_without_weights_is_refused() {
    let fx = Fixture::new();
    let missing = fx.tmp.path().join("does-not-exist");
    assert_clean_error("missing folder", &fx.pull_over(&missing), &[s(&missing)]);
    let empty = fx.dir("empty");
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    assert_clean_error(
        "no weights",
        &fx.pull_over(&empty),
        &[s(&empty), "safetensors"],
    );
    // A file whose header holds no tensor.
    let none = fx.dir("no-tensors");
    write_st(
        &none.join("model.safetensors"),
        r#"{"__metadata__":{"format":"pt"}}"#,
        None,
        &[],
    );
    assert_clean_error(
        "no tensors",
        &fx.pull_over(&none),
        &[s(&none), "no tensors"],
    );
    fx.assert_unchanged("bad folders");
}

/// name -> (dtype, shape, bytes) of every tensor of a safetensors folder.
fn read_checkpoint(dir: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let h = st::read_header(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        for t in &h.tensors {
            let (a, b) = (
                (h.data_start() + t.begin) as usize,
                (h.data_start() + t.end) as usize,
            );
            let prev = out.insert(
                t.name.clone(),
                (t.dtype.to_string(), t.shape.clone(), bytes[a..b].to_vec()),
            );
            assert!(prev.is_none(), "{} twice in {}", t.name, dir.display());
        }
    }
    out
}

/// Every tensor name (aliases included) -> the checksum of its bytes.
fn checksums(manifest: &Value) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["checksum"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (alias, target) in manifest["aliases"].as_object().unwrap() {
        let sum = out[target.as_str().unwrap()].clone();
        out.insert(alias.clone(), sum);
    }
    out
}

#[test]
fn happy_path_synth_pull_list_info_verify_export_reimport_rm() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let src = tmp.path().join("tiny");
    let synth = json_out(
        "synth",
        flash(&store, &["synth", "qwen3", "tiny", s(&src), "--json"]),
    );
    let tensors = synth["tensors"].as_u64().unwrap();
    assert!(tensors > 0);

    let report = json_out(
        "pull",
        flash(
            &store,
            &["pull", "--from", s(&src), "--name", "happy/tiny", "--json"],
        ),
    );
    assert_eq!(report["model_id"], "happy/tiny");
    assert_eq!(
        report["tensors"].as_u64().unwrap() + report["aliases"].as_u64().unwrap(),
        tensors
    );

    let list = json_out("list", flash(&store, &["list", "--json"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let m = &list[0];
    let model_dir = store.join("models/happy/tiny");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("model.flash.json")).unwrap())
            .unwrap();
    let data_bytes: u64 = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["size"].as_u64().unwrap())
        .sum();
    let tensor_bytes: u64 = manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["length"].as_u64().unwrap())
        .sum();
    assert_eq!(m["model_id"], "happy/tiny");
    // `size` is the tensors' bytes; `stored_bytes` what the files take.
    assert_eq!(m["size"].as_u64().unwrap(), tensor_bytes);
    assert_eq!(m["stored_bytes"].as_u64().unwrap(), data_bytes);
    assert_eq!(m["compressed"], false);
    assert!(data_bytes >= tensor_bytes && tensor_bytes > 0);
    assert_eq!(m["dtype"], "BF16");
    assert_eq!(m["architecture"], "Qwen3ForCausalLM");
    assert_eq!(m["tensor_count"].as_u64().unwrap(), tensors);
    assert_eq!(m["ranks"], 1);
    assert_eq!(
        m["source"],
        format!("local:{}", src.canonicalize().unwrap().display())
    );
    assert!(m["revision"].is_null(), "{m}");
    assert_eq!(Path::new(m["path"].as_str().unwrap()), model_dir);
    assert_eq!(m["format_version"], 1);

    let info = json_out("info", flash(&store, &["info", "happy/tiny", "--json"]));
    assert_eq!(&info, m, "info --json and list --json agree");
    let text = ok("info", flash(&store, &["info", "happy/tiny"]));
    assert!(
        text.contains("Qwen3ForCausalLM") && text.contains("happy/tiny"),
        "{text}"
    );

    let v = ok("verify", flash(&store, &["verify", "happy/tiny"]));
    assert!(v.contains("happy/tiny: ok"), "{v}");
    let vj = json_out(
        "verify --json",
        flash(&store, &["verify", "happy/tiny", "--json"]),
    );
    assert_eq!(vj["bad"], serde_json::json!([]));
    assert_eq!(vj["bytes"].as_u64().unwrap(), data_bytes);

    // Export in small shards, so the index path is exercised too.
    let out = tmp.path().join("export");
    ok(
        "export",
        flash(
            &store,
            &[
                "export",
                "happy/tiny",
                "--to",
                s(&out),
                "--shard-size",
                "64K",
            ],
        ),
    );
    assert!(
        out.join(st::INDEX_FILE).is_file(),
        "64K shards of ~200K need an index"
    );
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap(),
            "{f} copied as is"
        );
    }
    let original = read_checkpoint(&src);
    let exported = read_checkpoint(&out);
    assert_eq!(original.len() as u64, tensors);
    assert!(
        original == exported,
        "exported tensors differ from the synthesized ones"
    );
    let refused = flash(&store, &["export", "happy/tiny", "--to", s(&out)]);
    assert_clean_error(
        "export into a non-empty folder",
        &refused,
        &[s(&out), "not empty"],
    );
    assert!(
        read_checkpoint(&out) == exported,
        "a refused export changed the folder"
    );

    ok(
        "re-import",
        flash(
            &store,
            &["pull", "--from", s(&out), "--name", "happy/again"],
        ),
    );
    ok(
        "verify re-import",
        flash(&store, &["verify", "happy/again"]),
    );
    let manifest2: Value = serde_json::from_slice(
        &std::fs::read(store.join("models/happy/again/model.flash.json")).unwrap(),
    )
    .unwrap();
    let (a, b) = (checksums(&manifest), checksums(&manifest2));
    assert_eq!(a.len() as u64, tensors);
    assert_eq!(a, b, "tensor checksums differ after export and re-import");
    assert_eq!(manifest["metadata"], manifest2["metadata"]);

    let list = json_out("list", flash(&store, &["list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 2);
    let text = ok("list", flash(&store, &["list"]));
    assert!(
        text.contains("happy/tiny") && text.contains("happy/again"),
        "{text}"
    );

    let rm = ok("rm", flash(&store, &["rm", "happy/tiny"]));
    assert!(rm.contains("happy/tiny"), "{rm}");
    ok(
        "verify the other after rm",
        flash(&store, &["verify", "happy/again"]),
    );
    ok("rm", flash(&store, &["rm", "happy/again"]));
    assert_eq!(
        json_out("list", flash(&store, &["list", "--json"])),
        serde_json::json!([])
    );
    assert_eq!(
        std::fs::read_dir(store.join("models")).unwrap().count(),
        0,
        "models/ is empty"
    );
    assert_eq!(
        std::fs::read_dir(store.join("trash")).unwrap().count(),
        0,
        "trash/ is empty"
    );
    assert_clean_error(
        "rm twice",
        &flash(&store, &["rm", "happy/tiny"]),
        &["happy/tiny", "not in the store"],
    );
    // The source checkpoint was only read.
    assert!(read_checkpoint(&src) == original);
}

#[test]
fn flash_home_is_the_default_store() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_st(
        &src.join("model.safetensors"),
        GOOD_HEADER,
        None,
        &data(28, 5),
    );
    let home = tmp.path().join("home");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("FLASH_HOME", &home)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    ok(
        "pull",
        run(&["-q", "pull", "--from", s(&src), "--name", "home/m"]),
    );
    assert!(home.join("models/home/m/model.flash.json").is_file());
    let list = json_out("list", run(&["list", "--json"]));
    assert_eq!(list[0]["model_id"], "home/m");
    // --storage wins over FLASH_HOME.
    let other = tmp.path().join("other");
    let list = json_out(
        "list --storage",
        run(&["--storage", s(&other), "list", "--json"]),
    );
    assert_eq!(list, serde_json::json!([]));
}

#[test]
fn completions_and_help() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok("completions", flash(tmp.path(), &["completions", "bash"]));
    assert!(out.contains("flash"), "{out}");
    assert!(
        out.contains("complete") && out.contains("pull"),
        "not a bash completion script: {out}"
    );

    let help = ok("--help", Command::new(BIN).arg("--help").output().unwrap());
    for cmd in [
        "pull",
        "list",
        "info",
        "rm",
        "verify",
        "export",
        "synth",
        "bench",
        "doctor",
        "completions",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} ")) || l.trim() == cmd),
            "--help does not list {cmd}:\n{help}"
        );
    }
    let bad = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "clap usage errors exit 2");
    assert!(stderr(&bad).contains("frobnicate"));
}

/// True when some file under `dir` holds at least one byte.
fn has_data(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => has_data(&p),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len() > 0).unwrap_or(false),
            _ => false,
        }
    })
}

#[test]
fn import_killed_half_way_leaves_no_model_and_no_temporary() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let src = tmp.path().join("qwen3-0.6b");
    ok(
        "synth 0.6b",
        flash(&store, &["synth", "qwen3", "0.6b", s(&src)]),
    );

    let mut child = command(&store, &["pull", "--from", s(&src), "--name", "kill/me"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let tmp_dir = store.join("tmp");
    while !has_data(&tmp_dir) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended before it wrote any data: {:?}",
            child.try_wait()
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no data under {} after 30 s",
            tmp_dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the import finished before it could be killed"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap(); // reaped: its pid is dead for the store's recovery
    assert!(!status.success());

    // The dead import left its work in tmp/ and nothing in models/.
    assert!(
        std::fs::read_dir(&tmp_dir).unwrap().count() > 0,
        "killed, yet tmp/ is empty"
    );
    assert!(
        !store.join("models/kill").exists(),
        "a half-written model is in models/"
    );

    // Any command opens the store, which removes the dead process's work.
    assert_eq!(
        json_out("list", flash(&store, &["list", "--json"])),
        serde_json::json!([])
    );
    let left: Vec<_> = std::fs::read_dir(&tmp_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left in tmp/ after reopening: {left:?}");
    assert_clean_error(
        "info of the killed import",
        &flash(&store, &["info", "kill/me"]),
        &["kill/me", "not in the store"],
    );

    ok(
        "pull again",
        flash(&store, &["pull", "--from", s(&src), "--name", "kill/me"]),
    );
    ok("verify", flash(&store, &["verify", "kill/me"]));
    let list = json_out("list", flash(&store, &["list", "--json"]));
    assert_eq!(list[0]["model_id"], "kill/me");
    assert_eq!(std::fs::read_dir(&tmp_dir).unwrap().count(), 0);
    // tmp (1.2 GB of synth, 1.1 GB of store) is removed when `tmp` drops.
}

// ---------------------------------------------------------------------------
// `flash run` in this process: the device it picks
// ---------------------------------------------------------------------------

/// A tiny synthesized Qwen3 folder (bf16, so `--device auto` would take a
/// GPU) in `tmp`, and a store folder beside it.
fn tiny_run_model(tmp: &Path) -> (PathBuf, PathBuf) {
    let (store, model) = (tmp.join("store"), tmp.join("qwen3-tiny"));
    ok(
        "synth",
        flash(&store, &["synth", "qwen3", "tiny", s(&model)]),
    );
    (store, model)
}

/// `flash run MODEL PROMPT ARGS...` with CUDA disabled (no GPU, even on a
/// machine that has one).
fn run_without_gpu(store: &Path, model: &Path, args: &[&str]) -> Command {
    let mut c = command(store, &["run", s(model), "Hello there"]);
    c.args(args).env("FLASH_NO_CUDA", "1");
    c
}

#[test]
fn run_on_a_missing_gpu_fails_cleanly_and_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, model) = tiny_run_model(tmp.path());
    for (device, name) in [
        ("cuda:0", "cuda:0"),
        ("cuda:3", "cuda:3"),
        ("cuda", "cuda:0"),
    ] {
        let out = run_without_gpu(&store, &model, &["--device", device, "--json"])
            .output()
            .unwrap();
        assert_clean_error(
            &format!("run --device {device}"),
            &out,
            &[name, "no usable GPU", "FLASH_NO_CUDA"],
        );
        assert!(out.stdout.is_empty(), "{device}: printed {:?}", out.stdout);
    }
    // A store name with --device cuda:0 runs in this process (not through
    // a daemon): the same error, and no daemon was started.
    ok(
        "pull",
        flash(&store, &["pull", "--from", s(&model), "--name", "t/tiny"]),
    );
    let out = command(&store, &["run", "t/tiny", "hi", "--device", "cuda:0"])
        .env("FLASH_NO_CUDA", "1")
        .output()
        .unwrap();
    assert_clean_error(
        "run t/tiny --device cuda:0",
        &out,
        &["cuda:0", "no usable GPU"],
    );
    assert!(!store.join("daemon.pid").exists() && !store.join("flash.sock").exists());
    let out = run_without_gpu(&store, &model, &["--device", "tpu"])
        .output()
        .unwrap();
    assert_clean_error(
        "run --device tpu",
        &out,
        &["\"tpu\"", "auto, cpu or cuda:N"],
    );
}

#[test]
fn run_auto_falls_back_to_the_cpu_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, model) = tiny_run_model(tmp.path());
    let greedy = ["--temperature", "0", "--max-tokens", "6", "--json"];
    let out = run_without_gpu(&store, &model, &greedy)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = stderr(&out);
    let auto: Value = serde_json::from_str(&ok("run --device auto", out)).unwrap();
    // One info line says why, nothing louder.
    let why: Vec<&str> = err.lines().filter(|l| l.contains("CPU engine")).collect();
    assert_eq!(why.len(), 1, "{err}");
    assert!(
        why[0].contains("INFO") && why[0].contains("FLASH_NO_CUDA"),
        "{err}"
    );
    assert!(!err.contains("WARN") && !err.contains("ERROR"), "{err}");
    assert_eq!(auto["device"], "cpu", "{auto}");
    assert_eq!(auto["engine"], "cpu-f32", "{auto}");
    let from = auto["served_from"].as_str().unwrap_or_default();
    assert!(from == "disk" || from == "page cache", "{auto}");
    // TTFT counts from the process start: the load and the engine's own
    // time to the first token lie inside it.
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"));
    assert!(
        f(&auto, "ttft_s") >= f(&auto, "load_s") + f(&auto, "engine_ttft_s"),
        "{auto}"
    );
    assert!(f(&auto, "ttft_s") < 60.0, "{auto}");

    // --device cpu: the same engine, the same greedy tokens.
    let cpu = json_out(
        "run --device cpu",
        run_without_gpu(
            &store,
            &model,
            &[&greedy[..], &["--device", "cpu"]].concat(),
        )
        .output()
        .unwrap(),
    );
    for k in ["prompt_token_ids", "token_ids", "text", "device", "engine"] {
        assert_eq!(auto[k], cpu[k], "{k}");
    }
    assert_eq!(
        auto["token_ids"].as_array().map(Vec::len),
        Some(6),
        "{auto}"
    );

    // --logits on the engine --device auto picked: the prompt's last logits.
    let l = json_out(
        "run --logits",
        run_without_gpu(&store, &model, &["--json", "--logits", "--max-tokens", "0"])
            .output()
            .unwrap(),
    );
    let vocab = std::fs::read_to_string(model.join("config.json")).unwrap();
    let vocab: Value = serde_json::from_str(&vocab).unwrap();
    assert_eq!(
        l["last_logits"].as_array().map(Vec::len),
        vocab["vocab_size"].as_u64().map(|v| v as usize)
    );

    // Without -q: the text on stdout, one status line on stderr naming the
    // device, where the load came from and the TTFT from the process start.
    let out = Command::new(BIN)
        .args(["--storage", s(&store), "run", s(&model), "Hello there"])
        .args(["--temperature", "0", "--max-tokens", "6"])
        .env_remove("RUST_LOG")
        .env("FLASH_NO_CUDA", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    let text = ok("run", out);
    // (the newline ends the output)
    assert_eq!(text, format!("{}\n", auto["text"].as_str().unwrap()));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    for want in [
        "load ",
        "(from ",
        "TTFT ",
        "from process start",
        "tokens/s",
        "· cpu (",
    ] {
        assert!(lines[0].contains(want), "{want:?} not in {err}");
    }
}

/// Compression end to end: the store's default (`flash config`), `pull
/// --compress` / `--no-compress`, `info --json`, `list`, `verify`, and an
/// export byte-identical to the plain model's.
#[test]
fn compressed_pull_info_verify_export() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let src = tmp.path().join("src");
    ok(
        "synth",
        flash(&store, &["synth", "qwen3", "tiny", s(&src), "--seed", "3"]),
    );
    // The default is auto: compress where an NVIDIA GPU is present (none
    // in CI); the store's setting changes it.
    let cfg = json_out("config", flash(&store, &["config", "--json"]));
    assert_eq!(cfg["compress"], "auto");
    assert_eq!(
        cfg["imports_compress"],
        flash_store::nvidia_gpu_present(),
        "{cfg}"
    );
    ok("config on", flash(&store, &["config", "compress", "on"]));
    let cfg = json_out("config", flash(&store, &["config", "--json"]));
    assert_eq!(
        (&cfg["compress"], &cfg["imports_compress"]),
        (&"on".into(), &true.into())
    );
    assert_clean_error(
        "bad value",
        &flash(&store, &["config", "compress", "maybe"]),
        &["compress", "maybe"],
    );
    ok(
        "pull default",
        flash(
            &store,
            &["pull", "--from", s(&src), "--name", "z/by-default"],
        ),
    );
    ok(
        "pull plain",
        flash(
            &store,
            &[
                "pull",
                "--from",
                s(&src),
                "--name",
                "z/plain",
                "--no-compress",
            ],
        ),
    );
    ok("config off", flash(&store, &["config", "compress", "off"]));
    assert_eq!(
        json_out("config", flash(&store, &["config", "--json"]))["imports_compress"],
        false
    );
    ok(
        "pull packed",
        flash(
            &store,
            &[
                "pull",
                "--from",
                s(&src),
                "--name",
                "z/packed",
                "--compress",
            ],
        ),
    );
    let info = |m: &str| json_out("info", flash(&store, &["info", m, "--json"]));
    let (packed, plain) = (info("z/packed"), info("z/plain"));
    assert_eq!(packed["compressed"], true);
    assert_eq!(info("z/by-default")["compressed"], true);
    assert_eq!(plain["compressed"], false);
    assert_eq!(packed["size"], plain["size"]);
    assert!(packed["stored_bytes"].as_u64() < plain["stored_bytes"].as_u64());
    let list = ok("list", flash(&store, &["list"]));
    assert!(
        list.contains("RATIO") && list.contains("z/packed"),
        "{list}"
    );
    let v = json_out("verify", flash(&store, &["verify", "z/packed", "--json"]));
    assert!(v["bad"].as_array().unwrap().is_empty(), "{v}");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(
        "export packed",
        flash(&store, &["export", "z/packed", "--to", s(&a)]),
    );
    ok(
        "export plain",
        flash(&store, &["export", "z/plain", "--to", s(&b)]),
    );
    let shard = std::fs::read(a.join("model.safetensors")).unwrap();
    assert_eq!(shard, std::fs::read(b.join("model.safetensors")).unwrap());
    // The export pulls in again as the same model.
    ok(
        "pull export",
        flash(&store, &["pull", "--from", s(&a), "--name", "z/again"]),
    );
    assert_eq!(info("z/again")["size"], plain["size"]);
    // Back to the machine's default: the file no longer names a choice.
    ok(
        "config auto",
        flash(&store, &["config", "compress", "auto"]),
    );
    assert_eq!(
        json_out("config", flash(&store, &["config", "--json"]))["compress"],
        "auto"
    );
    let file = std::fs::read_to_string(store.join("settings.json")).unwrap();
    assert!(!file.contains("compress"), "{file}");
}

#[test]
fn tensor_parallel_pull_info_export() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let src = tmp.path().join("src");
    ok(
        "synth",
        flash(&store, &["synth", "qwen3", "tiny", s(&src), "--seed", "5"]),
    );
    let pull = |name: &str, tp: &str| {
        flash(
            &store,
            &[
                "pull",
                "--from",
                s(&src),
                "--name",
                name,
                "--tp",
                tp,
                "--json",
            ],
        )
    };
    let report = json_out("pull --tp 2", pull("z/tp2", "2"));
    assert_eq!(report["ranks"], 2);
    let info = json_out("info", flash(&store, &["info", "z/tp2", "--json"]));
    assert_eq!(info["ranks"], 2);
    // The tiny Qwen3 has 2 key/value heads: 4 ranks would cut them.
    assert_clean_error(
        "pull --tp 4",
        &pull("z/tp4", "4"),
        &["z/tp4", "4 tensor-parallel ranks", "num_key_value_heads 2"],
    );
    assert!(!flash(&store, &["info", "z/tp4"]).status.success());
    assert!(!pull("z/tp0", "0").status.success(), "--tp 0 is refused");
    let v = json_out("verify", flash(&store, &["verify", "z/tp2", "--json"]));
    assert!(v["bad"].as_array().unwrap().is_empty(), "{v}");

    // Gathered back, the model exports as if pulled whole.
    ok(
        "pull whole",
        flash(&store, &["pull", "--from", s(&src), "--name", "z/whole"]),
    );
    let (a, b, r1) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("r1"),
    );
    ok(
        "export tp2",
        flash(&store, &["export", "z/tp2", "--to", s(&a)]),
    );
    ok(
        "export whole",
        flash(&store, &["export", "z/whole", "--to", s(&b)]),
    );
    assert!(
        std::fs::read(a.join("model.safetensors")).unwrap()
            == std::fs::read(b.join("model.safetensors")).unwrap()
    );
    // One rank: the part's shapes (4 heads of 16 rows, 2 per rank).
    ok(
        "export --rank 1",
        flash(&store, &["export", "z/tp2", "--rank", "1", "--to", s(&r1)]),
    );
    let header = flash_format::safetensors::read_header(&r1.join("model.safetensors")).unwrap();
    let q = header
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.shape, [32, 64]);
    assert_clean_error(
        "export --rank 2",
        &flash(
            &store,
            &[
                "export",
                "z/tp2",
                "--rank",
                "2",
                "--to",
                s(&tmp.path().join("r2")),
            ],
        ),
        &["2 tensor-parallel rank(s)", "not rank 2"],
    );
}
