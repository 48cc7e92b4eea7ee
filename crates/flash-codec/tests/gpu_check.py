#!/usr/bin/env python3
"""Runs the CUDA decoder (src/decode.cu) on a GPU with CuPy: bit-exactness
against the CPU encoder's input, bad-chunk reporting, and decode speed.

    cargo run -p flash-codec --release --example gpu_testdata -- target/fc-gpu
    python3 crates/flash-codec/tests/gpu_check.py target/fc-gpu

Needs a CUDA GPU and CuPy (NVRTC is CuPy's). Exits non-zero on a mismatch.
FC_SKIP_SPEED=1 skips the timing (for runs under compute-sanitizer).
"""
import math
import os
import pathlib
import sys

import cupy as cp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
WARPS = 4  # FC_WARPS_PER_BLOCK
DESC = np.dtype([("src", "<u8"), ("dst", "<u8"), ("elems", "<u4"), ("kind", "<u4")])
REC = np.dtype([("soff", "<u8"), ("doff", "<u8"), ("elems", "<u4"), ("kind", "<u4"),
                ("slen", "<u4"), ("tensor", "<u4")])


def main():
    data = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/fc-gpu")
    recs = np.fromfile(data / "chunks.bin", dtype=REC)
    stored = np.fromfile(data / "stored.bin", dtype=np.uint8)
    decoded = np.fromfile(data / "decoded.bin", dtype=np.uint8)
    tensors = (data / "tensors.txt").read_text().splitlines()
    assert DESC.itemsize == 24
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    print(f"{props['name'].decode()}, {props['multiProcessorCount']} SMs; "
          f"{len(recs)} chunks, {stored.size} stored bytes, {decoded.size} decoded bytes")

    src = (HERE.parent / "src" / "decode.cu").read_text()
    kern = cp.RawKernel(src, "flash_codec_decode", options=("--std=c++17",), backend="nvrtc")
    print(f"kernel: {kern.num_regs} registers, {kern.shared_size_bytes} B static shared, "
          f"{kern.local_size_bytes} B local (spills), max {kern.max_threads_per_block} threads/block")

    def launch(d_desc, n, grid=None, status=None):
        if status is None:
            status = cp.empty(2, dtype=cp.uint32)
        status[0] = 0
        status[1] = 0xFFFFFFFF
        grid = grid or math.ceil(n / WARPS)
        kern((grid,), (32 * WARPS,), (d_desc, np.uint32(n), status))
        return status

    def descriptors(d_stored, d_out, sel, s_shift=0, d_shift=0):
        d = np.zeros(len(sel), dtype=DESC)
        d["src"] = d_stored.data.ptr + s_shift + sel["soff"]
        d["dst"] = d_out.data.ptr + d_shift + sel["doff"]
        d["elems"] = sel["elems"]
        d["kind"] = sel["kind"]
        return cp.asarray(d.view(np.uint8))

    # 1. Bit-exact, with the launch grid, one block, and a few blocks.
    failed = False
    d_stored = cp.asarray(stored)
    for grid in (None, 1, 7):
        d_out = cp.full(decoded.size, 0xEE, dtype=cp.uint8)
        st = launch(descriptors(d_stored, d_out, recs), len(recs), grid)
        cp.cuda.runtime.deviceSynchronize()
        out = cp.asnumpy(d_out)
        status = cp.asnumpy(st)
        bad = [i for i, r in enumerate(recs)
               if not np.array_equal(out[r["doff"]:r["doff"] + r["elems"] * (4 if r["kind"] & 0xFF == 2 else 2)],
                                     decoded[r["doff"]:r["doff"] + r["elems"] * (4 if r["kind"] & 0xFF == 2 else 2)])]
        ok = status[0] == 0 and status[1] == 0xFFFFFFFF and not bad
        print(f"decode, grid {grid or 'ceil(n/4)'}: status {list(status)}, "
              f"{len(bad)} chunks differ {bad[:5]} -> {'OK' if ok else 'FAIL'}")
        failed |= not ok
        for i in bad[:3]:
            r = recs[i]
            print("  chunk", i, "tensor", tensors[r["tensor"]], "kind", hex(r["kind"]), "elems", r["elems"])

    # 2. Bad chunks are reported: lane states changed in two Rans chunks.
    rans = [i for i, r in enumerate(recs) if (r["kind"] >> 8) == 1]
    a, b = rans[9], rans[4]
    bad_stored = stored.copy()
    bad_stored[recs[a]["soff"] + 8 + 4 * 3] ^= 0x40
    bad_stored[recs[b]["soff"] + 8 + 4 * 17 + 1] ^= 0x01
    d_bad = cp.asarray(bad_stored)
    d_out = cp.zeros(decoded.size, dtype=cp.uint8)
    status = cp.asnumpy(launch(descriptors(d_bad, d_out, recs), len(recs)))
    ok = status[0] == 2 and status[1] == min(a, b)
    print(f"corrupt chunks {a} and {b}: status {list(status)} -> {'OK' if ok else 'FAIL'}")
    failed |= not ok

    if os.environ.get("FC_SKIP_SPEED"):
        print("FAIL" if failed else "ALL OK (speed skipped)")
        sys.exit(1 if failed else 0)

    # 3. Speed: each layout's normal tensor, replicated so that ~1 GB is
    #    decoded per launch, stored copies distinct in memory (not L2 hits).
    for t, name in [(0, "bf16"), (1, "f16"), (2, "f32")]:
        sel = recs[recs["tensor"] == t]
        s0, s1 = int(sel["soff"].min()), int((sel["soff"] + sel["slen"]).max())
        d0 = int(sel["doff"].min())
        out_bytes = int(sum(sel["elems"])) * (4 if name == "f32" else 2)
        reps = max(1, math.ceil(1e9 / out_bytes))
        span_s = (s1 - s0 + 255) // 256 * 256
        span_d = (out_bytes + 255) // 256 * 256
        d_st = cp.empty(reps * span_s, dtype=cp.uint8)
        for r in range(reps):
            d_st[r * span_s:r * span_s + (s1 - s0)] = d_stored[s0:s1]
        d_out = cp.empty(reps * span_d, dtype=cp.uint8)
        descs = []
        for r in range(reps):
            shifted = sel.copy()
            shifted["soff"] -= s0
            shifted["doff"] -= d0
            descs.append(descriptors(d_st, d_out, shifted, r * span_s, r * span_d))
        d_desc = cp.concatenate(descs)
        n = len(sel) * reps
        for grid in (None, props["multiProcessorCount"] * 6):
            st = launch(d_desc, n, grid)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            iters = 10
            start.record()
            for _ in range(iters):
                launch(d_desc, n, grid, st)
            end.record()
            end.synchronize()
            ms = cp.cuda.get_elapsed_time(start, end) / iters
            status = cp.asnumpy(st)
            first = cp.asnumpy(d_out[:out_bytes])
            ok = status[0] == 0 and np.array_equal(first, decoded[d0:d0 + out_bytes])
            failed |= not ok
            gbs = reps * out_bytes / ms / 1e6
            print(f"{name}: {n} chunks, {reps * out_bytes / 1e9:.2f} GB out in {ms:.3f} ms = {gbs:.0f} GB/s "
                  f"(grid {grid or 'ceil(n/4)'}) {'OK' if ok else 'FAIL'}")
        # Reference: a device-to-device copy of the same output size.
        ref = cp.empty_like(d_out)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(10):
            ref[:] = d_out
        end.record()
        end.synchronize()
        ms = cp.cuda.get_elapsed_time(start, end) / 10
        print(f"  (device copy of {d_out.nbytes / 1e9:.2f} GB: {d_out.nbytes / ms / 1e6:.0f} GB/s)")
        del d_st, d_out, d_desc, ref

    print("FAIL" if failed else "ALL OK")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
