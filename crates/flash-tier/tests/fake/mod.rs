//! Fake backends: allocations that count live bytes per tier (and flag any
//! moment above the budget), transfers that record what they did and can be
//! told to fail, panic, or block on a gate until the test opens it.

#![allow(dead_code)]

use flash_tier::{ClientId, ModelId, Tier, TierBackend, TierError, TierManager, Transfers};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub fn m(s: &str) -> ModelId {
    ModelId::new(s)
}

pub const C1: ClientId = ClientId(1);
pub const C2: ClientId = ClientId(2);
pub const GPU: Tier = Tier::Gpu(0);
pub const MEM: Tier = Tier::Memory;

/// Live memory of one tier, as the backend sees it.
pub struct TierLive {
    pub tier: Tier,
    pub budget: u64,
    /// Allocations fail with `OutOfMemory` beyond this (a fragmented pool,
    /// another process on the GPU).
    pub physical: AtomicU64,
    pub live: AtomicU64,
    pub allocs: AtomicU64,
    pub violations: Mutex<Vec<String>>,
}

impl TierLive {
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::SeqCst)
    }
}

pub struct FakeBuf {
    pub tier: Tier,
    pub bytes: u64,
    /// The model the transfer wrote into it.
    pub model: Option<ModelId>,
    live: Arc<TierLive>,
}

impl Drop for FakeBuf {
    fn drop(&mut self) {
        self.live.live.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

pub struct FakeBackend(pub Arc<TierLive>);

impl TierBackend for FakeBackend {
    type Buf = FakeBuf;
    fn alloc(&self, bytes: u64) -> Result<FakeBuf, TierError> {
        let l = &self.0;
        let physical = l.physical.load(Ordering::SeqCst);
        // Claim atomically, give back if over the physical limit.
        let now = l.live.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if now > physical {
            l.live.fetch_sub(bytes, Ordering::SeqCst);
            return Err(TierError::out_of_memory(format!(
                "{} of {physical} bytes in use",
                now - bytes
            )));
        }
        if now > l.budget {
            l.violations.lock().unwrap().push(format!(
                "{}: {now} bytes live after allocating {bytes}, budget {}",
                l.tier, l.budget
            ));
        }
        l.allocs.fetch_add(1, Ordering::SeqCst);
        Ok(FakeBuf {
            tier: l.tier,
            bytes,
            model: None,
            live: l.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    DiskToMemory(ModelId),
    MemoryToGpu(ModelId, u16),
    DiskToGpu(ModelId, u16),
    /// One pass over the disk filling the GPU copy and a memory copy.
    DiskToGpuAndMemory(ModelId, u16),
}

/// Blocks transfers until opened; counts who is blocked.
#[derive(Default)]
pub struct Gate {
    state: Mutex<(bool, u32)>,
    cv: Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut g = self.state.lock().unwrap();
        g.1 += 1;
        self.cv.notify_all();
        while !g.0 {
            g = self.cv.wait(g).unwrap();
        }
    }
    pub fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }
    /// Waits until `n` transfers have reached the gate.
    pub fn wait_entered(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut g = self.state.lock().unwrap();
        while g.1 < n {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("nobody reached the gate");
            g = self.cv.wait_timeout(g, left).unwrap().0;
        }
    }
}

#[derive(Default)]
pub struct FakeTransfers {
    pub sizes: Mutex<HashMap<ModelId, u64>>,
    pub log: Mutex<Vec<Op>>,
    /// Fail the next n transfers of a model.
    pub fail: Mutex<HashMap<ModelId, u32>>,
    /// Fail every n-th transfer (0: never).
    pub fail_every: AtomicU64,
    transfers: AtomicU64,
    /// Each transfer takes this long (microseconds), so loads overlap.
    pub delay_us: AtomicU64,
    /// A disk shared by every read (0: off, `delay_us` alone): a read of
    /// an image of N bytes needs N times this many nanoseconds of the
    /// disk, which serves every read in flight at once, each at its share
    /// of the rate (k reads in flight: each at 1/k).
    pub disk_ns_per_byte: AtomicU64,
    /// The same for copies from the memory tier to a GPU (a link shared by
    /// every upload in flight).
    pub upload_ns_per_byte: AtomicU64,
    disk_in_flight: AtomicU64,
    uploads_in_flight: AtomicU64,
    pub panic_on: Mutex<HashSet<ModelId>>,
    pub gates: Mutex<HashMap<ModelId, Arc<Gate>>>,
    pub violations: Mutex<Vec<String>>,
}

impl FakeTransfers {
    pub fn with_sizes(sizes: &[(&str, u64)]) -> Self {
        let t = FakeTransfers::default();
        t.sizes
            .lock()
            .unwrap()
            .extend(sizes.iter().map(|(n, b)| (m(n), *b)));
        t
    }

    /// The next transfers of `model` block until the returned gate opens.
    pub fn gate(&self, model: &str) -> Arc<Gate> {
        let g = Arc::new(Gate::default());
        self.gates.lock().unwrap().insert(m(model), g.clone());
        g
    }

    pub fn fail_next(&self, model: &str, n: u32) {
        self.fail.lock().unwrap().insert(m(model), n);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.log.lock().unwrap().clone()
    }

    fn transfer(&self, model: &ModelId, op: Op, dst: &mut FakeBuf) -> Result<(), TierError> {
        let gate = self.gates.lock().unwrap().get(model).cloned();
        if let Some(g) = gate {
            g.pass();
        }
        let delay = self.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            thread::sleep(Duration::from_micros(delay));
        }
        let (per_byte, in_flight) = match op {
            Op::MemoryToGpu(..) => (&self.upload_ns_per_byte, &self.uploads_in_flight),
            _ => (&self.disk_ns_per_byte, &self.disk_in_flight),
        };
        shared_link(in_flight, dst.bytes * per_byte.load(Ordering::SeqCst));
        if self.panic_on.lock().unwrap().contains(model) {
            panic!("injected panic for {model}");
        }
        if let Some(n) = self.fail.lock().unwrap().get_mut(model).filter(|n| **n > 0) {
            *n -= 1;
            return Err(TierError::backend(format!("injected failure for {model}")));
        }
        let k = self.transfers.fetch_add(1, Ordering::SeqCst) + 1;
        let every = self.fail_every.load(Ordering::SeqCst);
        if every > 0 && k % every == 0 {
            return Err(TierError::backend("injected failure"));
        }
        let want = self.sizes.lock().unwrap()[model];
        if dst.bytes != want {
            self.violations.lock().unwrap().push(format!(
                "{model}: buffer of {} bytes, image of {want}",
                dst.bytes
            ));
        }
        dst.model = Some(model.clone());
        self.log.lock().unwrap().push(op);
        Ok(())
    }
}

impl Transfers for FakeTransfers {
    type Memory = FakeBackend;
    type Gpu = FakeBackend;

    fn image_bytes(&self, model: &ModelId, _tier: Tier) -> Result<u64, TierError> {
        self.sizes
            .lock()
            .unwrap()
            .get(model)
            .copied()
            .ok_or_else(|| TierError::model(model, "not in the store"))
    }

    fn disk_to_memory(&self, model: &ModelId, dst: &mut FakeBuf) -> Result<(), TierError> {
        assert_eq!(dst.tier, Tier::Memory);
        self.transfer(model, Op::DiskToMemory(model.clone()), dst)
    }

    fn memory_to_gpu(
        &self,
        model: &ModelId,
        src: &FakeBuf,
        gpu: u16,
        dst: &mut FakeBuf,
    ) -> Result<(), TierError> {
        if src.model.as_ref() != Some(model) || src.tier != Tier::Memory {
            self.violations.lock().unwrap().push(format!(
                "{model}: copied up from a buffer holding {:?}",
                src.model
            ));
        }
        assert_eq!(dst.tier, Tier::Gpu(gpu));
        self.transfer(model, Op::MemoryToGpu(model.clone(), gpu), dst)
    }

    fn disk_to_gpu(
        &self,
        model: &ModelId,
        gpu: u16,
        dst: &mut FakeBuf,
        keep: Option<&mut FakeBuf>,
    ) -> Result<(), TierError> {
        assert_eq!(dst.tier, Tier::Gpu(gpu));
        match keep {
            Some(mem) => {
                assert_eq!(mem.tier, Tier::Memory);
                self.transfer(model, Op::DiskToGpuAndMemory(model.clone(), gpu), dst)?;
                if mem.bytes != dst.bytes {
                    self.violations.lock().unwrap().push(format!(
                        "{model}: memory copy of {} bytes beside a GPU image of {}",
                        mem.bytes, dst.bytes
                    ));
                }
                // Filled by the same pass: marked only when the pass succeeded.
                mem.model = dst.model.clone();
                Ok(())
            }
            None => self.transfer(model, Op::DiskToGpu(model.clone(), gpu), dst),
        }
    }
}

/// Takes `work_ns` nanoseconds of a link that serves everything in flight
/// at once (processor sharing): every step of time counts for 1/k of a
/// transfer's work while k transfers are in flight.
fn shared_link(in_flight: &AtomicU64, work_ns: u64) {
    if work_ns == 0 {
        return;
    }
    const STEP: Duration = Duration::from_micros(200);
    in_flight.fetch_add(1, Ordering::SeqCst);
    let mut done = 0.0;
    let mut last = Instant::now();
    while done < work_ns as f64 {
        thread::sleep(STEP);
        let now = Instant::now();
        let k = in_flight.load(Ordering::SeqCst).max(1) as f64;
        done += (now - last).as_secs_f64() * 1e9 / k;
        last = now;
    }
    in_flight.fetch_sub(1, Ordering::SeqCst);
}

/// A manager over fakes, and the fakes' live counters (memory first).
pub struct Rig {
    pub mgr: TierManager<FakeTransfers>,
    pub live: Vec<Arc<TierLive>>,
}

pub struct RigBuilder {
    memory: u64,
    gpus: Vec<u64>,
    sizes: Vec<(String, u64)>,
    inclusive: bool,
    space_wait: Duration,
    disk_loads: usize,
}

pub fn rig(memory: u64, gpus: &[u64]) -> RigBuilder {
    RigBuilder {
        memory,
        gpus: gpus.to_vec(),
        sizes: Vec::new(),
        inclusive: true,
        space_wait: Duration::from_secs(5),
        disk_loads: flash_tier::DEFAULT_DISK_LOADS,
    }
}

impl RigBuilder {
    pub fn models(mut self, sizes: &[(&str, u64)]) -> Self {
        self.sizes
            .extend(sizes.iter().map(|(n, b)| (n.to_string(), *b)));
        self
    }
    pub fn inclusive(mut self, yes: bool) -> Self {
        self.inclusive = yes;
        self
    }
    pub fn space_wait(mut self, d: Duration) -> Self {
        self.space_wait = d;
        self
    }
    pub fn disk_loads(mut self, n: usize) -> Self {
        self.disk_loads = n;
        self
    }
    pub fn build(self) -> Rig {
        let live = |tier, budget| {
            Arc::new(TierLive {
                tier,
                budget,
                physical: AtomicU64::new(u64::MAX),
                live: AtomicU64::new(0),
                allocs: AtomicU64::new(0),
                violations: Mutex::default(),
            })
        };
        let sizes: Vec<(&str, u64)> = self.sizes.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        let mem = live(Tier::Memory, self.memory);
        let mut all = vec![mem.clone()];
        let mut b = TierManager::builder(
            FakeTransfers::with_sizes(&sizes),
            FakeBackend(mem),
            self.memory,
        )
        .inclusive(self.inclusive)
        .space_wait(self.space_wait)
        .disk_loads(self.disk_loads);
        for (i, &budget) in self.gpus.iter().enumerate() {
            let l = live(Tier::Gpu(i as u16), budget);
            all.push(l.clone());
            b = b.gpu(FakeBackend(l), budget);
        }
        Rig {
            mgr: b.build(),
            live: all,
        }
    }
}

impl Rig {
    pub fn fakes(&self) -> &FakeTransfers {
        self.mgr.transfers()
    }

    /// Live bytes of a tier as the backend sees them.
    pub fn live(&self, tier: Tier) -> u64 {
        self.live.iter().find(|l| l.tier == tier).unwrap().live()
    }

    /// The checks every test ends with: invariants, no byte above a budget,
    /// no transfer from a wrong source, backend bytes == resident bytes, no
    /// pin, load or free left over.
    pub fn assert_sound(&self) {
        self.mgr.check_invariants().unwrap();
        for l in &self.live {
            let v = l.violations.lock().unwrap();
            assert!(v.is_empty(), "over budget: {v:?}");
        }
        let v = self.fakes().violations.lock().unwrap();
        assert!(v.is_empty(), "{v:?}");
        let st = self.mgr.status();
        for t in &st.tiers {
            assert_eq!(t.loading, 0, "{}", t.tier);
            assert_eq!(t.freeing, 0, "{}", t.tier);
            assert_eq!(t.waiting, 0, "{}", t.tier);
            assert_eq!(
                self.live(t.tier),
                t.resident,
                "{}: backend bytes vs resident",
                t.tier
            );
            for r in &t.models {
                assert_eq!(r.pins, 0, "{} in {}", r.model, t.tier);
            }
        }
    }

    /// Models in a tier, most recently used first.
    pub fn models_in(&self, tier: Tier) -> Vec<String> {
        let st = self.mgr.status();
        st.tier(tier)
            .unwrap()
            .models
            .iter()
            .map(|r| r.model.to_string())
            .collect()
    }

    /// Polls until the load of `model` in `tier` has `n` waiters.
    pub fn wait_waiters(&self, model: &str, tiers: &[Tier], n: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let st = self.mgr.status();
            let w: u32 = tiers
                .iter()
                .map(|&t| {
                    st.tier(t)
                        .unwrap()
                        .model(&m(model))
                        .map_or(0, |r| r.waiters)
                })
                .sum();
            if w >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{model} in {tiers:?}: {w} waiters, expected {n}"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Polls until `n` requests wait for room in `tier`.
    pub fn wait_room_waiters(&self, tier: Tier, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.mgr.status().tier(tier).unwrap().waiting < n {
            assert!(Instant::now() < deadline, "nobody waits for room in {tier}");
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Runs `f` on a thread and fails the test if it has not returned within
/// `secs` (a deadlock), or re-raises its panic.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("did not finish within {secs} s: deadlock?"),
    }
}

/// splitmix64: small, seeded, good enough to pick operations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
