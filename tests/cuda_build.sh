#!/usr/bin/env bash
# The CUDA build, checked on a machine without a GPU (tests/run.sh calls it): the fused
# kernels compile with NVRTC as they do at run time (ptxas reports their registers), and
# `--features cuda` compiles and documents with no warnings. Running the kernels needs a
# GPU: benches/gpu.sh.
#
# Uses nvcc from PATH when there is one; otherwise installs the CUDA 13.0 compiler, NVRTC
# and headers from PyPI wheels into target/cuda-venv (about 2 minutes once). The first
# compile of Candle's own CUDA kernels takes ~13 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc > /dev/null; then
    venv=target/cuda-venv
    if [ ! -f "$venv/ready" ]; then
        python3 -m venv "$venv" &&
            "$venv/bin/pip" install --quiet --disable-pip-version-check \
                nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
                nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 ||
            {
                mkdir -p target/tmp
                echo "SKIPPED CUDA build check: pip could not install the CUDA 13.0 toolchain" > target/tmp/SKIPPED-cuda-build.txt
                exit 0
            }
        touch "$venv/ready"
    fi
    cu=$(echo "$PWD/$venv"/lib/python3*/site-packages/nvidia/cu13)
    export CUDA_HOME=$cu PATH=$cu/bin:$PATH LD_LIBRARY_PATH=$cu/lib:${LD_LIBRARY_PATH:-}
else
    # libnvrtc sits beside the nvcc in use (lib64 in a toolkit, lib in the PyPI wheels).
    cu=$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)
    export LD_LIBRARY_PATH=$cu/lib64:$cu/lib:${LD_LIBRARY_PATH:-}
fi
# Candle's kernels are built for Hopper unless told otherwise (no GPU to ask here).
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
# ptxas (beside nvcc) reports the attention kernels' registers and shared memory, and any
# kernel that spills: what bounds their blocks per SM, which no CPU test sees.
python3 tests/nvrtc_check.py --registers "$(dirname "$(command -v nvcc)")/ptxas" \
    src/cuda/kernels.cu src/cuda/flash.cu
cargo clippy --release --locked --features cuda --all-targets --target-dir target-cuda --quiet -- -D warnings
RUSTDOCFLAGS=-Dwarnings cargo doc --release --locked --features cuda --target-dir target-cuda \
    --no-deps --quiet -p mimco
echo "cuda build check: kernels compile with NVRTC; --features cuda compiles and documents without warnings"
