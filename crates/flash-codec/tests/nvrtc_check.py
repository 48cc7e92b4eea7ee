#!/usr/bin/env python3
"""Compiles crates/flash-codec/src/decode.cu with NVRTC (no GPU needed) and
fails on any error or warning.

    python3 crates/flash-codec/tests/nvrtc_check.py [--lib PATH] [--arch compute_90] [--ptx OUT]

libnvrtc.so.13 comes from the pip wheel `nvidia-cuda-nvrtc` (13.x):
    python3 -m pip download --no-deps --only-binary=:all: -d /tmp/nvrtc-whl "nvidia-cuda-nvrtc>=13,<14"
    unzip -q -o /tmp/nvrtc-whl/*.whl -d /tmp/nvrtc
The script looks in $NVRTC_LIB, then /tmp/nvrtc/nvidia/cu13/lib, then the
system library path. It prints the compile log and, from the PTX, the
kernel's entry, its static shared memory and the registers PTX declares
(the final count is ptxas's, at load time; PTX virtual registers are an
upper bound before allocation).
"""
import argparse
import ctypes
import os
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE.parent / "src" / "decode.cu"


def load_nvrtc(explicit):
    candidates = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get("NVRTC_LIB"):
        candidates.append(os.environ["NVRTC_LIB"])
    candidates += ["/tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13", "libnvrtc.so.13"]
    errors = []
    for c in candidates:
        try:
            return ctypes.CDLL(c)
        except OSError as e:
            errors.append(f"{c}: {e}")
    sys.exit("libnvrtc.so.13 not found:\n  " + "\n  ".join(errors))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib")
    ap.add_argument("--arch", default="compute_90")
    ap.add_argument("--ptx", help="write the PTX here")
    args = ap.parse_args()

    nvrtc = load_nvrtc(args.lib)
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(rc, what):
        if rc != 0:
            sys.exit(f"{what}: {nvrtc.nvrtcGetErrorString(rc).decode()}")

    major, minor = ctypes.c_int(), ctypes.c_int()
    check(nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    print(f"NVRTC {major.value}.{minor.value}, {args.arch}")

    src = SOURCE.read_bytes()
    prog = ctypes.c_void_p()
    check(
        nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"decode.cu", 0, None, None),
        "nvrtcCreateProgram",
    )
    opts = [f"--gpu-architecture={args.arch}".encode(), b"--std=c++17", b"-lineinfo"]
    copts = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), copts)

    log_size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
    log = ctypes.create_string_buffer(log_size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    print("log:", text if text else "(empty)")
    check(rc, "nvrtcCompileProgram")
    if "warning" in text.lower():
        sys.exit("the compile log has warnings")

    ptx_size = ctypes.c_size_t()
    check(nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(ptx_size)), "nvrtcGetPTXSize")
    ptx = ctypes.create_string_buffer(ptx_size.value)
    check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    ptx = ptx.value.decode()
    if args.ptx:
        pathlib.Path(args.ptx).write_text(ptx)
        print("PTX written to", args.ptx)

    if ".entry flash_codec_decode" not in ptx:
        sys.exit("no entry flash_codec_decode in the PTX")
    shared = re.findall(r"\.shared \.align \d+ \.b8 (\w+)\[(\d+)\]", ptx)
    for name, size in shared:
        print(f"static shared: {name} {size} bytes")
    regs = {}
    for kind, n in re.findall(r"\.reg \.(\w+)\s+%\w+<(\d+)>", ptx):
        regs[kind] = regs.get(kind, 0) + int(n)
    print("PTX virtual registers (before allocation):", regs)
    print("maxntid:", re.findall(r"\.maxntid (\d+, \d+, \d+)", ptx))
    print("OK")


if __name__ == "__main__":
    main()
