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

/* mean, population std, min, max of n doubles in one pass over memory: blocks small enough for
 * L1 get an exact two-pass mean and sum of squared deviations, merged with Chan et al.'s update;
 * std is NaN when a value is not finite. */
MULTIVERSION static void stats_of(const double *x, long n, double *out)
{
    enum { BLOCK = 2048 };
    double mean = 0, m2 = 0, total = 0, lo = x[0], hi = x[0];
    long count = 0;
    for (long s = 0; s < n; s += BLOCK) {
        const double *restrict v = x + s;
        const long m = n - s < BLOCK ? n - s : BLOCK;
        double sum = 0, blo = v[0], bhi = v[0];
        for (long p = 0; p < m; p++) {
            sum += v[p];
            blo = v[p] < blo ? v[p] : blo;
            bhi = v[p] > bhi ? v[p] : bhi;
        }
        const double bm = sum / (double)m;
        double ss = 0;
        for (long p = 0; p < m; p++) ss += (v[p] - bm) * (v[p] - bm);
        const long merged = count + m;
        const double delta = bm - mean;
        mean += delta * ((double)m / (double)merged);
        m2 += ss + delta * delta * ((double)count * (double)m / (double)merged);
        count = merged;
        total += sum;
        lo = blo < lo ? blo : lo;
        hi = bhi > hi ? bhi : hi;
    }
    out[0] = mean;
    out[1] = not_finite(total) ? NAN : sqrt(m2 / (double)n);
    out[2] = lo;
    out[3] = hi;
}

#define INLINE static inline __attribute__((always_inline))

/* Row r of the plane sums: 4 x W values (x, y, x^2 + y^2, xy summed over 7 planes), rows of the
 * four quantities interleaved so that one row of all four is contiguous. */

/* Build a row of plane sums afresh from the rows of 7 consecutive planes (a, b step hw). */
INLINE void build_row(const double *restrict a, const double *restrict b, long hw, long W, double ma,
                      double ia, double mb, double ib, double *restrict p)
{
    double *restrict sa = p, *restrict sb = p + W, *restrict sq = p + 2 * W, *restrict sx = p + 3 * W;
    for (long x = 0; x < 4 * W; x++) p[x] = 0;
    for (long k = 0; k < 7; k++) {
        const double *restrict ak = a + k * hw, *restrict bk = b + k * hw;
        for (long x = 0; x < W; x++) {
            const double u = (ak[x] - ma) * ia, v = (bk[x] - mb) * ib;
            sa[x] += u;
            sb[x] += v;
            sq[x] += u * u + v * v;
            sx[x] += u * v;
        }
    }
}

/* Slide a row of plane sums one plane on: add the row (a, b), drop the row (c, d). */
INLINE void slide_row(const double *restrict a, const double *restrict b, const double *restrict c,
                      const double *restrict d, long W, double ma, double ia, double mb, double ib,
                      double *restrict p)
{
    double *restrict sa = p, *restrict sb = p + W, *restrict sq = p + 2 * W, *restrict sx = p + 3 * W;
    for (long x = 0; x < W; x++) {
        const double u = (a[x] - ma) * ia, v = (b[x] - mb) * ib;
        const double s = (c[x] - ma) * ia, t = (d[x] - mb) * ib;
        sa[x] += u - s;
        sb[x] += v - t;
        sq[x] += (u * u + v * v) - (s * s + t * t);
        sx[x] += u * v - s * t;
    }
}

/* The SSIM map's sums over output planes d0 <= d < d1 (out[d]). For each plane the rows of the
 * plane sums P (H x 4 x W) are slid along axis 0 one at a time, and as soon as row r is current
 * the column sums over rows r-6..r slide down to it and output row r-6 is finished: all of one
 * row's work happens while its data is in L1. With window sums A, B, Q = Saa + Sbb and X = Sab over
 * N = 343 voxels, the SSIM of a window is
 * (2AB + N^2 C1)(2n(N X - AB) + N^2 C2) / ((A^2 + B^2 + N^2 C1)(n(N Q - A^2 - B^2) + N^2 C2))
 * with n = N/(N - 1): the means, variances and covariance with N^2 multiplied out. */
MULTIVERSION static void ssim_planes(const double *a, const double *b, double *out, long H, long W,
                                     long d0, long d1, double ma, double ia, double mb, double ib,
                                     double C1, double C2, double *P, double *col, double *pair)
{
    const long hw = H * W, w4 = 4 * W, wo = W - 6;
    const double N = 343.0, n = 343.0 / 342.0, c1 = N * N * C1, c2 = N * N * C2;
    for (long d = d0; d < d1; d++) {
        const int fresh = (d - d0) % 32 == 0; /* exact sums afresh every 32 planes: no drift */
        double acc = 0;
        for (long r = 0; r < H; r++) {
            double *restrict p = P + r * w4;
            if (fresh)
                build_row(a + d * hw + r * W, b + d * hw + r * W, hw, W, ma, ia, mb, ib, p);
            else
                slide_row(a + (d + 6) * hw + r * W, b + (d + 6) * hw + r * W, a + (d - 1) * hw + r * W,
                          b + (d - 1) * hw + r * W, W, ma, ia, mb, ib, p);
            if (r < 6) continue;
            double *restrict c = col;
            if (r == 6) {
                for (long x = 0; x < w4; x++) {
                    double t = 0;
                    for (long k = 0; k < 7; k++) t += P[k * w4 + x];
                    c[x] = t;
                }
            } else {
                const double *restrict q = P + (r - 7) * w4;
                for (long x = 0; x < w4; x++) c[x] += p[x] - q[x];
            }
            double *restrict pr = pair;
            for (long x = 0; x < w4 - 1; x++) pr[x] = c[x] + c[x + 1];
            const double *restrict pa = pair, *restrict pb = pair + W, *restrict pq = pair + 2 * W,
                                   *restrict px = pair + 3 * W;
            const double *restrict ca = c + 6, *restrict cb = c + W + 6, *restrict cq = c + 2 * W + 6,
                                   *restrict cx = c + 3 * W + 6;
            double row = 0;
            for (long x = 0; x < wo; x++) {
                const double A = pa[x] + pa[x + 2] + pa[x + 4] + ca[x];
                const double B = pb[x] + pb[x + 2] + pb[x + 4] + cb[x];
                const double Q = pq[x] + pq[x + 2] + pq[x + 4] + cq[x];
                const double X = px[x] + px[x + 2] + px[x + 4] + cx[x];
                const double AB = A * B, A2B2 = A * A + B * B;
                const double num = (2 * AB + c1) * (2 * n * (N * X - AB) + c2);
                const double den = (A2B2 + c1) * (n * (N * Q - A2B2) + c2);
                row += num / den;
            }
            acc += row;
        }
        out[d] = acc;
    }
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
    double *P = (double *)malloc(sizeof(double) * (4 * H * W + 8 * W));
    long status = P == NULL ? -1 : 0;
    if (P != NULL) {
        double *col = P + 4 * H * W, *pair = col + 4 * W;
        Py_BEGIN_ALLOW_THREADS
        ssim_planes((const double *)ba.buf, (const double *)bb.buf, (double *)bo.buf, H, W, d0, d1, ma,
                    ia, mb, ib, C1, C2, P, col, pair);
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
