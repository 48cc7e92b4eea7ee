//! The tier manager over fake backends: policy, concurrency, errors.

mod fake;

use fake::*;
use flash_tier::{ClientId, ModelState, Tier, TierError};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn among_equally_requested_models_the_least_recent_goes() {
    let r = rig(300, &[])
        .models(&[("a", 100), ("b", 100), ("c", 100), ("d", 100), ("e", 100)])
        .build();
    for n in ["a", "b", "c"] {
        drop(r.mgr.acquire(&m(n), MEM, C1).unwrap());
    }
    drop(r.mgr.acquire(&m("a"), MEM, C1).unwrap()); // a: the most recent and requested
    assert_eq!(r.models_in(MEM), ["a", "c", "b"]);
    drop(r.mgr.acquire(&m("d"), MEM, C1).unwrap());
    assert_eq!(
        r.models_in(MEM),
        ["d", "a", "c"],
        "b was the least recently used"
    );
    drop(r.mgr.acquire(&m("e"), MEM, C1).unwrap());
    assert_eq!(r.models_in(MEM), ["e", "d", "a"]);
    let c = r.mgr.status().tier(MEM).unwrap().counters;
    assert_eq!(
        (c.hits, c.misses, c.loads, c.evictions, c.evicted_bytes),
        (1, 5, 5, 2, 200)
    );
    r.assert_sound();
}

#[test]
fn evicts_as_many_as_needed_in_order_and_no_more() {
    let r = rig(300, &[])
        .models(&[("a", 50), ("b", 50), ("c", 100), ("d", 100), ("big", 180)])
        .build();
    for n in ["a", "b", "c", "d"] {
        r.mgr.load(&m(n), MEM, false).unwrap();
    }
    // 0 free: a + b + c (200) make room for 180; d stays.
    r.mgr.load(&m("big"), MEM, false).unwrap();
    assert_eq!(r.models_in(MEM), ["big", "d"]);
    assert_eq!(r.mgr.status().tier(MEM).unwrap().used, 280);
    r.assert_sound();
}

#[test]
fn eviction_skips_leased_and_kept_copies() {
    let r = rig(300, &[])
        .models(&[("a", 100), ("b", 100), ("c", 100), ("d", 100), ("e", 100)])
        .build();
    let lease_a = r.mgr.acquire(&m("a"), MEM, C1).unwrap();
    r.mgr.load(&m("b"), MEM, true).unwrap(); // kept
    r.mgr.load(&m("c"), MEM, false).unwrap();
    // a and b are older than c, but held.
    drop(r.mgr.acquire(&m("d"), MEM, C2).unwrap());
    assert_eq!(r.mgr.locate(&m("c")), Vec::<Tier>::new());
    assert_eq!(r.models_in(MEM), ["d", "b", "a"]);
    drop(lease_a);
    // Now a is evictable, b still kept.
    drop(r.mgr.acquire(&m("e"), MEM, C2).unwrap());
    assert_eq!(r.models_in(MEM), ["e", "d", "b"]);
    r.mgr.set_keep(&m("b"), MEM, false).unwrap();
    r.mgr.load(&m("a"), MEM, false).unwrap();
    assert_eq!(r.models_in(MEM), ["a", "e", "d"], "b went once unkept");
    r.assert_sound();
}

#[test]
fn budget_full_of_held_copies_is_refused_at_once_with_the_details() {
    let r = Arc::new(
        rig(1000, &[250])
            .models(&[("a", 100), ("b", 100), ("c", 100)])
            .space_wait(Duration::from_secs(10))
            .build(),
    );
    let r2 = r.clone();
    let (la, err) = within(5, move || {
        let la = r2.mgr.acquire(&m("a"), GPU, C1).unwrap();
        r2.mgr.load(&m("b"), GPU, true).unwrap();
        let started = Instant::now();
        // C1 asks for more while its own lease and a kept copy fill the
        // tier: no one else can make room.
        let err = r2.mgr.acquire(&m("c"), GPU, C1).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused without waiting"
        );
        (la, err)
    });
    let TierError::NoSpace(ns) = &err else {
        panic!("{err}")
    };
    assert_eq!(
        (ns.tier, ns.needed, ns.budget, ns.free, ns.evictable),
        (GPU, 100, 250, 50, 0)
    );
    assert_eq!(ns.waited_ms, None);
    assert_eq!(ns.held.len(), 2);
    let msg = err.to_string();
    for want in [
        "c",
        "gpu:0",
        "100 B",
        "250 B",
        "a (100 B, leased by client 1)",
        "b (100 B, kept)",
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg:?}");
    }
    // The memory tier was filled on the way (inclusive), and is fine.
    assert_eq!(r.mgr.locate(&m("a")), [GPU, MEM]);
    drop(la);
    let lc = r.mgr.acquire(&m("c"), GPU, C2).unwrap();
    assert_eq!(lc.served_from(), Tier::Disk);
    assert_eq!(
        r.mgr.locate(&m("a")),
        [MEM],
        "a was evicted from the GPU once released"
    );
    drop(lc);
    r.assert_sound();
}

#[test]
fn a_request_queues_behind_other_clients_leases_for_a_bounded_time() {
    let r = Arc::new(
        rig(1000, &[200])
            .models(&[("a", 200), ("b", 200)])
            .space_wait(Duration::from_millis(300))
            .build(),
    );
    // C1 holds the only room; C2's request waits for it, then loads.
    let la = r.mgr.acquire(&m("a"), GPU, C1).unwrap();
    let r2 = r.clone();
    let waiter = thread::spawn(move || r2.mgr.acquire(&m("b"), GPU, C2).map(|l| l.served_from()));
    r.wait_room_waiters(GPU, 1);
    drop(la);
    assert_eq!(
        within(5, move || waiter.join().unwrap()).unwrap(),
        Tier::Disk
    );
    assert_eq!(r.mgr.locate(&m("a")), [MEM], "a evicted once released");
    // A lease never given back: refused once the wait is over, saying so.
    let lb = r.mgr.acquire(&m("b"), GPU, C2).unwrap();
    let started = Instant::now();
    let e = r.mgr.acquire(&m("a"), GPU, C1).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let TierError::NoSpace(ns) = &e else {
        panic!("{e}")
    };
    assert!(ns.waited_ms.is_some_and(|ms| ms >= 300), "{e}");
    assert!(e.to_string().contains("leased by client 2"), "{e}");
    drop(lb);
    r.assert_sound();
}

#[test]
fn single_flight_eight_threads_one_load() {
    let r = Arc::new(rig(1000, &[1000]).models(&[("m", 300)]).build());
    let gate = r.fakes().gate("m");
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let r = r.clone();
            thread::spawn(move || r.mgr.acquire(&m("m"), GPU, ClientId(i)).unwrap())
        })
        .collect();
    gate.wait_entered(1);
    // Each of the others waits for the GPU copy, or for the memory copy the
    // same load fills (when it looked there before the load began).
    r.wait_waiters("m", &[MEM, GPU], 7);
    gate.open();
    let leases: Vec<_> = within(5, move || {
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(
        r.fakes().ops(),
        [Op::DiskToGpuAndMemory(m("m"), 0)],
        "one load, one pass over the disk for both tiers"
    );
    for l in &leases {
        let buf = l.gpu().unwrap();
        assert_eq!(buf.model.as_ref(), Some(&m("m")));
        assert_eq!(buf.tier, GPU);
        assert_eq!(l.served_from(), Tier::Disk);
    }
    let st = r.mgr.status();
    let gpu = st.tier(GPU).unwrap();
    assert_eq!(
        (
            gpu.counters.misses,
            gpu.counters.coalesced,
            gpu.counters.loads
        ),
        (1, 7, 1)
    );
    let mem = st.tier(MEM).unwrap();
    assert_eq!(mem.counters.loads, 1);
    assert!(mem.counters.misses >= 1 && mem.counters.misses + mem.counters.coalesced <= 8);
    assert_eq!(mem.model(&m("m")).unwrap().bytes, 300, "the memory copy");
    assert_eq!(gpu.model(&m("m")).unwrap().leases, 8);
    assert_eq!(st.leases, 8);
    assert_eq!(r.live[1].allocs.load(Ordering::SeqCst), 1);
    drop(leases);
    r.assert_sound();
}

#[test]
fn failed_load_wakes_waiters_with_the_error_and_restores_the_budget() {
    let r = Arc::new(rig(1000, &[]).models(&[("m", 300)]).build());
    let gate = r.fakes().gate("m");
    r.fakes().fail_next("m", 1);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let r = r.clone();
            thread::spawn(move || r.mgr.acquire(&m("m"), MEM, ClientId(i)).map(|_| ()))
        })
        .collect();
    gate.wait_entered(1);
    r.wait_waiters("m", &[MEM], 3);
    let st = r.mgr.status();
    assert_eq!(
        (st.tier(MEM).unwrap().loading, st.tier(MEM).unwrap().used),
        (300, 300)
    );
    assert_eq!(r.live(MEM), 300, "allocated before the transfer");
    gate.open();
    let results = within(5, move || {
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for res in results {
        let e = res.unwrap_err();
        let TierError::Load {
            model,
            from,
            to,
            cause,
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!((model.as_str(), *from, *to), ("m", Tier::Disk, MEM));
        assert!(cause.to_string().contains("injected failure for m"), "{e}");
    }
    let st = r.mgr.status();
    let mem = st.tier(MEM).unwrap();
    assert!(mem.models.is_empty(), "no partial entry");
    assert_eq!((mem.used, mem.loading), (0, 0));
    assert_eq!(
        (
            mem.counters.misses,
            mem.counters.coalesced,
            mem.counters.load_failures
        ),
        (1, 3, 1)
    );
    assert_eq!(r.live(MEM), 0);
    // The next request loads afresh.
    let l = r.mgr.acquire(&m("m"), MEM, C1).unwrap();
    assert_eq!(l.memory().unwrap().model.as_ref(), Some(&m("m")));
    drop(l);
    r.assert_sound();
}

#[test]
fn client_gone_releases_its_leases_so_eviction_proceeds() {
    let r = rig(200, &[])
        .models(&[("a", 100), ("b", 100), ("c", 100)])
        .space_wait(Duration::from_millis(50))
        .build();
    let ia = r.mgr.acquire(&m("a"), MEM, C1).unwrap().detach();
    let ib = r.mgr.acquire(&m("b"), MEM, C1).unwrap().detach();
    let kept = r.mgr.acquire(&m("b"), MEM, C2).unwrap(); // another client's lease on b
                                                         // Client 1 never gives a back: refused after the wait.
    assert!(matches!(
        r.mgr.acquire(&m("c"), MEM, C2),
        Err(TierError::NoSpace(ns)) if ns.waited_ms.is_some()
    ));
    assert_eq!(r.mgr.status().leases, 3);
    assert_eq!(r.mgr.client_gone(C1), 2);
    assert_eq!(r.mgr.client_gone(C1), 0);
    let lc = r.mgr.acquire(&m("c"), MEM, C2).unwrap();
    assert_eq!(
        r.models_in(MEM),
        ["c", "b"],
        "a evicted, b still leased by client 2"
    );
    assert!(matches!(r.mgr.release(ia), Err(TierError::UnknownLease(_))));
    assert!(matches!(r.mgr.release(ib), Err(TierError::UnknownLease(_))));
    drop((kept, lc));
    assert_eq!(r.mgr.status().leases, 0);
    r.assert_sound();
}

#[test]
fn leases_release_by_drop_or_by_id() {
    let r = rig(200, &[]).models(&[("a", 100)]).build();
    let l = r.mgr.acquire(&m("a"), MEM, C1).unwrap();
    assert_eq!(
        (
            l.model().as_str(),
            l.tier(),
            l.client(),
            l.bytes(),
            l.served_from()
        ),
        ("a", MEM, C1, 100, Tier::Disk)
    );
    let id = l.id();
    assert!(matches!(r.mgr.release(id), Err(TierError::LeaseAttached(x)) if x == id));
    let busy = r.mgr.unload(&m("a"), Some(MEM)).unwrap_err();
    assert!(busy.to_string().contains("leased by client 1"), "{busy}");
    drop(l);
    assert_eq!(r.mgr.status().leases, 0);
    let l2 = r.mgr.acquire(&m("a"), MEM, C2).unwrap();
    assert_eq!(l2.served_from(), MEM, "a hit");
    let id2 = l2.detach();
    assert_eq!(
        r.mgr
            .status()
            .tier(MEM)
            .unwrap()
            .model(&m("a"))
            .unwrap()
            .clients,
        [C2]
    );
    r.mgr.release(id2).unwrap();
    assert!(matches!(
        r.mgr.release(id2),
        Err(TierError::UnknownLease(_))
    ));
    assert_eq!(r.mgr.unload(&m("a"), None).unwrap(), [(MEM, 100)]);
    r.assert_sound();
}

#[test]
fn promotion_from_memory_counts_a_memory_hit() {
    let r = rig(1000, &[1000]).models(&[("m", 300)]).build();
    assert_eq!(
        r.mgr.load(&m("m"), MEM, false).unwrap().served_from,
        Tier::Disk
    );
    let l = r.mgr.acquire(&m("m"), GPU, C1).unwrap();
    assert_eq!(l.served_from(), MEM);
    assert_eq!(l.gpu().unwrap().model.as_ref(), Some(&m("m")));
    assert!(l.memory().is_none());
    let st = r.mgr.status();
    let (mem, gpu) = (
        st.tier(MEM).unwrap().counters,
        st.tier(GPU).unwrap().counters,
    );
    assert_eq!((mem.misses, mem.hits), (1, 1));
    assert_eq!(
        (gpu.misses, gpu.hits, gpu.loads, gpu.loaded_bytes),
        (1, 0, 1, 300)
    );
    let hist = &st.tier(GPU).unwrap().load_seconds;
    assert_eq!(
        hist.iter().map(|h| (h.from, h.count)).collect::<Vec<_>>(),
        [(Tier::Disk, 0), (MEM, 1)]
    );
    drop(l);
    let l = r.mgr.acquire(&m("m"), GPU, C1).unwrap();
    assert_eq!(l.served_from(), GPU);
    assert_eq!(r.mgr.status().tier(GPU).unwrap().counters.hits, 1);
    assert_eq!(
        r.fakes().ops(),
        [Op::DiskToMemory(m("m")), Op::MemoryToGpu(m("m"), 0)]
    );
    drop(l);
    r.assert_sound();
}

#[test]
fn gpu_loads_fill_memory_when_inclusive_and_go_direct_otherwise() {
    let r = rig(1000, &[1000]).models(&[("m", 300)]).build();
    let l = r.mgr.acquire(&m("m"), GPU, C1).unwrap();
    assert_eq!(l.served_from(), Tier::Disk, "straight from disk");
    drop(l);
    assert_eq!(r.mgr.locate(&m("m")), [GPU, MEM]);
    assert_eq!(r.fakes().ops(), [Op::DiskToGpuAndMemory(m("m"), 0)]);
    let st = r.mgr.status();
    let mem = st.tier(MEM).unwrap();
    assert_eq!((mem.used, mem.counters.loads), (300, 1));
    assert_eq!(
        mem.model(&m("m")).unwrap().loaded_from,
        Tier::Disk,
        "filled by the GPU's pass"
    );
    // The memory copy serves the next GPU load.
    r.mgr.unload(&m("m"), Some(GPU)).unwrap();
    assert_eq!(r.mgr.acquire(&m("m"), GPU, C1).unwrap().served_from(), MEM);
    r.assert_sound();

    let r = rig(1000, &[1000])
        .models(&[("m", 300)])
        .inclusive(false)
        .build();
    drop(r.mgr.acquire(&m("m"), GPU, C1).unwrap());
    assert_eq!(r.mgr.locate(&m("m")), [GPU]);
    assert_eq!(r.fakes().ops(), [Op::DiskToGpu(m("m"), 0)]);
    assert_eq!(
        r.mgr.status().tier(MEM).unwrap().counters.misses,
        1,
        "memory consulted"
    );
    r.assert_sound();

    // Inclusive, but the memory tier cannot take it: straight to the GPU.
    let r = rig(200, &[1000]).models(&[("m", 300)]).build();
    let l = r.mgr.acquire(&m("m"), GPU, C1).unwrap();
    assert_eq!(l.served_from(), Tier::Disk);
    assert_eq!(r.fakes().ops(), [Op::DiskToGpu(m("m"), 0)]);
    drop(l);
    r.assert_sound();
}

#[test]
fn a_cold_gpu_load_shares_its_memory_copy_and_its_failure() {
    // A request for the memory copy while a GPU load fills it waits for that
    // load instead of reading the disk again.
    let r = Arc::new(rig(1000, &[1000]).models(&[("m", 300)]).build());
    let gate = r.fakes().gate("m");
    let r2 = r.clone();
    let gpu = thread::spawn(move || r2.mgr.acquire(&m("m"), GPU, C1).map(|l| l.served_from()));
    gate.wait_entered(1);
    assert_eq!(r.mgr.status().tier(MEM).unwrap().loading, 300);
    let r3 = r.clone();
    let mem = thread::spawn(move || r3.mgr.acquire(&m("m"), MEM, C2).map(|l| l.served_from()));
    r.wait_waiters("m", &[MEM], 1);
    gate.open();
    let (g, mm) = within(5, move || (gpu.join().unwrap(), mem.join().unwrap()));
    assert_eq!((g.unwrap(), mm.unwrap()), (Tier::Disk, Tier::Disk));
    assert_eq!(r.fakes().ops(), [Op::DiskToGpuAndMemory(m("m"), 0)]);
    r.assert_sound();

    // A failed pass leaves neither copy, and the waiter gets the error.
    let r = Arc::new(rig(1000, &[1000]).models(&[("m", 300)]).build());
    let gate = r.fakes().gate("m");
    r.fakes().fail_next("m", 1);
    let r2 = r.clone();
    let gpu = thread::spawn(move || r2.mgr.acquire(&m("m"), GPU, C1).map(|_| ()));
    gate.wait_entered(1);
    let r3 = r.clone();
    let mem = thread::spawn(move || r3.mgr.acquire(&m("m"), MEM, C2).map(|_| ()));
    r.wait_waiters("m", &[MEM], 1);
    gate.open();
    let (g, mm) = within(5, move || (gpu.join().unwrap(), mem.join().unwrap()));
    for e in [g.unwrap_err(), mm.unwrap_err()] {
        assert!(e.to_string().contains("injected failure for m"), "{e}");
    }
    assert_eq!(r.mgr.locate(&m("m")), Vec::<Tier>::new());
    let st = r.mgr.status();
    assert_eq!(
        (st.tier(MEM).unwrap().used, st.tier(GPU).unwrap().used),
        (0, 0)
    );
    assert_eq!(st.tier(MEM).unwrap().counters.load_failures, 1);
    r.assert_sound();
    // And the next request loads it.
    drop(r.mgr.acquire(&m("m"), GPU, C1).unwrap());
    assert_eq!(r.mgr.locate(&m("m")), [GPU, MEM]);
    r.assert_sound();
}

#[test]
fn gpu_eviction_keeps_the_memory_copy() {
    let r = rig(1000, &[300]).models(&[("a", 200), ("b", 200)]).build();
    drop(r.mgr.acquire(&m("a"), GPU, C1).unwrap());
    drop(r.mgr.acquire(&m("b"), GPU, C1).unwrap());
    assert_eq!(
        r.mgr.locate(&m("a")),
        [MEM],
        "demoted: the memory copy stays"
    );
    assert_eq!(r.mgr.locate(&m("b")), [GPU, MEM]);
    let l = r.mgr.acquire(&m("a"), GPU, C1).unwrap();
    assert_eq!(l.served_from(), MEM, "back from memory, not disk");
    drop(l);
    assert_eq!(
        r.fakes()
            .ops()
            .iter()
            .filter(|o| matches!(o, Op::DiskToGpuAndMemory(..)))
            .count(),
        2
    );
    r.assert_sound();
}

#[test]
fn gpu_use_refreshes_the_memory_copy() {
    // Memory holds two of three; a is used on the GPU only, yet its memory
    // copy must not be the one evicted.
    let r = rig(400, &[1000])
        .models(&[("a", 200), ("b", 200), ("c", 200)])
        .build();
    drop(r.mgr.acquire(&m("a"), GPU, C1).unwrap());
    r.mgr.load(&m("b"), MEM, false).unwrap();
    drop(r.mgr.acquire(&m("a"), GPU, C1).unwrap()); // GPU hit
    r.mgr.load(&m("c"), MEM, false).unwrap();
    assert_eq!(r.models_in(MEM), ["c", "a"]);
    r.assert_sound();
}

#[test]
fn unload_is_all_or_nothing_clears_keep_and_reports_bytes() {
    let r = rig(1000, &[1000]).models(&[("a", 100), ("b", 100)]).build();
    r.mgr.load(&m("a"), GPU, true).unwrap();
    let l = r.mgr.acquire(&m("a"), GPU, C2).unwrap();
    let e = r.mgr.unload(&m("a"), None).unwrap_err();
    assert!(
        matches!(&e, TierError::Busy { tier, holders, .. } if *tier == GPU && holders == &[C2]),
        "{e}"
    );
    assert_eq!(r.mgr.locate(&m("a")), [GPU, MEM], "nothing removed");
    assert_eq!(r.mgr.unload(&m("a"), Some(MEM)).unwrap(), [(MEM, 100)]);
    drop(l);
    assert_eq!(r.mgr.unload(&m("a"), None).unwrap(), [(GPU, 100)]);
    assert_eq!(r.mgr.unload(&m("a"), None).unwrap(), []);
    assert_eq!(r.mgr.unload(&m("b"), Some(GPU)).unwrap(), []);
    let st = r.mgr.status();
    assert_eq!(
        (
            st.tier(GPU).unwrap().counters.unloads,
            st.tier(MEM).unwrap().counters.unloads
        ),
        (1, 1)
    );
    assert!(matches!(
        r.mgr.set_keep(&m("a"), GPU, true),
        Err(TierError::NotResident { .. })
    ));
    r.assert_sound();
}

#[test]
fn unload_waits_for_a_load_in_flight() {
    let r = Arc::new(rig(1000, &[]).models(&[("a", 100)]).build());
    let gate = r.fakes().gate("a");
    let r2 = r.clone();
    let loader = thread::spawn(move || r2.mgr.load(&m("a"), MEM, true).unwrap());
    gate.wait_entered(1);
    let r3 = r.clone();
    let unloader = thread::spawn(move || r3.mgr.unload(&m("a"), None).unwrap());
    thread::sleep(Duration::from_millis(20));
    assert!(!unloader.is_finished());
    gate.open();
    let freed = within(5, move || {
        loader.join().unwrap();
        unloader.join().unwrap()
    });
    assert_eq!(freed, [(MEM, 100)]);
    r.assert_sound();
}

#[test]
fn allocation_failure_within_the_budget_evicts_more() {
    let r = rig(300, &[])
        .models(&[("a", 100), ("b", 100), ("c", 100)])
        .build();
    r.live[0].physical.store(200, Ordering::SeqCst); // a pool smaller than its budget
    r.mgr.load(&m("a"), MEM, false).unwrap();
    r.mgr.load(&m("b"), MEM, false).unwrap();
    r.mgr.load(&m("c"), MEM, false).unwrap(); // the budget fits; the pool does not
    assert_eq!(r.models_in(MEM), ["c", "b"]);
    assert_eq!(r.mgr.status().tier(MEM).unwrap().counters.evictions, 1);
    // Nothing left to evict: the error says so.
    let l = (
        r.mgr.acquire(&m("b"), MEM, C1).unwrap(),
        r.mgr.acquire(&m("c"), MEM, C1).unwrap(),
    );
    r.live[0].physical.store(150, Ordering::SeqCst);
    let e = r.mgr.acquire(&m("a"), MEM, C1).unwrap_err();
    assert!(
        e.is_capacity() && e.to_string().contains("out of memory"),
        "{e}"
    );
    drop(l);
    r.assert_sound();
}

#[test]
fn a_panicking_transfer_is_an_error_not_a_hang() {
    let r = Arc::new(
        rig(1000, &[1000])
            .models(&[("a", 100)])
            .inclusive(false)
            .build(),
    );
    r.fakes().panic_on.lock().unwrap().insert(m("a"));
    let r2 = r.clone();
    let e = within(5, move || r2.mgr.acquire(&m("a"), GPU, C1).unwrap_err());
    assert!(
        e.to_string().contains("panicked: injected panic for a"),
        "{e}"
    );
    assert_eq!(r.live(GPU), 0);
    r.fakes().panic_on.lock().unwrap().clear();
    drop(r.mgr.acquire(&m("a"), GPU, C1).unwrap());
    r.assert_sound();
}

#[test]
fn waits_for_room_held_by_a_load_in_flight() {
    let r = Arc::new(rig(100, &[]).models(&[("a", 100), ("b", 100)]).build());
    let gate = r.fakes().gate("a");
    let r2 = r.clone();
    let prewarm = thread::spawn(move || r2.mgr.load(&m("a"), MEM, false).unwrap());
    gate.wait_entered(1);
    let r3 = r.clone();
    let request = thread::spawn(move || r3.mgr.acquire(&m("b"), MEM, C1).map(|l| l.served_from()));
    r.wait_room_waiters(MEM, 1);
    gate.open();
    let served = within(5, move || {
        prewarm.join().unwrap();
        request.join().unwrap()
    });
    assert_eq!(served.unwrap(), Tier::Disk);
    assert_eq!(r.models_in(MEM), ["b"], "a evicted once loaded");
    r.assert_sound();
}

#[test]
fn waiting_for_room_gives_up_after_space_wait() {
    let r = Arc::new(
        rig(100, &[])
            .models(&[("a", 100), ("b", 100)])
            .space_wait(Duration::from_millis(100))
            .build(),
    );
    let gate = r.fakes().gate("a");
    let r2 = r.clone();
    let prewarm = thread::spawn(move || r2.mgr.load(&m("a"), MEM, false).unwrap());
    gate.wait_entered(1);
    let r3 = r.clone();
    let started = Instant::now();
    let e = within(5, move || r3.mgr.acquire(&m("b"), MEM, C1).unwrap_err());
    assert!(started.elapsed() >= Duration::from_millis(100));
    let TierError::NoSpace(ns) = &e else {
        panic!("{e}")
    };
    assert!(ns.waited_ms.unwrap() >= 100 && ns.in_flight == 100, "{e}");
    assert!(e.to_string().contains("100 B in flight"), "{e}");
    gate.open();
    prewarm.join().unwrap();
    r.assert_sound();
}

#[test]
fn refusals_are_clear() {
    let r = rig(1000, &[0, 500])
        .models(&[("a", 100), ("huge", 800)])
        .build();
    assert_eq!(r.mgr.tiers(), [MEM, Tier::Gpu(0), Tier::Gpu(1)]);
    let e = r.mgr.acquire(&m("a"), Tier::Disk, C1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "disk is not a cache tier here (tiers: memory, gpu:0, gpu:1)"
    );
    assert!(matches!(
        r.mgr.acquire(&m("a"), Tier::Gpu(2), C1),
        Err(TierError::NoSuchTier { .. })
    ));
    let e = r.mgr.acquire(&m("a"), Tier::Gpu(0), C1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot place a in the gpu:0 tier: its budget is 0 bytes"
    );
    let e = r.mgr.acquire(&m("huge"), Tier::Gpu(1), C1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "huge needs 800 B in the gpu:1 tier, more than its whole budget of 500 B"
    );
    assert!(
        r.fakes().ops().is_empty(),
        "refused before loading anything"
    );
    let e = r.mgr.acquire(&m("nope"), MEM, C1).unwrap_err();
    assert_eq!(e.to_string(), "nope: not in the store");
    r.assert_sound();
}

#[test]
fn two_gpus_are_separate_tiers() {
    let r = rig(1000, &[300, 300]).models(&[("a", 200)]).build();
    let l0 = r.mgr.acquire(&m("a"), Tier::Gpu(0), C1).unwrap();
    let l1 = r.mgr.acquire(&m("a"), Tier::Gpu(1), C1).unwrap();
    // The first from disk (leaving the memory copy), the second from memory.
    assert_eq!((l0.served_from(), l1.served_from()), (Tier::Disk, MEM));
    assert_eq!(l1.gpu().unwrap().tier, Tier::Gpu(1));
    assert_eq!(r.mgr.locate(&m("a")), [Tier::Gpu(1), Tier::Gpu(0), MEM]);
    drop((l0, l1));
    r.assert_sound();
}

#[test]
fn status_serializes() {
    let r = rig(1000, &[1000]).models(&[("org/a@main", 100)]).build();
    let l = r.mgr.acquire(&m("org/a@main"), GPU, C1).unwrap();
    let st = r.mgr.status();
    let gpu = st.tier(GPU).unwrap();
    let a = gpu.model(&m("org/a@main")).unwrap();
    assert_eq!(
        (a.state, a.leases, a.kept, a.loaded_from),
        (ModelState::Ready, 1, false, Tier::Disk)
    );
    let json = serde_json::to_value(&st).unwrap();
    assert_eq!(json["leases"], 1);
    assert_eq!(json["tiers"][0]["tier"], "memory");
    assert_eq!(json["tiers"][1]["tier"], "gpu:0");
    assert_eq!(json["tiers"][1]["budget"], 1000);
    assert_eq!(json["tiers"][1]["used"], 100);
    assert_eq!(json["tiers"][1]["models"][0]["model"], "org/a@main");
    assert_eq!(json["tiers"][1]["models"][0]["state"], "ready");
    assert_eq!(json["tiers"][1]["models"][0]["clients"][0], 1);
    assert_eq!(json["tiers"][1]["counters"]["misses"], 1);
    assert_eq!(json["tiers"][1]["load_seconds"][0]["from"], "disk");
    assert_eq!(json["tiers"][1]["load_seconds"][0]["count"], 1);
    assert_eq!(json["tiers"][1]["load_seconds"][1]["count"], 0);
    assert_eq!(
        json["tiers"][1]["load_seconds"][0]["buckets"]
            .as_array()
            .unwrap()
            .len(),
        16
    );
    drop(l);
    r.assert_sound();
}

#[test]
fn leases_move_between_threads() {
    let r = Arc::new(rig(1000, &[]).models(&[("a", 100)]).build());
    let barrier = Arc::new(Barrier::new(2));
    let l = r.mgr.acquire(&m("a"), MEM, C1).unwrap();
    let b2 = barrier.clone();
    let h = thread::spawn(move || {
        b2.wait();
        drop(l);
    });
    barrier.wait();
    h.join().unwrap();
    assert_eq!(r.mgr.status().leases, 0);
    r.assert_sound();
}

#[test]
fn reservations_count_in_the_budget_evict_copies_and_are_refused_by_name() {
    let r = rig(1000, &[500])
        .models(&[("a", 200), ("b", 200), ("c", 200)])
        .space_wait(Duration::from_millis(50))
        .build();
    drop(r.mgr.acquire(&m("a"), GPU, C1).unwrap());
    drop(r.mgr.acquire(&m("b"), GPU, C1).unwrap());
    // 100 free: an engine of 250 evicts the least recently used of two equally requested copies (a).
    let engine = r.mgr.reserve(GPU, 250, &m("b"), C1).unwrap();
    assert_eq!((engine.bytes(), engine.tier()), (250, GPU));
    assert_eq!(r.mgr.locate(&m("a")), [MEM], "a evicted from the GPU");
    let gpu = r.mgr.status().tier(GPU).unwrap().clone();
    assert_eq!((gpu.reserved, gpu.resident, gpu.used), (250, 200, 450));
    r.assert_sound();
    // The reservation is never evicted: c fits only by evicting b.
    let lc = r.mgr.acquire(&m("c"), GPU, C2).unwrap();
    assert_eq!(r.mgr.locate(&m("b")), [MEM]);
    // Now 250 reserved + 200 leased by C2 itself: nothing can make room for
    // another 250 of C2's, so it is refused at once...
    let started = Instant::now();
    let e = r.mgr.reserve(GPU, 250, &m("c"), C2).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(40),
        "without waiting"
    );
    let TierError::NoSpace(ns) = &e else {
        panic!("{e}")
    };
    assert_eq!(
        (ns.model.as_str(), ns.needed, ns.free, ns.evictable),
        ("c", 250, 50, 0)
    );
    assert_eq!(ns.reserved, 250);
    assert!(e.to_string().contains("250 B reserved for engines"), "{e}");
    // ... while C1's request waits for C2's lease, then is refused.
    let e = r.mgr.reserve(GPU, 250, &m("a"), C1).unwrap_err();
    assert!(
        matches!(&e, TierError::NoSpace(ns) if ns.waited_ms.is_some_and(|ms| ms >= 50)),
        "{e}"
    );
    // More than the whole budget: refused at once.
    assert!(matches!(
        r.mgr.reserve(GPU, 501, &m("c"), C2),
        Err(TierError::TooLarge { .. })
    ));
    drop(lc);
    drop(engine);
    let gpu = r.mgr.status().tier(GPU).unwrap().clone();
    assert_eq!((gpu.reserved, gpu.used), (0, 200));
    // Freed room serves the next load without eviction.
    drop(r.mgr.acquire(&m("a"), GPU, C1).unwrap());
    assert_eq!(r.mgr.locate(&m("c")), [GPU, MEM]);
    r.assert_sound();
}

/// The swap workload of `flash bench-daemon` (30 models, Zipf 1.0, a GPU
/// tier of 3 and a memory tier of 6), one client: the share of requests
/// that must read the disk.
#[test]
fn zipf_swaps_read_the_disk_seldom() {
    let names: Vec<String> = (0..30).map(|i| format!("m{i:02}")).collect();
    let sizes: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 100)).collect();
    let r = rig(600, &[300]).models(&sizes).build();
    let weights: Vec<f64> = (1..=30).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut rng = Rng(7);
    let (mut disk, n) = (0, 3000);
    for _ in 0..n {
        let mut u = rng.unit() * total;
        let i = weights.iter().position(|w| {
            u -= w;
            u < 0.0
        });
        let model = m(&names[i.unwrap_or(29)]);
        let lease = r.mgr.acquire(&model, GPU, C1).unwrap();
        if lease.served_from() == Tier::Disk {
            disk += 1;
        }
    }
    let share = disk as f64 / n as f64;
    // LRU eviction read the disk for 54.5 % of them with this seed;
    // popularity order and the memory tier's admission rule, 37.9 %.
    assert!(
        share < 0.42,
        "{:.1} % of the requests read the disk",
        share * 100.0
    );
    r.assert_sound();
}

#[test]
fn popular_models_outlast_recent_ones() {
    let r = rig(300, &[])
        .models(&[("hot", 100), ("b", 100), ("c", 100), ("d", 100)])
        .build();
    for _ in 0..3 {
        drop(r.mgr.acquire(&m("hot"), MEM, C1).unwrap());
    }
    drop(r.mgr.acquire(&m("b"), MEM, C1).unwrap());
    drop(r.mgr.acquire(&m("c"), MEM, C1).unwrap());
    // hot is the least recently used, b the least popular.
    drop(r.mgr.acquire(&m("d"), MEM, C1).unwrap());
    assert_eq!(r.models_in(MEM), ["d", "c", "hot"]);
    let st = r.mgr.status();
    let pop = |name: &str| {
        st.tier(MEM)
            .unwrap()
            .models
            .iter()
            .find(|x| x.model == m(name))
            .unwrap()
            .popularity
    };
    assert!(pop("hot") > 2.9 && pop("hot") <= 3.0, "{}", pop("hot"));
    assert!(pop("d") > 0.9 && pop("d") <= 1.0, "{}", pop("d"));
    r.assert_sound();
}

#[test]
fn a_gpu_load_keeps_a_memory_copy_only_in_place_of_less_popular_ones() {
    // Memory holds two models, the GPU one.
    let r = rig(200, &[100])
        .models(&[("hot", 100), ("warm", 100), ("x", 100), ("y", 100)])
        .build();
    for _ in 0..3 {
        drop(r.mgr.acquire(&m("hot"), GPU, C1).unwrap());
    }
    for _ in 0..2 {
        drop(r.mgr.acquire(&m("warm"), GPU, C1).unwrap());
    }
    assert_eq!(r.models_in(MEM), ["warm", "hot"]);
    // Requested once each: they go to the GPU, past the memory tier.
    let x = r.mgr.acquire(&m("x"), GPU, C1).unwrap();
    assert_eq!(x.served_from(), Tier::Disk);
    drop(x);
    drop(r.mgr.acquire(&m("y"), GPU, C1).unwrap());
    assert_eq!(r.mgr.locate(&m("y")), [GPU], "no memory copy of y");
    assert_eq!(r.models_in(MEM), ["warm", "hot"]);
    // Requested a second time, x counts as many requests as warm, more
    // recent ones (they weigh more): it takes warm's place.
    let x = r.mgr.acquire(&m("x"), GPU, C1).unwrap();
    assert_eq!(x.served_from(), Tier::Disk);
    drop(x);
    assert_eq!(r.mgr.locate(&m("x")), [GPU, MEM]);
    assert_eq!(r.models_in(MEM), ["x", "hot"], "warm made room");
    r.assert_sound();
}

/// Polls until `n` loads wait for their turn on the disk.
fn wait_disk_waiting(r: &Rig, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.mgr.status().disk_waiting < n {
        assert!(
            Instant::now() < deadline,
            "never {n} loads waiting for the disk"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Loads from disk take turns on it (one at a time by default), the
/// smallest waiting first, and a load waiting for its turn holds no room:
/// a copy from the memory tier goes up to the GPU meanwhile.
#[test]
fn disk_loads_take_turns_smallest_first_holding_no_room() {
    let r = Arc::new(
        rig(1000, &[400])
            // small is more than a quarter of big: it does not read beside it.
            .models(&[("big", 200), ("next", 150), ("small", 60), ("warm", 100)])
            .build(),
    );
    drop(r.mgr.acquire(&m("warm"), MEM, C1).unwrap());
    let gate = r.fakes().gate("big");
    let spawn = |model: &'static str, tier: Tier| {
        let r = r.clone();
        thread::spawn(move || r.mgr.acquire(&m(model), tier, C1).map(|l| l.served_from()))
    };
    let big = spawn("big", GPU);
    gate.wait_entered(1);
    let next = spawn("next", GPU);
    wait_disk_waiting(&r, 1);
    // A second request for next waits for that load, not for a turn of
    // its own.
    let next_again = spawn("next", GPU);
    let small = spawn("small", MEM);
    wait_disk_waiting(&r, 2);
    thread::sleep(Duration::from_millis(20));
    let st = r.mgr.status();
    assert_eq!((st.disk_reading, st.disk_waiting), (1, 2));
    assert_eq!(
        st.tier(GPU).unwrap().loading,
        200,
        "only big holds GPU room"
    );
    // The memory copy of warm goes up while every disk load waits.
    let warm = spawn("warm", GPU);
    let warm = within(5, move || warm.join().unwrap());
    assert_eq!(warm.unwrap(), Tier::Memory);
    gate.open();
    for load in [big, next, next_again, small] {
        assert_eq!(within(5, move || load.join().unwrap()).unwrap(), Tier::Disk);
    }
    let ops = r.fakes().ops();
    let reads_of_next = ops
        .iter()
        .filter(|op| matches!(op, Op::DiskToGpuAndMemory(x, _) if x == &m("next")))
        .count();
    assert_eq!(reads_of_next, 1, "{ops:?}");
    assert_eq!(r.mgr.status().tier(GPU).unwrap().counters.coalesced, 1);
    let at = |model: &str| {
        ops.iter()
            .position(|op| match op {
                Op::DiskToMemory(x) | Op::DiskToGpu(x, _) | Op::DiskToGpuAndMemory(x, _) => {
                    x == &m(model)
                }
                Op::MemoryToGpu(..) => false,
            })
            .unwrap()
    };
    assert!(
        at("big") < at("small") && at("small") < at("next"),
        "{ops:?}"
    );
    let st = r.mgr.status();
    assert_eq!((st.disk_reading, st.disk_waiting), (0, 0));
    r.assert_sound();
}

/// Without a limit (`disk_loads(0)`), loads read the disk side by side.
#[test]
fn disk_loads_without_a_limit_run_side_by_side() {
    let r = Arc::new(
        rig(1000, &[])
            .models(&[("a", 100), ("b", 100)])
            .disk_loads(0)
            .build(),
    );
    let (ga, gb) = (r.fakes().gate("a"), r.fakes().gate("b"));
    let loads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|model| {
            let r = r.clone();
            thread::spawn(move || r.mgr.acquire(&m(model), MEM, C1).map(|_| ()))
        })
        .collect();
    // Both transfers are under way at once.
    ga.wait_entered(1);
    gb.wait_entered(1);
    assert_eq!(r.mgr.status().disk_waiting, 0);
    ga.open();
    gb.open();
    for l in loads {
        within(5, move || l.join().unwrap()).unwrap();
    }
    r.assert_sound();
}
