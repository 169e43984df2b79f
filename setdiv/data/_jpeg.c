/* Decode the region of a JPEG an image transform keeps, at a DCT scale of M/8, and resize it.
 *
 * The image transforms keep only part of a photo (a centre crop, a random crop) at a small
 * size. libjpeg-turbo can scale in the DCT domain (scale_num / 8), skip the IDCT and colour
 * conversion of the columns left and right of a region (jpeg_crop_scanline) and of the rows
 * above it (jpeg_skip_scanlines), and stop after its last row. Entropy decoding, which no
 * scale or crop skips, is then most of what is left. The region is resized here too, with an
 * antialiased bilinear or bicubic filter over a sub-pixel box (the formulation Pillow's and
 * torch's antialiased resizes share), straight into the (3, size, size) planar layout the
 * model takes. docs/data.md ("Decoding images") gives the measured gain; setdiv/data/images.py
 * is the only caller.
 *
 *   decode(data, num, x0, y0, x1, y1, tail, box, size, bicubic, flip) -> bytearray
 *   resize(rgbx, width, height, box, size, bicubic, flip) -> bytearray
 *
 * data: the JPEG file's bytes; num: the scale is num / 8 (1..8); [x0, x1) x [y0, y1): the
 * region to decode, in pixels of the scaled image; box: (left, top, right, bottom), the part
 * of the scaled image to resize to (size, size), inside the region; flip: mirror the result
 * left-right. Returns 3 * size * size bytes, RGB planes. tail: also entropy-decode the rows
 * below the region and read up to the end-of-image marker, so that a truncated file is
 * noticed. Any libjpeg error or warning raises ValueError with libjpeg's message; the caller
 * then decodes the file with Pillow, and resizes what Pillow decoded with `resize` (RGBX
 * pixels), so that both routes give the same pixels wherever they decode the same ones.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) { /* a warning (corrupt data, premature end): treated as an error */
        on_error(cinfo);
    }
}

typedef struct {
    int x_offset, width, height;
} Region;

/* Returns 0, or 1 with err->message set, or 2 when `out` is too small for the region. */
static int decode_region(const unsigned char *data, size_t size, int num, int x0, int y0, int x1,
                         int y1, int tail, unsigned char *out, size_t capacity, Region *region,
                         ErrorManager *err) {
    struct jpeg_decompress_struct cinfo;
    cinfo.err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    if (setjmp(err->jump)) {
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.scale_num = (unsigned int)num;
    cinfo.scale_denom = 8;
    cinfo.out_color_space = JCS_EXT_RGBX;
    jpeg_start_decompress(&cinfo);
    if (x0 < 0 || y0 < 0 || x1 > (int)cinfo.output_width || y1 > (int)cinfo.output_height ||
        x0 >= x1 || y0 >= y1) {
        snprintf(err->message, sizeof err->message, "region outside the %ux%u image",
                 cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    JDIMENSION x_offset = (JDIMENSION)x0, width = (JDIMENSION)(x1 - x0);
    if (x0 > 0 || x1 < (int)cinfo.output_width) {
        jpeg_crop_scanline(&cinfo, &x_offset, &width);
    }
    size_t stride = (size_t)width * 4;
    if (stride * (size_t)(y1 - y0 + 1) > capacity) {
        jpeg_destroy_decompress(&cinfo);
        return 2;
    }
    if (y0 > 0) {
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
    }
    while ((int)cinfo.output_scanline < y1) {
        JSAMPROW row = out + stride * (size_t)((int)cinfo.output_scanline - y0);
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    if (tail) { /* (skipping to the very end would decode nothing: the last line is read) */
        JDIMENSION left = cinfo.output_height - cinfo.output_scanline;
        if (left > 1) {
            jpeg_skip_scanlines(&cinfo, left - 1);
        }
        if (cinfo.output_scanline < cinfo.output_height) {
            JSAMPROW row = out + stride * (size_t)(y1 - y0); /* (the spare line) */
            jpeg_read_scanlines(&cinfo, &row, 1);
        }
        jpeg_finish_decompress(&cinfo);
    }
    jpeg_destroy_decompress(&cinfo);
    region->x_offset = (int)x_offset;
    region->width = (int)width;
    region->height = y1 - y0;
    return 0;
}

/* Buffer `i` of this thread, at least n bytes: kept between calls, since a fresh block of this
 * size comes from mmap and costs a page fault per 4 KiB on first touch. NULL when out of memory. */
static uint8_t *scratch(int i, size_t n) {
    static _Thread_local struct {
        uint8_t *data;
        size_t size;
    } held[4];
    if (held[i].size < n) {
        uint8_t *grown = realloc(held[i].data, n);
        if (grown == NULL) return NULL;
        held[i].data = grown, held[i].size = n;
    }
    return held[i].data;
}

/* --- resizing: separable antialiased filters over a sub-pixel box ---------------------------- */

#define PRECISION 14 /* fixed-point bits of a weight, which fits int16 (|weight| < 2) */

static double triangle(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double cubic(double x) { /* Keys' cubic, a = -0.5 */
    const double a = -0.5;
    x = fabs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

typedef struct {
    int taps;       /* weights per output pixel (the widest) */
    int *first;     /* (out,) first input pixel of each output pixel */
    int *count;     /* (out,) how many inputs it reads */
    int16_t *weight; /* (out, taps) fixed-point weights, summing to ~1 << PRECISION */
    int copy;        /* whether output i is input first[0] + i, as it is (a plain crop) */
} Filter;

/* The weights mapping inputs [b0, b1) of an axis of `in` pixels onto `out` pixels. Each output
 * pixel's centre maps to b0 + (i + 0.5) * scale; when shrinking, the filter widens by the scale
 * (antialiasing). Inputs are read only inside [0, in). Returns 0, or -1 when out of memory. */
static int make_filter(Filter *f, int in, double b0, double b1, int out, int bicubic) {
    double (*kernel)(double) = bicubic ? cubic : triangle;
    double scale = (b1 - b0) / out, stretch = scale > 1.0 ? scale : 1.0;
    double support = (bicubic ? 2.0 : 1.0) * stretch;
    f->taps = (int)ceil(support) * 2 + 1;
    f->first = malloc(sizeof(int) * (size_t)out * 2);
    f->weight = malloc(sizeof(int16_t) * (size_t)out * (size_t)f->taps);
    double *w = malloc(sizeof(double) * (size_t)f->taps);
    if (f->first == NULL || f->weight == NULL || w == NULL) {
        free(w);
        return -1;
    }
    f->count = f->first + out;
    for (int i = 0; i < out; i++) {
        double centre = b0 + (i + 0.5) * scale;
        int lo = (int)(centre - support + 0.5), hi = (int)(centre + support + 0.5);
        lo = lo < 0 ? 0 : lo;
        hi = hi > in ? in : hi;
        int n = hi - lo > f->taps ? f->taps : hi - lo;
        double total = 0.0;
        for (int t = 0; t < n; t++) {
            w[t] = kernel((lo + t - centre + 0.5) / stretch);
            total += w[t];
        }
        while (n > 1 && w[n - 1] == 0.0) n--; /* (no reads for taps that weigh nothing) */
        while (n > 1 && w[0] == 0.0) {
            memmove(w, w + 1, sizeof(double) * (size_t)--n);
            lo++;
        }
        for (int t = 0; t < f->taps; t++) {
            double v = t < n && total != 0.0 ? w[t] / total : 0.0;
            f->weight[(size_t)i * f->taps + t] = (int16_t)lround(v * (1 << PRECISION));
        }
        f->first[i] = lo;
        f->count[i] = n;
    }
    f->copy = 1;
    for (int i = 0; i < out; i++) {
        f->copy &= f->count[i] == 1 && f->first[i] == f->first[0] + i &&
                   f->weight[(size_t)i * f->taps] == 1 << PRECISION;
    }
    free(w);
    return 0;
}

static void free_filter(Filter *f) {
    free(f->first);
    free(f->weight);
}

#define BLOCK 8  /* lines a pass hands on at once (whole 8-pixel runs for the transposes) */
#define CHUNK 64 /* bytes of a line summed at once, in registers */

/* One filter pass along the lines of `src` (lines of `len` bytes): output line i is the
 * weighted sum of input lines first[i] .. first[i] + count[i] - 1, computed over contiguous
 * bytes (so the compiler vectorises it: 16-bit weights times 8-bit pixels into 32-bit sums).
 * Lines are handed to `put` BLOCK at a time, as (first line, how many, the lines); a pass
 * that is a plain crop hands on its input lines. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void pass(const uint8_t *restrict src, size_t len, const Filter *f, int n_out,
                 uint8_t *restrict lines, void (*put)(void *, int, int, const uint8_t *),
                 void *ctx) {
    if (f->copy) {
        for (int i = 0; i < n_out; i += BLOCK) {
            const uint8_t *from = src + (size_t)(f->first[0] + i) * len;
            put(ctx, i, n_out - i < BLOCK ? n_out - i : BLOCK, from);
        }
        return;
    }
    for (int i = 0; i < n_out; i++) {
        const int16_t *w = f->weight + (size_t)i * f->taps;
        const uint8_t *in = src + (size_t)f->first[i] * len;
        uint8_t *line = lines + (size_t)(i % BLOCK) * len;
        for (size_t k0 = 0; k0 < len; k0 += CHUNK) {
            size_t m = len - k0 < CHUNK ? len - k0 : CHUNK;
            int32_t sum[CHUNK];
            for (size_t k = 0; k < m; k++) sum[k] = 1 << (PRECISION - 1);
            for (int t = 0; t < f->count[i]; t++) {
                const uint8_t *row = in + (size_t)t * len + k0;
                int16_t wt = w[t];
                for (size_t k = 0; k < m; k++) sum[k] += (int32_t)wt * (int16_t)row[k];
            }
            for (size_t k = 0; k < m; k++) {
                int32_t v = sum[k] >> PRECISION;
                line[k0 + k] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
        }
        if (i % BLOCK == BLOCK - 1 || i == n_out - 1) {
            put(ctx, i - i % BLOCK, i % BLOCK + 1, lines);
        }
    }
}

typedef struct {
    uint8_t *dst;
    int n;    /* pixels in a line */
    int size; /* lines in all */
} Sink;

/* Lines y0.. of a pass (n RGBX pixels each) -> columns y0.. of the transposed image. */
static void put_transposed(void *ctx, int y0, int count, const uint8_t *lines) {
    Sink *s = ctx;
    size_t len = (size_t)s->n * 4;
    for (int x = 0; x < s->n; x++) {
        uint8_t *to = s->dst + ((size_t)x * s->size + (size_t)y0) * 4;
        for (int j = 0; j < count; j++) memcpy(to + 4 * j, lines + j * len + (size_t)x * 4, 4);
    }
}

/* (size, size, 4) RGBX, rows `stride` pixels apart -> (3, size, size) RGB planes, mirrored
 * left-right when `flip`. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void to_planes(const uint8_t *restrict rgbx, size_t stride, int size, int flip,
                      uint8_t *restrict out) {
    size_t plane = (size_t)size * size;
    for (int y = 0; y < size; y++) {
        const uint8_t *in = rgbx + (size_t)y * stride * 4;
        uint8_t *r = out + (size_t)y * size, *g = r + plane, *b = g + plane;
        if (flip) {
            for (int x = 0, f = size - 1; x < size; x++, f--) {
                r[x] = in[4 * f], g[x] = in[4 * f + 1], b[x] = in[4 * f + 2];
            }
        } else {
            for (int x = 0; x < size; x++) {
                r[x] = in[4 * x], g[x] = in[4 * x + 1], b[x] = in[4 * x + 2];
            }
        }
    }
}

/* (height, width, 4) RGBX -> (3, size, size) RGB planes: the rows filtered first, written
 * transposed, so that the column filter runs over contiguous lines as well, and transposed
 * back. Returns 0, or -1 when out of memory. */
static int resize(const uint8_t *src, int width, int height, const double box[4], int size,
                  int bicubic, int flip, uint8_t *out) {
    Filter fy = {0}, fx = {0};
    size_t longest = (size_t)(width > size ? width : size) * 4;
    uint8_t *mid = scratch(1, (size_t)width * size * 4), *lines = scratch(2, longest * BLOCK);
    uint8_t *done = scratch(3, (size_t)size * size * 4);
    int ok = mid != NULL && lines != NULL && done != NULL &&
             make_filter(&fy, height, box[1], box[3], size, bicubic) == 0 &&
             make_filter(&fx, width, box[0], box[2], size, bicubic) == 0;
    if (ok && fy.copy && fx.copy) { /* the box is a plain crop */
        to_planes(src + ((size_t)fy.first[0] * width + fx.first[0]) * 4, width, size, flip, out);
    } else if (ok) {
        Sink rows = {mid, width, size}, cols = {done, size, size};
        pass(src, (size_t)width * 4, &fy, size, lines, put_transposed, &rows);
        pass(mid, (size_t)size * 4, &fx, size, lines, put_transposed, &cols);
        to_planes(done, size, size, flip, out);
    }
    free_filter(&fy), free_filter(&fx);
    return ok ? 0 : -1;
}

/* --- the module --------------------------------------------------------------------------- */

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int num, x0, y0, x1, y1, tail, size, bicubic, flip;
    double box[4];
    if (!PyArg_ParseTuple(args, "y*iiiiip(dddd)ipp", &data, &num, &x0, &y0, &x1, &y1, &tail,
                          &box[0], &box[1], &box[2], &box[3], &size, &bicubic, &flip)) {
        return NULL;
    }
    if (num < 1 || num > 8 || x1 <= x0 || y1 <= y0 || x0 < 0 || y0 < 0 || size < 1 ||
        box[0] < x0 || box[1] < y0 || box[2] > x1 || box[3] > y1 || box[0] >= box[2] ||
        box[1] >= box[3]) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "bad scale, region or box");
        return NULL;
    }
    /* libjpeg widens a crop to whole iMCUs: at most 2 x 16 scaled pixels at scale 8/8; and a
     * spare line for reading the tail. */
    size_t capacity = (size_t)(x1 - x0 + 32) * 4 * (size_t)(y1 - y0 + 1);
    uint8_t *pixels = scratch(0, capacity);
    PyObject *out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)3 * size * size);
    if (pixels == NULL || out == NULL) {
        Py_XDECREF(out);
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    ErrorManager err;
    Region region;
    int status;
    uint8_t *planes = (uint8_t *)PyByteArray_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    status = decode_region((const unsigned char *)data.buf, (size_t)data.len, num, x0, y0, x1, y1,
                           tail, pixels, capacity, &region, &err);
    if (status == 0) {
        double local[4] = {box[0] - region.x_offset, box[1] - y0, box[2] - region.x_offset,
                           box[3] - y0};
        status = resize(pixels, region.width, region.height, local, size, bicubic, flip, planes)
                     ? 3
                     : 0;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (status != 0) {
        Py_DECREF(out);
        if (status == 3) return PyErr_NoMemory();
        PyErr_SetString(PyExc_ValueError, status == 1 ? err.message : "region wider than expected");
        return NULL;
    }
    return out;
}

static PyObject *resize_pixels(PyObject *self, PyObject *args) {
    Py_buffer data;
    int width, height, size, bicubic, flip;
    double box[4];
    if (!PyArg_ParseTuple(args, "y*ii(dddd)ipp", &data, &width, &height, &box[0], &box[1],
                          &box[2], &box[3], &size, &bicubic, &flip)) {
        return NULL;
    }
    if (width < 1 || height < 1 || data.len != (Py_ssize_t)width * height * 4 || size < 1 ||
        box[0] < 0 || box[1] < 0 || box[2] > width || box[3] > height || box[0] >= box[2] ||
        box[1] >= box[3]) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "bad image size or box");
        return NULL;
    }
    PyObject *out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)3 * size * size);
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    int status;
    uint8_t *planes = (uint8_t *)PyByteArray_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    status = resize((const uint8_t *)data.buf, width, height, box, size, bicubic, flip, planes);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (status != 0) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    return out;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(data, num, x0, y0, x1, y1, tail, box, size, bicubic, flip) -> bytearray: the box "
     "of a JPEG decoded at scale num/8 (region x0..x1, y0..y1), resized to (3, size, size)."},
    {"resize", resize_pixels, METH_VARARGS,
     "resize(rgbx, width, height, box, size, bicubic, flip) -> bytearray: the box of decoded "
     "(height, width, 4) pixels resized to (3, size, size), as decode() resizes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg", "JPEG region decoding with libjpeg-turbo (images.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
