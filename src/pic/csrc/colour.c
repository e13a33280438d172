/* Colour augmentations on uint8 images stored as planes (C x H x W). As tensor operations they
 * cost ~10x more per image (bench/dataload.py --ops).
 *
 * pic_adjust_hue: the HSV hue rotation of torchvision's adjust_hue. The maximum (V) and
 * minimum channel stay, the hue angle moves by hue_factor turns, and each channel is
 * V - C * clamp(min(k, 4 - k), 0, 1) with C = max - min and k = (n + 6 * hue) mod 6,
 * n = 5, 3, 1 for R, G, B. Quantised back to uint8 as torchvision does: trunc(v * 255.999).
 *
 * pic_gaussian_blur: a separable Gaussian blur (see below).
 *
 * Built with the other csrc/ files into _native.so by `make install`; see src/pic/native.py.
 */
#include <math.h>

static inline float max2(float a, float b) { return a > b ? a : b; }
static inline float min2(float a, float b) { return a < b ? a : b; }

static inline float channel(float n, float h, float maxc, float c, float scale) {
    float k = n + h;                     /* in [0, 12) */
    k -= 6.0f * (float)(k >= 6.0f);      /* in [0, 6) */
    float t = max2(0.0f, min2(1.0f, min2(k, 4.0f - k)));
    return (maxc - c * t) * scale;
}

/* Written without branches (selects as 0/1 products, all exact), so that the compiler
 * vectorises the loop. */
void pic_adjust_hue(const unsigned char *restrict in, unsigned char *restrict out, long pixels,
                    float hue_factor) {
    const unsigned char *r = in, *g = in + pixels, *b = in + 2 * pixels;
    unsigned char *ro = out, *go = out + pixels, *bo = out + 2 * pixels;
    const float shift = 6.0f * hue_factor, scale = 255.999f / 255.0f;
    for (long i = 0; i < pixels; i++) {
        float rv = r[i], gv = g[i], bv = b[i];
        float maxc = max2(rv, max2(gv, bv)), minc = min2(rv, min2(gv, bv));
        float c = maxc - minc;
        /* Hue in sextants; the first channel equal to the maximum wins, as in torchvision.
         * Gray pixels (c = 0) get any hue: every channel is then maxc. */
        float is_r = (float)(maxc == rv);
        float is_g = (1.0f - is_r) * (float)(maxc == gv);
        float is_b = 1.0f - is_r - is_g;
        float num = is_r * (gv - bv) + is_g * (bv - rv) + is_b * (rv - gv);
        float h = num / max2(c, 1.0f) + 2.0f * is_g + 4.0f * is_b + shift; /* in (-4, 9) */
        h -= 6.0f * (float)(int)(h * (1.0f / 6.0f));                      /* in (-6, 6) */
        h += 6.0f * (float)(h < 0.0f);                                     /* in [0, 6) */
        ro[i] = (unsigned char)(int)channel(5.0f, h, maxc, c, scale);
        go[i] = (unsigned char)(int)channel(3.0f, h, maxc, c, scale);
        bo[i] = (unsigned char)(int)channel(1.0f, h, maxc, c, scale);
    }
}

/* Gaussian blur of a uint8 image in `channels` planes of height x width: the kernel
 * exp(-i^2 / (2 sigma^2)), |i| <= ceil(3 sigma), normalised, applied along rows then columns,
 * edges replicated, rounded to nearest. The separable passes run over contiguous rows, which
 * the compiler vectorises. `scratch` holds (height + 2 * radius) * width floats plus
 * width + 2 * radius for one padded row. */
void pic_gaussian_blur(const unsigned char *restrict in, unsigned char *restrict out,
                       int channels, int height, int width, float sigma,
                       float *restrict scratch) {
    int radius = (int)(3.0f * sigma);
    radius += (float)radius < 3.0f * sigma; /* ceil */
    float kernel[2 * 64 + 1];
    if (radius > 64) radius = 64;
    float total = 0.0f;
    for (int i = -radius; i <= radius; i++) {
        kernel[i + radius] = expf(-(float)(i * i) / (2.0f * sigma * sigma));
        total += kernel[i + radius];
    }
    for (int i = 0; i <= 2 * radius; i++) kernel[i] /= total;

    float *rows = scratch;                                   /* (height + 2r) x width */
    float *padded = scratch + (long)(height + 2 * radius) * width; /* width + 2r */
    for (int ch = 0; ch < channels; ch++) {
        const unsigned char *src = in + (long)ch * height * width;
        unsigned char *dst = out + (long)ch * height * width;
        /* Rows: blurred along x into rows[radius + y]. */
        for (int y = 0; y < height; y++) {
            const unsigned char *line = src + (long)y * width;
            for (int x = 0; x < radius; x++) {
                padded[x] = line[0];
                padded[radius + width + x] = line[width - 1];
            }
            for (int x = 0; x < width; x++) padded[radius + x] = line[x];
            float *acc = rows + (long)(radius + y) * width;
            for (int x = 0; x < width; x++) acc[x] = 0.0f;
            for (int i = 0; i <= 2 * radius; i++) {
                const float k = kernel[i], *p = padded + i;
                for (int x = 0; x < width; x++) acc[x] += k * p[x];
            }
        }
        /* Replicated edge rows above and below. */
        for (int y = 0; y < radius; y++) {
            for (int x = 0; x < width; x++) {
                rows[(long)y * width + x] = rows[(long)radius * width + x];
                rows[(long)(radius + height + y) * width + x] =
                    rows[(long)(radius + height - 1) * width + x];
            }
        }
        /* Columns: blurred along y, rounded into dst. */
        for (int y = 0; y < height; y++) {
            float *acc = padded; /* reused: width floats */
            for (int x = 0; x < width; x++) acc[x] = 0.0f;
            for (int i = 0; i <= 2 * radius; i++) {
                const float k = kernel[i], *p = rows + (long)(y + i) * width;
                for (int x = 0; x < width; x++) acc[x] += k * p[x];
            }
            unsigned char *line = dst + (long)y * width;
            for (int x = 0; x < width; x++) line[x] = (unsigned char)(int)(acc[x] + 0.5f);
        }
    }
}
