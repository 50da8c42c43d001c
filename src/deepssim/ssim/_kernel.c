/* Fused SSIM kernel: one mean-SSIM value per (train, generated) pair.
 *
 * For each pair the product image, its 7x7 box sum and the SSIM map are computed in one pass
 * and only the mean leaves the kernel, so nothing of size N x M x H x W is ever stored.
 * Per-image local statistics (z-scores, 7x7 local means and variances, C1 and C2) are computed
 * once per image by prepare_block, for prepare_images or straight into the pair kernel's SIMD
 * block; deepssim/ssim/engine.py documents the formula. The pair kernel puts generated images
 * in SIMD lanes (see DEFINE_KERNEL). The vertical 7-row sums are updated incrementally (add the
 * new row, drop the old one) and recomputed exactly every REFRESH rows to bound drift.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TI 2        /* training images sharing one block row (a multiple of every P) */
#define XREFRESH 16 /* columns between exact recomputations of the horizontal sums */
#define REFRESH 16  /* rows between exact recomputations of the vertical sums */
/* The pair kernel's workspace, in 64-byte vectors (the widest): the interleaved generated
 * block (z, mu, mu^2, var) and TI column-sum rows with a leading zero; then prepare_block's
 * doubles. */
#define WORK_VECTORS(H, W) ((H) * (W) + 3 * ((H) - 6) * ((W) - 6) + TI * ((W) + 1))
#define WORK_BYTES(H, W) (64 * WORK_VECTORS(H, W) + 8 * BLOCK_WORK(W) + 64) /* + 64: alignment */

/* Clones by instruction-set level, which GCC's dispatcher checks by CPU feature: an "arch=haswell"
 * clone is chosen by CPU model, so an AMD (or a later Intel) AVX2 CPU ran the SSE2 default. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* NaN or Inf, by the exponent bits: -ffast-math lets the compiler assume isfinite() is true. */
static int not_finite(double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (bits & 0x7ff0000000000000ULL) == 0x7ff0000000000000ULL;
}

/* Per-image statistics of n <= L <= 16 raw images (n, H, W) in double, written into the L
 * lanes of a block: z = (x - mean) / std (population std) times zscale at z[p * L + l]; and
 * per valid pixel q, mu = the 7x7 local mean of z times muscale, mu^2 and var = the sample
 * variance in the window (x 49/48) at st[(3 q + k) * L + l], k = 0, 1, 2. With L = 1
 * that is one image with its statistics packed; the pair kernel passes its SIMD block. For
 * training images (c1 != NULL) mu^2 + C1 and var + C2 are stored, with C1 = (K1 R)^2,
 * C2 = (K2 R)^2, R the range of z, and C1, C2 in c1[l], c2[l].
 * Each row's z goes into a lanes-minor buffer first, so the column sums (7 rows, sliding down),
 * the window sums (7 columns afresh) and the stores run over all lanes at once, in double.
 * work: BLOCK_WORK(W) doubles. Returns 0, or 1 + the first image that cannot be prepared:
 * constant, or negated when it has NaN or Inf values (its sum is not finite). */
#define BLOCK_WORK(W) (7 * 16 * (W))
#define DEFINE_PREPARE_BLOCK(T, NAME, L)                                                       \
MULTIVERSION static long NAME(const double *raw, long n, T *z, T *st, double zscale,           \
                              double muscale, T *c1, T *c2, long H, long W, double *work)      \
{                                                                                              \
    const long wo = W - 6, hw = H * W, WL = W * L;                                             \
    double mean[16], inv[16], C1[16] = {0}, C2[16] = {0};                                      \
    double *zr = work, *dr = zr + WL, *col = dr + WL, *col2 = col + WL, *mr = col2 + WL,       \
           *m2r = mr + WL, *vr = m2r + WL;                                                     \
    for (long l = 0; l < n; l++) {                                                             \
        const double *x = raw + l * hw;                                                        \
        double sum = 0, ss = 0, lo = x[0], hi = x[0];                                          \
        for (long p = 0; p < hw; p++) {                                                        \
            sum += x[p];                                                                       \
            lo = x[p] < lo ? x[p] : lo;                                                        \
            hi = x[p] > hi ? x[p] : hi;                                                        \
        }                                                                                      \
        if (not_finite(sum)) return -(1 + l);                                                  \
        const double m = sum / (double)hw;                                                     \
        for (long p = 0; p < hw; p++) ss += (x[p] - m) * (x[p] - m);                           \
        const double sd = sqrt(ss / (double)hw);                                               \
        if (!(sd > 0)) return 1 + l;                                                           \
        mean[l] = m;                                                                           \
        inv[l] = 1.0 / sd;                                                                     \
        if (c1 != NULL) { /* z's range: (max - min) / std */                                   \
            const double range = (hi - lo) * inv[l];                                           \
            C1[l] = (0.01 * range) * (0.01 * range);                                           \
            C2[l] = (0.03 * range) * (0.03 * range);                                           \
            c1[l] = (T)C1[l];                                                                  \
            c2[l] = (T)C2[l];                                                                  \
        }                                                                                      \
    }                                                                                          \
    for (long i = 0; i < 2 * WL; i++) zr[i] = 0; /* lanes past n stay 0 */                     \
    for (long y = 0; y < H; y++) {                                                             \
        for (long l = 0; l < n; l++) { /* row y's z, and the leaving row y - 7's, lanes-minor */ \
            const double *x = raw + l * hw + y * W, m = mean[l], iv = inv[l];                  \
            for (long c = 0; c < W; c++) zr[c * L + l] = (x[c] - m) * iv;                      \
            if (y >= 7)                                                                        \
                for (long c = 0; c < W; c++) dr[c * L + l] = (x[c - 7 * W] - m) * iv;          \
        }                                                                                      \
        T *zo = z + y * WL;                                                                    \
        for (long i = 0; i < WL; i++) zo[i] = (T)(zscale * zr[i]);                             \
        if (y == 0) {                                                                          \
            for (long i = 0; i < WL; i++) {                                                    \
                col[i] = zr[i];                                                                \
                col2[i] = zr[i] * zr[i];                                                       \
            }                                                                                  \
        } else if (y < 7) {                                                                    \
            for (long i = 0; i < WL; i++) {                                                    \
                col[i] += zr[i];                                                               \
                col2[i] += zr[i] * zr[i];                                                      \
            }                                                                                  \
        } else { /* slide the column sums down one row (double: no drift) */                   \
            for (long i = 0; i < WL; i++) {                                                    \
                col[i] += zr[i] - dr[i];                                                       \
                col2[i] += zr[i] * zr[i] - dr[i] * dr[i];                                      \
            }                                                                                  \
        }                                                                                      \
        if (y < 6) continue;                                                                   \
        for (long i = 0; i < wo * L; i++) { /* the 7 columns summed afresh, all lanes at once */ \
            const double *a = col + i, *b = col2 + i;                                          \
            const double s = a[0] + a[L] + a[2 * L] + a[3 * L] + a[4 * L] + a[5 * L] + a[6 * L]; \
            const double s2 = b[0] + b[L] + b[2 * L] + b[3 * L] + b[4 * L] + b[5 * L] + b[6 * L]; \
            const double mu = s * (1.0 / 49.0);                                                \
            mr[i] = muscale * mu;                                                              \
            m2r[i] = mu * mu;                                                                  \
            vr[i] = (49.0 / 48.0) * (s2 * (1.0 / 49.0) - mu * mu);                             \
        }                                                                                      \
        T *so = st + 3 * (y - 6) * wo * L;                                                     \
        for (long c = 0; c < wo; c++)                                                          \
            for (long l = 0; l < L; l++) {                                                     \
                so[3 * c * L + l] = (T)mr[c * L + l];                                          \
                so[(3 * c + 1) * L + l] = (T)(m2r[c * L + l] + C1[l]);                         \
                so[(3 * c + 2) * L + l] = (T)(vr[c * L + l] + C2[l]);                          \
            }                                                                                  \
    }                                                                                          \
    return 0;                                                                                  \
}

/* one per lane count, so the loops over lanes have a fixed length */
DEFINE_PREPARE_BLOCK(float, prepare_block_f32_16, 16)
DEFINE_PREPARE_BLOCK(float, prepare_block_f32_8, 8)
DEFINE_PREPARE_BLOCK(float, prepare_block_f32_4, 4)
DEFINE_PREPARE_BLOCK(float, prepare_block_f32_1, 1)
DEFINE_PREPARE_BLOCK(double, prepare_block_f64_8, 8)
DEFINE_PREPARE_BLOCK(double, prepare_block_f64_4, 4)
DEFINE_PREPARE_BLOCK(double, prepare_block_f64_2, 2)
DEFINE_PREPARE_BLOCK(double, prepare_block_f64_1, 1)

/* The horizontal pass over one block row of the kernel below (its local variables): SLIDE
 * rows first slide each column's vertical sum down one row. Two expansions, so the test is not
 * made per pixel. */
#define HORIZONTAL_PASS(SLIDE, P)                                                              \
    for (long x0 = 0; x0 < wo; x0 += XREFRESH) {                                               \
        const long x1 = (wo - x0 < XREFRESH) ? wo : x0 + XREFRESH;                             \
        /* the window left of x0 (col[-1] is 0); entering minus leaving                        \
         * column first, so flat regions add exactly 0 */                                      \
        for (int q = 0; q < P; q++) {                                                          \
            const V *c = col[q];                                                               \
            s[q] = c[x0 - 1] + c[x0] + c[x0 + 1] + c[x0 + 2] + c[x0 + 3]                       \
                 + c[x0 + 4] + c[x0 + 5];                                                      \
        }                                                                                      \
        for (long x = x0; x < x1; x++) {                                                       \
            const V in6 = b6[x + 6], out0 = b0[x + 6];                                         \
            const V mbx = st[3 * x], sbx = st[3 * x + 1], vbx = st[3 * x + 2];                 \
            for (int q = 0; q < P; q++) {                                                      \
                V *c = col[q];                                                                 \
                if (SLIDE)                                                                     \
                    c[x + 6] += ar[q][6 * W + x + 6] * in6                                     \
                              - ar[q][x + 6 - back] * out0;                                    \
                s[q] += c[x + 6] - c[x - 1];                                                   \
                const V lum = ta[q][3 * x] * mbx + C1[q]; /* 2 mu_a mu_b + C1 */               \
                const V num = lum * (s[q] - kcov * lum);                                       \
                const V den = (ta[q][3 * x + 1] + sbx) * (ta[q][3 * x + 2] + vbx);             \
                row[q] += num * RECIP(den);                                                    \
            }                                                                                  \
        }                                                                                      \
    }

/* za, zb: z-scored images (n, H, W); sa, sb: statistics (n, H-6, W-6, 3): the local mean,
 * mu^2 and the local variance side by side, + C1 and + C2 on the training side (sa); c1, c2:
 * constants per training image; raw: when not NULL, generated images (m, H, W) in double,
 * prepared here instead of zb, sb. Computes out[i, j] (row stride nb) for i in [i0, i1),
 * j in [j0, j1); returns 0, or for the first generated image that cannot be prepared 1 + its
 * index, negated when it has NaN or Inf values (see prepare_block).
 *
 * Generated images go LANES at a time into the lanes of a SIMD vector: their statistics are
 * laid out once per block (pixel-major, image-minor: interleaved from prepared arrays, or
 * prepared straight into place from raw images), so a training image's value is one
 * broadcast shared by LANES pairs and the 7-wide horizontal window slides as a running sum
 * (add the entering column, drop the leaving one; restarted every XREFRESH columns) instead of
 * six adds per pixel. A column's vertical sum slides down one row just before it enters the
 * window. P training images go through the block row together so they share its loads (the
 * AVX2 kernel, with half the lanes, spills a few pointers but still gains), and TI of them share
 * it while it is in cache. The block's statistics are one vector per pixel for z and three
 * consecutive vectors (mu, mu^2, var) per valid pixel, so one pointer walks them.
 * Constants are folded so the pixel loop does little arithmetic: the interleaved z is scaled by
 * k1 = 2 (49/48) / 49 and mu by 2, and each column sum carries (C2 + (49/48) C1) / 7, so with
 * lum = 2 mu_a mu_b + C1 the window sum s gives 2 cov + C2 = s - (49/48) lum. */
#define DEFINE_KERNEL(T, NAME, LANES, P, TARGET, PREPARE_BLOCK)                                \
TARGET static long NAME(const T *za, const T *zb, const T *sa, const T *sb, const T *c1,      \
                        const T *c2, const double *raw, T *out, long i0, long i1,              \
                        long j0, long j1, long nb, long H, long W, void *work)                 \
{                                                                                              \
    typedef T V __attribute__((vector_size(sizeof(T) * LANES)));                               \
    const long ho = H - 6, wo = W - 6, hw = H * W, vhw = ho * wo;                              \
    const T kcov = (T)(49.0 / 48.0), k1 = (T)(2.0 * (49.0 / 48.0) / 49.0);                   \
    V *bz = (V *)work; /* WORK_VECTORS(H, W) vectors, 64-byte aligned */                      \
    V *bstat = bz + hw, *cols = bstat + 3 * vhw;                                               \
    double *prepare_work = (double *)(cols + TI * (W + 1));                                    \
    for (long u = 0; u < TI; u++) cols[u * (W + 1)] = (V){0}; /* col[-1] of each image */      \
    for (long jb = j0; jb < j1; jb += LANES) {                                                 \
        const long nj = (j1 - jb < LANES) ? j1 - jb : LANES;                                   \
        if (raw != NULL) { /* prepare the generated images straight into their lanes */        \
            const long bad = PREPARE_BLOCK(raw + jb * hw, nj, (T *)bz, (T *)bstat, k1, 2.0,    \
                                           NULL, NULL, H, W, prepare_work);                    \
            if (bad) return bad > 0 ? bad + jb : bad - jb;                                     \
        } else { /* interleave prepared images pixel by pixel, a vector at a time */           \
            const T *z[LANES], *m[LANES];                                                      \
            for (long l = 0; l < LANES; l++) {                                                 \
                const long j = jb + (l < nj ? l : 0); /* padding: any real image, zeroed below */\
                z[l] = zb + j * hw;                                                            \
                m[l] = sb + 3 * j * vhw;                                                       \
            }                                                                                  \
            for (long p = 0; p < hw; p++) {                                                    \
                V t;                                                                           \
                for (long l = 0; l < LANES; l++) t[l] = k1 * z[l][p];                          \
                bz[p] = t;                                                                     \
            }                                                                                  \
            for (long p = 0; p < vhw; p++) {                                                   \
                V t1, t2, t3;                                                                  \
                for (long l = 0; l < LANES; l++) {                                             \
                    t1[l] = 2 * m[l][3 * p];                                                   \
                    t2[l] = m[l][3 * p + 1];                                                   \
                    t3[l] = m[l][3 * p + 2];                                                   \
                }                                                                              \
                bstat[3 * p] = t1;                                                             \
                bstat[3 * p + 1] = t2;                                                         \
                bstat[3 * p + 2] = t3;                                                         \
            }                                                                                  \
            if (nj < LANES) /* zero the padding lanes (prepare_block leaves them 0) */         \
                for (long p = 0; p < hw + 3 * vhw; p++)                                        \
                    for (long l = nj; l < LANES; l++) bz[p][l] = 0;                            \
        }                                                                                      \
        for (long it = i0; it < i1; it += TI) {                                                \
            const long ni = (i1 - it < TI) ? i1 - it : TI;                                     \
            double acc[TI][LANES];                                                             \
            for (long u = 0; u < ni; u++)                                                      \
                for (long l = 0; l < LANES; l++) acc[u][l] = 0.0;                              \
            for (long y = 0; y < ho; y++) {                                                    \
                const int slide = y % REFRESH != 0; /* else sum all 7 rows afresh */           \
                const long back = slide ? W : 0;    /* row y - 1, the one leaving */           \
                const V *br = bz + y * W, *b6 = br + 6 * W, *b0 = br - back;                   \
                const V *st = bstat + 3 * y * wo;                                              \
                for (long u = 0; u < ni; u += P) {                                             \
                    const T *ar[P], *ta[P];                                                    \
                    T C1[P], C7[P];                                                            \
                    V *col[P], s[P], row[P];                                                   \
                    for (int q = 0; q < P; q++) {                                              \
                        /* past the last image, repeat it (computed, never stored) */          \
                        const long i = it + (u + q < ni ? u + q : ni - 1);                     \
                        ar[q] = za + i * hw + y * W;                                           \
                        ta[q] = sa + 3 * (i * vhw + y * wo);                                   \
                        C1[q] = c1[i];                                                         \
                        C7[q] = (c2[i] + kcov * c1[i]) / 7;                                    \
                        col[q] = cols + (u + q) * (W + 1) + 1;                                 \
                        row[q] = (V){0};                                                       \
                        const T *a6 = ar[q] + 6 * W, *a0 = ar[q] - back;                       \
                        if (slide) {                                                           \
                            for (long x = 0; x < 6; x++)                                       \
                                col[q][x] += a6[x] * b6[x] - a0[x] * b0[x];                    \
                        } else {                                                               \
                            for (long x = 0; x < W; x++) {                                     \
                                V t = C7[q] + ar[q][x] * br[x];                                \
                                for (long k = 1; k < 7; k++)                                   \
                                    t += ar[q][k * W + x] * br[k * W + x];                     \
                                col[q][x] = t;                                                 \
                            }                                                                  \
                        }                                                                      \
                    }                                                                          \
                    if (slide)                                                                 \
                        HORIZONTAL_PASS(1, P)                                                  \
                    else                                                                       \
                        HORIZONTAL_PASS(0, P)                                                  \
                    for (int q = 0; q < P && u + q < ni; q++)                                  \
                        for (long l = 0; l < LANES; l++) acc[u + q][l] += row[q][l];           \
                }                                                                              \
            }                                                                                  \
            for (long u = 0; u < ni; u++)                                                      \
                for (long l = 0; l < nj; l++)                                                  \
                    out[(it + u) * nb + jb + l] = (T)(acc[u][l] / (double)vhw);                \
        }                                                                                      \
    }                                                                                          \
    return 0;                                                                                  \
}

/* One kernel per instruction set, each with the lane count its registers hold, chosen at run
 * time (target_clones would give every clone the same vector width). */
typedef long (*rows_f32_fn)(const float *, const float *, const float *, const float *,
                            const float *, const float *, const double *, float *, long, long,
                            long, long, long, long, long, void *);
typedef long (*rows_f64_fn)(const double *, const double *, const double *, const double *,
                            const double *, const double *, const double *, double *, long, long,
                            long, long, long, long, long, void *);

/* 1 / d for the SSIM map's denominator; the float32 AVX kernels use the approximate
 * reciprocal and one Newton step (relative error ~1e-7, as accurate as float32 division) */
#define RECIP(d) (1 / (d))
DEFINE_KERNEL(float, ssim_rows_f32_base, 4, 1, , prepare_block_f32_4)
DEFINE_KERNEL(double, ssim_rows_f64_base, 2, 1, , prepare_block_f64_2)
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
DEFINE_KERNEL(double, ssim_rows_f64_avx512, 8, 2, AVX512, prepare_block_f64_8)
DEFINE_KERNEL(double, ssim_rows_f64_avx2, 4, 1, AVX2, prepare_block_f64_4)
#undef RECIP
#define RECIP(d) ({ const V r_ = (V)_mm512_rcp14_ps((__m512)(d)); r_ * (2.0f - (d) * r_); })
DEFINE_KERNEL(float, ssim_rows_f32_avx512, 16, 2, AVX512, prepare_block_f32_16)
#undef RECIP
#define RECIP(d) ({ const V r_ = (V)_mm256_rcp_ps((__m256)(d)); r_ * (2.0f - (d) * r_); })
DEFINE_KERNEL(float, ssim_rows_f32_avx2, 8, 2, AVX2, prepare_block_f32_8)
#endif

static rows_f32_fn ssim_rows_f32 = ssim_rows_f32_base;
static rows_f64_fn ssim_rows_f64 = ssim_rows_f64_base;
static const char *instruction_set = "baseline";

/* Use the kernels of one instruction set ("avx512", "avx2" or "baseline"); returns 0 when this
 * CPU or build lacks it. The widest available is chosen at import. */
static int use_kernels(const char *name)
{
    if (strcmp(name, "baseline") == 0) {
        ssim_rows_f32 = ssim_rows_f32_base;
        ssim_rows_f64 = ssim_rows_f64_base;
        instruction_set = "baseline";
        return 1;
    }
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    __builtin_cpu_init();
    if (strcmp(name, "avx512") == 0 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw")) {
        ssim_rows_f32 = ssim_rows_f32_avx512;
        ssim_rows_f64 = ssim_rows_f64_avx512;
        instruction_set = "avx512";
        return 1;
    }
    if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        ssim_rows_f32 = ssim_rows_f32_avx2;
        ssim_rows_f64 = ssim_rows_f64_avx2;
        instruction_set = "avx2";
        return 1;
    }
#endif
    return 0;
}

static PyObject *set_instruction_set(PyObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    return PyBool_FromLong(use_kernels(name));
}

static PyObject *get_instruction_set(PyObject *self, PyObject *args)
{
    return PyUnicode_FromString(instruction_set);
}

/* Runs the pair kernel on buffers already taken: train = za, sa, c1, c2; generated = zb, sb
 * prepared, or raw images (float64) with generated NULL. Releases every buffer. */
static PyObject *run_rows(Py_buffer *train, Py_buffer *generated, Py_buffer *raw, Py_buffer *out,
                          Py_buffer *workspace, long i0, long i1, long j0, long j1, long nb, long H,
                          long W, int is64)
{
    Py_buffer *all[] = {&train[0], &train[1], &train[2], &train[3],
                        generated ? &generated[0] : NULL, generated ? &generated[1] : NULL,
                        raw, out, workspace};
    const int count = sizeof(all) / sizeof(all[0]);
    /* the workspace is caller-owned so repeated calls reuse memory already touched */
    const Py_ssize_t need = WORK_BYTES(H, W);
    if (workspace->len < need) {
        for (int k = 0; k < count; k++)
            if (all[k]) PyBuffer_Release(all[k]);
        return PyErr_Format(PyExc_ValueError, "workspace of %zd bytes, need %zd", workspace->len, need);
    }
    void *work = (void *)(((uintptr_t)workspace->buf + 63) & ~(uintptr_t)63);
    const void *zb = generated ? generated[0].buf : NULL, *sb = generated ? generated[1].buf : NULL;
    const double *images = raw ? (const double *)raw->buf : NULL;
    long bad;
    Py_BEGIN_ALLOW_THREADS
    if (is64)
        bad = ssim_rows_f64(train[0].buf, zb, train[1].buf, sb, train[2].buf, train[3].buf, images,
                            out->buf, i0, i1, j0, j1, nb, H, W, work);
    else
        bad = ssim_rows_f32(train[0].buf, zb, train[1].buf, sb, train[2].buf, train[3].buf, images,
                            out->buf, i0, i1, j0, j1, nb, H, W, work);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < count; k++)
        if (all[k]) PyBuffer_Release(all[k]);
    return PyLong_FromLong(bad);
}

static PyObject *ssim_rows(PyObject *self, PyObject *args)
{
    Py_buffer train[4], generated[2], out, workspace;
    long i0, i1, j0, j1, nb, H, W;
    int is64;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*w*lllllllpw*", &train[0], &generated[0], &train[1],
                          &generated[1], &train[2], &train[3], &out, &i0, &i1, &j0, &j1, &nb, &H,
                          &W, &is64, &workspace))
        return NULL;
    return run_rows(train, generated, NULL, &out, &workspace, i0, i1, j0, j1, nb, H, W, is64);
}

static PyObject *ssim_rows_raw(PyObject *self, PyObject *args)
{
    Py_buffer train[4], raw, out, workspace;
    long i0, i1, j0, j1, nb, H, W;
    int is64;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*lllllllpw*", &train[0], &train[1], &train[2],
                          &train[3], &raw, &out, &i0, &i1, &j0, &j1, &nb, &H, &W, &is64,
                          &workspace))
        return NULL;
    return run_rows(train, NULL, &raw, &out, &workspace, i0, i1, j0, j1, nb, H, W, is64);
}

static PyObject *workspace_bytes(PyObject *self, PyObject *args)
{
    long H, W;
    if (!PyArg_ParseTuple(args, "ll", &H, &W)) return NULL;
    return PyLong_FromLong(WORK_BYTES(H, W));
}


/* Matched pairs: out[i] = mean SSIM of (a_i, b_i), the same formula as the matrix kernel. */
/* ia, ib: NULL for matched pairs (a_i, b_i), else the images' indices of each pair (int64), so
 * callers pair each prepared image with many others without gathering copies. */
#define DEFINE_PAIRS(T, NAME)                                                                  \
MULTIVERSION static int NAME(const T *za, const T *zb, const T *sa, const T *sb, const T *c1,  \
                             const T *c2, const long long *ia, const long long *ib, T *out,    \
                             long n, long H, long W)                                           \
{                                                                                              \
    const long ho = H - 6, wo = W - 6, hw = H * W, vhw = ho * wo;                              \
    const T k1 = (T)(2.0 * (49.0 / 48.0) / 49.0), k2 = (T)(2.0 * (49.0 / 48.0));              \
    T *col = (T *)malloc(sizeof(T) * W);                                                       \
    if (col == NULL) return -1;                                                                \
    for (long p = 0; p < n; p++) {                                                             \
        const long i = ia ? (long)ia[p] : p, j = ib ? (long)ib[p] : p;                         \
        const T *a = za + i * hw, *b = zb + j * hw;                                            \
        const T C1 = c1[i], C2 = c2[i];                                                        \
        double acc = 0.0;                                                                      \
        for (long y = 0; y < ho; y++) {                                                        \
            const T *ar = a + y * W, *br = b + y * W;                                          \
            if (y % REFRESH == 0) {                                                            \
                for (long x = 0; x < W; x++) {                                                 \
                    T s = 0;                                                                   \
                    for (long k = 0; k < 7; k++) s += ar[k * W + x] * br[k * W + x];           \
                    col[x] = s;                                                                \
                }                                                                              \
            } else {                                                                           \
                for (long x = 0; x < W; x++)                                                   \
                    col[x] += ar[6 * W + x] * br[6 * W + x] - ar[x - W] * br[x - W];           \
            }                                                                                  \
            const T *ta = sa + 3 * (i * vhw + y * wo), *tb = sb + 3 * (j * vhw + y * wo);      \
            T row = 0;                                                                         \
            for (long x = 0; x < wo; x++) {                                                    \
                const T s = col[x] + col[x + 1] + col[x + 2] + col[x + 3]                      \
                          + col[x + 4] + col[x + 5] + col[x + 6];                              \
                const T m = ta[3 * x] * tb[3 * x];                                             \
                const T num = (m + m + C1) * (k1 * s - k2 * m + C2);                           \
                const T den = (ta[3 * x + 1] + tb[3 * x + 1]) * (ta[3 * x + 2] + tb[3 * x + 2]); \
                row += num / den;                                                              \
            }                                                                                  \
            acc += row;                                                                        \
        }                                                                                      \
        out[p] = (T)(acc / (double)vhw);                                                       \
    }                                                                                          \
    free(col);                                                                                 \
    return 0;                                                                                  \
}

DEFINE_PAIRS(float, ssim_pairs_f32)
DEFINE_PAIRS(double, ssim_pairs_f64)

static PyObject *prepare_images(PyObject *self, PyObject *args)
{
    Py_buffer b[5]; /* x, z, stats, c1, c2 */
    long n, H, W, bad = 0;
    int train, is64;
    if (!PyArg_ParseTuple(args, "y*w*w*w*w*lllpp", &b[0], &b[1], &b[2], &b[3], &b[4], &n, &H, &W,
                          &train, &is64))
        return NULL;
    double *work = (double *)malloc(sizeof(double) * BLOCK_WORK(W));
    if (work == NULL) {
        for (int k = 0; k < 5; k++) PyBuffer_Release(&b[k]);
        return PyErr_NoMemory();
    }
    const long hw = H * W, vhw3 = 3 * (H - 6) * (W - 6);
    Py_BEGIN_ALLOW_THREADS
    for (long i = 0; i < n && !bad; i++) { /* one image at a time, its statistics packed */
        const double *x = (const double *)b[0].buf + i * hw;
        long code;
        if (is64) {
            double *c1 = train ? (double *)b[3].buf + i : NULL, *c2 = (double *)b[4].buf + i;
            code = prepare_block_f64_1(x, 1, (double *)b[1].buf + i * hw,
                                       (double *)b[2].buf + i * vhw3, 1.0, 1.0, c1, c2, H, W, work);
        } else {
            float *c1 = train ? (float *)b[3].buf + i : NULL, *c2 = (float *)b[4].buf + i;
            code = prepare_block_f32_1(x, 1, (float *)b[1].buf + i * hw,
                                       (float *)b[2].buf + i * vhw3, 1.0, 1.0, c1, c2, H, W, work);
        }
        if (code) bad = code > 0 ? i + 1 : -(i + 1);
    }
    Py_END_ALLOW_THREADS
    free(work);
    for (int k = 0; k < 5; k++) PyBuffer_Release(&b[k]);
    return PyLong_FromLong(bad);
}

static PyObject *ssim_pairs(PyObject *self, PyObject *args)
{
    Py_buffer b[7]; /* za, zb, sa, sb, c1, c2, out */
    long n, H, W;
    int is64, status;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*w*lllp", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5],
                          &b[6], &n, &H, &W, &is64))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (is64)
        status = ssim_pairs_f64(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, NULL,
                                NULL, b[6].buf, n, H, W);
    else
        status = ssim_pairs_f32(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, NULL,
                                NULL, b[6].buf, n, H, W);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 7; k++) PyBuffer_Release(&b[k]);
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ssim_pairs_indexed(za, zb, sa, sb, c1, c2, ia, ib, out, n, H, W, is64): out[p] = SSIM of
 * (a_ia[p], b_ib[p]); ia, ib int64. The caller checks the indices. */
static PyObject *ssim_pairs_indexed(PyObject *self, PyObject *args)
{
    Py_buffer b[9]; /* za, zb, sa, sb, c1, c2, ia, ib, out */
    long n, H, W;
    int is64, status;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*w*lllp", &b[0], &b[1], &b[2], &b[3], &b[4],
                          &b[5], &b[6], &b[7], &b[8], &n, &H, &W, &is64))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (is64)
        status = ssim_pairs_f64(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf,
                                b[6].buf, b[7].buf, b[8].buf, n, H, W);
    else
        status = ssim_pairs_f32(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf,
                                b[6].buf, b[7].buf, b[8].buf, n, H, W);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 9; k++) PyBuffer_Release(&b[k]);
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* contrast_images(images, rows, gammas, out, z, m, hw) -> 0, 1 + the first output that is constant, or
 * -1 without memory: out[i] = images[rows[i]] min-max scaled to [0, 1] and raised to gammas[i], or
 * copied unchanged where gammas[i] is 1 (float64); z[i] = out[i] z-scored (population std), in float32,
 * for the search. One image at a time in cache, with vectorised exp and log, no temporaries; u^g as
 * exp(g log u), the log kept while rows repeat (registration asks for each image under several gammas,
 * its rows together). */
MULTIVERSION static long contrast_f64(const double *images, const long long *rows, const double *gammas,
                                      double *out, float *z, long m, long hw)
{
    double *logs = (double *)malloc(sizeof(double) * hw); /* log u of the image rows[logged] */
    if (logs == NULL) return -1;
    long logged = -1;
    double lowest = 0; /* the minimum of the image rows[logged] */
    for (long i = 0; i < m; i++) {
        const double *x = images + rows[i] * hw, g = gammas[i];
        double *y = out + i * hw;
        if (g == 1.0) {
            memcpy(y, x, sizeof(double) * hw);
        } else {
            if (logged < 0 || rows[logged] != rows[i]) {
                double lo = x[0], hi = x[0];
                for (long p = 0; p < hw; p++) {
                    lo = x[p] < lo ? x[p] : lo;
                    hi = x[p] > hi ? x[p] : hi;
                }
                const double span = hi - lo > 1e-12 ? hi - lo : 1e-12;
                /* the minimum's u = 0 is left out of log and exp (it stays 0): vectorised log(0) and
                 * exp(-inf) take glibc's slow path, and a scan's background is much of an image. The
                 * selections are loops of their own: inside the loop of a vectorised call they make
                 * it 3-4x slower. */
                _Pragma("omp simd")
                for (long p = 0; p < hw; p++) logs[p] = x[p] > lo ? (x[p] - lo) / span : 1.0;
                _Pragma("omp simd")
                for (long p = 0; p < hw; p++) logs[p] = log(logs[p]);
                lowest = lo;
                logged = i;
            }
            _Pragma("omp simd")
            for (long p = 0; p < hw; p++) y[p] = exp(g * logs[p]);
            _Pragma("omp simd")
            for (long p = 0; p < hw; p++) y[p] = x[p] > lowest ? y[p] : 0.0;
        }
        double sum = 0, ss = 0;
        for (long p = 0; p < hw; p++) sum += y[p];
        const double mean = sum / (double)hw;
        for (long p = 0; p < hw; p++) ss += (y[p] - mean) * (y[p] - mean);
        const double sd = sqrt(ss / (double)hw);
        if (!(sd > 0)) {
            free(logs);
            return i + 1;
        }
        float *zi = z + i * hw;
        for (long p = 0; p < hw; p++) zi[p] = (float)((y[p] - mean) / sd);
    }
    free(logs);
    return 0;
}

static PyObject *contrast_images(PyObject *self, PyObject *args)
{
    Py_buffer b[5]; /* images, rows, gammas, out, z */
    long m, hw, code;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*ll", &b[0], &b[1], &b[2], &b[3], &b[4], &m, &hw)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    code = contrast_f64(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, m, hw);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 5; k++) PyBuffer_Release(&b[k]);
    return PyLong_FromLong(code);
}

/* exact_transforms(images, rows, flips, shifts, out, m, H, W): out[i] = images[rows[i]] flipped (bit 0:
 * rows, bit 1: columns) and shifted by whole pixels (shifts[i] = (rows, columns)), the uncovered pixels
 * filled with the image's minimum: pixels copied, not mixed (float64; rows, flips, shifts int64). */
static void exact_f64(const double *images, const long long *rows, const long long *flips,
                      const long long *shifts, double *out, long m, long H, long W)
{
    for (long i = 0; i < m; i++) {
        const double *x = images + rows[i] * H * W;
        double *y = out + i * H * W, lo = x[0];
        for (long p = 0; p < H * W; p++) lo = x[p] < lo ? x[p] : lo;
        const long dr = (long)shifts[2 * i], dc = (long)shifts[2 * i + 1];
        const int flip_rows = (int)(flips[i] & 1), flip_cols = (int)((flips[i] >> 1) & 1);
        for (long r = 0; r < H; r++) {
            const long source = r - dr;
            double *yr = y + r * W;
            if (source < 0 || source >= H) {
                for (long c = 0; c < W; c++) yr[c] = lo;
                continue;
            }
            const double *xr = x + (flip_rows ? H - 1 - source : source) * W;
            for (long c = 0; c < W; c++) {
                const long sc = c - dc;
                yr[c] = sc < 0 || sc >= W ? lo : xr[flip_cols ? W - 1 - sc : sc];
            }
        }
    }
}

static PyObject *exact_transforms(PyObject *self, PyObject *args)
{
    Py_buffer b[5]; /* images, rows, flips, shifts, out */
    long m, H, W;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*lll", &b[0], &b[1], &b[2], &b[3], &b[4], &m, &H, &W)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    exact_f64(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, m, H, W);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 5; k++) PyBuffer_Release(&b[k]);
    Py_RETURN_NONE;
}

/* coarse_scores(coarse, pt, warped, pc, best, index, n0, n1, M, h, w, pr, pw, flips) -> 0, or -1 without
 * memory. Registration's coarse grid search (deepssim/ssim/_alignment.py, _coarse_search), for pairs n in
 * [n0, n1): the Pearson correlation of training image coarse[pt[n]] (h x w, zero mean, unit norm),
 * flipped by f (bit 0 rows, bit 1 columns), with each candidate m of warped[pc[n]] (M, h, w; fill 0)
 * shifted by (i - pr, j - pw) whole pixels, i < 2 pr + 1, j < 2 pw + 1: their dot product over the frame
 * over the shifted candidate's sqrt(n var) (its 1e-6 floor as torch's). best[n, f] is the highest
 * correlation and index[n, f] its (i, j, m) flattened, the first in that order among equals. The dot
 * products run candidate-wise in SIMD lanes (the candidates laid out pixel-major), 16 at a time for
 * all shifts of a row of shifts, so each candidate value loaded serves 2 pw + 1 multiply-adds; float32
 * as torch's convolution, the spreads from running sums kept at the frame's corners. Consecutive pairs
 * of one candidate image (pc) share its layout and spreads. */
typedef float v8f __attribute__((vector_size(32)));

/* the dot products of one padded flipped training image with V x 8 candidates (lanes) at the J shifts
 * of row shift i: V and J are constants wherever this is inlined, so the V J sums stay in registers */
static inline __attribute__((always_inline)) void
coarse_row(const float *restrict padded, long PW, const float *restrict cand, long MP, long h, long w,
           long i, long J, long V, float *restrict out)
{
    v8f acc[2 * 16] = {0};
    for (long y = 0; y < h; y++) {
        const float *row = padded + (y + i) * PW, *c = cand + y * w * MP;
        for (long x = 0; x < w; x++, c += MP) {
            const v8f c0 = *(const v8f *)c, c1 = V == 2 ? *(const v8f *)(c + 8) : c0;
            for (long j = 0; j < J; j++) {
                acc[2 * j] += row[x + j] * c0;
                if (V == 2) acc[2 * j + 1] += row[x + j] * c1;
            }
        }
    }
    for (long j = 0; j < J; j++)
        for (long v = 0; v < V; v++) memcpy(out + j * MP + 8 * v, &acc[2 * j + v], sizeof(v8f));
}

/* the shifted candidates' sqrt(n var) over the frame, spread[(i J + j) MP + m], with the candidates in
 * lanes (cand: pixel-major, MP lanes): the sums over the frame's rectangles [r0, r1) x [q0, q1) come
 * from running sums kept only at the rectangles' corners (r0 <= pr or r1 >= h - pr, likewise q).
 * work: 2 (2 pw + 2) (2 pr + 2 + 1) MP + 2 MP floats. */
static inline __attribute__((always_inline)) void
coarse_spreads(const float *restrict cand, long h, long w, long pr, long pw, long MP, float *restrict work,
               float *restrict spread)
{
    const long I = 2 * pr + 1, J = 2 * pw + 1, NQ = 2 * pw + 2, NR = 2 * pr + 2;
    float *column = work, *corner = column + 2 * NQ * MP, *row = corner + 2 * NR * NQ * MP;
    /* corner rows r in {0..pr, h-pr..h}, columns q in {0..pw, w-pw..w}: index k < pr + 1 or the rest */
#define CORNER_ROW(k) ((k) <= pr ? (k) : h - pr + (k) - pr - 1)
#define CORNER_COL(k) ((k) <= pw ? (k) : w - pw + (k) - pw - 1)
    memset(column, 0, sizeof(float) * 2 * NQ * MP);
    for (long y = 0; y <= h; y++) {
        if (y > 0) { /* add row y - 1 into the column sums at the corner columns */
            memset(row, 0, sizeof(float) * 2 * MP);
            for (long x = 0; x <= w; x++) {
                for (long k = 0; k < NQ; k++) /* (corners may coincide in tiny images) */
                    if (CORNER_COL(k) == x)
                        for (long m = 0; m < MP; m++) {
                            column[k * MP + m] += row[m];
                            column[(NQ + k) * MP + m] += row[MP + m];
                        }
                if (x == w) break;
                const float *c = cand + ((y - 1) * w + x) * MP;
                for (long m = 0; m < MP; m++) row[m] += c[m], row[MP + m] += c[m] * c[m];
            }
        }
        for (long k = 0; k < NR; k++)
            if (CORNER_ROW(k) == y) memcpy(corner + k * 2 * NQ * MP, column, sizeof(float) * 2 * NQ * MP);
    }
    for (long i = 0; i < I; i++)
        for (long j = 0; j < J; j++) {
            const long si = i - pr, sj = j - pw; /* rows [r0, r1), columns [q0, q1) stay in the frame */
            const long r0 = si < 0 ? -si : 0, r1 = si > 0 ? NR - 1 - si : NR - 1;
            const long q0 = sj < 0 ? -sj : 0, q1 = sj > 0 ? NQ - 1 - sj : NQ - 1;
            const float *a = corner + r0 * 2 * NQ * MP, *b = corner + r1 * 2 * NQ * MP;
            float *out = spread + (i * J + j) * MP;
            for (long m = 0; m < MP; m++) {
                const float first = b[q1 * MP + m] - a[q1 * MP + m] - b[q0 * MP + m] + a[q0 * MP + m];
                const float second = b[(NQ + q1) * MP + m] - a[(NQ + q1) * MP + m] - b[(NQ + q0) * MP + m] +
                                     a[(NQ + q0) * MP + m];
                const float var = second - first * first / (float)(h * w);
                out[m] = sqrtf(var > 1e-6f ? var : 1e-6f);
            }
        }
#undef CORNER_ROW
#undef CORNER_COL
}

MULTIVERSION static long coarse_f32(const float *coarse, const long long *pt, const float *warped,
                                    const long long *pc, float *best, long long *index, long n0, long n1,
                                    long M, long h, long w, long pr, long pw, long flips)
{
    const long I = 2 * pr + 1, J = 2 * pw + 1, MP = (M + 7) / 8 * 8, PH = h + 2 * pr, PW = w + 2 * pw;
    const long hw = h * w;
    const long table = (2 * (2 * pw + 2) * (2 * pr + 3) + 2) * MP;
    float *work = NULL;
    if (posix_memalign((void **)&work, 64, sizeof(float) * (hw * MP + PH * PW + 2 * I * J * MP + table)) != 0)
        return -1;
    float *cand = work, *padded = cand + hw * MP, *dots = padded + PH * PW, *spread = dots + I * J * MP;
    for (long n = n0; n < n1; n++) {
        const float *a = coarse + pt[n] * hw;
        if (n == n0 || pc[n] != pc[n - 1]) { /* a new candidate image: pixel-major, candidates in lanes */
            const float *g = warped + pc[n] * M * hw;
            for (long q = 0; q < hw; q++) {
                for (long m = 0; m < M; m++) cand[q * MP + m] = g[m * hw + q];
                for (long m = M; m < MP; m++) cand[q * MP + m] = 0;
            }
            coarse_spreads(cand, h, w, pr, pw, MP, spread + I * J * MP, spread);
        }
        for (long f = 0; f < flips; f++) {
            memset(padded, 0, sizeof(float) * PH * PW);
            for (long y = 0; y < h; y++)
                for (long x = 0; x < w; x++)
                    padded[(y + pr) * PW + x + pw] = a[((f & 1) ? h - 1 - y : y) * w + ((f & 2) ? w - 1 - x : x)];
            for (long mb = 0; mb < MP; mb += 16) /* 16 candidates at a time, the last 8 maybe alone */
                for (long i = 0; i < I; i++) {
                    float *out = dots + i * J * MP + mb;
                    const long V = mb + 16 <= MP ? 2 : 1;
                    if (J == 5 && V == 2) /* the default search at the default coarse size */
                        coarse_row(padded, PW, cand + mb, MP, h, w, i, 5, 2, out);
                    else if (J == 5)
                        coarse_row(padded, PW, cand + mb, MP, h, w, i, 5, 1, out);
                    else
                        coarse_row(padded, PW, cand + mb, MP, h, w, i, J, V, out);
                }
            float top = -INFINITY;
            long long where = 0;
            for (long s = 0; s < I * J; s++)
                for (long m = 0; m < M; m++) {
                    const float score = dots[s * MP + m] / spread[s * MP + m];
                    if (score > top) top = score, where = s * M + m;
                }
            best[n * flips + f] = top;
            index[n * flips + f] = where;
        }
    }
    free(work);
    return 0;
}

static PyObject *coarse_scores(PyObject *self, PyObject *args)
{
    Py_buffer b[6]; /* coarse, pt, warped, pc, best, index */
    long n0, n1, M, h, w, pr, pw, flips, code;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*w*llllllll", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &n0, &n1,
                          &M, &h, &w, &pr, &pw, &flips))
        return NULL;
    if (2 * pw + 1 > 16) {
        for (int k = 0; k < 6; k++) PyBuffer_Release(&b[k]);
        PyErr_SetString(PyExc_ValueError, "coarse_scores takes at most 16 shifts along a row");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    code = coarse_f32(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, n0, n1, M, h, w, pr, pw,
                      flips);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 6; k++) PyBuffer_Release(&b[k]);
    return PyLong_FromLong(code);
}

/* ssim_raw_pairs(za, mu, var, c1, c2, raws, stack, ia, ib, out, n, H, W) -> 0, or 1 + the pair whose
 * raw image cannot be prepared (negated for NaN or Inf, as prepare_images; LONG_MIN: no memory).
 * out[p] = SSIM of training image ia[p] and raw image raws[stack[p]][ib[p]], float64 (raws: a tuple
 * of stacks, so callers need not copy their candidates into one). The training side is prepared
 * (z, and per valid pixel its local mean mu and variance + C2 var, each a plane); the raw image is
 * centred and its 7x7 sums (of it, its square and its product with the training z) slide down the
 * image in one pass, its 1 / sd (the rest of z-scoring) folded into the formula's constants, so
 * nothing of it leaves the cache, and every per-pixel loop runs at unit stride in SIMD.
 * For registration's candidates, each scored once. The caller checks the indices. */
MULTIVERSION static long raw_pairs_f64(const double *za, const double *mua, const double *vara,
                                       const double *c1, const double *c2, const double *const *raws,
                                       const long long *stack, const long long *ia, const long long *ib,
                                       double *out, long n, long H, long W)
{
    const long ho = H - 6, wo = W - 6, hw = H * W, vhw = ho * wo;
    const double k1 = 2.0 * (49.0 / 48.0) / 49.0, k2 = 2.0 * (49.0 / 48.0);
    double *scratch = (double *)malloc(sizeof(double) * 3 * W);
    if (scratch == NULL) return LONG_MIN;
    double *sb = scratch, *sbb = sb + W, *sab = sbb + W;
    for (long p = 0; p < n; p++) {
        const double *x = raws[stack[p]] + ib[p] * hw, *a = za + ia[p] * hw;
        const double *ma = mua + ia[p] * vhw, *va = vara + ia[p] * vhw, C1 = c1[ia[p]], C2 = c2[ia[p]];
        double sum = 0, ss = 0;
        for (long q = 0; q < hw; q++) sum += x[q];
        if (not_finite(sum)) {
            free(scratch);
            return -(p + 1);
        }
        const double m = sum / (double)hw;
        for (long q = 0; q < hw; q++) ss += (x[q] - m) * (x[q] - m);
        const double sd = sqrt(ss / (double)hw);
        if (!(sd > 0)) {
            free(scratch);
            return p + 1;
        }
        const double inv = 1.0 / sd, mean_of_sum = inv / 49.0, square_of_sum = inv * inv / 49.0;
        const double k1_inv = k1 * inv;
        for (long c = 0; c < W; c++) {
            double s1 = 0, s2 = 0, s3 = 0;
            for (long k = 0; k < 7; k++) {
                const double v = x[k * W + c] - m; /* centred; 1 / sd is in the formula */
                s1 += v, s2 += v * v, s3 += a[k * W + c] * v;
            }
            sb[c] = s1, sbb[c] = s2, sab[c] = s3;
        }
        double acc = 0;
        for (long y = 0; y < ho; y++) {
            if (y > 0) { /* slide the column sums down one row (double: no drift to speak of) */
                const double *xn = x + (y + 6) * W, *xo = x + (y - 1) * W;
                const double *an = a + (y + 6) * W, *ao = a + (y - 1) * W;
                for (long c = 0; c < W; c++) {
                    const double zn = xn[c] - m, zo = xo[c] - m;
                    sb[c] += zn - zo;
                    sbb[c] += zn * zn - zo * zo;
                    sab[c] += an[c] * zn - ao[c] * zo;
                }
            }
            const double *mr = ma + y * wo, *vr = va + y * wo;
            double row = 0;
            _Pragma("omp simd reduction(+ : row)")
            for (long c = 0; c < wo; c++) {
                const double s1 = sb[c] + sb[c + 1] + sb[c + 2] + sb[c + 3] + sb[c + 4] + sb[c + 5] + sb[c + 6];
                const double s2 = sbb[c] + sbb[c + 1] + sbb[c + 2] + sbb[c + 3] + sbb[c + 4] + sbb[c + 5]
                                + sbb[c + 6];
                const double s3 = sab[c] + sab[c + 1] + sab[c + 2] + sab[c + 3] + sab[c + 4] + sab[c + 5]
                                + sab[c + 6];
                const double mub = s1 * mean_of_sum, mm = mr[c] * mub;
                const double vb = (49.0 / 48.0) * (s2 * square_of_sum - mub * mub);
                const double num = (mm + mm + C1) * (k1_inv * s3 - k2 * mm + C2);
                const double den = (mr[c] * mr[c] + C1 + mub * mub) * (vr[c] + vb);
                row += num / den;
            }
            acc += row;
        }
        out[p] = acc / (double)vhw;
    }
    free(scratch);
    return 0;
}

static PyObject *ssim_raw_pairs(PyObject *self, PyObject *args)
{
    Py_buffer b[9]; /* za, mu, var, c1, c2, stack, ia, ib, out */
    PyObject *sequence;
    long n, H, W, code = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*Oy*y*y*w*lll", &b[0], &b[1], &b[2], &b[3], &b[4], &sequence,
                          &b[5], &b[6], &b[7], &b[8], &n, &H, &W))
        return NULL;
    /* the raw stacks: a tuple of float64 arrays, pair p's image is raws[stack[p]][ib[p]] */
    const Py_ssize_t count = PyTuple_Check(sequence) ? PyTuple_GET_SIZE(sequence) : -1;
    Py_buffer *views = count > 0 ? (Py_buffer *)calloc((size_t)count, sizeof(Py_buffer)) : NULL;
    const double **raws = count > 0 ? (const double **)calloc((size_t)count, sizeof(double *)) : NULL;
    Py_ssize_t held = 0;
    if (views == NULL || raws == NULL) {
        code = LONG_MIN;
        if (count <= 0) PyErr_SetString(PyExc_TypeError, "raws must be a non-empty tuple of arrays");
    }
    for (; code == 0 && held < count; held++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(sequence, held), &views[held], PyBUF_SIMPLE) != 0) {
            code = LONG_MIN + 1;
            break;
        }
        raws[held] = (const double *)views[held].buf;
    }
    if (code == 0) {
        Py_BEGIN_ALLOW_THREADS
        code = raw_pairs_f64(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, raws, b[5].buf, b[6].buf,
                             b[7].buf, b[8].buf, n, H, W);
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    free(views);
    free((void *)raws);
    for (int k = 0; k < 9; k++) PyBuffer_Release(&b[k]);
    if (code == LONG_MIN) return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    if (code == LONG_MIN + 1) return NULL; /* GetBuffer set the error */
    return PyLong_FromLong(code);
}

static PyMethodDef methods[] = {
    {"ssim_rows", ssim_rows, METH_VARARGS,
     "ssim_rows(za, zb, sa, sb, c1, c2, out, i0, i1, j0, j1, nb, H, W, is64, "
     "workspace)"},
    {"ssim_rows_raw", ssim_rows_raw, METH_VARARGS,
     "ssim_rows_raw(za, sa, c1, c2, images, out, i0, i1, j0, j1, nb, H, W, is64, "
     "workspace) -> 0, or as prepare_images; images: raw float64 (m, H, W)"},
    {"workspace_bytes", workspace_bytes, METH_VARARGS,
     "workspace_bytes(H, W) -> the bytes ssim_rows needs as its workspace"},
    {"prepare_images", prepare_images, METH_VARARGS,
     "prepare_images(x, z, stats, c1, c2, n, H, W, train, is64) -> 0, or 1 + the first bad image "
     "(negated when it has NaN or Inf values)"},
    {"set_instruction_set", set_instruction_set, METH_VARARGS,
     "set_instruction_set(name) -> False if this CPU lacks it: the pair kernel's 'avx512', 'avx2' or 'baseline'"},
    {"instruction_set", get_instruction_set, METH_NOARGS, "instruction_set() -> the pair kernel in use"},
    {"ssim_pairs", ssim_pairs, METH_VARARGS,
     "ssim_pairs(za, zb, sa, sb, c1, c2, out, n, H, W, is64)"},
    {"ssim_pairs_indexed", ssim_pairs_indexed, METH_VARARGS,
     "ssim_pairs_indexed(za, zb, sa, sb, c1, c2, ia, ib, out, n, H, W, is64): pairs (a_ia[p], b_ib[p])"},
    {"contrast_images", contrast_images, METH_VARARGS,
     "contrast_images(images, rows, gammas, out, z, m, hw) -> 0 or 1 + a constant output: out[i] = "
     "images[rows[i]] min-max scaled, raised to gammas[i] (unchanged at 1); z: out z-scored, float32"},
    {"exact_transforms", exact_transforms, METH_VARARGS,
     "exact_transforms(images, rows, flips, shifts, out, m, H, W): images[rows[i]] flipped (bit 0 rows, "
     "bit 1 columns) and shifted by whole pixels, filled with its minimum; float64, the rest int64"},
    {"ssim_raw_pairs", ssim_raw_pairs, METH_VARARGS,
     "ssim_raw_pairs(za, mu, var, c1, c2, raws, stack, ia, ib, out, n, H, W) -> 0, or as prepare_images "
     "(the pair); float64: pairs (training image ia[p], raws[stack[p]][ib[p]]), statistics as planes"},
    {"coarse_scores", coarse_scores, METH_VARARGS,
     "coarse_scores(coarse, pt, warped, pc, best, index, n0, n1, M, h, w, pr, pw, flips) -> 0, or -1 "
     "without memory: registration's coarse search, the best correlation of each pair and flip"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel",
                                    "Fused CPU kernel for SSIM matrices.", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void)
{
    if (!use_kernels("avx512")) use_kernels("avx2"); /* the widest this CPU has */
    return PyModule_Create(&module);
}
