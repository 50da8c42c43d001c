/* Affine warps of float32 images, as registration samples them (deepssim/ssim/_alignment.py, _warp):
 * what torch.nn.functional.grid_sample computes on the CPU with align_corners=False and
 * padding_mode="zeros", bilinear or bicubic (cubic convolution, A = -0.75, every one of the 16 taps
 * outside the image counting 0), bit for bit, without building the grid.
 *
 * The grid is affine in the output row and column: grid_sample's normalised coordinate of output
 * pixel (i, j) is g = (rows[i] * lin[:, 0] + off) + cols[j] * lin[:, 1], which _warp evaluates in
 * float32 one operation at a time. Here the column part is tabulated once per map and the row part
 * once per row, so each pixel's coordinate is one addition per axis that rounds as torch's does (not
 * an accumulation along the row, which would drift from torch's grid by a rounding per step).
 *
 * torch's vectorised kernels (AVX2, AVX-512) are compiled with some products fused into multiply-adds
 * and its scalar one is not; so every formula here comes in both roundings, `fused` choosing (the
 * caller finds which one matches its torch, see _alignment.py). This file is compiled without
 * -ffast-math and with -ffp-contract=off, so the compiler fuses nothing on its own.
 *
 * The images are copied into a frame of PAD zeros, so that every tap is read without a bounds check:
 * a tap outside the image reads 0, as torch's masked gather does; a point whose taps all lie outside
 * has its floor clamped to within a pixel of the frame's border, where they all still read 0.
 * Each output row takes two passes: the first, vectorised, turns the coordinates into each pixel's
 * first tap and interpolation weights; the second reads the taps. A caller splits the images among
 * threads (the GIL is released).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#define A (-0.75f) /* torch's cubic convolution constant */
#define PAD 4

/* a b + c, fused into one rounding or not (fused is a constant wherever this is inlined) */
#define MAD(a, b, c) (fused ? fmaf(a, b, c) : (a) * (b) + (c))

/* grid_sample's pixel coordinate (align_corners=False) of normalised coordinate g: its fraction and
 * its floor's index in the padded image (the floor clamped to [-3, size + 1], which leaves out no
 * tap inside the image; NaN becomes -3). */
#define LOCATE(g, half, size, frac, index)                                                         \
    do {                                                                                           \
        const float x_ = MAD((g) + 1.0f, (half), -0.5f);                                           \
        float f_ = floorf(x_);                                                                     \
        (frac) = x_ - f_;                                                                          \
        f_ = f_ > -3.0f ? f_ : -3.0f;                                                              \
        f_ = f_ < (float)(size) + 1.0f ? f_ : (float)(size) + 1.0f;                                \
        (index) = (int)f_ + PAD;                                                                   \
    } while (0)

/* torch's cubic convolution weights of the taps at -1, 0, 1, 2 for fraction t (which products its
 * vectorised kernels fuse was found by matching their output bit for bit) */
#define CUBIC(t, c0, c1, c2, c3)                                                                   \
    do {                                                                                           \
        float u_ = (t) + 1.0f;                                                                     \
        (c0) = ((A * u_ - 5.0f * A) * u_ + 8.0f * A) * u_ - 4.0f * A;                              \
        u_ = (t);                                                                                  \
        (c1) = MAD(MAD(A + 2.0f, u_, -(A + 3.0f)) * u_, u_, 1.0f);                                    \
        u_ = 1.0f - (t);                                                                           \
        (c2) = MAD(MAD(A + 2.0f, u_, -(A + 3.0f)) * u_, u_, 1.0f);                                    \
        u_ = 2.0f - (t);                                                                           \
        (c3) = ((A * u_ - 5.0f * A) * u_ + 8.0f * A) * u_ - 4.0f * A;                              \
    } while (0)

/* a0 v0 + a1 v1 + a2 v2 + a3 v3, summed left to right, as torch sums a row of taps (ROW4) and the
 * rows (COL4, and the bilinear taps) */
#define ROW4(a0, v0, a1, v1, a2, v2, a3, v3) (MAD(a0, v0, (a1) * (v1)) + (a2) * (v2) + (a3) * (v3))
#define COL4(a0, v0, a1, v1, a2, v2, a3, v3) MAD(a3, v3, MAD(a2, v2, MAD(a1, v1, (a0) * (v0))))

/* One map: out (R, C) from the padded image pad ((h + 2 PAD) x (w + 2 PAD)); lin, off: the map;
 * cx, cy: the columns' parts of its grid (C). Per row, the first pass writes each pixel's first tap
 * (index, C ints) and weights (wt, 8 C: bilinear nw, ne, sw, se; bicubic 4 along x, then 4 along y). */
static inline __attribute__((always_inline)) void
warp_map(const float *restrict pad, long h, long w, const float *restrict rows, long R,
         const float *restrict cx, const float *restrict cy, long C, const float *lin, const float *off,
         int cubic, float *restrict out, int *restrict index, float *restrict wt, const int fused)
{
    const float hw = (float)w / 2, hh = (float)h / 2;
    const int pw = (int)(w + 2 * PAD);
    for (long i = 0; i < R; i++) {
        const float rx = rows[i] * lin[0] + off[0], ry = rows[i] * lin[2] + off[1];
        float *restrict o = out + i * C;
        if (cubic) {
            for (long j = 0; j < C; j++) {
                float fx, fy, *c = wt + 8 * j;
                int x, y;
                LOCATE(rx + cx[j], hw, w, fx, x);
                LOCATE(ry + cy[j], hh, h, fy, y);
                CUBIC(fx, c[0], c[1], c[2], c[3]);
                CUBIC(fy, c[4], c[5], c[6], c[7]);
                index[j] = (y - 1) * pw + x - 1;
            }
            for (long j = 0; j < C; j++) {
                const float *c = wt + 8 * j, *p = pad + index[j];
                const float r0 = ROW4(c[0], p[0], c[1], p[1], c[2], p[2], c[3], p[3]);
                p += pw;
                const float r1 = ROW4(c[0], p[0], c[1], p[1], c[2], p[2], c[3], p[3]);
                p += pw;
                const float r2 = ROW4(c[0], p[0], c[1], p[1], c[2], p[2], c[3], p[3]);
                p += pw;
                const float r3 = ROW4(c[0], p[0], c[1], p[1], c[2], p[2], c[3], p[3]);
                o[j] = COL4(c[4], r0, c[5], r1, c[6], r2, c[7], r3);
            }
        } else {
            for (long j = 0; j < C; j++) {
                float we, ws, *c = wt + 4 * j;
                int x, y;
                LOCATE(rx + cx[j], hw, w, we, x);
                LOCATE(ry + cy[j], hh, h, ws, y);
                const float ww = 1.0f - we, wn = 1.0f - ws;
                c[0] = wn * ww, c[1] = wn * we, c[2] = ws * ww, c[3] = ws * we;
                index[j] = y * pw + x;
            }
            for (long j = 0; j < C; j++) {
                const float *c = wt + 4 * j, *p = pad + index[j];
                o[j] = COL4(c[0], p[0], c[1], p[1], c[2], p[pw], c[3], p[pw + 1]);
            }
        }
    }
}

MULTIVERSION static void warp_map_fused(const float *pad, long h, long w, const float *rows, long R,
                                        const float *cx, const float *cy, long C, const float *lin,
                                        const float *off, int cubic, float *out, int *index, float *wt)
{
    warp_map(pad, h, w, rows, R, cx, cy, C, lin, off, cubic, out, index, wt, 1);
}

MULTIVERSION static void warp_map_plain(const float *pad, long h, long w, const float *rows, long R,
                                        const float *cx, const float *cy, long C, const float *lin,
                                        const float *off, int cubic, float *out, int *index, float *wt)
{
    warp_map(pad, h, w, rows, R, cx, cy, C, lin, off, cubic, out, index, wt, 0);
}

/* warp(images, lin, off, rows, cols, out, n0, n1, K, h, w, R, C, cubic, fused) -> 0, or -1 without
 * memory. images (N, h, w), lin (N, K, 2, 2), off (N, K, 2), rows (R,), cols (C,), out (N, K, R, C):
 * float32, contiguous. lin and off are _warp's normalised map, (x, y) = (col, row) first: the grid of
 * map (n, k) at output pixel (i, j) is rows[i] * lin[n, k, :, 0] + off[n, k] + cols[j] * lin[n, k, :, 1].
 * Fills out[n] for n in [n0, n1). */
static PyObject *warp(PyObject *self, PyObject *args)
{
    Py_buffer bi, bl, bo, br, bc, bout;
    long n0, n1, K, h, w, R, C;
    int cubic, fused;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*lllllllpp", &bi, &bl, &bo, &br, &bc, &bout, &n0, &n1, &K,
                          &h, &w, &R, &C, &cubic, &fused))
        return NULL;
    /* the columns' parts of a map's grid (2 C), warp_map's weights (8 C) and taps (C), the padded image */
    const long ph = h + 2 * PAD, pw = w + 2 * PAD;
    float *work = (float *)calloc((size_t)(11 * C + ph * pw), sizeof(float));
    long status = work == NULL ? -1 : 0;
    if (work != NULL) {
        const float *images = (const float *)bi.buf, *lin = (const float *)bl.buf;
        const float *off = (const float *)bo.buf, *rows = (const float *)br.buf;
        const float *cols = (const float *)bc.buf;
        float *out = (float *)bout.buf;
        float *cx = work, *cy = cx + C, *wt = cy + C, *pad = wt + 8 * C;
        int *index = (int *)(pad + ph * pw);
        Py_BEGIN_ALLOW_THREADS
        for (long n = n0; n < n1; n++) {
            for (long y = 0; y < h; y++) /* the frame stays 0 */
                memcpy(pad + (y + PAD) * pw + PAD, images + (n * h + y) * w, sizeof(float) * w);
            for (long k = 0; k < K; k++) {
                const float *l = lin + 4 * (n * K + k), *m = off + 2 * (n * K + k);
                for (long j = 0; j < C; j++) {
                    cx[j] = cols[j] * l[1];
                    cy[j] = cols[j] * l[3];
                }
                float *o = out + (n * K + k) * R * C;
                if (fused)
                    warp_map_fused(pad, h, w, rows, R, cx, cy, C, l, m, cubic, o, index, wt);
                else
                    warp_map_plain(pad, h, w, rows, R, cx, cy, C, l, m, cubic, o, index, wt);
            }
        }
        Py_END_ALLOW_THREADS
        free(work);
    }
    PyBuffer_Release(&bi);
    PyBuffer_Release(&bl);
    PyBuffer_Release(&bo);
    PyBuffer_Release(&br);
    PyBuffer_Release(&bc);
    PyBuffer_Release(&bout);
    return PyLong_FromLong(status);
}

/* Sums of products over P samples, in 8 double lanes so the compiler vectorises them without being
 * allowed to reorder sums (this file is compiled without -ffast-math): out[i] = sum_p s[i P + p] e[p]
 * for i < 4, out[4] = sum_p e[p]^2. */
static inline __attribute__((always_inline)) void
gradient_sums(const float *restrict s, const float *restrict e, long P, double out[5])
{
    double acc[5][8] = {{0}};
    long p = 0;
    for (; p + 8 <= P; p += 8)
        for (int l = 0; l < 8; l++) {
            const double v = e[p + l];
            for (int i = 0; i < 4; i++) acc[i][l] += (double)s[i * P + p + l] * v;
            acc[4][l] += v * v;
        }
    for (; p < P; p++) {
        const double v = e[p];
        for (int i = 0; i < 4; i++) acc[i][0] += (double)s[i * P + p] * v;
        acc[4][0] += v * v;
    }
    for (int i = 0; i < 5; i++) {
        double t = 0;
        for (int l = 0; l < 8; l++) t += acc[i][l];
        out[i] = t;
    }
}

/* Inverse-compositional Gauss-Newton for one pair and one starting map, as _alignment._gauss_newton
 * does it with tensors: warp the image (bilinear, as warp() does) on the template's sampled grid,
 * error = warped - (template - fill), step = inverse (steepest . error), and compose the map with the
 * step's inverse; the best map seen and its mean squared error are kept. L (row-major 2x2) and m are
 * the map in centred full-resolution pixels, (row, col), updated in place with the best. pad: the image
 * in its zero frame; work: 11 C + R C floats and C ints. */
static inline __attribute__((always_inline)) float
refine(const float *restrict pad, long h, long w, const float *restrict target, float fill,
       const float *restrict steepest, const float *restrict inverse, const float *restrict rows, long R,
       const float *restrict cols, long C, float sx, float sy, float *L, float *m, long iterations,
       float *restrict work, const int fused)
{
    const long P = R * C;
    float *cx = work, *cy = cx + C, *wt = cy + C, *warped = wt + 8 * C;
    int *index = (int *)(warped + P);
    float l[4] = {L[2], L[3], L[0], L[1]}, o[2] = {m[1], m[0]};
    float best[6] = {L[0], L[1], L[2], L[3], m[0], m[1]}, best_cost = INFINITY;
    for (long it = 0;; it++) {
        /* _normalised: the rows of L reordered to (col, row) and scaled by 2 / size */
        const float nl[4] = {l[0] * sx, l[1] * sx, l[2] * sy, l[3] * sy}, no[2] = {o[0] * sx, o[1] * sy};
        for (long j = 0; j < C; j++) {
            cx[j] = cols[j] * nl[1];
            cy[j] = cols[j] * nl[3];
        }
        warp_map(pad, h, w, rows, R, cx, cy, C, nl, no, 0, warped, index, wt, fused);
        for (long p = 0; p < P; p++) warped[p] -= target[p] - fill;
        double sums[5];
        gradient_sums(steepest, warped, P, sums);
        const float cost = (float)(sums[4] / (double)P);
        if (cost < best_cost) {
            best_cost = cost;
            best[0] = l[2], best[1] = l[3], best[2] = l[0], best[3] = l[1], best[4] = o[1], best[5] = o[0];
        }
        if (it == iterations) break;
        float step[4];
        for (int i = 0; i < 4; i++) {
            double t = 0;
            for (int j = 0; j < 4; j++) t += (double)inverse[4 * i + j] * sums[j];
            step[i] = (float)t;
        }
        /* L <- L W^-1 and m <- m - L W^-1 t, W^-1 = [[1 + a, b], [-b, 1 + a]] / ((1 + a)^2 + b^2) */
        const float a1 = 1.0f + step[0], b = step[1], det = a1 * a1 + b * b;
        const float w00 = a1 / det, w01 = b / det, w10 = -b / det;
        const float L00 = l[2] * w00 + l[3] * w10, L01 = l[2] * w01 + l[3] * w00;
        const float L10 = l[0] * w00 + l[1] * w10, L11 = l[0] * w01 + l[1] * w00;
        l[0] = L10, l[1] = L11, l[2] = L00, l[3] = L01;
        o[1] = o[1] - (L00 * step[2] + L01 * step[3]);
        o[0] = o[0] - (L10 * step[2] + L11 * step[3]);
    }
    memcpy(L, best, 4 * sizeof(float));
    m[0] = best[4], m[1] = best[5];
    return best_cost;
}

MULTIVERSION static float refine_fused(const float *pad, long h, long w, const float *target, float fill,
                                       const float *steepest, const float *inverse, const float *rows,
                                       long R, const float *cols, long C, float sx, float sy, float *L,
                                       float *m, long iterations, float *work)
{
    return refine(pad, h, w, target, fill, steepest, inverse, rows, R, cols, C, sx, sy, L, m, iterations,
                  work, 1);
}

MULTIVERSION static float refine_plain(const float *pad, long h, long w, const float *target, float fill,
                                       const float *steepest, const float *inverse, const float *rows,
                                       long R, const float *cols, long C, float sx, float sy, float *L,
                                       float *m, long iterations, float *work)
{
    return refine(pad, h, w, target, fill, steepest, inverse, rows, R, cols, C, sx, sy, L, m, iterations,
                  work, 0);
}

/* gauss_newton(template, steepest, inverse, rows, cols, owner, fill, images, image_of, linear, offset,
 * cost, n0, n1, K, h, w, R, C, full_h, full_w, iterations, fused) -> 0, or -1 without memory.
 * For pairs n in [n0, n1) and their K starting maps: template (Nt, R C), steepest (Nt, 4, R C),
 * inverse (Nt, 4, 4) from _alignment._templates; owner (n,) and image_of (n,): each pair's template
 * and image (int64); fill (n,); images (Ng, h, w); linear (n, K, 2, 2) and offset (n, K, 2): the maps
 * in centred full-resolution pixels, replaced by the best found; cost (n, K): its mean squared error.
 * float32, contiguous. */
static PyObject *gauss_newton(PyObject *self, PyObject *args)
{
    Py_buffer b[12]; /* template, steepest, inverse, rows, cols, owner, fill, images, image_of, linear, offset, cost */
    long n0, n1, K, h, w, R, C, full_h, full_w, iterations;
    int fused;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*y*w*w*w*llllllllllp", &b[0], &b[1], &b[2], &b[3], &b[4],
                          &b[5], &b[6], &b[7], &b[8], &b[9], &b[10], &b[11], &n0, &n1, &K, &h, &w, &R, &C,
                          &full_h, &full_w, &iterations, &fused))
        return NULL;
    const long ph = h + 2 * PAD, pw = w + 2 * PAD, P = R * C;
    float *work = (float *)calloc((size_t)(12 * C + P + ph * pw), sizeof(float));
    long status = work == NULL ? -1 : 0;
    if (work != NULL) {
        const float *template = b[0].buf, *steepest = b[1].buf, *inverse = b[2].buf;
        const float *rows = b[3].buf, *cols = b[4].buf, *fill = b[6].buf, *images = b[7].buf;
        const long long *owner = b[5].buf, *image_of = b[8].buf;
        float *linear = b[9].buf, *offset = b[10].buf, *cost = b[11].buf;
        float *pad = work + 12 * C + P;
        const float sx = (float)(2.0 / (double)full_w), sy = (float)(2.0 / (double)full_h);
        Py_BEGIN_ALLOW_THREADS
        for (long n = n0; n < n1; n++) {
            const float *image = images + image_of[n] * h * w;
            for (long y = 0; y < h; y++) /* the frame stays 0 */
                memcpy(pad + (y + PAD) * pw + PAD, image + y * w, sizeof(float) * w);
            const long t = (long)owner[n];
            for (long k = 0; k < K; k++) {
                float *L = linear + 4 * (n * K + k), *m = offset + 2 * (n * K + k);
                cost[n * K + k] = (fused ? refine_fused : refine_plain)(
                    pad, h, w, template + t * P, fill[n], steepest + 4 * t * P, inverse + 16 * t, rows, R,
                    cols, C, sx, sy, L, m, iterations, work);
            }
        }
        Py_END_ALLOW_THREADS
        free(work);
    }
    for (int k = 0; k < 12; k++) PyBuffer_Release(&b[k]);
    return PyLong_FromLong(status);
}

/* pool(images, out, n0, n1, H, W, h, w): torch's adaptive_avg_pool2d of float32 images (N, H, W) to
 * (N, h, w) for images [n0, n1), bit for bit: each output cell sums its input rows [floor(i H / h),
 * ceil((i + 1) H / h)) x columns likewise in row-major order, in float32, then is divided by the row
 * count and by the column count. The cells' sums are independent, so the CPU overlaps them (torch's
 * generic loop costs ~4 ns per input pixel here; registration pools every candidate image twice). */
static PyObject *pool(PyObject *self, PyObject *args)
{
    Py_buffer bi, bo;
    long n0, n1, H, W, h, w;
    if (!PyArg_ParseTuple(args, "y*w*llllll", &bi, &bo, &n0, &n1, &H, &W, &h, &w)) return NULL;
    long *bounds = (long *)malloc(sizeof(long) * 2 * (h + w));
    float *widths = (float *)malloc(sizeof(float) * w);
    long status = bounds == NULL || widths == NULL ? -1 : 0;
    if (status == 0) {
        long *r0 = bounds, *r1 = r0 + h, *c0 = r1 + h, *c1 = c0 + w;
        for (long i = 0; i < h; i++) r0[i] = i * H / h, r1[i] = ((i + 1) * H + h - 1) / h;
        for (long j = 0; j < w; j++) c0[j] = j * W / w, c1[j] = ((j + 1) * W + w - 1) / w;
        for (long j = 0; j < w; j++) widths[j] = (float)(c1[j] - c0[j]);
        const float *images = bi.buf;
        float *out = bo.buf;
        Py_BEGIN_ALLOW_THREADS
        for (long n = n0; n < n1; n++) {
            const float *x = images + n * H * W;
            float *y = out + n * h * w;
            for (long i = 0; i < h; i++) {
                float *row = y + i * w;
                for (long j = 0; j < w; j++) {
                    float sum = 0;
                    for (long r = r0[i]; r < r1[i]; r++)
                        for (long q = c0[j]; q < c1[j]; q++) sum += x[r * W + q];
                    row[j] = sum;
                }
                const float height = (float)(r1[i] - r0[i]);
                for (long j = 0; j < w; j++) row[j] = row[j] / height / widths[j]; /* (vectorised) */
            }
        }
        Py_END_ALLOW_THREADS
    }
    free(bounds);
    free(widths);
    PyBuffer_Release(&bi);
    PyBuffer_Release(&bo);
    return PyLong_FromLong(status);
}

static PyMethodDef methods[] = {
    {"warp", warp, METH_VARARGS,
     "warp(images, lin, off, rows, cols, out, n0, n1, K, h, w, R, C, cubic, fused) -> 0, or -1 "
     "without memory"},
    {"gauss_newton", gauss_newton, METH_VARARGS,
     "gauss_newton(template, steepest, inverse, rows, cols, owner, fill, images, image_of, linear, offset, "
     "cost, n0, n1, K, h, w, R, C, full_h, full_w, iterations, fused) -> 0, or -1 without memory"},
    {"pool", pool, METH_VARARGS,
     "pool(images, out, n0, n1, H, W, h, w) -> 0, or -1 without memory: torch's adaptive_avg_pool2d, float32"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_warp_kernel",
                                    "grid_sample's affine warps of float32 images, without the grid.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__warp_kernel(void) { return PyModule_Create(&module); }
