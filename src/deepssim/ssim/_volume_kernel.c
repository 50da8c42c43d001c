/* Exact 3D SSIM of one pair of volumes: scikit-image's structural_similarity on 3D arrays (7x7x7
 * uniform window, sample covariance x 343/342, K1 = 0.01, K2 = 0.03, mean of the map with a
 * 3-voxel border cropped, i.e. over every window inside the volume), on z-scores computed on the
 * fly from the raw volumes. deepssim/ssim/volume.py documents the rule.
 *
 * Separable box sums in double: five plane sums (a, b, a^2, b^2, ab over 7 consecutive planes)
 * slide along axis 0 (add the entering plane, drop the leaving one); within a plane, column sums
 * over 7 rows slide down, and each output row sums 7 columns. Only per-plane sums of the SSIM
 * map leave the kernel. A caller splits the output planes among threads (the GIL is released).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

static int not_finite(double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (bits & 0x7ff0000000000000ULL) == 0x7ff0000000000000ULL;
}

/* mean, population std, min, max of n doubles; std is NaN when a value is not finite. */
MULTIVERSION static void stats_of(const double *x, long n, double *out)
{
    double sum = 0, lo = x[0], hi = x[0];
    for (long p = 0; p < n; p++) {
        sum += x[p];
        lo = x[p] < lo ? x[p] : lo;
        hi = x[p] > hi ? x[p] : hi;
    }
    const double m = sum / (double)n;
    double ss = 0;
    for (long p = 0; p < n; p++) ss += (x[p] - m) * (x[p] - m);
    out[0] = m;
    out[1] = not_finite(sum) ? NAN : sqrt(ss / (double)n);
    out[2] = lo;
    out[3] = hi;
}

/* Add one plane's z-scores and products to the five plane sums. */
MULTIVERSION static void add_plane(const double *restrict a, const double *restrict b, long hw,
                                   double ma, double ia, double mb, double ib, double *restrict sa,
                                   double *restrict sb, double *restrict saa, double *restrict sbb,
                                   double *restrict sab)
{
    for (long p = 0; p < hw; p++) {
        const double x = (a[p] - ma) * ia, y = (b[p] - mb) * ib;
        sa[p] += x;
        sb[p] += y;
        saa[p] += x * x;
        sbb[p] += y * y;
        sab[p] += x * y;
    }
}

/* Slide the plane sums one plane on: add plane (a, b), drop plane (c, d), in one pass. */
MULTIVERSION static void slide_plane(const double *restrict a, const double *restrict b,
                                     const double *restrict c, const double *restrict d, long hw,
                                     double ma, double ia, double mb, double ib, double *restrict sa,
                                     double *restrict sb, double *restrict saa, double *restrict sbb,
                                     double *restrict sab)
{
    for (long p = 0; p < hw; p++) {
        const double x = (a[p] - ma) * ia, y = (b[p] - mb) * ib;
        const double u = (c[p] - ma) * ia, v = (d[p] - mb) * ib;
        sa[p] += x - u;
        sb[p] += y - v;
        saa[p] += x * x - u * u;
        sbb[p] += y * y - v * v;
        sab[p] += x * y - u * v;
    }
}

/* The SSIM map's sum over output plane d, from the plane sums P (5 x H x W) over its 7 planes.
 * With window sums A, B, Saa, Sbb, Sab over N = 343 voxels, the SSIM of the window is
 * (2AB + N^2 C1)(2n(N Sab - AB) + N^2 C2) / ((A^2 + B^2 + N^2 C1)(n(N(Saa + Sbb) - A^2 - B^2) + N^2 C2))
 * with n = N/(N - 1): the means, variances and covariance with N^2 multiplied out. */
MULTIVERSION static double plane_ssim(const double *restrict P, long H, long W, double C1, double C2,
                                      double *restrict col, double *restrict win)
{
    const long hw = H * W, wo = W - 6;
    const double N = 343.0, n = 343.0 / 342.0, c1 = N * N * C1, c2 = N * N * C2;
    double acc = 0;
    for (long y = 0; y < H - 6; y++) {
        for (int q = 0; q < 5; q++) {
            const double *restrict s = P + q * hw;
            double *restrict c = col + q * W;
            if (y == 0) {
                for (long x = 0; x < W; x++) {
                    double t = 0;
                    for (long k = 0; k < 7; k++) t += s[k * W + x];
                    c[x] = t;
                }
            } else {
                for (long x = 0; x < W; x++) c[x] += s[(y + 6) * W + x] - s[(y - 1) * W + x];
            }
            /* 7-column window sums: pairs, then three pairs and one column */
            double *restrict pair = win + 5 * W, *restrict w = win + q * W;
            for (long x = 0; x < W - 1; x++) pair[x] = c[x] + c[x + 1];
            for (long x = 0; x < wo; x++) w[x] = pair[x] + pair[x + 2] + pair[x + 4] + c[x + 6];
        }
        const double *restrict ta = win, *restrict tb = win + W, *restrict taa = win + 2 * W,
                               *restrict tbb = win + 3 * W, *restrict tab = win + 4 * W;
        double row = 0;
        for (long x = 0; x < wo; x++) {
            const double A = ta[x], B = tb[x], AB = A * B, A2B2 = A * A + B * B;
            const double num = (2 * AB + c1) * (2 * n * (N * tab[x] - AB) + c2);
            const double den = (A2B2 + c1) * (n * (N * (taa[x] + tbb[x]) - A2B2) + c2);
            row += num / den;
        }
        acc += row;
    }
    return acc;
}

/* planes(a, b, out, D, H, W, d0, d1, ma, ia, mb, ib, C1, C2) -> 0, or -1 without memory.
 * out[d] = the sum of the SSIM map over output plane d, for d in [d0, d1). */
static PyObject *planes(PyObject *self, PyObject *args)
{
    Py_buffer ba, bb, bo;
    long D, H, W, d0, d1;
    double ma, ia, mb, ib, C1, C2;
    if (!PyArg_ParseTuple(args, "y*y*w*llllldddddd", &ba, &bb, &bo, &D, &H, &W, &d0, &d1, &ma, &ia,
                          &mb, &ib, &C1, &C2))
        return NULL;
    const long hw = H * W;
    double *P = (double *)calloc(5 * hw + 11 * W, sizeof(double));
    long status = P == NULL ? -1 : 0;
    if (P != NULL) {
        const double *a = (const double *)ba.buf, *b = (const double *)bb.buf;
        double *out = (double *)bo.buf, *col = P + 5 * hw, *win = col + 5 * W;
        Py_BEGIN_ALLOW_THREADS
        for (long d = d0; d < d1; d++) {
            if (d == d0 || (d - d0) % 32 == 0) { /* exact sums afresh every 32 planes: no drift */
                memset(P, 0, sizeof(double) * 5 * hw);
                for (long k = 0; k < 7; k++)
                    add_plane(a + (d + k) * hw, b + (d + k) * hw, hw, ma, ia, mb, ib, P, P + hw,
                              P + 2 * hw, P + 3 * hw, P + 4 * hw);
            } else {
                slide_plane(a + (d + 6) * hw, b + (d + 6) * hw, a + (d - 1) * hw, b + (d - 1) * hw, hw,
                            ma, ia, mb, ib, P, P + hw, P + 2 * hw, P + 3 * hw, P + 4 * hw);
            }
            out[d] = plane_ssim(P, H, W, C1, C2, col, win);
        }
        Py_END_ALLOW_THREADS
        free(P);
    }
    PyBuffer_Release(&ba);
    PyBuffer_Release(&bb);
    PyBuffer_Release(&bo);
    return PyLong_FromLong(status);
}

/* stats(x, n) -> (mean, std, min, max); std is NaN when x has NaN or Inf values. */
static PyObject *stats(PyObject *self, PyObject *args)
{
    Py_buffer bx;
    long n;
    double out[4];
    if (!PyArg_ParseTuple(args, "y*l", &bx, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    stats_of((const double *)bx.buf, n, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bx);
    return Py_BuildValue("dddd", out[0], out[1], out[2], out[3]);
}

static PyMethodDef methods[] = {
    {"planes", planes, METH_VARARGS,
     "planes(a, b, out, D, H, W, d0, d1, ma, ia, mb, ib, C1, C2) -> 0, or -1 without memory"},
    {"stats", stats, METH_VARARGS, "stats(x, n) -> (mean, std, min, max)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_volume_kernel",
                                    "Exact 3D SSIM of one pair of volumes.", -1, methods};

PyMODINIT_FUNC PyInit__volume_kernel(void) { return PyModule_Create(&module); }
