#!/usr/bin/env python3
"""Times ONE peer loader, once, in this process.

    python3 bench/peers.py --loader L --model-dir DIR --model NAME \\
        --scenario cold|warm --card CARD

prints one JSON line: {loader, model, scenario, seconds, gbps, card, bytes, ...}
(with "error" instead of "seconds" when the loader failed; exit status 1 then).

    python3 bench/peers.py --evict-only --model-dir DIR

only evicts the folder's *.safetensors from the page cache (no torch import).

Loaders: st_load_file, st_safe_open, fastsafetensors, runai, instanttensor.

What is timed: from the call into the loader until torch.cuda.synchronize()
returns with every tensor on cuda:0. Not timed: importing torch and the
loader's module, CUDA context creation (torch.cuda.init() and a tiny
allocation), and the page-cache preparation, which happens before torch is
even imported:
  cold: each file is fsync'ed and dropped with posix_fadvise(DONTNEED); as
        root, `echo 1 > /proc/sys/vm/drop_caches` as well.
  warm: each file is read through once, so its pages are in the page cache.
The page-cache residency of the files just before the clock starts is
reported as "resident" (0.0 .. 1.0, from mincore; null if unknown); while
the clock runs, the block device's reads are sampled (/proc/diskstats, every
process's): "disk_read_bytes", "disk_gbps_steady" (between 20 % and 80 % of
those bytes) and "threads_max" (this process's most threads).
"""

import argparse
import ctypes
import ctypes.util
import glob
import json
import mmap
import os
import sys
import time

# The process's start, near enough: "setup_seconds" (eviction, imports, CUDA
# context) is how long the disk sat idle between the eviction and the timed
# read.
PROCESS_START = time.perf_counter()

LOADERS = ("st_load_file", "st_safe_open", "fastsafetensors", "runai", "instanttensor")
DEVICE = "cuda:0"


def shard_files(model_dir):
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise SystemExit(f"no *.safetensors in {model_dir}")
    return files


def evict(files):
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if os.geteuid() == 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("1\n")
        except OSError:
            pass  # read-only /proc/sys (containers): fadvise alone


def warm(files):
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass


def residency(files):
    """Fraction of the files' pages in the page cache (mincore), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        page = os.sysconf("SC_PAGE_SIZE")
        resident = total = 0
        for f in files:
            size = os.path.getsize(f)
            if size == 0:
                continue
            fd = os.open(f, os.O_RDONLY)
            try:
                # A mapping that is never read: mincore only asks the kernel.
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                try:
                    pages = (size + page - 1) // page
                    vec = ctypes.create_string_buffer(pages)
                    if libc.mincore(addr, size, vec) != 0:
                        return None
                    resident += sum(b & 1 for b in vec.raw[:pages])
                    total += pages
                finally:
                    libc.munmap(addr, size)
            finally:
                os.close(fd)
        return round(resident / total, 4) if total else 1.0
    except Exception:
        return None


def block_device_of(path):
    """The /proc/diskstats name of the block device holding `path`, or None."""
    try:
        dev = os.stat(path).st_dev
        return os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    except OSError:
        return None


def sectors_read(name):
    """Sectors (512 bytes) the block device `name` has read since boot."""
    if name is None:
        return None
    try:
        with open("/proc/diskstats") as fh:
            for line in fh:
                f = line.split()
                if f[2] == name:
                    return int(f[5])
    except OSError:
        pass
    return None


class ReadSampler:
    """What the disk delivered while the clock ran: the block device's bytes
    read (all processes) every 0.1 s, and the most threads this process had.
    Tells a reader that reads the disk faster from one that reads less of it."""

    def __init__(self, path):
        import threading

        self.dev = block_device_of(path)
        self.samples = []
        self.threads = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        self.samples.append((time.perf_counter(), sectors_read(self.dev)))
        try:
            self.threads = max(self.threads, len(os.listdir("/proc/self/task")))
        except OSError:
            pass

    def _run(self):
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()

    def report(self):
        s = [(t, v) for t, v in self.samples if v is not None]
        if len(s) < 2:
            return {}
        out = {"disk_read_bytes": (s[-1][1] - s[0][1]) * 512, "threads_max": self.threads}
        # The steady rate: between 20 % and 80 % of the bytes read.
        total = s[-1][1] - s[0][1]
        lo = next((p for p in s if p[1] - s[0][1] >= 0.2 * total), None)
        hi = next((p for p in s if p[1] - s[0][1] >= 0.8 * total), None)
        if lo and hi and hi[0] > lo[0]:
            out["disk_gbps_steady"] = round((hi[1] - lo[1]) * 512 / (hi[0] - lo[0]) / 1e9, 3)
        return out


def load(loader, files):
    """Runs the loader; returns {name: tensor}. Called with the clock running."""
    import torch

    out = {}
    if loader == "st_load_file":
        from safetensors.torch import load_file

        for f in files:
            out.update(load_file(f, device=DEVICE))
    elif loader == "st_safe_open":
        from safetensors import safe_open

        for f in files:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k).to(DEVICE)
    elif loader == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        with fastsafe_open(files, framework="pt", device=DEVICE, nogds=True) as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
            torch.cuda.synchronize()
    elif loader == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files, device=DEVICE)
            for name, t in s.get_tensors():
                out[name] = t
            torch.cuda.synchronize()
    elif loader == "instanttensor":
        from instanttensor import safe_open as it_open

        with it_open(files, framework="pt", device=DEVICE) as h:
            for name, t in h.tensors():
                out[name] = t
            torch.cuda.synchronize()
    else:
        raise ValueError(f"unknown loader {loader}")
    torch.cuda.synchronize()
    return out


def preimport(loader):
    """Imports the loader's module before the clock starts."""
    if loader in ("st_load_file", "st_safe_open"):
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open  # noqa: F401
    elif loader == "fastsafetensors":
        import fastsafetensors  # noqa: F401
    elif loader == "runai":
        import runai_model_streamer  # noqa: F401
    elif loader == "instanttensor":
        import instanttensor  # noqa: F401


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loader", choices=LOADERS)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--scenario", choices=("cold", "warm"), default="cold")
    ap.add_argument("--card", default="unknown")
    ap.add_argument("--evict-only", action="store_true", help="evict the files and exit")
    ap.add_argument("--no-prepare", action="store_true",
                    help="skip the page-cache step (the caller did it)")
    a = ap.parse_args()

    files = shard_files(a.model_dir)
    if a.evict_only:
        evict(files)
        return 0
    if not a.loader:
        ap.error("--loader is required")

    record = {
        "loader": a.loader,
        "model": a.model or os.path.basename(os.path.normpath(a.model_dir)),
        "scenario": a.scenario,
        "card": a.card,
        "files": len(files),
        "file_bytes": sum(os.path.getsize(f) for f in files),
    }

    # 1. Page cache, before torch exists in this process.
    if not a.no_prepare:
        if a.scenario == "cold":
            evict(files)
        else:
            warm(files)

    # 2. Imports and CUDA context, untimed.
    try:
        import torch

        preimport(a.loader)
        torch.cuda.init()
        torch.empty(1, device=DEVICE)
        torch.cuda.synchronize()
        record["torch"] = torch.__version__
    except Exception as e:  # a missing wheel, no GPU
        record["error"] = f"setup: {type(e).__name__}: {e}"
        print(json.dumps(record), flush=True)
        return 1

    record["resident"] = residency(files)

    # 3. The timed load.
    try:
        sampler = ReadSampler(files[0])
        with sampler:
            t0 = time.perf_counter()
            record["setup_seconds"] = round(t0 - PROCESS_START, 3)
            tensors = load(a.loader, files)
            seconds = time.perf_counter() - t0
        record.update(sampler.report())
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(record), flush=True)
        return 1

    # 4. Check and count, untimed.
    nbytes = 0
    off_device = []
    for name, t in tensors.items():
        if t.device != torch.device(DEVICE):
            off_device.append(name)
        nbytes += t.numel() * t.element_size()
    record.update(
        seconds=round(seconds, 4),
        bytes=nbytes,
        gbps=round(nbytes / seconds / 1e9, 3),
        tensors=len(tensors),
    )
    if off_device:
        record["error"] = f"{len(off_device)} tensors not on {DEVICE}, e.g. {off_device[0]}"
    print(json.dumps(record), flush=True)
    return 1 if off_device else 0


if __name__ == "__main__":
    sys.exit(main())
