//! The GPU copy measurements the reports compare against: pinned
//! host-to-device (the limit of a load from the daemon's memory tier) and
//! device-to-device (the memory bandwidth, which bounds decode). `flash
//! doctor`, `flash bench` and `flash bench-engine` all measure them here,
//! so their numbers agree.

use crate::{CheckError, Result};
use flash_sys::cuda::{self, DeviceMemory, Direction, Gpu, Stream};

/// Timed repetitions of each copy measurement (the best is kept).
pub const REPEATS: usize = 3;

/// GB/s (10^9 bytes per second) of `bytes` moved in `secs`, to two
/// decimals; 0 for no time.
pub fn gbps(bytes: usize, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    round2(bytes as f64 / secs / 1e9)
}

/// `x` rounded to two decimals (the reports' precision).
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A device-to-device copy of the first `bytes` of `src` into a fresh
/// allocation on `stream`, timed with events, best of [`REPEATS`]: GB/s
/// counting the bytes read plus the bytes written (the memory bandwidth
/// the copy used), not rounded.
pub fn d2d_copy_gbps(gpu: &Gpu, src: &DeviceMemory, bytes: usize, stream: &Stream) -> Result<f64> {
    let dst = gpu.alloc(bytes)?;
    let (start, end) = (gpu.event(true)?, gpu.event(true)?);
    let mut best_ms = f32::MAX;
    for _ in 0..REPEATS {
        start.record(stream)?;
        src.copy_to_device(0, &dst, 0, bytes, stream)?;
        end.record(stream)?;
        best_ms = best_ms.min(start.elapsed_ms(&end)?);
    }
    Ok(2.0 * bytes as f64 / (best_ms as f64 / 1e3) / 1e9)
}

/// The device-to-device bandwidth of `gpu` on its own allocations: copies
/// of up to 1 GiB (a quarter of the free memory on a smaller GPU).
pub fn d2d_gbps(gpu: &Gpu) -> Result<f64> {
    let (free, _) = gpu.mem_info()?;
    let bytes = (1usize << 30).min((free as usize / 4) & !((1 << 20) - 1));
    if bytes < 1 << 20 {
        return Err(CheckError::Failed(format!(
            "only {free} bytes free on the GPU"
        )));
    }
    let src = gpu.alloc(bytes)?;
    d2d_copy_gbps(gpu, &src, bytes, &gpu.stream()?)
}

/// Pinned host-to-device bandwidth, the limit of a load from pinned host
/// memory: 4 buffers of 64 MiB copied in 16 MiB pieces over 2 streams,
/// best of [`REPEATS`], not rounded.
pub fn pinned_h2d_gbps(gpu: &Gpu) -> Result<f64> {
    let piece = 64 << 20;
    let mut bufs = (0..4)
        .map(|_| gpu.pinned(piece))
        .collect::<Result<Vec<_>, _>>()?;
    let mem = gpu.alloc(4 * piece)?;
    let streams = [gpu.stream()?, gpu.stream()?];
    let mut best = 0.0f64;
    for _ in 0..REPEATS {
        let (d, b) =
            cuda::timed_pinned_copies(Direction::HostToDevice, &mem, bufs, &streams, 16 << 20)?;
        bufs = b;
        best = best.max((4 * piece) as f64 / d.as_secs_f64() / 1e9);
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(gbps(2_000_000_000, 1.0), 2.0);
        assert_eq!(gbps(1, 0.0), 0.0);
        assert_eq!(round2(1.2345), 1.23);
    }
}
