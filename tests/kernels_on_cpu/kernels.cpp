// Every kernel of src/cuda/kernels.cu run on the CPU (cuda_on_cpu.h) against plain loops in
// double: layouts, indices, the vectorised and scalar paths, bf16 rounding. It cannot see
// the Rust side's launches or cuBLAS; `mimco bench kernels` checks those on a GPU.
// Built and run by tests/kernels_on_cpu.sh.
#include <memory>
#include "cuda_on_cpu.h"

#include "../../src/cuda/kernels.cu"
#include "../../src/cuda/flash.cu"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <tuple>
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#endif

static int passed = 0, failed = 0;

static void expect(bool ok, const std::string &what, double error = 0.0) {
    if (ok) {
        passed++;
    } else {
        failed++;
        std::printf("FAILED: %s (error %g)\n", what.c_str(), error);
    }
}

// Round to nearest even, as torch does; NaN stays NaN.
static bf16 to_bf(double v) {
    const float f = (float)v;
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
static double value(float v) { return v; }
static double value(bf16 v) { return __uint_as_float((unsigned int)v << 16); }
template <typename T> static T from(double v);
template <> float from<float>(double v) { return (float)v; }
template <> bf16 from<bf16>(double v) { return to_bf(v); }
template <typename T> static const char *name();
template <> const char *name<float>() { return "f32"; }
template <> const char *name<bf16>() { return "bf16"; }
// The tolerance of a result stored in T, relative to the reference's L2 norm.
template <typename T> static double tolerance() { return sizeof(T) == 2 ? 8e-3 : 2e-6; }

static std::mt19937 rng(20261128);
template <typename T> static std::vector<T> random_values(size_t n, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    std::vector<T> v(n);
    for (auto &x : v) x = from<T>(u(rng));
    return v;
}

// Relative L2 error of `got` against `want`; infinite if anything is NaN.
template <typename T> static double error(const T *got, const std::vector<double> &want) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < want.size(); i++) {
        const double g = value(got[i]);
        if (std::isnan(g)) return INFINITY;
        diff += (g - want[i]) * (g - want[i]);
        norm += want[i] * want[i];
    }
    return std::sqrt(diff) / std::max(std::sqrt(norm), 1e-300);
}

template <typename T>
static void expect_close(const T *got, const std::vector<double> &want, const std::string &what,
                         double tol = tolerance<T>()) {
    const double e = error(got, want);
    if (std::getenv("MIMCO_SHOW_ERRORS")) std::printf("%-60s %.3g\n", what.c_str(), e);
    expect(e <= tol, what, e);
}

// A 64-byte aligned buffer of n T, with `offset` elements in front (to misalign it). Under
// AddressSanitizer (as tests/kernels_on_cpu.sh builds it unless MIMCO_ASAN=0) the bytes
// around the n elements are poisoned, so a kernel that reads or writes past its buffer
// fails.
template <typename T> struct Buffer {
    std::vector<T> store;
    T *p;
    size_t n;
    Buffer(size_t n, size_t offset = 0) : store(n + offset + 128 / sizeof(T)), n(n) {
        const auto base = reinterpret_cast<uintptr_t>(store.data());
        p = reinterpret_cast<T *>((base + 63) / 64 * 64) + offset;
        poison(true);
    }
    Buffer(const std::vector<T> &v, size_t offset = 0) : Buffer(v.size(), offset) {
        std::copy(v.begin(), v.end(), p);
    }
    Buffer(const Buffer &) = delete;
    ~Buffer() { poison(false); }
    void poison(bool on) {
#ifdef __SANITIZE_ADDRESS__
        char *begin = (char *)store.data(), *end = (char *)(store.data() + store.size());
        if (on) {
            ASAN_POISON_MEMORY_REGION(begin, (char *)p - begin);
            ASAN_POISON_MEMORY_REGION((char *)(p + n), end - (char *)(p + n));
        } else {
            ASAN_UNPOISON_MEMORY_REGION(begin, end - begin);
        }
#else
        (void)on;
#endif
    }
};

#define WIDTH_KERNEL(name, e)                                                                 \
    ((e) == 1    ? name##_1                                                                   \
     : (e) == 2  ? name##_2                                                                   \
     : (e) == 4  ? name##_4                                                                   \
     : (e) == 8  ? name##_8                                                                   \
     : (e) == 12 ? name##_12                                                                  \
     : (e) == 16 ? name##_16                                                                  \
     : (e) == 24 ? name##_24                                                                  \
                 : name##_32)

// Elements per lane for rows of d elements, as src/cuda/mod.rs picks them.
static int width(int d) {
    for (int e : {1, 2, 4, 8, 12, 16, 24, 32})
        if (32 * e >= d) return e;
    std::abort();
}

// --- attention heads -------------------------------------------------------------------

typedef void (*SplitKernel)(const void *, void *, int, int, int, int, int);
typedef void (*MergeKernel)(const void *, const void *, const void *, void *, int, int, int,
                            int, int);

template <typename U> static void split_as(const void *x, void *y, int B, int N, int S, int H, int V) {
    split_heads<U>((const U *)x, (U *)y, B, N, S, H, V);
}
template <typename U>
static void merge_as(const void *p0, const void *p1, const void *p2, void *y, int B, int N,
                     int S, int H, int V) {
    merge_heads<U>((const U *)p0, (const U *)p1, (const U *)p2, (U *)y, B, N, S, H, V);
}

// (B, N, S, H, E) of `size`-byte elements, token-major -> head-major and back, in the
// widest unit the chunk and the (offset) buffers allow, as attention.rs picks it.
static void heads(int B, int N, int S, int H, int E, int size, int offset) {
    const size_t n = (size_t)B * N * S * H * E, bytes = n * size;
    Buffer<unsigned char> x(bytes, offset * size), y(bytes), back(bytes, offset * size);
    for (size_t i = 0; i < bytes; i++) x.p[i] = (unsigned char)(i * 7 + i / 251);
    int unit = 16;
    while ((E * size) % unit || reinterpret_cast<uintptr_t>(x.p) % unit) unit /= 2;
    const int V = E * size / unit;
    SplitKernel split = unit == 16  ? split_as<uint4>
                        : unit == 8 ? split_as<uint2>
                        : unit == 4 ? split_as<unsigned int>
                        : unit == 2 ? split_as<unsigned short>
                                    : split_as<unsigned char>;
    MergeKernel merge = unit == 16  ? merge_as<uint4>
                        : unit == 8 ? merge_as<uint2>
                        : unit == 4 ? merge_as<unsigned int>
                        : unit == 2 ? merge_as<unsigned short>
                                    : merge_as<unsigned char>;
    // Few threads, so that the grid-stride loops go round.
    launch(split, {3}, {64}, (const void *)x.p, (void *)y.p, B, N, S, H, V);
    bool same = true;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < N; t++)
            for (int s = 0; s < S; s++)
                for (int h = 0; h < H; h++) {
                    const size_t from_at = ((((size_t)b * N + t) * S + s) * H + h) * E * size;
                    const size_t to_at = ((((size_t)s * B + b) * H + h) * N + t) * E * size;
                    same &= std::memcmp(x.p + from_at, y.p + to_at, E * size) == 0;
                }
    const std::string what = "heads (" + std::to_string(B) + ", " + std::to_string(N) + ", " +
                             std::to_string(S) + ", " + std::to_string(H) + ", " +
                             std::to_string(E) + ") of " + std::to_string(size) +
                             " bytes in " + std::to_string(unit) + "-byte units";
    expect(same, "split " + what);
    const size_t part = bytes / S;
    const unsigned char *p0 = y.p, *p1 = y.p + (S > 1 ? part : 0), *p2 = y.p + (S > 2 ? 2 * part : 0);
    launch(merge, {2}, {96}, (const void *)p0, (const void *)p1, (const void *)p2, (void *)back.p, B,
           N, S, H, V);
    expect(std::memcmp(x.p, back.p, bytes) == 0, "merge " + what);
}

// --- bias, activation, column sums -----------------------------------------------------

static double act_ref(double z, int act) {
    if (act == 1) return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
    if (act == 2) return z > 0 ? z : 0;
    return z;
}
static double act_grad_ref(double z, int act) {
    if (act == 1)
        return 0.5 * (1 + std::erf(z / std::sqrt(2.0))) +
               z * std::exp(-0.5 * z * z) * 0.39894228040143268;
    if (act == 2) return z > 0 ? 1 : 0;
    return 1;
}

template <typename T>
static void bias_act(void (*fwd)(const T *, const float *, T *, long, int, int),
                     void (*bwd)(const T *, const float *, const T *, T *, long, int, int),
                     int rows, int cols, int act, int offset) {
    const long n = (long)rows * cols;
    const auto xv = random_values<T>(n, -3, 3), gv = random_values<T>(n, -1, 1);
    const auto bv = random_values<float>(cols, -1, 1);
    Buffer<T> x(xv, offset), g(gv, offset), y(n, offset), dz(n, offset);
    Buffer<float> b(bv);
    launch(fwd, {3}, {64}, (const T *)x.p, (const float *)b.p, y.p, n, cols, act);
    launch(bwd, {2}, {32}, (const T *)x.p, (const float *)b.p, (const T *)g.p, dz.p, n, cols, act);
    std::vector<double> want_y(n), want_dz(n);
    for (long i = 0; i < n; i++) {
        const double z = value(xv[i]) + bv[i % cols];
        want_y[i] = act_ref(z, act);
        want_dz[i] = value(gv[i]) * act_grad_ref(z, act);
    }
    const std::string what = std::string(name<T>()) + " act " + std::to_string(act) + " " +
                             std::to_string(rows) + "x" + std::to_string(cols) +
                             (offset ? " misaligned" : "");
    expect_close(y.p, want_y, "bias_act_fwd " + what);
    expect_close(dz.p, want_dz, "bias_act_bwd " + what);
}

// The eight-at-a-time path and the one-at-a-time path give the same bits.
template <typename T>
static void bias_act_paths(void (*fwd)(const T *, const float *, T *, long, int, int), int act) {
    const int rows = 5, cols = 40;
    const long n = rows * cols;
    const auto xv = random_values<T>(n, -3, 3);
    const auto bv = random_values<float>(cols, -1, 1);
    Buffer<T> x8(xv), y8(n), x1(xv, 1), y1(n, 1);
    Buffer<float> b(bv);
    launch(fwd, {2}, {64}, (const T *)x8.p, (const float *)b.p, y8.p, n, cols, act);
    launch(fwd, {2}, {64}, (const T *)x1.p, (const float *)b.p, y1.p, n, cols, act);
    expect(std::memcmp(y8.p, y1.p, n * sizeof(T)) == 0,
           std::string("bias_act_fwd ") + name<T>() + " act " + std::to_string(act) +
               ": vector and scalar paths differ");
}

template <typename TI, typename TO>
static void bias_add_check(void (*k)(const TI *, const float *, TO *, long, int), int rows,
                           int cols, int offset) {
    const long n = (long)rows * cols;
    const auto xv = random_values<TI>(n, -3, 3);
    const auto bv = random_values<float>(cols, -1, 1);
    Buffer<TI> x(xv, offset);
    Buffer<TO> y(n, offset);
    Buffer<float> b(bv);
    launch(k, {2}, {64}, (const TI *)x.p, (const float *)b.p, y.p, n, cols);
    std::vector<double> want(n);
    for (long i = 0; i < n; i++) want[i] = value(xv[i]) + bv[i % cols];
    expect_close(y.p, want,
                 std::string("bias_add ") + name<TI>() + " -> " + name<TO>() + " " +
                     std::to_string(rows) + "x" + std::to_string(cols) +
                     (offset ? " misaligned" : ""));
}

template <typename TI>
static void bias_add_res_check(void (*k)(const TI *, const float *, const float *, float *, long,
                                         int),
                               int rows, int cols, int offset) {
    const long n = (long)rows * cols;
    const auto xv = random_values<TI>(n, -3, 3);
    const auto rv = random_values<float>(n, -2, 2);
    const auto bv = random_values<float>(cols, -1, 1);
    Buffer<TI> x(xv, offset);
    Buffer<float> res(rv, offset), y(n, offset), b(bv);
    launch(k, {2}, {64}, (const TI *)x.p, (const float *)b.p, (const float *)res.p, y.p, n, cols);
    std::vector<double> want(n);
    for (long i = 0; i < n; i++) want[i] = value(xv[i]) + bv[i % cols] + rv[i];
    expect_close(y.p, want,
                 std::string("bias_add_res ") + name<TI>() + " " + std::to_string(rows) + "x" +
                     std::to_string(cols) + (offset ? " misaligned" : ""));
}

template <typename T>
static void column_sum_check(void (*k)(const T *, float *, int, int), int rows, int cols) {
    const auto xv = random_values<T>((size_t)rows * cols, -1, 1);
    Buffer<T> x(xv);
    Buffer<float> out(std::vector<float>(cols, 0.f));
    launch(k, {(unsigned)(cols + 31) / 32, 3}, {32}, (const T *)x.p, out.p, rows, cols);
    std::vector<double> want(cols, 0.0);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) want[c] += value(xv[(size_t)r * cols + c]);
    expect_close(out.p, want, std::string("column_sum ") + name<T>(), 1e-6);
}

// --- LayerNorm and softmax ---------------------------------------------------------------

template <typename TO>
static void layer_norm(void (*fwd)(const float *, const float *, const float *, TO *, int, int,
                                   float),
                       void (*bwd)(const float *, const float *, const TO *, const float *,
                                   float *, bf16 *, int, int, float),
                       int rows, int d) {
    const float eps = 1e-6f;
    const auto xv = random_values<float>((size_t)rows * d, -2, 3);
    const auto wv = random_values<float>(d, 0, 2), bv = random_values<float>(d, -1, 1);
    const auto gv = random_values<TO>((size_t)rows * d, -1, 1);
    const auto sv = random_values<float>((size_t)rows * d, -1, 1);
    Buffer<float> x(xv), w(wv), b(bv), out(std::vector<float>((size_t)rows * d + 2 * d, 0.f));
    Buffer<float> skipped(std::vector<float>((size_t)rows * d + 2 * d, 0.f)), skip(sv);
    Buffer<TO> y((size_t)rows * d), g(gv);
    launch(fwd, {(unsigned)(rows + 3) / 4}, {128}, (const float *)x.p, (const float *)w.p,
           (const float *)b.p, y.p, rows, d, eps);
    // Two warps in all, so that each goes over several rows.
    launch(bwd, {1}, {64}, (const float *)x.p, (const float *)w.p, (const TO *)g.p,
           (const float *)nullptr, out.p, (bf16 *)nullptr, rows, d, eps);
    // With a skip gradient: dx gains it, dweight and dbias do not change; and dx rounded to
    // bf16 as well.
    Buffer<bf16> skipped_bf16((size_t)rows * d);
    launch(bwd, {1}, {64}, (const float *)x.p, (const float *)w.p, (const TO *)g.p,
           (const float *)skip.p, skipped.p, skipped_bf16.p, rows, d, eps);
    std::vector<double> want_y((size_t)rows * d), dx((size_t)rows * d), dw(d, 0.0), db(d, 0.0);
    for (int r = 0; r < rows; r++) {
        const float *xr = &xv[(size_t)r * d];
        double mean = 0, var = 0;
        for (int c = 0; c < d; c++) mean += xr[c];
        mean /= d;
        for (int c = 0; c < d; c++) var += (xr[c] - mean) * (xr[c] - mean);
        const double rstd = 1 / std::sqrt(var / d + eps);
        double sg = 0, sgx = 0;
        for (int c = 0; c < d; c++) {
            const double xhat = (xr[c] - mean) * rstd, dy = value(gv[(size_t)r * d + c]);
            want_y[(size_t)r * d + c] = xhat * wv[c] + bv[c];
            dw[c] += dy * xhat;
            db[c] += dy;
            sg += dy * wv[c];
            sgx += dy * wv[c] * xhat;
        }
        for (int c = 0; c < d; c++) {
            const double xhat = (xr[c] - mean) * rstd, dy = value(gv[(size_t)r * d + c]);
            dx[(size_t)r * d + c] = rstd * (dy * wv[c] - sg / d - xhat * sgx / d);
        }
    }
    const std::string what = std::string(name<TO>()) + " " + std::to_string(rows) + "x" +
                             std::to_string(d);
    expect_close(y.p, want_y, "layer_norm_fwd " + what);
    expect_close(out.p, dx, "layer_norm_bwd dx " + what, 1e-5);
    expect_close(out.p + (size_t)rows * d, dw, "layer_norm_bwd dweight " + what, 1e-5);
    expect_close(out.p + (size_t)rows * d + d, db, "layer_norm_bwd dbias " + what, 1e-5);
    std::vector<double> dx_skip(dx);
    for (size_t i = 0; i < dx.size(); i++) dx_skip[i] += sv[i];
    expect_close(skipped.p, dx_skip, "layer_norm_bwd dx + skip " + what, 1e-5);
    expect_close(skipped.p + (size_t)rows * d, dw, "layer_norm_bwd dweight (skip) " + what, 1e-5);
    bool rounded = true;
    for (size_t i = 0; i < (size_t)rows * d; i++)
        rounded &= skipped_bf16.p[i] == to_bf16(skipped.p[i]);
    expect(rounded, "layer_norm_bwd dx in bf16 is dx rounded " + what);
}

template <typename T>
static void softmax(void (*fwd)(const T *, T *, int, int, int, float),
                    void (*bwd)(const T *, const T *, T *, int, int, int, float), int rows,
                    int cols) {
    const int ld = (cols + 7) / 8 * 8;
    const float scale = 0.125f;
    const auto xv = random_values<T>((size_t)rows * ld, -20, 20);
    const auto gv = random_values<T>((size_t)rows * ld, -1, 1);
    Buffer<T> x(xv), y(xv), g(gv), dx((size_t)rows * ld);
    launch(fwd, {(unsigned)(rows + 1) / 2}, {64}, (const T *)x.p, y.p, rows, cols, ld, scale);
    launch(bwd, {(unsigned)(rows + 1) / 2}, {64}, (const T *)y.p, (const T *)g.p, dx.p, rows, cols,
           ld, scale);
    std::vector<double> want_y, want_dx, got_y, got_dx;
    for (int r = 0; r < rows; r++) {
        double m = -INFINITY, s = 0, sgy = 0;
        for (int c = 0; c < cols; c++) m = std::max(m, scale * value(xv[(size_t)r * ld + c]));
        for (int c = 0; c < cols; c++) s += std::exp(scale * value(xv[(size_t)r * ld + c]) - m);
        for (int c = 0; c < cols; c++) {
            const double p = std::exp(scale * value(xv[(size_t)r * ld + c]) - m) / s;
            want_y.push_back(p);
            got_y.push_back(value(y.p[(size_t)r * ld + c]));
            // The backward from the kernel's own (rounded) output, as in the trainer.
            sgy += value(y.p[(size_t)r * ld + c]) * value(gv[(size_t)r * ld + c]);
        }
        for (int c = 0; c < cols; c++) {
            const double yy = value(y.p[(size_t)r * ld + c]);
            want_dx.push_back(scale * yy * (value(gv[(size_t)r * ld + c]) - sgy));
            got_dx.push_back(value(dx.p[(size_t)r * ld + c]));
        }
    }
    const std::string what = std::string(name<T>()) + " " + std::to_string(rows) + "x" +
                             std::to_string(cols) + " (rows " + std::to_string(ld) + " apart)";
    std::vector<float> gy(got_y.begin(), got_y.end()), gdx(got_dx.begin(), got_dx.end());
    expect_close(gy.data(), want_y, "softmax_fwd " + what, tolerance<T>());
    expect_close(gdx.data(), want_dx, "softmax_bwd " + what, tolerance<T>());
}

// --- losses, optimiser, images ------------------------------------------------------------

static void info_nce(int n, int K, int C) {
    const float inv_tau = 5.f;
    const auto qv = random_values<float>((size_t)n * C, -0.3, 0.3);
    const auto kv = random_values<float>((size_t)n * C, -0.3, 0.3);
    const auto negv = random_values<float>((size_t)n * K, -1, 1);
    const auto gv = random_values<float>(n, 0.5, 1.5);
    Buffer<float> q(qv), k(kv), neg(negv), g(gv), loss(n), pos(n), dneg((size_t)n * K);
    launch(info_nce_fwd_f32, {(unsigned)(n + 1) / 2}, {64}, (const float *)q.p, (const float *)k.p,
           (const float *)neg.p, loss.p, n, K, C, inv_tau);
    std::vector<double> want_loss(n), want_dneg((size_t)n * K);
    for (int r = 0; r < n; r++) {
        double p = 0;
        for (int c = 0; c < C; c++) p += (double)qv[(size_t)r * C + c] * kv[(size_t)r * C + c];
        pos.p[r] = (float)p;
        double m = p * inv_tau;
        for (int j = 0; j < K; j++) m = std::max(m, (double)negv[(size_t)r * K + j] * inv_tau);
        double s = std::exp(p * inv_tau - m);
        for (int j = 0; j < K; j++) s += std::exp(negv[(size_t)r * K + j] * inv_tau - m);
        const double lse = m + std::log(s);
        want_loss[r] = lse - p * inv_tau;
        for (int j = 0; j < K; j++)
            want_dneg[(size_t)r * K + j] =
                gv[r] * inv_tau * std::exp(negv[(size_t)r * K + j] * inv_tau - lse);
    }
    launch(info_nce_bwd_f32, {(unsigned)(n + 1) / 2}, {64}, (const float *)neg.p,
           (const float *)pos.p, (const float *)g.p, dneg.p, n, K, inv_tau);
    expect_close(loss.p, want_loss, "info_nce_fwd", 1e-5);
    expect_close(dneg.p, want_dneg, "info_nce_bwd", 1e-5);
}

static void scatter_add_rows_check() {
    const int n = 9, cols = 13, out_rows = 4;
    const auto gv = random_values<float>((size_t)n * cols, -1, 1);
    const std::vector<unsigned int> ids = {3, 0, 3, 1, 3, 0, 2, 1, 3};
    Buffer<float> g(gv), out(std::vector<float>((size_t)out_rows * cols, 0.f));
    Buffer<unsigned int> id(ids);
    launch(scatter_add_rows_f32, {2}, {32}, (const float *)g.p, (const unsigned int *)id.p, out.p,
           n, cols);
    std::vector<double> want((size_t)out_rows * cols, 0.0);
    for (int r = 0; r < n; r++)
        for (int c = 0; c < cols; c++) want[(size_t)ids[r] * cols + c] += gv[(size_t)r * cols + c];
    expect_close(out.p, want, "scatter_add_rows", 1e-6);
}

// Three parameters of different sizes (one without weight decay) in one launch, in place,
// with more blocks per row than the smallest needs.
static void adamw_check() {
    const float lr = 1e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, c1 = 0.19f, c2 = 0.0975f,
                scale = 0.5f;
    const long sizes[3] = {1000, 7, 300};
    const float decays[3] = {0.9995f, 1.f, 0.99f};
    std::vector<std::vector<float>> pv, gv, mv, vv;
    std::vector<std::unique_ptr<Buffer<float>>> p, g, m, v;
    for (long n : sizes) {
        pv.push_back(random_values<float>(n, -1, 1));
        gv.push_back(random_values<float>(n, -1, 1));
        mv.push_back(random_values<float>(n, -0.1, 0.1));
        vv.push_back(random_values<float>(n, 0, 0.1));
        p.push_back(std::make_unique<Buffer<float>>(pv.back()));
        g.push_back(std::make_unique<Buffer<float>>(gv.back()));
        m.push_back(std::make_unique<Buffer<float>>(mv.back()));
        v.push_back(std::make_unique<Buffer<float>>(vv.back()));
    }
    std::vector<AdamWTensor> rows;
    for (int t = 0; t < 3; t++)
        rows.push_back({p[t]->p, g[t]->p, m[t]->p, v[t]->p, sizes[t], decays[t], 0});
    Buffer<AdamWTensor> table(rows);
    launch(adamw_f32, {3, 3}, {64}, (const AdamWTensor *)table.p, lr, b1, b2, eps, c1, c2, scale);
    for (int t = 0; t < 3; t++) {
        const long n = sizes[t];
        std::vector<double> want_p(n), want_m(n), want_v(n);
        for (long i = 0; i < n; i++) {
            const double gi = (double)gv[t][i] * scale;
            want_m[i] = b1 * mv[t][i] + (1 - b1) * gi;
            want_v[i] = b2 * vv[t][i] + (1 - b2) * gi * gi;
            want_p[i] = pv[t][i] * (double)decays[t] -
                        lr * (want_m[i] / c1) / (std::sqrt(want_v[i] / c2) + eps);
        }
        const std::string which = "adamw tensor " + std::to_string(t);
        expect_close(p[t]->p, want_p, which + " p", 1e-6);
        expect_close(m[t]->p, want_m, which + " m", 1e-6);
        expect_close(v[t]->p, want_v, which + " v", 1e-6);
    }
}

template <typename T>
static void patchify_check(void (*k)(const float *, T *, int, int, int, int, int), int B, int H,
                           int W, int p) {
    const int C = 3;
    const auto xv = random_values<float>((size_t)B * C * H * W, -2, 2);
    Buffer<float> x(xv);
    Buffer<T> y(xv.size());
    launch(k, {5}, {64}, (const float *)x.p, y.p, B, C, H, W, p);
    std::vector<double> want;
    for (int b = 0; b < B; b++)
        for (int gy = 0; gy < H / p; gy++)
            for (int gx = 0; gx < W / p; gx++)
                for (int c = 0; c < C; c++)
                    for (int py = 0; py < p; py++)
                        for (int px = 0; px < p; px++)
                            want.push_back(
                                xv[(((size_t)b * C + c) * H + gy * p + py) * W + gx * p + px]);
    expect_close(y.p, want, std::string("patchify -> ") + name<T>());
}

static void normalize_check() {
    const int planes = 6, plane = 77;
    std::vector<unsigned char> xv(planes * plane);
    for (size_t i = 0; i < xv.size(); i++) xv[i] = (unsigned char)(i * 37);
    Buffer<unsigned char> x(xv);
    Buffer<float> y(xv.size());
    const float s[3] = {0.1f, 0.2f, 0.3f}, t[3] = {-1.f, 0.5f, 2.f};
    launch(normalize_u8_f32, {2, (unsigned)planes}, {32}, (const unsigned char *)x.p, y.p, plane,
           s[0], s[1], s[2], t[0], t[1], t[2]);
    std::vector<double> want(xv.size());
    for (int i = 0; i < planes * plane; i++) want[i] = xv[i] * s[(i / plane) % 3] + t[(i / plane) % 3];
    expect_close(y.p, want, "normalize_u8", 1e-6);
}

// The GPU decode's crop and resize: two images into slots 2 and 0 of three (slot 1 left
// alone), downscaled and upscaled, mirrored or not, taps clamped at the edges, against the
// same filter in double; a crop of the output's size is the source's pixels exactly.
static void crop_resize_check() {
    const int size = 6, pixels = size * size;
    const int dims[2][2] = {{37, 23}, {5, 9}};
    std::vector<unsigned char> src[2];
    for (int k = 0; k < 2; k++) {
        src[k].resize(3 * dims[k][0] * dims[k][1]);
        for (auto &v : src[k]) v = (unsigned char)(rng() % 256);
    }
    Buffer<unsigned char> a(src[0]), b(src[1]);
    auto run = [&](CropJob j0, CropJob j1, const std::string &what) {
        Buffer<CropJob> jobs(std::vector<CropJob>{j0, j1});
        Buffer<unsigned char> out(std::vector<unsigned char>(3 * 3 * pixels, 77));
        launch(crop_resize_u8, {2, 2}, {16}, (const CropJob *)jobs.p, out.p, size);
        double worst = 0;
        for (const CropJob &j : {j0, j1}) {
            const int w = j.width, h = j.height;
            const double sx = (double)j.crop_width / size, sy = (double)j.crop_height / size;
            const double fx = std::max(sx, 1.0), fy = std::max(sy, 1.0);
            auto taps = [](double c, double f, double support, int n) {
                std::vector<double> wt(n, 0.0);
                double total = 0;
                for (int t = 0; t < n; t++) {
                    const double d = std::fabs((t - c + 0.5) / f);
                    if (d < 1 && t >= (int)(c - support + 0.5) && t < (int)(c + support + 0.5))
                        total += wt[t] = 1 - d;
                }
                for (auto &v : wt) v /= total;
                return wt;
            };
            for (int oy = 0; oy < size; oy++)
                for (int ox = 0; ox < size; ox++) {
                    const auto wx = taps(j.left + (ox + 0.5) * sx, fx, fx, w);
                    const auto wy = taps(j.top + (oy + 0.5) * sy, fy, fy, h);
                    for (int c = 0; c < 3; c++) {
                        double v = 0;
                        for (int y = 0; y < h; y++)
                            for (int x = 0; x < w; x++)
                                v += wy[y] * wx[x] * j.src[(long)c * w * h + y * w + x];
                        const int x = j.flip ? size - 1 - ox : ox;
                        const double got = out.p[j.slot * 3 * pixels + c * pixels + oy * size + x];
                        worst = std::max(worst, std::fabs(got - v));
                    }
                }
        }
        bool untouched = true;
        for (int i = 0; i < 3 * pixels; i++) untouched &= out.p[3 * pixels + i] == 77;
        expect(worst <= 0.51 && untouched, "crop_resize_u8 " + what, worst);
        return std::vector<unsigned char>(out.p, out.p + 3 * 3 * pixels);
    };
    // Down 3.5x by 2.3x from inside the image (taps past the crop), up from a 4x7 crop at
    // the small image's corner, mirrored.
    run({a.p, 37, 23, 9, 4, 21, 14, 0, 2}, {b.p, 5, 9, 1, 2, 4, 7, 1, 0}, "down, up mirrored");
    run({a.p, 37, 23, 0, 0, 37, 23, 1, 2}, {b.p, 5, 9, 0, 0, 5, 9, 0, 0}, "whole images");
    // A size x size crop is a copy.
    const auto copy = run({a.p, 37, 23, 30, 16, 6, 6, 0, 2}, {b.p, 5, 9, 0, 0, 5, 9, 0, 0},
                          "copy");
    bool same = true;
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++)
                same &= copy[2 * 3 * pixels + c * pixels + y * size + x] ==
                        src[0][c * 37 * 23 + (16 + y) * 37 + 30 + x];
    expect(same, "crop_resize_u8: a crop of the output's size is copied");
}

// The token stream (CLS, patches or the mask token, plus positions) and its gradients for x
// and the mask token, against the composed formulas; rows wider than a block.
static void tokens_check() {
    const int B = 3, N = 7, D = 37;
    const auto xv = random_values<float>((size_t)B * N * D, -1, 1);
    const auto pv = random_values<float>((size_t)(N + 3) * D, -1, 1); // token | cls | pos
    const auto gv = random_values<float>((size_t)B * (N + 1) * D, -1, 1);
    std::vector<float> mv(B * N);
    for (int i = 0; i < B * N; i++) mv[i] = (i * 5 + 1) % 3 == 0 ? 0.f : 1.f;
    Buffer<float> x(xv), m(mv), params(pv), dy(gv), out((size_t)B * (N + 1) * D),
        dx((size_t)B * N * D), dtoken(std::vector<float>(D, 0.f));
    launch(tokens_fwd_f32, {(unsigned)(B * (N + 1))}, {32}, (const float *)x.p,
           (const float *)m.p, (const float *)params.p, out.p, N, D);
    launch(tokens_bwd_f32, {(unsigned)(B * N)}, {32}, (const float *)dy.p, (const float *)m.p,
           dx.p, N, D);
    launch(tokens_token_grad_f32, {2, 3}, {32}, (const float *)dy.p, (const float *)m.p,
           dtoken.p, B * N, N, D);
    std::vector<double> want_out, want_dx, want_dtoken(D, 0.0);
    for (int b = 0; b < B; b++)
        for (int t = 0; t <= N; t++)
            for (int d = 0; d < D; d++) {
                const double pos = pv[(size_t)(2 + t) * D + d];
                if (t == 0) {
                    want_out.push_back(pv[D + d] + pos);
                    continue;
                }
                const double mk = mv[b * N + t - 1];
                want_out.push_back(xv[((size_t)b * N + t - 1) * D + d] * (1 - mk) + pv[d] * mk + pos);
            }
    for (int b = 0; b < B; b++)
        for (int n = 0; n < N; n++)
            for (int d = 0; d < D; d++) {
                const double g = gv[((size_t)b * (N + 1) + 1 + n) * D + d], mk = mv[b * N + n];
                want_dx.push_back(g * (1 - mk));
                want_dtoken[d] += g * mk;
            }
    expect_close(out.p, want_out, "tokens_fwd", 1e-6);
    expect_close(dx.p, want_dx, "tokens_bwd dx", 1e-6);
    expect_close(dtoken.p, want_dtoken, "tokens_token_grad", 1e-6);
}

// Three gradients of different lengths in one launch, into one accumulator.
static void sum_squares_check() {
    const long sizes[3] = {5000, 3, 700};
    std::vector<std::unique_ptr<Buffer<float>>> g;
    std::vector<long> table;
    double want = 0;
    for (long n : sizes) {
        const auto gv = random_values<float>(n, -1, 1);
        for (float v : gv) want += (double)v * v;
        g.push_back(std::make_unique<Buffer<float>>(gv));
        table.push_back((long)g.back()->p);
        table.push_back(n);
    }
    Buffer<long> t(table);
    Buffer<double> out(std::vector<double>{0.0});
    launch(sum_squares_f32, {3, 3}, {64}, (const long *)t.p, out.p);
    const double e = std::abs(out.p[0] - want) / want;
    expect(e < 1e-6, "sum_squares", e);
}

// --- attention on tensor cores (flash.cu) ---------------------------------------------------

// Forward and backward of attention on a packed bf16 qkv (B * N, 3 H E) against softmax
// attention in double.
static void flash(int B, int H, int N, int E) {
    const int D = H * E;
    const double scale = 1 / std::sqrt((double)E);
    const auto qkv_v = random_values<bf16>((size_t)B * N * 3 * D, -1.5, 1.5);
    const auto dout_v = random_values<bf16>((size_t)B * N * D, -1, 1);
    Buffer<bf16> qkv(qkv_v), out((size_t)B * N * D), dout(dout_v), dqkv((size_t)B * N * 3 * D);
    Buffer<float> lse((size_t)B * H * N), dot((size_t)B * H * N), lse_fwd((size_t)B * H * N);
    const dim3 grid{(unsigned)(N + 63) / 64, (unsigned)(B * H)};
    auto fwd = E == 32 ? flash_fwd_bf16_32 : flash_fwd_bf16_64;
    auto bwd_dq = E == 32 ? flash_bwd_dq_bf16_32 : flash_bwd_dq_bf16_64;
    auto bwd_dkv = E == 32 ? flash_bwd_dkv_bf16_32 : flash_bwd_dkv_bf16_64;
    launch(fwd, grid, {128}, (const bf16 *)qkv.p, out.p, lse_fwd.p, N, H, (float)scale);
    // The backward as the graph's node runs it (the logsumexp computed in the dq kernel) ...
    launch(bwd_dq, grid, {128}, (const bf16 *)qkv.p, (const bf16 *)out.p, (const bf16 *)dout.p,
           dqkv.p, lse.p, dot.p, 0, N, H, (float)scale);
    launch(bwd_dkv, grid, {128}, (const bf16 *)qkv.p, (const bf16 *)dout.p, (const float *)lse.p,
           (const float *)dot.p, dqkv.p, N, H, (float)scale);
    // ... and as the blocks node runs it, from the forward's logsumexp: the same bits.
    Buffer<bf16> out2((size_t)B * N * D), dqkv2((size_t)B * N * 3 * D);
    Buffer<float> dot2((size_t)B * H * N);
    launch(fwd, grid, {128}, (const bf16 *)qkv.p, out2.p, (float *)nullptr, N, H, (float)scale);
    launch(bwd_dq, grid, {128}, (const bf16 *)qkv.p, (const bf16 *)out.p, (const bf16 *)dout.p,
           dqkv2.p, lse_fwd.p, dot2.p, 1, N, H, (float)scale);
    launch(bwd_dkv, grid, {128}, (const bf16 *)qkv.p, (const bf16 *)dout.p,
           (const float *)lse_fwd.p, (const float *)dot2.p, dqkv2.p, N, H, (float)scale);
    const std::string what = "(B " + std::to_string(B) + ", H " + std::to_string(H) + ", N " +
                             std::to_string(N) + ", E " + std::to_string(E) + ")";
    expect(std::memcmp(out.p, out2.p, out2.n * sizeof(bf16)) == 0,
           "flash_fwd without logsumexp gives the same output " + what, 0);
    expect(std::memcmp(lse.p, lse_fwd.p, lse.n * sizeof(float)) == 0,
           "flash_fwd's logsumexp is the dq kernel's " + what, 0);
    expect(std::memcmp(dqkv.p, dqkv2.p, dqkv.n * sizeof(bf16)) == 0,
           "flash_bwd from the forward's logsumexp gives the same dqkv " + what, 0);
    std::vector<double> want_out((size_t)B * N * D), want_d((size_t)B * N * 3 * D);
    auto at = [&](int b, int t, int part, int h, int e) {
        return (((size_t)b * N + t) * 3 + part) * D + h * E + e;
    };
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            std::vector<double> p((size_t)N * N), dp((size_t)N * N);
            for (int i = 0; i < N; i++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < N; j++) {
                    double s = 0;
                    for (int e = 0; e < E; e++)
                        s += value(qkv_v[at(b, i, 0, h, e)]) * value(qkv_v[at(b, j, 1, h, e)]);
                    p[(size_t)i * N + j] = s * scale;
                    mx = std::max(mx, s * scale);
                }
                for (int j = 0; j < N; j++) sum += std::exp(p[(size_t)i * N + j] - mx);
                for (int j = 0; j < N; j++)
                    p[(size_t)i * N + j] = std::exp(p[(size_t)i * N + j] - mx) / sum;
            }
            auto d_o = [&](int i, int e) { return value(dout_v[((size_t)b * N + i) * D + h * E + e]); };
            for (int i = 0; i < N; i++) {
                for (int e = 0; e < E; e++) {
                    double o = 0;
                    for (int j = 0; j < N; j++)
                        o += p[(size_t)i * N + j] * value(qkv_v[at(b, j, 2, h, e)]);
                    want_out[((size_t)b * N + i) * D + h * E + e] = o;
                }
                double row = 0;
                for (int j = 0; j < N; j++) {
                    double s = 0;
                    for (int e = 0; e < E; e++) s += d_o(i, e) * value(qkv_v[at(b, j, 2, h, e)]);
                    dp[(size_t)i * N + j] = s;
                    row += s * p[(size_t)i * N + j];
                }
                for (int j = 0; j < N; j++)  // ds, in place
                    dp[(size_t)i * N + j] = p[(size_t)i * N + j] * (dp[(size_t)i * N + j] - row);
            }
            for (int i = 0; i < N; i++)
                for (int e = 0; e < E; e++) {
                    double dq = 0, dk = 0, dv = 0;
                    for (int j = 0; j < N; j++) {
                        dq += dp[(size_t)i * N + j] * value(qkv_v[at(b, j, 1, h, e)]);
                        dk += dp[(size_t)j * N + i] * value(qkv_v[at(b, j, 0, h, e)]);
                        dv += p[(size_t)j * N + i] * d_o(j, e);
                    }
                    want_d[at(b, i, 0, h, e)] = dq * scale;
                    want_d[at(b, i, 1, h, e)] = dk * scale;
                    want_d[at(b, i, 2, h, e)] = dv;
                }
        }
    expect_close(out.p, want_out, "flash_fwd " + what, 1e-2);
    // Each part of dqkv on its own, so that a part left unwritten shows.
    for (int part = 0; part < 3; part++) {
        std::vector<double> want;
        std::vector<bf16> got;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < N; t++)
                for (int h = 0; h < H; h++)
                    for (int e = 0; e < E; e++) {
                        want.push_back(want_d[at(b, t, part, h, e)]);
                        got.push_back(dqkv.p[at(b, t, part, h, e)]);
                    }
        expect_close(got.data(), want, std::string("flash_bwd d") + "qkv"[part] + " " + what,
                     1.5e-2);
    }
}

int main() {
    // Heads of 64 bf16 / f32 (16-byte units), of 5, 6 and 3 elements (narrower units), and
    // misaligned buffers.
    heads(2, 5, 3, 2, 64, 2, 0);
    heads(2, 5, 1, 3, 64, 4, 0);
    heads(1, 7, 3, 2, 5, 4, 0);
    heads(2, 3, 3, 2, 5, 2, 0);
    heads(1, 4, 3, 2, 6, 2, 0);
    heads(1, 4, 1, 2, 6, 4, 0);
    heads(2, 3, 3, 1, 64, 2, 1);
    heads(2, 3, 3, 1, 64, 4, 1);
    for (int act = 0; act < 3; act++) {
        for (int offset : {0, 1}) {
            bias_act<float>(bias_act_fwd_f32, bias_act_bwd_f32, 6, 24, act, offset);
            bias_act<bf16>(bias_act_fwd_bf16, bias_act_bwd_bf16, 6, 24, act, offset);
        }
        bias_act<float>(bias_act_fwd_f32, bias_act_bwd_f32, 5, 7, act, 0);
        bias_act<bf16>(bias_act_fwd_bf16, bias_act_bwd_bf16, 5, 7, act, 0);
        bias_act_paths<float>(bias_act_fwd_f32, act);
        bias_act_paths<bf16>(bias_act_fwd_bf16, act);
    }
    for (auto [rows, cols, offset] :
         std::vector<std::tuple<int, int, int>>{{6, 24, 0}, {5, 7, 0}, {6, 24, 1}}) {
        bias_add_check<float, float>(bias_add_f32_f32, rows, cols, offset);
        bias_add_check<bf16, bf16>(bias_add_bf16_bf16, rows, cols, offset);
        bias_add_check<bf16, float>(bias_add_bf16_f32, rows, cols, offset);
        bias_add_res_check<float>(bias_add_res_f32_f32, rows, cols, offset);
        bias_add_res_check<bf16>(bias_add_res_bf16_f32, rows, cols, offset);
    }
    column_sum_check<float>(column_sum_f32, 37, 45);
    column_sum_check<bf16>(column_sum_bf16, 37, 45);
    for (int d : {3, 64, 384, 1000}) {
        const int e = width(d);
        layer_norm<float>(WIDTH_KERNEL(layer_norm_fwd_f32_f32, e),
                          WIDTH_KERNEL(layer_norm_bwd_f32_f32, e), 5, d);
        layer_norm<bf16>(WIDTH_KERNEL(layer_norm_fwd_f32_bf16, e),
                         WIDTH_KERNEL(layer_norm_bwd_f32_bf16, e), 5, d);
    }
    for (int cols : {5, 197, 1000}) {
        const int e = width(cols);
        softmax<float>(WIDTH_KERNEL(softmax_fwd_f32_f32, e), WIDTH_KERNEL(softmax_bwd_f32_f32, e),
                       3, cols);
        softmax<bf16>(WIDTH_KERNEL(softmax_fwd_bf16_bf16, e),
                      WIDTH_KERNEL(softmax_bwd_bf16_bf16, e), 3, cols);
    }
    info_nce(5, 37, 16);
    scatter_add_rows_check();
    adamw_check();
    patchify_check<float>(patchify_f32_f32, 2, 8, 12, 4);
    patchify_check<bf16>(patchify_f32_bf16, 2, 8, 12, 4);
    normalize_check();
    crop_resize_check();
    sum_squares_check();
    tokens_check();
    for (bool early : {false, true}) {  // cp.async copies landing at the wait, and at once
        copies_land_early = early;
        flash(1, 2, 70, 64);
        flash(2, 1, 33, 32);
        flash(1, 1, 197, 64);
        flash(3, 2, 5, 32);  // fewer tokens than a warp's 16 rows
    }
    std::printf("kernels on CPU: %d checks passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
