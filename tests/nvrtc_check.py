"""Compiles src/cuda/kernels.cu and flash.cu (one source, in that order) with NVRTC, as
mimco does at run time, for Hopper (sm_90) and Ampere (sm_80), and checks that every kernel
the Rust side launches is in the PTX. Needs libnvrtc (CUDA 13) on the loader path; no GPU.

    python3 tests/nvrtc_check.py [--registers PTXAS] src/cuda/kernels.cu src/cuda/flash.cu

With `--registers`, also assembles the sm_90 PTX with that `ptxas` and prints each
attention kernel's registers, spills and shared memory, and any other kernel that spills:
registers per thread bound how many blocks an SM holds, which no CPU test sees.
"""

import ctypes
import ctypes.util
import os
import re
import subprocess
import sys
import tempfile

WIDTHS = [1, 2, 4, 8, 12, 16, 24, 32]


def expected():
    names = ["adamw_f32"]
    for stage in ("fwd", "bwd"):
        for e in WIDTHS:
            names += [f"layer_norm_{stage}_f32_{o}_{e}" for o in ("f32", "bf16")]
            names += [f"softmax_{stage}_{t}_{t}_{e}" for t in ("f32", "bf16")]
        names += [f"bias_act_{stage}_{t}" for t in ("f32", "bf16")]
    for t in ("f32", "bf16"):
        names += [f"column_sum_{t}"]
    for u in (1, 2, 4, 8, 16):
        names += [f"split_heads_u{u}", f"merge_heads_u{u}"]
    names += ["scatter_add_rows_f32", "bias_add_f32_f32", "bias_add_bf16_bf16", "bias_add_bf16_f32",
              "bias_add_res_f32_f32", "bias_add_res_bf16_f32",
              "info_nce_fwd_f32", "info_nce_bwd_f32", "normalize_u8_f32",
              "patchify_f32_f32", "patchify_f32_bf16", "sum_squares_f32",
              "tokens_fwd_f32", "tokens_bwd_f32", "tokens_token_grad_f32", "crop_resize_u8"]
    for e in (32, 64):
        names += [f"flash_fwd_bf16_{e}", f"flash_bwd_dq_bf16_{e}", f"flash_bwd_dkv_bf16_{e}"]
    return names


def compile_ptx(nvrtc, src, arch):
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"mimco_kernels.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode()]
    result = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if result != 0:
        sys.exit(f"NVRTC ({arch}) failed:\n{log.value.decode()}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def registers(ptxas, ptx):
    """ptxas -v on sm_90 PTX: (kernel, its resource line) for the attention kernels and
    every kernel that spills."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernels.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-arch=sm_90", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"ptxas failed:\n{run.stderr}")
    rows, kernel, spills = [], None, ""
    for line in run.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            kernel = m.group(1)
        elif "spill stores" in line:
            spills = line.split("stack frame,", 1)[-1].strip()
        elif m := re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line):
            if kernel.startswith("flash_") or not spills.startswith("0 bytes spill stores, 0"):
                rows.append((kernel, f"{m.group(1)} registers, {m.group(2)} bytes smem, {spills}"))
    return sorted(rows)


def main():
    args = sys.argv[1:]
    ptxas = None
    if args[:1] == ["--registers"]:
        ptxas, args = args[1], args[2:]
    src = b"".join(open(path, "rb").read() for path in args)
    nvrtc = None
    for name in ("libnvrtc.so.13", "libnvrtc.so", ctypes.util.find_library("nvrtc")):
        try:
            nvrtc = ctypes.CDLL(name)
            break
        except (OSError, TypeError):
            continue
    if nvrtc is None:
        sys.exit("libnvrtc not found: put the CUDA 13 lib folder on LD_LIBRARY_PATH")
    for arch in ("sm_90", "sm_80"):
        ptx = compile_ptx(nvrtc, src, arch)
        entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
        missing = [n for n in expected() if n not in entries]
        if missing:
            sys.exit(f"{arch}: kernels missing from the PTX: {missing}")
        print(f"NVRTC {arch}: {len(entries)} kernels, all {len(expected())} that mimco launches")
        if ptxas and arch == "sm_90":
            for kernel, resources in registers(ptxas, ptx):
                print(f"  {kernel}: {resources}")


if __name__ == "__main__":
    main()
