//! Symbol counts and their normalisation to frequencies summing to
//! `2^PB`. Integer arithmetic only, so every machine makes the same table.

/// Counts of each symbol value.
pub(crate) type Counts = [u32; 256];

/// Counts the symbols produced by `sym` for each element of `elems`
/// (4 interleaved histograms: runs of one symbol do not serialise on one
/// counter).
#[inline(always)]
pub(crate) fn histogram<const EB: usize>(decoded: &[u8], sym: impl Fn([u8; EB]) -> u8) -> Counts {
    let mut h = [[0u32; 256]; 4];
    let mut quads = decoded.chunks_exact(4 * EB);
    for q in &mut quads {
        for (i, h) in h.iter_mut().enumerate() {
            let e: [u8; EB] = q[i * EB..(i + 1) * EB].try_into().expect("EB bytes");
            h[sym(e) as usize] += 1;
        }
    }
    for e in quads.remainder().chunks_exact(EB) {
        h[0][sym(e.try_into().expect("EB bytes")) as usize] += 1;
    }
    let mut out = [0u32; 256];
    for (s, o) in out.iter_mut().enumerate() {
        *o = h[0][s] + h[1][s] + h[2][s] + h[3][s];
    }
    out
}

/// Frequencies for `counts` (not all zero): every present symbol gets at
/// least 1, absent ones 0, and they sum to exactly `2^pb` (`8 <= pb <= 12`,
/// so the 256 symbols always fit).
///
/// Start from `max(1, round(c * 2^pb / n))`, then move the sum to `2^pb`
/// one unit at a time: add to the symbol whose code length shrinks the most
/// (`c / (f + 1/2)` largest, approximating `c * ln((f + 1) / f)`), or take
/// from the symbol with `f > 1` whose code length grows the least
/// (`c / (f - 1/2)` smallest). Ties go to the smaller symbol. Comparisons
/// are exact integer cross-products.
pub(crate) fn normalise(counts: &Counts, pb: u32) -> [u32; 256] {
    let scale = 1u64 << pb;
    let total: u64 = counts.iter().map(|&c| c as u64).sum();
    debug_assert!(total > 0);
    let mut present = [0u8; 256];
    let mut k = 0;
    let mut f = [0u32; 256];
    let mut sum = 0u64;
    for (s, &c) in counts.iter().enumerate() {
        if c > 0 {
            present[k] = s as u8;
            k += 1;
            let v = ((2 * c as u64 * scale + total) / (2 * total)).max(1);
            f[s] = v as u32;
            sum += v;
        }
    }
    let present = &present[..k];
    while sum < scale {
        // Largest c / (2f + 1).
        let mut best = present[0] as usize;
        for &s in &present[1..] {
            let s = s as usize;
            let (cs, fs) = (counts[s] as u64, f[s] as u64);
            let (cb, fb) = (counts[best] as u64, f[best] as u64);
            if cs * (2 * fb + 1) > cb * (2 * fs + 1) {
                best = s;
            }
        }
        f[best] += 1;
        sum += 1;
    }
    while sum > scale {
        // Smallest c / (2f - 1) among f > 1; one exists since k <= 256 <= 2^pb.
        let mut best = usize::MAX;
        for &s in present {
            let s = s as usize;
            if f[s] < 2 {
                continue;
            }
            if best == usize::MAX {
                best = s;
                continue;
            }
            let (cs, fs) = (counts[s] as u64, f[s] as u64);
            let (cb, fb) = (counts[best] as u64, f[best] as u64);
            if cs * (2 * fb - 1) < cb * (2 * fs - 1) {
                best = s;
            }
        }
        f[best] -= 1;
        sum -= 1;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(counts: &Counts, pb: u32) -> [u32; 256] {
        let f = normalise(counts, pb);
        assert_eq!(f.iter().map(|&v| v as u64).sum::<u64>(), 1 << pb);
        for s in 0..256 {
            assert_eq!(counts[s] > 0, f[s] > 0, "symbol {s}");
        }
        f
    }

    #[test]
    fn sums_and_keeps_every_present_symbol() {
        for pb in 8..=12 {
            let mut c = [0u32; 256];
            c[7] = 1;
            assert_eq!(check(&c, pb)[7], 1 << pb);
            let all = [1u32; 256];
            assert!(check(&all, pb).iter().all(|&v| v == 1 << (pb - 8)));
            // One huge symbol and 255 rare ones: rounding gives the rare
            // ones 0 and they are lifted to 1.
            let mut c = [1u32; 256];
            c[100] = 1_000_000;
            let f = check(&c, pb);
            assert_eq!(f[100], (1 << pb) - 255);
            // Many symbols that all round up.
            let mut c = [0u32; 256];
            for (s, v) in c.iter_mut().enumerate().take(200) {
                *v = 1000 + (s as u32 % 7);
            }
            check(&c, pb);
        }
    }

    #[test]
    fn proportional_for_round_counts() {
        let mut c = [0u32; 256];
        c[1] = 3 * 512;
        c[2] = 512;
        let f = check(&c, 11);
        assert_eq!((f[1], f[2]), (1536, 512));
    }
}
