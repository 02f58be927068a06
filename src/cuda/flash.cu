// Attention on tensor cores for bf16 heads of E = 32 or 64 elements, any number of tokens,
// read from and written to the packed layouts the linear layers use, so no copy splits or
// merges the heads: qkv is (B * N, 3 * H * E), each token's q | k | v with the heads side
// by side in each (timm's `attn.qkv`), and the output (B * N, H * E). Compiled after
// kernels.cu (it uses its bf16 helpers), for sm_80 and newer.
//
// The products run as mma.sync m16n8k16 tiles (bf16 in, f32 accumulation). Per lane
// (g = lane / 4, t = lane % 4), as the PTX ISA lays the fragments out:
//   A (16 x 16, row-major): a[r] holds A[g + 8 (r % 2)][2t + 8 (r / 2) + {0, 1}]
//   B (16 x 8, as k x n):    b[r] holds B[2t + 8 r + {0, 1}][g]
//   C (16 x 8, f32):         c[r] is   C[g + 8 (r / 2)][2t + r % 2]
// Each warp owns 16 rows (queries in the forward and for dq, keys for dk and dv) and walks
// the other side in tiles of 64 rows, so a block of 4 warps covers 64 rows; the softmax
// runs online (a running maximum and sum per row), so the scores are never stored. The
// block's 128 threads copy each tile into shared memory in 16-byte units (rows padded to
// E + 8 elements, so that the eight 16-byte rows ldmatrix reads at a time fall in
// different banks), and its 4 warps load their B operands from there with ldmatrix, four
// 8 x 8 matrices per instruction (transposed for the products with P): each tile leaves
// global memory once per block instead of once per warp in 4-byte pieces. The copies are
// asynchronous (cp.async) and double-buffered: the block asks for tile i + 1 before it
// computes on tile i, so the loads overlap the products instead of stalling every warp at
// each tile. Every address of qkv, out and dout is 16-byte aligned (the host checks).

#ifndef MIMCO_MMA_ON_CPU
// c += a b for one m16n8k16 tile.
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4],
                                          const unsigned (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the host sends bf16 attention here only on sm_80 and newer
#endif
}

// Four 8 x 8 bf16 matrices from shared memory (ldmatrix): lanes 8i .. 8i + 7 give the
// 16-byte aligned addresses of matrix i's rows 0 .. 7; r[i] receives the lane's fragment of
// matrix i, row g, elements 2t and 2t + 1 (g = lane / 4, t = lane % 4).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const bf16 *row) {
#if __CUDA_ARCH__ >= 800
    const unsigned at = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
#else
    __trap();
#endif
}

// The same, each matrix transposed: r[i] holds rows 2t and 2t + 1 of column g.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const bf16 *row) {
#if __CUDA_ARCH__ >= 800
    const unsigned at = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
#else
    __trap();
#endif
}

// cp.async (sm_80): `bytes` (4 or 16) from global `src` to shared `dst` without passing
// through registers, the bytes from `valid` on zero-filled (valid 0: all zeros, src not
// read). The copy lands once copy_wait lets it: the caller waits, then synchronises the
// block, before reading.
template <int bytes>
__device__ __forceinline__ void copy_async(void *dst, const void *src, int valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned at = (unsigned)__cvta_generic_to_shared(dst);
    if constexpr (bytes == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(at), "l"(src),
                     "r"(valid)
                     : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(at), "l"(src),
                     "r"(valid)
                     : "memory");
#else
    __trap();
#endif
}

// Closes the group of this thread's copies asked for since the last commit.
__device__ __forceinline__ void copy_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending> __device__ __forceinline__ void copy_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
#endif
}
#endif

#define MINUS_INF __int_as_float(0xff800000)

// Two bf16 as one 32-bit word, the first in the low half.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)to_bf16(lo) | ((unsigned)to_bf16(hi) << 16);
}
// Elements p[0], p[1] (4-byte aligned) as one word.
__device__ __forceinline__ unsigned load_pair(const bf16 *p) { return *(const unsigned *)p; }

// The sum and the maximum over the four lanes of a quad (the lanes that share a row of a
// C fragment).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// The A fragments of 16 rows from `row0` of a row-major matrix (rows `ld` apart, E
// columns), zero past `rows`.
template <int E>
__device__ __forceinline__ void load_a(const bf16 *m, long ld, int row0, int rows,
                                       unsigned (&a)[E / 16][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < E / 16; kk++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int row = row0 + g + 8 * (r & 1);
            a[kk][r] = row < rows ? load_pair(m + row * ld + kk * 16 + 2 * t + 8 * (r >> 1)) : 0u;
        }
}

// Row stride of a tile in shared memory, in elements.
template <int E> __device__ constexpr int tile_ld() { return E + 8; }
// Elements of one tile (64 rows), as a count of 16-byte units for a __shared__ uint4 array.
#define TILE_UNITS(E) (64 * (E + 8) / 8)

// Asks for rows row0 .. row0 + 63 of a row-major matrix (rows `ld` apart, E columns,
// 16-byte aligned), zero past `rows`, to be copied into `tile` by the whole block; they
// land after the caller's copy_commit and copy_wait, then a __syncthreads.
template <int E>
__device__ __forceinline__ void fetch_tile(const bf16 *m, long ld, int row0, int rows,
                                           uint4 *tile) {
    constexpr int units = E / 8;  // per row
    for (int c = threadIdx.x; c < 64 * units; c += blockDim.x) {
        const int r = c / units, k = c % units;
        const bool in = row0 + r < rows;
        copy_async<16>(tile + r * (tile_ld<E>() / 8) + k, in ? m + (row0 + r) * ld + k * 8 : m,
                       in ? 16 : 0);
    }
}

// s = A X^T for the 16 rows of `a` and the 64 rows of the tile X: 8 C tiles of 8 columns,
// of which those from `valid` on (rows of X past the matrix's end, zeros) are left 0
// without a product. The B operand of column tile nt and step kk is X's rows nt * 8 .. + 7,
// columns kk * 16 .. + 15: two 8 x 8 matrices, so one ldmatrix_x4 fetches two steps (lane l
// gives the row l % 8 of matrix l / 8).
template <int E>
__device__ __forceinline__ void times_rows(const unsigned (&a)[E / 16][4], const bf16 *x,
                                           int valid, float (&s)[8][4]) {
    const int lane = threadIdx.x & 31, i = lane >> 3, j = lane & 7;
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        if (nt * 8 >= valid) continue;  // the same for the whole warp
        const bf16 *row = x + (nt * 8 + j) * tile_ld<E>() + (i >> 1) * 16 + (i & 1) * 8;
#pragma unroll
        for (int kk = 0; kk < E / 16; kk += 2) {
            unsigned r[4];
            ldmatrix_x4(r, row + kk * 16);
            const unsigned b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_16816(s[nt], a[kk], b0);
            mma_16816(s[nt], a[kk + 1], b1);
        }
    }
}

// acc += P Y for P the 16 x 64 tile `p` (C fragments, made bf16) and Y the 64 rows of a
// tile, of which those from `valid` on are skipped (their columns of P are 0, so the sum
// is the same).
template <int E>
__device__ __forceinline__ void add_times(const float (&p)[8][4], const bf16 *y, int valid,
                                          float (&acc)[E / 8][4]) {
    const int lane = threadIdx.x & 31, i = lane >> 3, j = lane & 7;
    constexpr int ld = tile_ld<E>();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        if (kk * 16 >= valid) continue;  // the same for the whole warp
        const unsigned a[4] = {
            pack_bf16(p[2 * kk][0], p[2 * kk][1]),
            pack_bf16(p[2 * kk][2], p[2 * kk][3]),
            pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]),
            pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]),
        };
        // The B operand of column tile en is Y's rows kk * 16 .. + 15, columns en * 8 .. + 7,
        // transposed: two 8 x 8 matrices, so one ldmatrix_x4_trans fetches two column tiles.
        const bf16 *rows = y + (kk * 16 + (i & 1) * 8 + j) * ld + (i >> 1) * 8;
#pragma unroll
        for (int en = 0; en < E / 8; en += 2) {
            unsigned r[4];
            ldmatrix_x4_trans(r, rows + en * 8);
            const unsigned b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma_16816(acc[en], a, b0);
            mma_16816(acc[en + 1], a, b1);
        }
    }
}

// The row of element r of a C fragment: 0 for g, 1 for g + 8.
#define HALF(r) ((r) >> 1)
// Its column within a tile of 8.
#define COL(nt, r) ((nt) * 8 + 2 * (int)(threadIdx.x & 3) + ((r) & 1))

// One tile of scores s (16 rows x 64 columns from col0, scaled here; columns past `cols`
// masked) into exp(s - m) with the running row maxima m and sums l updated; `keep`
// receives exp(old m - new m), the factor for what was summed before.
__device__ __forceinline__ void online_softmax(float (&s)[8][4], int col0, int cols, float scale,
                                               float (&m)[2], float (&l)[2], float (&keep)[2]) {
    float mx[2] = {m[0], m[1]}, sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            s[nt][r] = col0 + COL(nt, r) < cols ? s[nt][r] * scale : MINUS_INF;
            mx[HALF(r)] = fmaxf(mx[HALF(r)], s[nt][r]);
        }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        mx[i] = quad_max(mx[i]);
        keep[i] = __expf(m[i] - mx[i]);  // 0 for the first tile (m = -inf)
        m[i] = mx[i];
    }
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            s[nt][r] = __expf(s[nt][r] - m[HALF(r)]);
            sum[HALF(r)] += s[nt][r];
        }
#pragma unroll
    for (int i = 0; i < 2; i++) l[i] = l[i] * keep[i] + quad_sum(sum[i]);
}

// Writes the 16 rows from row0 of acc (C fragments over E columns), row half i times
// f[i], as bf16 rows `ld` apart from `dst`; rows past `rows` are not written.
template <int E>
__device__ __forceinline__ void store_rows(const float (&acc)[E / 8][4], const float (&f)[2],
                                           bf16 *dst, long ld, int row0, int rows) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int row = row0 + g + 8 * i;
        if (row >= rows) continue;
        unsigned *words = (unsigned *)(dst + row * ld + 2 * t);
#pragma unroll
        for (int en = 0; en < E / 8; en++)
            words[en * 4] = pack_bf16(acc[en][2 * i] * f[i], acc[en][2 * i + 1] * f[i]);
    }
}

// Each of the 16 rows from row0's logsumexp, m + log(l) (the running maximum and sum of
// online_softmax), into `lse`; rows past `rows` are not written.
__device__ __forceinline__ void store_lse(const float (&m)[2], const float (&l)[2], float *lse,
                                          int row0, int rows) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int row = row0 + g + 8 * i;
        if (t == 0 && row < rows) lse[row] = m[i] + logf(l[i]);
    }
}

// One (image, head): q, k, v rows 3 H E apart in qkv, and its rows of an output-shaped
// (B * N, H * E) matrix, H E apart.
struct Head {
    long b, h, ld, ld_out;
    template <int E> __device__ static Head of(int N, int H) {
        return {blockIdx.y / H, blockIdx.y % H, 3L * H * E, (long)H * E};
    }
    __device__ const bf16 *part(const bf16 *qkv, int N, int s, int E) const {
        return qkv + b * N * ld + s * (ld / 3) + h * E;
    }
    template <typename T> __device__ T *rows(T *m, int N, int E) const {
        return m + b * N * ld_out + h * E;
    }
};

// Forward: out = softmax(scale q k^T) v for 16 queries per warp, and, where `lse` is not
// null, each query's logsumexp of its scaled scores into `lse` [B H N] (for the backward).
// Grid (ceil(N / 64), B H), 128 threads. Warps whose rows lie past N only take part in the
// block's tile copies.
template <int E>
__device__ void flash_fwd(const bf16 *qkv, bf16 *out, float *lse, int N, int H, float scale) {
    __shared__ uint4 kt[2][TILE_UNITS(E)], vt[2][TILE_UNITS(E)];
    const Head hd = Head::of<E>(N, H);
    const int q0 = blockIdx.x * 64 + (threadIdx.x >> 5) * 16;
    const bool active = q0 < N;  // the same for the whole warp
    const bf16 *k = hd.part(qkv, N, 1, E), *v = hd.part(qkv, N, 2, E);
    fetch_tile<E>(k, hd.ld, 0, N, kt[0]);
    fetch_tile<E>(v, hd.ld, 0, N, vt[0]);
    copy_commit();
    unsigned qa[E / 16][4];
    load_a<E>(hd.part(qkv, N, 0, E), hd.ld, q0, N, qa);
    float o[E / 8][4] = {};
    float m[2] = {MINUS_INF, MINUS_INF}, l[2] = {0.f, 0.f}, keep[2];
    for (int k0 = 0, buf = 0; k0 < N; k0 += 64, buf ^= 1) {
        if (k0 + 64 < N) {  // the next tiles, into the other buffers
            fetch_tile<E>(k, hd.ld, k0 + 64, N, kt[buf ^ 1]);
            fetch_tile<E>(v, hd.ld, k0 + 64, N, vt[buf ^ 1]);
        }
        copy_commit();
        copy_wait<1>();  // this tile's copies have landed (the next may be in flight)
        __syncthreads();
        if (active) {
            float s[8][4];
            times_rows<E>(qa, (const bf16 *)kt[buf], N - k0, s);
            online_softmax(s, k0, N, scale, m, l, keep);
#pragma unroll
            for (int en = 0; en < E / 8; en++)
#pragma unroll
                for (int r = 0; r < 4; r++) o[en][r] *= keep[HALF(r)];
            add_times<E>(s, (const bf16 *)vt[buf], N - k0, o);
        }
        __syncthreads();  // before the next fetch overwrites this tile
    }
    if (!active) return;
    const float f[2] = {1.f / l[0], 1.f / l[1]};
    store_rows<E>(o, f, hd.rows(out, N, E), hd.ld_out, q0, N);
    if (lse) store_lse(m, l, lse + (long)blockIdx.y * N, q0, N);
}

// Backward, first kernel: for 16 queries per warp, D = rowsum(dout * out) into `dot`
// [B H N], kept for the second kernel, and dq = scale (p * (dout v^T - D)) k into the q
// part of dqkv, p recomputed from `lse` [B H N], the rows' logsumexp: the forward's where
// `lse_known`, else computed here in a first pass over the keys and written.
template <int E>
__device__ void flash_bwd_dq(const bf16 *qkv, const bf16 *out, const bf16 *dout, bf16 *dqkv,
                             float *lse, float *dot, int lse_known, int N, int H, float scale) {
    __shared__ uint4 kt[2][TILE_UNITS(E)], vt[2][TILE_UNITS(E)];
    const Head hd = Head::of<E>(N, H);
    const int q0 = blockIdx.x * 64 + (threadIdx.x >> 5) * 16;
    const bool active = q0 < N;  // the same for the whole warp
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16 *k = hd.part(qkv, N, 1, E), *v = hd.part(qkv, N, 2, E);
    unsigned qa[E / 16][4], da[E / 16][4];
    load_a<E>(hd.part(qkv, N, 0, E), hd.ld, q0, N, qa);
    const bf16 *d_o = hd.rows(dout, N, E), *o = hd.rows(out, N, E);
    load_a<E>(d_o, hd.ld_out, q0, N, da);
    lse += (long)blockIdx.y * N;
    dot += (long)blockIdx.y * N;
    float row_lse[2], row_dot[2];
    if (lse_known) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int row = q0 + g + 8 * i;
            row_lse[i] = row < N ? lse[row] : 0.f;
        }
    } else {
        float m[2] = {MINUS_INF, MINUS_INF}, l[2] = {0.f, 0.f}, keep[2];
        for (int k0 = 0; k0 < N; k0 += 64) {
            fetch_tile<E>(k, hd.ld, k0, N, kt[0]);
            copy_commit();
            copy_wait<0>();
            __syncthreads();
            if (active) {
                float s[8][4];
                times_rows<E>(qa, (const bf16 *)kt[0], N - k0, s);
                online_softmax(s, k0, N, scale, m, l, keep);
            }
            __syncthreads();
        }
        if (active) store_lse(m, l, lse, q0, N);
#pragma unroll
        for (int i = 0; i < 2; i++) row_lse[i] = m[i] + logf(l[i]);  // as store_lse writes it
    }
    fetch_tile<E>(k, hd.ld, 0, N, kt[0]);  // the main loop's first tiles
    fetch_tile<E>(v, hd.ld, 0, N, vt[0]);
    copy_commit();
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int row = q0 + g + 8 * i;
        float d = 0.f;
        if (row < N)
            for (int e = 2 * t; e < E; e += 8)
                d += to_f32(d_o[row * hd.ld_out + e]) * to_f32(o[row * hd.ld_out + e]) +
                     to_f32(d_o[row * hd.ld_out + e + 1]) * to_f32(o[row * hd.ld_out + e + 1]);
        row_dot[i] = quad_sum(d);
        if (t == 0 && row < N) dot[row] = row_dot[i];
    }
    float dq[E / 8][4] = {};
    for (int k0 = 0, buf = 0; k0 < N; k0 += 64, buf ^= 1) {
        if (k0 + 64 < N) {
            fetch_tile<E>(k, hd.ld, k0 + 64, N, kt[buf ^ 1]);
            fetch_tile<E>(v, hd.ld, k0 + 64, N, vt[buf ^ 1]);
        }
        copy_commit();
        copy_wait<1>();
        __syncthreads();
        if (active) {
            float p[8][4], dp[8][4];
            times_rows<E>(qa, (const bf16 *)kt[buf], N - k0, p);
            times_rows<E>(da, (const bf16 *)vt[buf], N - k0, dp);
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const float pr = k0 + COL(nt, r) < N
                                         ? __expf(p[nt][r] * scale - row_lse[HALF(r)])
                                         : 0.f;
                    p[nt][r] = pr * (dp[nt][r] - row_dot[HALF(r)]);  // ds
                }
            add_times<E>(p, (const bf16 *)kt[buf], N - k0, dq);
        }
        __syncthreads();
    }
    const float f[2] = {scale, scale};
    store_rows<E>(dq, f, (bf16 *)hd.part(dqkv, N, 0, E), hd.ld, q0, N);
}

// Backward, second kernel: for 16 keys per warp, dv = p^T dout and dk = scale ds^T q, with
// p and ds recomputed over every query from the rows' `lse` and `dot` (the first kernel's).
template <int E>
__device__ void flash_bwd_dkv(const bf16 *qkv, const bf16 *dout, const float *lse,
                              const float *dot, bf16 *dqkv, int N, int H, float scale) {
    __shared__ uint4 qt[2][TILE_UNITS(E)], dt[2][TILE_UNITS(E)];
    __shared__ float lse_t[2][64], dot_t[2][64];
    const Head hd = Head::of<E>(N, H);
    const int k0 = blockIdx.x * 64 + (threadIdx.x >> 5) * 16;
    const bool active = k0 < N;  // the same for the whole warp
    const bf16 *q = hd.part(qkv, N, 0, E), *d_o = hd.rows(dout, N, E);
    lse += (long)blockIdx.y * N;
    dot += (long)blockIdx.y * N;
    // Tile q0's queries, their output gradients and their rows' lse and dot (0 past N).
    auto fetch = [&](int q0, int buf) {
        fetch_tile<E>(q, hd.ld, q0, N, qt[buf]);
        fetch_tile<E>(d_o, hd.ld_out, q0, N, dt[buf]);
        if (threadIdx.x < 64) {
            const int row = q0 + threadIdx.x;
            const bool in = row < N;
            copy_async<4>(&lse_t[buf][threadIdx.x], in ? lse + row : lse, in ? 4 : 0);
            copy_async<4>(&dot_t[buf][threadIdx.x], in ? dot + row : dot, in ? 4 : 0);
        }
    };
    fetch(0, 0);
    copy_commit();
    unsigned ka[E / 16][4], va[E / 16][4];
    load_a<E>(hd.part(qkv, N, 1, E), hd.ld, k0, N, ka);
    load_a<E>(hd.part(qkv, N, 2, E), hd.ld, k0, N, va);
    float dk[E / 8][4] = {}, dv[E / 8][4] = {};
    for (int q0 = 0, buf = 0; q0 < N; q0 += 64, buf ^= 1) {
        if (q0 + 64 < N) fetch(q0 + 64, buf ^ 1);
        copy_commit();
        copy_wait<1>();
        __syncthreads();
        if (active) {
            float p[8][4], ds[8][4];
            times_rows<E>(ka, (const bf16 *)qt[buf], N - q0, p);   // s^T
            times_rows<E>(va, (const bf16 *)dt[buf], N - q0, ds);  // dp^T = v dout^T
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int col = COL(nt, r);
                    const float lse_q = lse_t[buf][col], dot_q = dot_t[buf][col];
                    p[nt][r] = q0 + col < N ? __expf(p[nt][r] * scale - lse_q) : 0.f;
                    ds[nt][r] = q0 + col < N ? p[nt][r] * (ds[nt][r] - dot_q) : 0.f;
                }
            add_times<E>(p, (const bf16 *)dt[buf], N - q0, dv);
            add_times<E>(ds, (const bf16 *)qt[buf], N - q0, dk);
        }
        __syncthreads();
    }
    if (!active) return;
    const float fk[2] = {scale, scale}, fv[2] = {1.f, 1.f};
    store_rows<E>(dk, fk, (bf16 *)hd.part(dqkv, N, 1, E), hd.ld, k0, N);
    store_rows<E>(dv, fv, (bf16 *)hd.part(dqkv, N, 2, E), hd.ld, k0, N);
}

#define FLASH(E)                                                                              \
    extern "C" __global__ void flash_fwd_bf16_##E(const bf16 *qkv, bf16 *out, float *lse,    \
                                                  int N, int H, float scale) {                \
        flash_fwd<E>(qkv, out, lse, N, H, scale);                                             \
    }                                                                                         \
    extern "C" __global__ void flash_bwd_dq_bf16_##E(const bf16 *qkv, const bf16 *out,       \
                                                     const bf16 *dout, bf16 *dqkv,            \
                                                     float *lse, float *dot, int lse_known,   \
                                                     int N, int H, float scale) {             \
        flash_bwd_dq<E>(qkv, out, dout, dqkv, lse, dot, lse_known, N, H, scale);              \
    }                                                                                         \
    extern "C" __global__ void flash_bwd_dkv_bf16_##E(const bf16 *qkv, const bf16 *dout,     \
                                                      const float *lse, const float *dot,     \
                                                      bf16 *dqkv, int N, int H,               \
                                                      float scale) {                          \
        flash_bwd_dkv<E>(qkv, dout, lse, dot, dqkv, N, H, scale);                             \
    }

FLASH(32)
FLASH(64)
