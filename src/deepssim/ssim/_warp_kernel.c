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

static PyMethodDef methods[] = {
    {"warp", warp, METH_VARARGS,
     "warp(images, lin, off, rows, cols, out, n0, n1, K, h, w, R, C, cubic, fused) -> 0, or -1 "
     "without memory"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_warp_kernel",
                                    "grid_sample's affine warps of float32 images, without the grid.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__warp_kernel(void) { return PyModule_Create(&module); }
