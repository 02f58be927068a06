// mimco's fused CUDA kernels, compiled at run time by NVRTC for the GPU in use
// (src/cuda/mod.rs). No headers: bf16 is handled as its bit pattern, so NVRTC needs no
// include path. All arithmetic is f32; bf16 only at loads and stores.
//
// Names: <op>_<in dtype>_<out dtype>_<E>, where E is the number of row elements each lane
// of a warp holds (a row of up to 32*E elements sits in registers).

typedef unsigned short bf16;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned int)v) << 16); }

__device__ __forceinline__ void put(float *p, long i, float v) { p[i] = v; }
__device__ __forceinline__ bf16 to_bf16(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (bf16)(u >> 16);
}
__device__ __forceinline__ void put(bf16 *p, long i, float v) { p[i] = to_bf16(v); }

// Eight consecutive elements as 16-byte accesses (one for bf16, two for f32): `p` must be
// 16-byte aligned.
__device__ __forceinline__ void load8(const float *p, float (&v)[8]) {
    const float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16 *p, float (&v)[8]) {
    const uint4 u = *(const uint4 *)p;
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void store8(float *p, const float (&v)[8]) {
    ((float4 *)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4 *)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16 *p, const float (&v)[8]) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
        w[k] = (unsigned int)to_bf16(v[2 * k]) | ((unsigned int)to_bf16(v[2 * k + 1]) << 16);
    *(uint4 *)p = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ bool aligned16(const void *p) {
    return ((unsigned long long)p & 15ull) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Row `r` of `d` elements into E registers per lane (element lane + 32 i), zero past d.
template <typename T, int E>
__device__ __forceinline__ void load_row(const T *r, int d, float (&v)[E]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < E; i++) {
        const int c = lane + 32 * i;
        v[i] = c < d ? to_f32(r[c]) : 0.f;
    }
}

// Mean and 1 / sqrt(biased variance + eps) of a row loaded by load_row.
template <int E>
__device__ __forceinline__ void row_stats(const float (&v)[E], int d, float eps, float &mean,
                                          float &rstd) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < E; i++) s += v[i];
    mean = warp_sum(s) / d;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < E; i++) {
        const float t = lane + 32 * i < d ? v[i] - mean : 0.f;
        q += t * t;
    }
    rstd = rsqrtf(warp_sum(q) / d + eps);
}

// LayerNorm forward, one warp per row: y = (x - mean) * rstd * w + b.
template <typename TO, int E>
__device__ void layer_norm_fwd(const float *x, const float *w, const float *b, TO *y, int rows,
                               int d, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float v[E], mean, rstd;
    load_row<float, E>(x + (long)row * d, d, v);
    row_stats<E>(v, d, eps, mean, rstd);
#pragma unroll
    for (int i = 0; i < E; i++) {
        const int c = lane + 32 * i;
        if (c < d) put(y, (long)row * d + c, (v[i] - mean) * rstd * w[c] + b[c]);
    }
}

// LayerNorm backward. `out` holds dx (rows*d), then dw (d), then db (d); dw and db must be
// zero on entry (each warp adds its rows' sums once per column). `skip` (rows*d, or null)
// is added to dx: the gradient that reaches x past the norm, by a residual connection.
// `dx_bf16` (rows*d, or null) receives dx rounded to bf16 as well: the residual stream's
// gradient as the bf16 layers before the norm read it, without a cast pass.
//   xhat = (x - mean) * rstd, g = dy * w,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dw = sum dy * xhat, db = sum dy.
template <typename TG, int E>
__device__ void layer_norm_bwd(const float *x, const float *w, const TG *dy, const float *skip,
                               float *out, bf16 *dx_bf16, int rows, int d, float eps) {
    const int warps = gridDim.x * (blockDim.x >> 5);
    const int lane = threadIdx.x & 31;
    float *dw = out + (long)rows * d;
    float *db = dw + d;
    // The block's dw and db, summed from its warps here and added to the output once per
    // block: one global atomic per warp and column was 3.1M atomics on 768 addresses for
    // a ViT-S/16 batch (1,024 blocks of 4 warps), a quarter of that now; the backward
    // went 4.73 -> 2.33 ms per step on an H200 with the skip gradient's early load.
    __shared__ float block_sums[2 * 32 * E];
    for (int c = threadIdx.x; c < 2 * d; c += blockDim.x) block_sums[c] = 0.f;
    __syncthreads();
    float acc_w[E], acc_b[E];
#pragma unroll
    for (int i = 0; i < E; i++) acc_w[i] = acc_b[i] = 0.f;
    for (int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
         row += warps) {
        float v[E], g[E], s[E], mean, rstd;
        load_row<float, E>(x + (long)row * d, d, v);
        load_row<TG, E>(dy + (long)row * d, d, g);
        // The skip gradient loaded with the rest, not after the row's reductions.
        if (skip) load_row<float, E>(skip + (long)row * d, d, s);
        row_stats<E>(v, d, eps, mean, rstd);
        float sg = 0.f, sgx = 0.f;
#pragma unroll
        for (int i = 0; i < E; i++) {
            const int c = lane + 32 * i;
            v[i] = (v[i] - mean) * rstd;  // xhat
            if (c < d) {
                acc_w[i] += g[i] * v[i];
                acc_b[i] += g[i];
                g[i] *= w[c];
                sg += g[i];
                sgx += g[i] * v[i];
            }
        }
        sg = warp_sum(sg) / d;
        sgx = warp_sum(sgx) / d;
#pragma unroll
        for (int i = 0; i < E; i++) {
            const int c = lane + 32 * i;
            if (c < d) {
                const float dx = rstd * (g[i] - sg - v[i] * sgx) + (skip ? s[i] : 0.f);
                out[(long)row * d + c] = dx;
                if (dx_bf16) dx_bf16[(long)row * d + c] = to_bf16(dx);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < E; i++) {
        const int c = lane + 32 * i;
        if (c < d) {
            atomicAdd(block_sums + c, acc_w[i]);
            atomicAdd(block_sums + d + c, acc_b[i]);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        atomicAdd(dw + c, block_sums[c]);
        atomicAdd(db + c, block_sums[d + c]);
    }
}

// Softmax of scale * x over rows of `cols` elements `ld` apart, one warp per row (in
// place is fine: each lane holds its elements before writing them).
template <typename T, int E>
__device__ void softmax_fwd(const T *x, T *y, int rows, int cols, int ld, float scale) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T *xr = x + (long)row * ld;
    float v[E];
    float m = __int_as_float(0xff800000);
#pragma unroll
    for (int i = 0; i < E; i++) {
        const int c = lane + 32 * i;
        v[i] = c < cols ? to_f32(xr[c]) * scale : __int_as_float(0xff800000);
        m = fmaxf(m, v[i]);
    }
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < E; i++) {
        const int c = lane + 32 * i;
        v[i] = c < cols ? __expf(v[i] - m) : 0.f;
        s += v[i];
    }
    const float inv = 1.f / warp_sum(s);
#pragma unroll
    for (int i = 0; i < E; i++) {
        const int c = lane + 32 * i;
        if (c < cols) put(y, (long)row * ld + c, v[i] * inv);
    }
}

// Softmax backward from its output y: dx = scale * y * (dy - sum(dy * y)).
template <typename T, int E>
__device__ void softmax_bwd(const T *y, const T *dy, T *dx, int rows, int cols, int ld,
                            float scale) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const long base = (long)row * ld;
    float yv[E], gv[E];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < E; i++) {
        const int c = lane + 32 * i;
        yv[i] = c < cols ? to_f32(y[base + c]) : 0.f;
        gv[i] = c < cols ? to_f32(dy[base + c]) : 0.f;
        s += yv[i] * gv[i];
    }
    s = warp_sum(s);
#pragma unroll
    for (int i = 0; i < E; i++) {
        const int c = lane + 32 * i;
        if (c < cols) put(dx, base + c, scale * yv[i] * (gv[i] - s));
    }
}

// AdamW, PyTorch's formulation, over every parameter in one launch, in place: row
// blockIdx.y of the grid updates tensor blockIdx.y of `table`. The gradient is
// g * grad_scale (averaging and clipping); `decay` is 1 - lr * weight_decay, or 1 for a
// parameter without weight decay. The host writes the table as six 8-byte words per
// tensor (four addresses, n, and decay's bits in the low half of the last).
struct AdamWTensor {
    float *p;
    const float *g;
    float *m;
    float *v;
    long n;
    float decay;
    int unused;
};

extern "C" __global__ void adamw_f32(const AdamWTensor *table, float lr, float beta1,
                                     float beta2, float eps, float c1, float c2,
                                     float grad_scale) {
    const AdamWTensor t = table[blockIdx.y];
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < t.n;
         i += (long)gridDim.x * blockDim.x) {
        const float gi = t.g[i] * grad_scale;
        const float m = beta1 * t.m[i] + (1.f - beta1) * gi;
        const float v = beta2 * t.v[i] + (1.f - beta2) * gi * gi;
        t.p[i] = t.p[i] * t.decay - lr * (m / c1) / (sqrtf(v / c2) + eps);
        t.m[i] = m;
        t.v[i] = v;
    }
}

// GELU (erf form, as torch.nn.GELU()) and its derivative.
__device__ __forceinline__ float gelu(float z) { return 0.5f * z * (1.f + erff(z * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad(float z) {
    return 0.5f * (1.f + erff(z * 0.70710678118654752f)) +
           z * 0.39894228040143268f * __expf(-0.5f * z * z);
}

// A grid-stride loop over the n elements of a `cols`-wide row-major matrix, W at a time
// (W divides cols), with the column of each run kept by addition (no 64-bit division per
// element).
#define FOR_EACH_RUN(n, cols, W, i, c)                                                        \
    const long step_ = (long)gridDim.x * blockDim.x * (W);                                    \
    const int step_cols_ = (int)(step_ % cols);                                               \
    long i = (blockIdx.x * (long)blockDim.x + threadIdx.x) * (W);                             \
    for (int c = (int)(i % cols); i < n; i += step_, c += step_cols_, c -= c >= cols ? cols : 0)

// Elementwise kernels over rows take eight elements at a time (16-byte accesses) where
// rows are whole groups of eight and every buffer is 16-byte aligned (fresh allocations
// are; the ViT's widths are multiples of eight), one at a time otherwise.
__device__ __forceinline__ bool by_eight(int cols, const void *a, const void *b, const void *c) {
    return cols % 8 == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

// act(z) and dy * act'(z). act 0: none, 1: GELU, 2: ReLU.
__device__ __forceinline__ float act_fwd(float z, int act) {
    return act == 1 ? gelu(z) : (act == 2 ? fmaxf(z, 0.f) : z);
}
__device__ __forceinline__ float act_bwd(float g, float z, int act) {
    return act == 1 ? g * gelu_grad(z) : (act == 2 ? (z > 0.f ? g : 0.f) : g);
}

// y = act(x + bias) for x of `rows` x `cols`, bias f32 of `cols`.
template <typename T>
__device__ void bias_act_fwd(const T *x, const float *bias, T *y, long n, int cols, int act) {
    if (by_eight(cols, x, y, y)) {
        FOR_EACH_RUN(n, cols, 8, i, c) {
            float v[8];
            load8(x + i, v);
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = act_fwd(v[k] + bias[c + k], act);
            store8(y + i, v);
        }
        return;
    }
    FOR_EACH_RUN(n, cols, 1, i, c) { put(y, i, act_fwd(to_f32(x[i]) + bias[c], act)); }
}

// dz = dy * act'(x + bias).
template <typename T>
__device__ void bias_act_bwd(const T *x, const float *bias, const T *dy, T *dz, long n, int cols,
                             int act) {
    if (by_eight(cols, x, dy, dz)) {
        FOR_EACH_RUN(n, cols, 8, i, c) {
            float v[8], g[8];
            load8(x + i, v);
            load8(dy + i, g);
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = act_bwd(g[k], v[k] + bias[c + k], act);
            store8(dz + i, v);
        }
        return;
    }
    FOR_EACH_RUN(n, cols, 1, i, c) {
        put(dz, i, act_bwd(to_f32(dy[i]), to_f32(x[i]) + bias[c], act));
    }
}

// out[c] += sum over this block's rows of x[r, c] (out zeroed first). Grid: (column tiles
// of blockDim.x, row chunks).
template <typename T>
__device__ void column_sum(const T *x, float *out, int rows, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const int chunk = (rows + gridDim.y - 1) / gridDim.y;
    const int r0 = blockIdx.y * chunk;
    const int r1 = rows < r0 + chunk ? rows : r0 + chunk;
    float s = 0.f;
    for (int r = r0; r < r1; r++) s += to_f32(x[(long)r * cols + c]);
    atomicAdd(out + c, s);
}

#define ELEMENTWISE(T, N)                                                                     \
    extern "C" __global__ void bias_act_fwd_##N(const T *x, const float *bias, T *y, long n, \
                                                int cols, int act) {                          \
        bias_act_fwd<T>(x, bias, y, n, cols, act);                                            \
    }                                                                                         \
    extern "C" __global__ void bias_act_bwd_##N(const T *x, const float *bias, const T *dy,  \
                                                T *dz, long n, int cols, int act) {           \
        bias_act_bwd<T>(x, bias, dy, dz, n, cols, act);                                       \
    }                                                                                         \
    extern "C" __global__ void column_sum_##N(const T *x, float *out, int rows, int cols) {  \
        column_sum<T>(x, out, rows, cols);                                                    \
    }

ELEMENTWISE(float, f32)
ELEMENTWISE(bf16, bf16)

#define LN(TO, NO, E)                                                                         \
    extern "C" __global__ void layer_norm_fwd_f32_##NO##_##E(                                \
        const float *x, const float *w, const float *b, TO *y, int rows, int d, float eps) { \
        layer_norm_fwd<TO, E>(x, w, b, y, rows, d, eps);                                      \
    }                                                                                         \
    extern "C" __global__ void layer_norm_bwd_f32_##NO##_##E(                                \
        const float *x, const float *w, const TO *dy, const float *skip, float *out,          \
        bf16 *dx_bf16, int rows, int d, float eps) {                                          \
        layer_norm_bwd<TO, E>(x, w, dy, skip, out, dx_bf16, rows, d, eps);                    \
    }

#define SOFTMAX(T, N, E)                                                                      \
    extern "C" __global__ void softmax_fwd_##N##_##N##_##E(const T *x, T *y, int rows,       \
                                                           int cols, int ld, float scale) {   \
        softmax_fwd<T, E>(x, y, rows, cols, ld, scale);                                       \
    }                                                                                         \
    extern "C" __global__ void softmax_bwd_##N##_##N##_##E(const T *y, const T *dy, T *dx,   \
                                                           int rows, int cols, int ld,        \
                                                           float scale) {                     \
        softmax_bwd<T, E>(y, dy, dx, rows, cols, ld, scale);                                  \
    }

#define EACH_WIDTH(M, A, B) M(A, B, 1) M(A, B, 2) M(A, B, 4) M(A, B, 8) M(A, B, 12) M(A, B, 16) M(A, B, 24) M(A, B, 32)

EACH_WIDTH(LN, float, f32)
EACH_WIDTH(LN, bf16, bf16)
EACH_WIDTH(SOFTMAX, float, f32)
EACH_WIDTH(SOFTMAX, bf16, bf16)

// Attention heads: x (B, N, S, H, E) token-major (the qkv projection's output, S = 3, or
// an attention output or its gradient, S = 1) to y (S, B, H, N, E) head-major. A chunk of
// E contiguous elements moves as V units of type U (16, 8, 4, 2 or 1 bytes: the widest
// that the chunk's bytes and the buffers' addresses allow), one unit per thread: 16-byte
// units for heads of 64 bf16 or f32 elements, where 2-byte copies took several times the
// time the bytes need (Nsight Compute, H200).
struct HeadChunk {
    int b, tok, s, h;
};

// Chunk `ch` of the token-major (B, N, S, H) order.
__device__ __forceinline__ HeadChunk head_chunk(int ch, int N, int S, int H) {
    HeadChunk c;
    c.h = ch % H;
    ch /= H;
    c.s = ch % S;
    ch /= S;
    c.tok = ch % N;
    c.b = ch / N;
    return c;
}

template <typename U>
__device__ void split_heads(const U *x, U *y, int B, int N, int S, int H, int V) {
    const long total = (long)B * N * S * H * V;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        const int ch = (int)(i / V);
        const HeadChunk c = head_chunk(ch, N, S, H);
        y[((((long)c.s * B + c.b) * H + c.h) * N + c.tok) * V + (i - (long)ch * V)] = x[i];
    }
}

// The inverse for S parts held apart: part s of y (B, N, S, H, E) from p[s], each
// (B, H, N, E) head-major (S at most 3).
template <typename U>
__device__ void merge_heads(const U *p0, const U *p1, const U *p2, U *y, int B, int N, int S,
                            int H, int V) {
    const long total = (long)B * N * S * H * V;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        const int ch = (int)(i / V);
        const HeadChunk c = head_chunk(ch, N, S, H);
        const U *p = c.s == 0 ? p0 : (c.s == 1 ? p1 : p2);
        y[i] = p[(((long)c.b * H + c.h) * N + c.tok) * V + (i - (long)ch * V)];
    }
}

// out[ids[r], :] += g[r, :] for the `n` rows of g (`cols` wide); out zeroed first. The
// backward of picking rows by index (ids may repeat).
__device__ void scatter_add_rows(const float *g, const unsigned int *ids, float *out, int n,
                                 int cols) {
    const long total = (long)n * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        const long r = i / cols;
        atomicAdd(out + (long)ids[r] * cols + (i - r * cols), g[i]);
    }
}

extern "C" __global__ void scatter_add_rows_f32(const float *g, const unsigned int *ids,
                                                float *out, int n, int cols) {
    scatter_add_rows(g, ids, out, n, cols);
}

// The ViT's token stream from the patch embeddings x (B, N, D), with SimMIM's mask (B, N)
// of 0 and 1: out (B, 1 + N, D), out[b, 0] = cls + pos[0] and out[b, 1 + n] =
// (mask[b, n] ? token : x[b, n]) + pos[1 + n], the composed x * (1 - m) + token * m, the
// CLS token's concatenation and the position add in one pass. params = token (D) | cls
// (D) | pos ((1 + N) D). A block per output row.
extern "C" __global__ void tokens_fwd_f32(const float *x, const float *mask,
                                          const float *params, float *out, int N, int D) {
    const long row = blockIdx.x;
    const int t = (int)(row % (N + 1));
    const long b = row / (N + 1);
    const float *pos = params + 2 * D + (long)t * D;
    const float *src = params + D; // the CLS token
    if (t > 0) {
        const long patch = b * N + t - 1;
        src = mask[patch] != 0.f ? params : x + patch * D;
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[row * D + d] = src[d] + pos[d];
}

// dx of tokens_fwd_f32 for its output gradient dy (B, 1 + N, D): dy at the patch's row
// where it was kept, 0 where the mask token replaced it. A block per row of dx (B N).
extern "C" __global__ void tokens_bwd_f32(const float *dy, const float *mask, float *dx, int N,
                                          int D) {
    const long patch = blockIdx.x;
    const long b = patch / N;
    const float keep = mask[patch] != 0.f ? 0.f : 1.f;
    const float *src = dy + (patch + b + 1) * D; // row b (1 + N) + 1 + n
    for (int d = threadIdx.x; d < D; d += blockDim.x) dx[patch * D + d] = keep * src[d];
}

// The mask token's gradient: out[d] += the sum of dy[b, 1 + n, d] over the masked (b, n)
// of the `patches` = B N rows; out zeroed first. Columns across threads, rows split over
// blockIdx.y, as column_sum.
extern "C" __global__ void tokens_token_grad_f32(const float *dy, const float *mask, float *out,
                                                 int patches, int N, int D) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    const int chunk = (patches + gridDim.y - 1) / gridDim.y;
    const int r0 = blockIdx.y * chunk;
    const int r1 = patches < r0 + chunk ? patches : r0 + chunk;
    float s = 0.f;
    for (int r = r0; r < r1; r++)
        if (mask[r] != 0.f) s += dy[((long)r + r / N + 1) * D + d];
    atomicAdd(out + d, s);
}

#define HEADS(U, BYTES)                                                                       \
    extern "C" __global__ void split_heads_u##BYTES(const U *x, U *y, int B, int Ntok, int S, \
                                                    int H, int V) {                           \
        split_heads<U>(x, y, B, Ntok, S, H, V);                                               \
    }                                                                                         \
    extern "C" __global__ void merge_heads_u##BYTES(const U *p0, const U *p1, const U *p2,   \
                                                    U *y, int B, int Ntok, int S, int H,      \
                                                    int V) {                                  \
        merge_heads<U>(p0, p1, p2, y, B, Ntok, S, H, V);                                      \
    }

HEADS(uint4, 16)
HEADS(uint2, 8)
HEADS(unsigned int, 4)
HEADS(unsigned short, 2)
HEADS(unsigned char, 1)

// y = x + bias, written in another dtype: a linear layer's bias, with the cast of its
// output to the residual stream's f32 folded in.
template <typename TI, typename TO>
__device__ void bias_add(const TI *x, const float *bias, TO *y, long n, int cols) {
    if (by_eight(cols, x, y, y)) {
        FOR_EACH_RUN(n, cols, 8, i, c) {
            float v[8];
            load8(x + i, v);
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] += bias[c + k];
            store8(y + i, v);
        }
        return;
    }
    FOR_EACH_RUN(n, cols, 1, i, c) { put(y, i, to_f32(x[i]) + bias[c]); }
}

#define BIAS_ADD(TI, NI, TO, NO)                                                              \
    extern "C" __global__ void bias_add_##NI##_##NO(const TI *x, const float *bias, TO *y,   \
                                                    long n, int cols) {                       \
        bias_add<TI, TO>(x, bias, y, n, cols);                                                \
    }

BIAS_ADD(float, f32, float, f32)
BIAS_ADD(bf16, bf16, bf16, bf16)
BIAS_ADD(bf16, bf16, float, f32)

// y = x + bias + res in f32: a linear layer's bias and the residual join after it (the
// block's `x + proj(...)` and `x1 + fc2(...)`) in one pass, where no gradient is recorded.
template <typename TI>
__device__ void bias_add_res(const TI *x, const float *bias, const float *res, float *y, long n,
                             int cols) {
    if (by_eight(cols, x, res, y)) {
        FOR_EACH_RUN(n, cols, 8, i, c) {
            float v[8], r[8];
            load8(x + i, v);
            load8(res + i, r);
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] += bias[c + k] + r[k];
            store8(y + i, v);
        }
        return;
    }
    FOR_EACH_RUN(n, cols, 1, i, c) { y[i] = to_f32(x[i]) + bias[c] + res[i]; }
}

#define BIAS_ADD_RES(TI, NI)                                                                  \
    extern "C" __global__ void bias_add_res_##NI##_f32(const TI *x, const float *bias,       \
                                                       const float *res, float *y, long n,    \
                                                       int cols) {                            \
        bias_add_res<TI>(x, bias, res, y, n, cols);                                           \
    }

BIAS_ADD_RES(float, f32)
BIAS_ADD_RES(bf16, bf16)

// InfoNCE against a queue, one warp per row r of the logits [pos_r, neg_r] / tau, where
// pos_r = q_r.k_r and neg = q queue^T (f32): the row's logsumexp.
__device__ float info_nce_lse(const float *nr, float pos, int K, float inv_tau) {
    const int lane = threadIdx.x & 31;
    float m = pos * inv_tau;
    for (int j = lane; j < K; j += 32) m = fmaxf(m, nr[j] * inv_tau);
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < K; j += 32) s += expf(nr[j] * inv_tau - m);
    return m + logf(warp_sum(s) + expf(pos * inv_tau - m));
}

// loss[r] = logsumexp(logits_r) - logits_r[0], for q, k (n, C) and neg (n, K).
extern "C" __global__ void info_nce_fwd_f32(const float *q, const float *k, const float *neg,
                                            float *loss, int n, int K, int C, float inv_tau) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= n) return;
    const int lane = threadIdx.x & 31;
    float d = 0.f;
    for (int c = lane; c < C; c += 32) d += q[(long)r * C + c] * k[(long)r * C + c];
    const float pos = warp_sum(d);
    const float lse = info_nce_lse(neg + (long)r * K, pos, K, inv_tau);
    if (lane == 0) loss[r] = lse - pos * inv_tau;
}

// dneg[r, j] = g[r] / tau * softmax(logits_r)[1 + j]: the gradient of the g-weighted
// losses with respect to neg, from neg (n, K) and pos (n). That of the positive logit is
// minus the row's sum of it (the softmax sums to one).
extern "C" __global__ void info_nce_bwd_f32(const float *neg, const float *pos, const float *g,
                                            float *dneg, int n, int K, float inv_tau) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= n) return;
    const float *nr = neg + (long)r * K;
    const float lse = info_nce_lse(nr, pos[r], K, inv_tau);
    const float gr = g[r] * inv_tau;
    float *dr = dneg + (long)r * K;
    for (int j = threadIdx.x & 31; j < K; j += 32) dr[j] = gr * expf(nr[j] * inv_tau - lse);
}

// uint8 images -> f32 x * scale[c] + shift[c] (the trainer's normalisation), for `planes`
// planes of `plane` pixels, channel c = plane index % 3. Grid: (pixel tiles, planes).
extern "C" __global__ void normalize_u8_f32(const unsigned char *x, float *y, int plane,
                                            float s0, float s1, float s2, float t0, float t1,
                                            float t2) {
    const int c = blockIdx.y % 3;
    const float s = c == 0 ? s0 : (c == 1 ? s1 : s2);
    const float t = c == 0 ? t0 : (c == 1 ? t1 : t2);
    const long base = (long)blockIdx.y * plane;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < plane; i += gridDim.x * blockDim.x)
        y[base + i] = (float)x[base + i] * s + t;
}

// Images (B, C, H, W) f32 -> patches (B * gh * gw, C * p * p) in T, each row one p x p
// patch in (channel, row, column) order: the stride-p convolution as a matmul's input.
template <typename T>
__device__ void patchify(const float *x, T *y, int B, int C, int H, int W, int p) {
    const int gh = H / p, gw = W / p;
    const int n = B * C * H * W;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int t = i;
        const int px = t % p;
        t /= p;
        const int py = t % p;
        t /= p;
        const int c = t % C;
        t /= C;
        const int gx = t % gw;
        t /= gw;
        const int gy = t % gh;
        const int b = t / gh;
        put(y, i, x[(((long)b * C + c) * H + gy * p + py) * W + gx * p + px]);
    }
}

extern "C" __global__ void patchify_f32_f32(const float *x, float *y, int B, int C, int H, int W,
                                            int p) {
    patchify<float>(x, y, B, C, H, W, p);
}
extern "C" __global__ void patchify_f32_bf16(const float *x, bf16 *y, int B, int C, int H, int W,
                                             int p) {
    patchify<bf16>(x, y, B, C, H, W, p);
}

// out[0] += the sum of g^2 over every gradient in `table` (an address and a length per
// gradient, 8 bytes each; row blockIdx.y of the grid reads gradient blockIdx.y): f32 within
// each warp, f64 across the block's warps, then one atomic per block that found work (the
// gradient norm for clipping, in one launch). At most 1024 threads per block.
extern "C" __global__ void sum_squares_f32(const long *table, double *out) {
    const float *g = (const float *)table[2 * blockIdx.y];
    const long n = table[2 * blockIdx.y + 1];
    const long first = blockIdx.x * (long)blockDim.x;
    if (first >= n) return;  // the whole block: the rows of small gradients
    float s = 0.f;
    for (long i = first + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) s += g[i] * g[i];
    s = warp_sum(s);
    __shared__ double warps[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) warps[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0;
        for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++) total += warps[w];
        atomicAdd(out, total);
    }
}

// One image of a batch that nvJPEG decoded (planar RGB, `width` x `height`, planes of
// width * height bytes from `src`), the crop to cut out of it (source pixels) and the
// slot of the batch its output goes to. 40 bytes, as `nvjpeg::CropJob` on the Rust side.
struct CropJob {
    const unsigned char *src;
    int width, height;
    int left, top, crop_width, crop_height;
    int flip, slot;
};

// The bilinear filter: a triangle of support 1.
__device__ inline float triangle(float x) {
    x = fabsf(x);
    return x < 1.f ? 1.f - x : 0.f;
}

// Cuts each job's crop out of its image, resizes it to size x size with the bilinear
// filter, antialiased as PIL and fast_image_resize do (the triangle widened by the
// downscaling factor, its taps reaching past the crop up to the image's edges, weights
// normalised), mirrors it when `flip`, and writes it into slot `slot` of the uint8
// (B, 3, size, size) `out`: the loader's crop and resize of the same image (whose two
// passes round in between; this one rounds once). Grid: (pixel tiles, jobs).
extern "C" __global__ void crop_resize_u8(const CropJob *jobs, unsigned char *out, int size) {
    const CropJob j = jobs[blockIdx.y];
    const int pixels = size * size;
    const float sx = (float)j.crop_width / size, sy = (float)j.crop_height / size;
    const float fx = fmaxf(sx, 1.f), fy = fmaxf(sy, 1.f);
    const long plane = (long)j.width * j.height;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < pixels; i += gridDim.x * blockDim.x) {
        const int oy = i / size, ox = i % size;
        const float cx = j.left + (ox + 0.5f) * sx, cy = j.top + (oy + 0.5f) * sy;
        // The taps' range, clamped to the image (the casts truncate toward zero, as PIL's).
        int x0 = (int)(cx - fx + 0.5f), x1 = (int)(cx + fx + 0.5f);
        int y0 = (int)(cy - fy + 0.5f), y1 = (int)(cy + fy + 0.5f);
        x0 = x0 < 0 ? 0 : x0;
        y0 = y0 < 0 ? 0 : y0;
        x1 = x1 > j.width ? j.width : x1;
        y1 = y1 > j.height ? j.height : y1;
        float r = 0.f, g = 0.f, b = 0.f, total = 0.f;
        for (int y = y0; y < y1; y++) {
            const float wy = triangle((y - cy + 0.5f) / fy);
            const unsigned char *row = j.src + (long)y * j.width;
            for (int x = x0; x < x1; x++) {
                const float w = wy * triangle((x - cx + 0.5f) / fx);
                r += w * row[x];
                g += w * row[plane + x];
                b += w * row[2 * plane + x];
                total += w;
            }
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        unsigned char *o = out + (long)j.slot * 3 * pixels + (long)oy * size +
                           (j.flip ? size - 1 - ox : ox);
        o[0] = (unsigned char)fminf(fmaxf(r * inv + 0.5f, 0.f), 255.f);
        o[pixels] = (unsigned char)fminf(fmaxf(g * inv + 0.5f, 0.f), 255.f);
        o[2 * pixels] = (unsigned char)fminf(fmaxf(b * inv + 0.5f, 0.f), 255.f);
    }
}
