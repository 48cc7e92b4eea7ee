//! Randomized stress: 8 threads x 2000 operations over 31 models under tight
//! budgets, with failing transfers and a GPU pool smaller than its budget.
//! After every operation: the manager's invariants, and every lease the
//! thread holds still has its copy. At the end: no byte ever allocated above
//! a budget, nothing left pinned, loading or being freed.

mod fake;

use fake::*;
use flash_tier::{ClientId, Lease, LeaseId, ModelId, Tier, TierError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const SEED: u64 = 0x5eed_f1a5_0000_0001;
const THREADS: u64 = 8;
const OPS: usize = 2000;

#[derive(Default, Debug)]
struct Tally {
    leases: u64,
    no_space: u64,
    too_large: u64,
    load_failed: u64,
    busy: u64,
}

fn allowed(e: &TierError, t: &mut Tally) {
    match e {
        TierError::NoSpace(_) => t.no_space += 1,
        TierError::TooLarge { .. } => t.too_large += 1,
        TierError::Load { .. } => t.load_failed += 1,
        e => panic!("unexpected error: {e}"),
    }
}

fn worker(r: Arc<Rig>, i: u64, models: Arc<Vec<(ModelId, u64)>>) -> Tally {
    const TIERS: [Tier; 3] = [Tier::Memory, Tier::Gpu(0), Tier::Gpu(1)];
    let client = ClientId(100 + i);
    let mut rng = Rng(SEED ^ (i + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut held: Vec<Lease<FakeTransfers>> = Vec::new();
    let mut detached: Vec<LeaseId> = Vec::new();
    let mut t = Tally::default();
    for op in 0..OPS {
        let (model, size) = &models[rng.below(models.len())];
        let tier = TIERS[rng.below(3)];
        match rng.below(100) {
            0..45 => match r.mgr.acquire(model, tier, client) {
                Ok(l) => {
                    t.leases += 1;
                    assert_eq!(l.bytes(), *size);
                    let (m, buf_tier) = match tier {
                        Tier::Memory => l.memory().map(|b| (b.model.clone(), b.tier)).unwrap(),
                        _ => l.gpu().map(|b| (b.model.clone(), b.tier)).unwrap(),
                    };
                    assert_eq!((m.as_ref(), buf_tier), (Some(model), tier));
                    held.push(l);
                    if held.len() > 3 {
                        held.remove(0);
                    }
                }
                Err(e) => allowed(&e, &mut t),
            },
            45..55 if !held.is_empty() => drop(held.swap_remove(rng.below(held.len()))),
            55..63 if !held.is_empty() => {
                detached.push(held.swap_remove(rng.below(held.len())).detach())
            }
            63..70 if !detached.is_empty() => {
                let id = detached.swap_remove(rng.below(detached.len()));
                r.mgr.release(id).unwrap();
            }
            70..75 => {
                if let Err(e) = r.mgr.load(model, tier, rng.below(5) == 0) {
                    allowed(&e, &mut t);
                }
            }
            75..83 => {
                let which = if rng.below(2) == 0 { Some(tier) } else { None };
                match r.mgr.unload(model, which) {
                    Ok(_) => {}
                    Err(TierError::Busy { .. }) => t.busy += 1,
                    Err(e) => panic!("unload: {e}"),
                }
            }
            83..86 => {
                assert_eq!(r.mgr.client_gone(client), detached.len());
                detached.clear();
            }
            86..91 => match r.mgr.set_keep(model, tier, false) {
                Ok(()) | Err(TierError::NotResident { .. }) => {}
                Err(e) => panic!("set_keep: {e}"),
            },
            _ => {
                for tr in r.mgr.status().tiers {
                    assert!(
                        tr.used <= tr.budget,
                        "{}: {} > {}",
                        tr.tier,
                        tr.used,
                        tr.budget
                    );
                    assert_eq!(tr.used, tr.resident + tr.loading + tr.freeing);
                }
            }
        }
        if let Err(e) = r.mgr.check_invariants() {
            panic!("thread {i}, operation {op}: {e}");
        }
        for l in &held {
            assert!(
                r.mgr.locate(l.model()).contains(&l.tier()),
                "thread {i}, operation {op}: leased {} evicted from {}",
                l.model(),
                l.tier()
            );
        }
    }
    drop(held);
    assert_eq!(r.mgr.client_gone(client), detached.len());
    t
}

#[test]
fn randomized_stress_keeps_the_invariants() {
    let mut rng = Rng(SEED);
    let mut sizes: Vec<(String, u64)> = (0..30)
        .map(|i| (format!("org/m{i:02}"), 1 + rng.below(10) as u64))
        .collect();
    sizes.push(("org/huge".into(), 40)); // fits memory only
    let names: Vec<(&str, u64)> = sizes.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    let r = Arc::new(
        rig(60, &[30, 25])
            .models(&names)
            .space_wait(Duration::from_millis(20))
            .build(),
    );
    r.live[2].physical.store(22, Ordering::SeqCst); // gpu:1's pool is smaller than its budget
    r.fakes().fail_every.store(37, Ordering::SeqCst);
    r.fakes().delay_us.store(50, Ordering::SeqCst);
    let models: Arc<Vec<(ModelId, u64)>> =
        Arc::new(sizes.iter().map(|(n, b)| (m(n), *b)).collect());

    let started = Instant::now();
    let r2 = r.clone();
    let tallies = within(30, move || {
        let hs: Vec<_> = (0..THREADS)
            .map(|i| {
                let (r, models) = (r2.clone(), models.clone());
                thread::spawn(move || worker(r, i, models))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let elapsed = started.elapsed();

    let mut total = Tally::default();
    for t in &tallies {
        total.leases += t.leases;
        total.no_space += t.no_space;
        total.too_large += t.too_large;
        total.load_failed += t.load_failed;
        total.busy += t.busy;
    }
    let st = r.mgr.status();
    eprintln!("{} ops in {elapsed:?}: {total:?}", THREADS as usize * OPS);
    for tr in &st.tiers {
        eprintln!("{}: {:?}", tr.tier, tr.counters);
    }
    r.assert_sound();
    assert_eq!(st.leases, 0);
    // The run exercised what it is meant to.
    assert!(
        total.leases > 1000
            && total.no_space > 0
            && total.too_large > 0
            && total.load_failed > 0
            && total.busy > 0,
        "{total:?}"
    );
    for tr in &st.tiers {
        let c = tr.counters;
        assert!(
            c.hits > 0 && c.misses > 0 && c.evictions > 0 && c.load_failures > 0,
            "{}: {c:?}",
            tr.tier
        );
    }
    assert!(
        st.tier(Tier::Gpu(0)).unwrap().load_seconds[1].count > 0,
        "some GPU loads came from memory"
    );
}
