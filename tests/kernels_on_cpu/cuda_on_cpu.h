// Just enough of CUDA to run src/cuda/kernels.cu on the CPU, for tests on machines without a
// GPU (tests/kernels_on_cpu.sh). Every thread of a block is an OS thread, so that warp
// shuffles exchange values between lanes in step as on the GPU and __syncthreads holds the
// whole block; blocks run one after another, so `__shared__` (a static here) is the running
// block's alone. Floating point is
// the CPU's: erff, expf and the like differ from CUDA's in the last bits, so outputs are
// compared with tolerances, but indices, layouts and control flow are the kernels' own.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

inline std::mutex atomics;
inline float atomicAdd(float *p, float v) {
    std::lock_guard<std::mutex> lock(atomics);
    const float old = *p;
    *p = old + v;
    return old;
}
inline double atomicAdd(double *p, double v) {
    std::lock_guard<std::mutex> lock(atomics);
    const double old = *p;
    *p = old + v;
    return old;
}

// The lanes of the warp being run: a barrier and one slot per lane for shuffles.
struct Warp {
    std::barrier<> *step;
    float slots[32];
    unsigned int a[32][4], b[32][2];
    const unsigned short *rows[32];
};
inline thread_local Warp *warp_now;
inline thread_local int lane_now;
// The running block's barrier, for __syncthreads.
inline thread_local std::barrier<> *block_now;

inline void __syncthreads() { block_now->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    warp_now->slots[lane_now] = v;
    warp_now->step->arrive_and_wait();
    const float got = warp_now->slots[lane_now ^ mask];
    warp_now->step->arrive_and_wait();
    return got;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (c += a b) for kernels that use it
// through mma_16816: each lane publishes its fragments, then computes its four outputs
// from the whole tiles, with the fragment layout of the PTX ISA:
//   a[r] holds A[g + 8 (r % 2)][2t + 8 (r / 2) + {0, 1}], b[r] holds B[2t + 8 r + {0, 1}][g],
//   c[r] is C[g + 8 (r / 2)][2t + r % 2], for g = lane / 4, t = lane % 4.
#define MIMCO_MMA_ON_CPU
inline float bf16_half(unsigned int word, int half) {
    return __uint_as_float(half ? word & 0xffff0000u : word << 16);
}
inline void mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    Warp &w = *warp_now;
    const int lane = lane_now, g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; r++) w.a[lane][r] = a[r];
    w.b[lane][0] = b[0];
    w.b[lane][1] = b[1];
    w.step->arrive_and_wait();
    for (int r = 0; r < 4; r++) {
        const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
        float acc = 0.f;
        for (int k = 0; k < 16; k++) {
            const float x = bf16_half(w.a[(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
            const float y = bf16_half(w.b[col * 4 + (k % 8) / 2][k / 8], k % 2);
            acc += x * y;
        }
        c[r] += acc;
    }
    w.step->arrive_and_wait();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 for kernels that use it through
// ldmatrix_x4 and ldmatrix_x4_trans: each lane publishes its row address (lanes 8i .. 8i + 7:
// rows 0 .. 7 of matrix i, 16-byte aligned), then reads its fragment of each matrix, row g,
// elements 2t and 2t + 1, or transposed rows 2t and 2t + 1 of column g.
inline void ldmatrix_lanes(unsigned (&r)[4], const unsigned short *row, bool trans) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        std::fprintf(stderr, "ldmatrix: a row address that is not 16-byte aligned\n");
        std::abort();
    }
    Warp &w = *warp_now;
    const int lane = lane_now, g = lane / 4, t = lane % 4;
    w.rows[lane] = row;
    w.step->arrive_and_wait();
    for (int i = 0; i < 4; i++) {
        const unsigned short *const *m = w.rows + 8 * i;
        const unsigned lo = trans ? m[2 * t][g] : m[g][2 * t];
        const unsigned hi = trans ? m[2 * t + 1][g] : m[g][2 * t + 1];
        r[i] = lo | (hi << 16);
    }
    w.step->arrive_and_wait();
}
inline void ldmatrix_x4(unsigned (&r)[4], const unsigned short *row) { ldmatrix_lanes(r, row, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const unsigned short *row) {
    ldmatrix_lanes(r, row, true);
}

// cp.async for kernels that use it through copy_async, copy_commit and copy_wait: each
// thread queues its copies and lands them in copy_wait, as late as the PTX ISA allows, so
// that a kernel reading a buffer before waiting for it reads stale bytes; with
// `copies_land_early` they land when asked for instead, so that a copy overwriting a buffer
// other warps still read shows (when the threads' timing lets it).
struct PendingCopy {
    void *dst;
    const void *src;
    int bytes, valid;
};
inline bool copies_land_early = false;
inline thread_local std::vector<PendingCopy> copies_open;
inline thread_local std::vector<std::vector<PendingCopy>> copies_committed;
inline void land(const PendingCopy &c) {
    std::memcpy(c.dst, c.src, (size_t)c.valid);
    std::memset((char *)c.dst + c.valid, 0, (size_t)(c.bytes - c.valid));
}
template <int bytes> inline void copy_async(void *dst, const void *src, int valid) {
    const auto misaligned = [](const void *p) { return reinterpret_cast<uintptr_t>(p) % bytes; };
    if (misaligned(dst) || misaligned(src) || valid < 0 || valid > bytes) {
        std::fprintf(stderr, "cp.async: misaligned address or bad source size\n");
        std::abort();
    }
    const PendingCopy c{dst, src, bytes, valid};
    if (copies_land_early)
        land(c);
    else
        copies_open.push_back(c);
}
inline void copy_commit() {
    copies_committed.push_back(std::move(copies_open));
    copies_open.clear();
}
template <int pending> inline void copy_wait() {
    while (copies_committed.size() > (size_t)pending) {
        for (const auto &c : copies_committed.front()) land(c);
        copies_committed.erase(copies_committed.begin());
    }
}

// Runs `kernel` over `grid` x `block`: blocks in turn, the threads of a block together. A
// thread that returns leaves its warp's and its block's barriers, so the others never wait
// on it.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    const unsigned warps = (threads + 31) / 32;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                std::barrier<> whole(threads);
                std::vector<std::unique_ptr<std::barrier<>>> steps;
                std::vector<Warp> w(warps);
                for (unsigned i = 0; i < warps; i++) {
                    const unsigned lanes = threads - 32 * i < 32 ? threads - 32 * i : 32;
                    steps.push_back(std::make_unique<std::barrier<>>(lanes));
                    w[i].step = steps.back().get();
                }
                std::vector<std::thread> running;
                for (unsigned t = 0; t < threads; t++)
                    running.emplace_back([&, t] {
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        warp_now = &w[t / 32];
                        lane_now = (int)(t % 32);
                        block_now = &whole;
                        kernel(static_cast<P>(args)...);
                        warp_now->step->arrive_and_drop();
                        whole.arrive_and_drop();
                    });
                for (auto &r : running) r.join();
            }
}
