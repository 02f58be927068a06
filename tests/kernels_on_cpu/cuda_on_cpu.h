// Just enough of CUDA to run src/cuda/kernels.cu on the CPU, for tests on machines without a
// GPU (tests/kernels_on_cpu.sh). Every thread of a warp is an OS thread, so that warp
// shuffles exchange values between lanes in step as on the GPU; warps and blocks run one
// after another (the kernels use no shared memory and no block barrier). Floating point is
// the CPU's: erff, expf and the like differ from CUDA's in the last bits, so outputs are
// compared with tolerances, but indices, layouts and control flow are the kernels' own.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
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
};
inline thread_local Warp *warp_now;
inline thread_local int lane_now;

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    warp_now->slots[lane_now] = v;
    warp_now->step->arrive_and_wait();
    const float got = warp_now->slots[lane_now ^ mask];
    warp_now->step->arrive_and_wait();
    return got;
}

// Runs `kernel` over `grid` x `block`: blocks and warps in turn, the lanes of a warp
// together. A lane that returns leaves the warp's barrier, so the others never wait on it.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++)
                for (unsigned first = 0; first < threads; first += 32) {
                    const unsigned lanes = threads - first < 32 ? threads - first : 32;
                    std::barrier<> step(lanes);
                    Warp w{&step, {}};
                    std::vector<std::thread> running;
                    for (unsigned l = 0; l < lanes; l++)
                        running.emplace_back([&, l] {
                            const unsigned t = first + l;
                            threadIdx = {t % block.x, (t / block.x) % block.y,
                                         t / (block.x * block.y)};
                            blockIdx = {bx, by, bz};
                            warp_now = &w;
                            lane_now = (int)l;
                            kernel(static_cast<P>(args)...);
                            step.arrive_and_drop();
                        });
                    for (auto &r : running) r.join();
                }
}
