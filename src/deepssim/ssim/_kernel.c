/* Fused SSIM kernel: one mean-SSIM value per (real, synthetic) pair.
 *
 * For each pair the product image, its 7x7 box sum and the SSIM map are computed in one pass
 * and only the mean leaves the kernel, so nothing of size N x M x H x W is ever stored.
 * Per-image local statistics are precomputed by the caller (deepssim/ssim.py), which also
 * documents the formula. Pairs are processed in TILE x TILE tiles row by row so the rows of
 * both images stay in cache while they are reused. The vertical 7-row sums are updated
 * incrementally (add the new row, drop the old one) and recomputed exactly every REFRESH rows
 * to bound floating-point drift.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
 * c1, c2: constants per real image. Computes out[i, j] for i in [i0, i1), j in [0, nb). */
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

static PyMethodDef methods[] = {
    {"ssim_rows", ssim_rows, METH_VARARGS,
     "ssim_rows(za, zb, mua, mub, mua2c1, mub2, vac2, vb, c1, c2, out, i0, i1, nb, H, W, is64)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel",
                                    "Fused CPU kernel for SSIM matrices.", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }
