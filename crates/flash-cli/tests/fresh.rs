//! The daemon never serves what the store no longer holds: a model replaced
//! (`flash pull --force`, or an import behind the daemon's back) or removed
//! (`flash rm`, or behind its back) while the daemon holds a copy, or an
//! engine built on it.

mod common;

use common::*;
use flash_client::Place;
use flash_store::{ImportOptions, Store};
use flash_synth::{spec, synth, Arch, SynthOptions};
use std::path::{Path, PathBuf};

/// A tiny Qwen3 checkpoint with `seed` (other bytes than the home's models).
fn checkpoint(dir: &Path, seed: u64) -> PathBuf {
    let opts = SynthOptions {
        seed,
        ..Default::default()
    };
    synth(&spec(Arch::Qwen3, "tiny").unwrap(), dir, &opts).unwrap();
    dir.to_path_buf()
}

/// The model's bytes through the daemon (copy mode into this process).
fn served_bytes(h: &Home, model: &str) -> Vec<u8> {
    let (file, _, _) = h.client().fill_shm(model).unwrap();
    file.to_vec()
}

fn stored_bytes(h: &Home, model: &str) -> Vec<u8> {
    let store = Store::open(&h.path).unwrap();
    let dir = store.existing(&model.parse().unwrap()).unwrap();
    let src = flash_load::ModelSource::open(&dir).unwrap();
    let (m, _) = flash_load::load_to_host(&src, None, &flash_load::LoadOptions::default()).unwrap();
    m.buffer().to_vec()
}

#[test]
fn a_replaced_model_is_served_anew_from_every_path() {
    let h = Home::new(1);
    let model = h.models[0].clone();
    h.start(&["--mem-pool", "64M"]);
    // Resident in the memory tier, with an engine built on it.
    ok("load", flash(&h.path, &["load", &model, "--memory"]));
    // Sampled with a fixed seed: tiny random models repeat one token when
    // greedy, whatever their weights; samples follow the logits.
    let sample = ["--raw", "--temperature", "1", "--seed", "5"];
    let before = h.run(&model, "hello", &sample);
    let old = served_bytes(&h, &model);

    // 1. `flash pull --force` while the daemon holds it.
    let tmp = tempfile::tempdir().unwrap();
    let b = checkpoint(&tmp.path().join("b"), 777);
    ok(
        "pull --force",
        flash(
            &h.path,
            &[
                "pull",
                "--from",
                b.to_str().unwrap(),
                "--name",
                &model,
                "--force",
            ],
        ),
    );
    let new = served_bytes(&h, &model);
    assert_ne!(old, new, "still the old bytes after pull --force");
    assert_eq!(new, stored_bytes(&h, &model));
    let after = h.run(&model, "hello", &sample);
    assert_ne!(
        before["token_ids"], after["token_ids"],
        "the engine still generates with the old weights"
    );

    // 2. Replaced behind the daemon's back (an import that does not ask it).
    let c = checkpoint(&tmp.path().join("c"), 4242);
    Store::open(&h.path)
        .unwrap()
        .import(
            &c,
            &model.parse().unwrap(),
            &ImportOptions {
                force: true,
                ..Default::default()
            },
        )
        .unwrap();
    let newest = served_bytes(&h, &model);
    assert_ne!(newest, new);
    assert_eq!(newest, stored_bytes(&h, &model));
    let last = h.run(&model, "hello", &sample);
    assert_ne!(last["token_ids"], after["token_ids"]);
}

#[test]
fn a_removed_model_leaves_every_tier_and_a_leased_one_stays() {
    let h = Home::new(2);
    h.start(&["--mem-pool", "64M"]);
    for m in &h.models {
        ok("load", flash(&h.path, &["load", m, "--memory"]));
    }
    // `flash rm` through the daemon: gone from the tier and the store.
    ok("rm", flash(&h.path, &["rm", &h.models[0]]));
    assert!(!resident(&h.status(), "memory").contains(&h.models[0]));
    let ps = ok("ps", flash(&h.path, &["ps"]));
    assert!(!ps.contains(&h.models[0]), "{ps}");

    // While a client holds a lease, rm is refused and nothing changes.
    let mut client = h.client();
    let lease = client.acquire(&h.models[1], Place::Memory).unwrap();
    let err = fails("rm leased", flash(&h.path, &["rm", &h.models[1]]));
    assert!(err.contains(&h.models[1]), "{err}");
    assert!(Store::open(&h.path)
        .unwrap()
        .contains(&h.models[1].parse().unwrap()));
    client.release(lease).unwrap();

    // Removed behind the daemon's back: ps no longer lists it.
    Store::open(&h.path)
        .unwrap()
        .remove(&h.models[1].parse().unwrap())
        .unwrap();
    assert!(!resident(&h.status(), "memory").contains(&h.models[1]));
    let err = fails(
        "load removed",
        flash(&h.path, &["load", &h.models[1], "--memory"]),
    );
    assert!(err.contains("not in the store"), "{err}");
}
