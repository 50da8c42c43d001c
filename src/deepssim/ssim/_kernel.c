/* Fused SSIM kernel: one mean-SSIM value per (train, generated) pair.
 *
 * For each pair the product image, its 7x7 box sum and the SSIM map are computed in one pass
 * and only the mean leaves the kernel, so nothing of size N x M x H x W is ever stored.
 * Per-image local statistics (z-scores, 7x7 local means and variances, C1 and C2) are computed
 * once per image by prepare_images; deepssim/ssim/engine.py documents the formula. Pairs are processed in TILE x TILE tiles row by row so the rows of
 * both images stay in cache while they are reused. The vertical 7-row sums are updated
 * incrementally (add the new row, drop the old one) and recomputed exactly every REFRESH rows
 * to bound floating-point drift.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>

#define TILE 8
#define REFRESH 16

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("arch=sapphirerapids", "avx512f", "avx2,fma", "default")))
#else
#define MULTIVERSION
#endif

/* za, zb: z-scored images (n, H, W); mua, mub: local means (n, H-6, W-6);
 * mua2c1 = mua^2 + C1; mub2 = mub^2; vac2 = local variance of a + C2; vb = local variance of b;
 * c1, c2: constants per training image. Computes out[i, j] for i in [i0, i1), j in [0, nb). */
#define DEFINE_KERNEL(T, NAME)                                                                 \
MULTIVERSION static int NAME(const T *za, const T *zb, const T *mua, const T *mub,             \
                             const T *mua2c1, const T *mub2, const T *vac2, const T *vb,       \
                             const T *c1, const T *c2, T *out, long i0, long i1, long nb,      \
                             long H, long W)                                                   \
{                                                                                              \
    const long ho = H - 6, wo = W - 6, hw = H * W, vhw = ho * wo;                              \
    const T k1 = (T)(2.0 * (49.0 / 48.0) / 49.0), k2 = (T)(2.0 * (49.0 / 48.0));              \
    T *cols = (T *)malloc(sizeof(T) * W * TILE * TILE);                                        \
    if (cols == NULL) return -1;                                                               \
    double acc[TILE][TILE];                                                                    \
    for (long it = i0; it < i1; it += TILE) {                                                  \
        const long ni = (i1 - it < TILE) ? i1 - it : TILE;                                     \
        for (long jt = 0; jt < nb; jt += TILE) {                                               \
            const long nj = (nb - jt < TILE) ? nb - jt : TILE;                                 \
            for (long u = 0; u < ni; u++)                                                      \
                for (long v = 0; v < nj; v++) acc[u][v] = 0.0;                                 \
            for (long y = 0; y < ho; y++) {                                                    \
                const long o = y * wo;                                                         \
                for (long u = 0; u < ni; u++) {                                                \
                    const long i = it + u;                                                     \
                    const T *ar = za + i * hw + y * W, *ma = mua + i * vhw + o,                \
                            *sa = mua2c1 + i * vhw + o, *va = vac2 + i * vhw + o;              \
                    const T C1 = c1[i], C2 = c2[i];                                            \
                    for (long v = 0; v < nj; v++) {                                            \
                        const long j = jt + v;                                                 \
                        const T *br = zb + j * hw + y * W, *mb = mub + j * vhw + o,            \
                                *sb = mub2 + j * vhw + o, *vbj = vb + j * vhw + o;             \
                        T *col = cols + (u * TILE + v) * W;                                    \
                        if (y % REFRESH == 0) {                                                \
                            for (long x = 0; x < W; x++) {                                     \
                                T s = 0;                                                       \
                                for (long k = 0; k < 7; k++) s += ar[k * W + x] * br[k * W + x]; \
                                col[x] = s;                                                    \
                            }                                                                  \
                        } else {                                                               \
                            for (long x = 0; x < W; x++)                                       \
                                col[x] += ar[6 * W + x] * br[6 * W + x] - ar[x - W] * br[x - W]; \
                        }                                                                      \
                        T row = 0;                                                             \
                        for (long x = 0; x < wo; x++) {                                        \
                            const T s = col[x] + col[x + 1] + col[x + 2] + col[x + 3]          \
                                      + col[x + 4] + col[x + 5] + col[x + 6];                  \
                            const T m = ma[x] * mb[x];                                         \
                            const T num = (m + m + C1) * (k1 * s - k2 * m + C2);               \
                            const T den = (sa[x] + sb[x]) * (va[x] + vbj[x]);                  \
                            row += num / den;                                                  \
                        }                                                                      \
                        acc[u][v] += row;                                                      \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (long u = 0; u < ni; u++)                                                      \
                for (long v = 0; v < nj; v++)                                                  \
                    out[(it + u) * nb + jt + v] = (T)(acc[u][v] / (double)vhw);                \
        }                                                                                      \
    }                                                                                          \
    free(cols);                                                                                \
    return 0;                                                                                  \
}

DEFINE_KERNEL(float, ssim_rows_f32)
DEFINE_KERNEL(double, ssim_rows_f64)

static PyObject *ssim_rows(PyObject *self, PyObject *args)
{
    Py_buffer b[11];
    long i0, i1, nb, H, W;
    int is64, status;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*y*y*w*lllllp", &b[0], &b[1], &b[2], &b[3],
                          &b[4], &b[5], &b[6], &b[7], &b[8], &b[9], &b[10], &i0, &i1, &nb, &H,
                          &W, &is64))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (is64)
        status = ssim_rows_f64(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf,
                               b[6].buf, b[7].buf, b[8].buf, b[9].buf, b[10].buf, i0, i1, nb, H, W);
    else
        status = ssim_rows_f32(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf,
                               b[6].buf, b[7].buf, b[8].buf, b[9].buf, b[10].buf, i0, i1, nb, H, W);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 11; k++) PyBuffer_Release(&b[k]);
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}


/* Per-image statistics. x: raw images (n, H, W) in double. Writes z = (x - mean) / std
 * (population std), mu = 7x7 local mean of z, var = sample variance in the window (x 49/48),
 * and for training images mu2 = mu^2 + C1, var += C2 with C1 = (K1 R)^2, C2 = (K2 R)^2, R the range
 * of z; for generated images mu2 = mu^2. Window sums are recomputed for every output pixel in
 * double (no running sums, so no drift). Returns the index of the first constant image + 1, or 0. */
#define DEFINE_PREPARE(T, NAME)                                                                \
MULTIVERSION static long NAME(const double *x, T *z, T *mu, T *mu2, T *var, T *c1, T *c2,      \
                              long n, long H, long W, int train, double *work)                  \
{                                                                                              \
    const long ho = H - 6, wo = W - 6, hw = H * W, vhw = ho * wo;                              \
    double *zd = work, *col = work + hw, *col2 = work + hw + W;                                \
    for (long i = 0; i < n; i++) {                                                             \
        const double *xi = x + i * hw;                                                         \
        double mean = 0, ss = 0;                                                               \
        for (long p = 0; p < hw; p++) mean += xi[p];                                           \
        mean /= (double)hw;                                                                    \
        for (long p = 0; p < hw; p++) ss += (xi[p] - mean) * (xi[p] - mean);                   \
        const double sd = sqrt(ss / (double)hw);                                               \
        if (!(sd > 0)) return i + 1;                                                           \
        double lo = 1e300, hi = -1e300;                                                        \
        for (long p = 0; p < hw; p++) {                                                        \
            const double v = (xi[p] - mean) / sd;                                              \
            zd[p] = v;                                                                         \
            z[i * hw + p] = (T)v;                                                              \
            if (v < lo) lo = v;                                                                \
            if (v > hi) hi = v;                                                                \
        }                                                                                      \
        double C1 = 0, C2 = 0;                                                                 \
        if (train) {                                                                            \
            C1 = (0.01 * (hi - lo)) * (0.01 * (hi - lo));                                      \
            C2 = (0.03 * (hi - lo)) * (0.03 * (hi - lo));                                      \
            c1[i] = (T)C1;                                                                     \
            c2[i] = (T)C2;                                                                     \
        }                                                                                      \
        for (long xx = 0; xx < W; xx++) {                                                      \
            double s = 0, s2 = 0;                                                              \
            for (long k = 0; k < 7; k++) {                                                     \
                const double v = zd[k * W + xx];                                               \
                s += v;                                                                        \
                s2 += v * v;                                                                   \
            }                                                                                  \
            col[xx] = s;                                                                       \
            col2[xx] = s2;                                                                     \
        }                                                                                      \
        for (long y = 0; y < ho; y++) {                                                        \
            if (y > 0) {  /* slide the 7-row column sums down one row (double: no drift) */   \
                const double *add = zd + (y + 6) * W, *drop = zd + (y - 1) * W;                \
                for (long xx = 0; xx < W; xx++) {                                              \
                    col[xx] += add[xx] - drop[xx];                                             \
                    col2[xx] += add[xx] * add[xx] - drop[xx] * drop[xx];                       \
                }                                                                              \
            }                                                                                  \
            double s = 0, s2 = 0;                                                              \
            for (long k = 0; k < 6; k++) {                                                     \
                s += col[k];                                                                   \
                s2 += col2[k];                                                                 \
            }                                                                                  \
            for (long xx = 0; xx < wo; xx++) {                                                 \
                s += col[xx + 6];                                                              \
                s2 += col2[xx + 6];                                                            \
                const double m = s / 49.0;                                                     \
                const long o = i * vhw + y * wo + xx;                                          \
                mu[o] = (T)m;                                                                  \
                mu2[o] = (T)(m * m + C1);                                                      \
                var[o] = (T)((49.0 / 48.0) * (s2 / 49.0 - m * m) + C2);                        \
                s -= col[xx];                                                                  \
                s2 -= col2[xx];                                                                \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    return 0;                                                                                  \
}

DEFINE_PREPARE(float, prepare_f32)
DEFINE_PREPARE(double, prepare_f64)

/* Matched pairs: out[i] = mean SSIM of (a_i, b_i), the same formula as the matrix kernel. */
#define DEFINE_PAIRS(T, NAME)                                                                  \
MULTIVERSION static int NAME(const T *za, const T *zb, const T *mua, const T *mub,             \
                             const T *mua2c1, const T *mub2, const T *vac2, const T *vb,       \
                             const T *c1, const T *c2, T *out, long n, long H, long W)         \
{                                                                                              \
    const long ho = H - 6, wo = W - 6, hw = H * W, vhw = ho * wo;                              \
    const T k1 = (T)(2.0 * (49.0 / 48.0) / 49.0), k2 = (T)(2.0 * (49.0 / 48.0));              \
    T *col = (T *)malloc(sizeof(T) * W);                                                       \
    if (col == NULL) return -1;                                                                \
    for (long i = 0; i < n; i++) {                                                             \
        const T *a = za + i * hw, *b = zb + i * hw;                                            \
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
            const long o = i * vhw + y * wo;                                                   \
            const T *ma = mua + o, *mb = mub + o, *sa = mua2c1 + o, *sb = mub2 + o,            \
                    *va = vac2 + o, *vbi = vb + o;                                             \
            T row = 0;                                                                         \
            for (long x = 0; x < wo; x++) {                                                    \
                const T s = col[x] + col[x + 1] + col[x + 2] + col[x + 3]                      \
                          + col[x + 4] + col[x + 5] + col[x + 6];                              \
                const T m = ma[x] * mb[x];                                                     \
                const T num = (m + m + C1) * (k1 * s - k2 * m + C2);                           \
                const T den = (sa[x] + sb[x]) * (va[x] + vbi[x]);                              \
                row += num / den;                                                              \
            }                                                                                  \
            acc += row;                                                                        \
        }                                                                                      \
        out[i] = (T)(acc / (double)vhw);                                                       \
    }                                                                                          \
    free(col);                                                                                 \
    return 0;                                                                                  \
}

DEFINE_PAIRS(float, ssim_pairs_f32)
DEFINE_PAIRS(double, ssim_pairs_f64)

static PyObject *prepare_images(PyObject *self, PyObject *args)
{
    Py_buffer b[7];
    long n, H, W, bad;
    int train, is64;
    if (!PyArg_ParseTuple(args, "y*w*w*w*w*w*w*lllpp", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5],
                          &b[6], &n, &H, &W, &train, &is64))
        return NULL;
    double *work = (double *)malloc(sizeof(double) * (H * W + 2 * W));
    if (work == NULL) {
        for (int k = 0; k < 7; k++) PyBuffer_Release(&b[k]);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    if (is64)
        bad = prepare_f64(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, b[6].buf, n, H,
                          W, train, work);
    else
        bad = prepare_f32(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, b[6].buf, n, H,
                          W, train, work);
    Py_END_ALLOW_THREADS
    free(work);
    for (int k = 0; k < 7; k++) PyBuffer_Release(&b[k]);
    return PyLong_FromLong(bad);
}

static PyObject *ssim_pairs(PyObject *self, PyObject *args)
{
    Py_buffer b[11];
    long n, H, W;
    int is64, status;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*y*y*w*lllp", &b[0], &b[1], &b[2], &b[3], &b[4],
                          &b[5], &b[6], &b[7], &b[8], &b[9], &b[10], &n, &H, &W, &is64))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (is64)
        status = ssim_pairs_f64(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf,
                                b[6].buf, b[7].buf, b[8].buf, b[9].buf, b[10].buf, n, H, W);
    else
        status = ssim_pairs_f32(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf,
                                b[6].buf, b[7].buf, b[8].buf, b[9].buf, b[10].buf, n, H, W);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < 11; k++) PyBuffer_Release(&b[k]);
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"ssim_rows", ssim_rows, METH_VARARGS,
     "ssim_rows(za, zb, mua, mub, mua2c1, mub2, vac2, vb, c1, c2, out, i0, i1, nb, H, W, is64)"},
    {"prepare_images", prepare_images, METH_VARARGS,
     "prepare_images(x, z, mu, mu2, var, c1, c2, n, H, W, train, is64) -> 1 + first constant image, or 0"},
    {"ssim_pairs", ssim_pairs, METH_VARARGS,
     "ssim_pairs(za, zb, mua, mub, mua2c1, mub2, vac2, vb, c1, c2, out, n, H, W, is64)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel",
                                    "Fused CPU kernel for SSIM matrices.", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
