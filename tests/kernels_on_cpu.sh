#!/usr/bin/env bash
# The CUDA kernels (src/cuda/kernels.cu, flash.cu) run on the CPU against plain loops
# (tests/kernels_on_cpu/), so that their indexing and arithmetic are tested on machines
# without a GPU. Needs g++ 11 or newer (C++20); tests/run.sh calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v g++ > /dev/null; then
    mkdir -p target/tmp
    echo "SKIPPED CUDA kernels on CPU: no g++ (apt-get install g++)" > target/tmp/SKIPPED-kernels-on-cpu.txt
    exit 0
fi
mkdir -p target/kernels-on-cpu
# With AddressSanitizer and UBSan the buffers' surroundings are poisoned, so a read or write
# past a buffer fails (about a minute; MIMCO_ASAN=0 builds it plain, a few seconds).
sanitize=()
if [ "${MIMCO_ASAN:-1}" = 1 ]; then sanitize=(-fsanitize=address,undefined -fno-sanitize-recover=all); fi
g++ -std=c++20 -O1 -g -pthread -Wall -Wextra -Werror -Wno-unknown-pragmas -Wno-unused-parameter \
    "${sanitize[@]}" -o target/kernels-on-cpu/kernels tests/kernels_on_cpu/kernels.cpp
target/kernels-on-cpu/kernels
