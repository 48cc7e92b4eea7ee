"""What the block device saw while a command ran: wraps a benchmark command,
passes its output through, and adds to each JSON line it prints a "disk"
object from /proc/diskstats (every process's I/O on the device holding
PATH), sampled every 20 ms:

  reads        read requests completed (after the block layer's merges)
  merged       reads merged into another before reaching the device
  bytes        bytes read
  req_kib      mean bytes per completed request, KiB
  ms_per_req   mean time a request took, queue and device (ms reading / reads)
  inflight_max most requests in flight at one sample (reads and writes)
  inflight_mean  their mean over the samples taken while bytes were read
  busy_share   share of the command's time the device had requests in flight

So two readers that move the same bytes at different speeds can be told
apart by what the device was asked: request sizes, queue depth, latency.

    python3 bench/diskwatch.py PATH -- COMMAND [ARGS...]
"""

import json
import os
import subprocess
import sys
import threading
import time

# The block device holding a path, as the peers' runner finds it.
from peers import block_device_of as device_of


def counters(name):
    """(reads, merged, sectors, read_ms, in_flight, io_ms) of device `name`."""
    with open("/proc/diskstats") as fh:
        for line in fh:
            f = line.split()
            if len(f) >= 14 and f[2] == name:
                return (int(f[3]), int(f[4]), int(f[5]), int(f[6]), int(f[11]), int(f[12]))
    return None


def summary(before, after, inflight, seconds):
    reads, merged, sectors, read_ms, _, io_ms = (a - b for a, b in zip(after, before))
    busy = [n for n in inflight if n > 0]
    return {
        "reads": reads,
        "merged": merged,
        "bytes": sectors * 512,
        "req_kib": round(sectors * 512 / reads / 1024, 1) if reads else None,
        "ms_per_req": round(read_ms / reads, 3) if reads else None,
        "inflight_max": max(inflight, default=0),
        "inflight_mean": round(sum(busy) / len(busy), 1) if busy else 0,
        "busy_share": round(io_ms / 1000 / seconds, 3) if seconds > 0 else None,
    }


def main():
    if "--" not in sys.argv or sys.argv.index("--") != 2:
        sys.exit("usage: diskwatch.py PATH -- COMMAND [ARGS...]")
    name = device_of(sys.argv[1])
    cmd = sys.argv[3:]
    if name is None or counters(name) is None:
        # Nothing to watch: run the command unchanged.
        sys.exit(subprocess.call(cmd))
    inflight = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            c = counters(name)
            if c:
                inflight.append(c[4])

    before = counters(name)
    t0 = time.perf_counter()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    rc = p.wait()
    stop.set()
    watcher.join()
    disk = summary(before, counters(name), inflight, time.perf_counter() - t0)
    disk["device"] = name
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("{"):
            try:
                d = json.loads(s)
            except ValueError:
                print(line, flush=True)
                continue
            d["disk"] = disk
            print(json.dumps(d), flush=True)
        else:
            print(line, flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
