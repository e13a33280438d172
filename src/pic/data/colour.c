/* SimCLR's hue jitter on a uint8 RGB image in 3 planes (C x H x W), ~10x faster than the same
 * arithmetic as tensor operations (bench/dataload.py --ops).
 *
 * Exactly the HSV hue rotation of torchvision's adjust_hue: the maximum (V) and minimum
 * channel stay, the hue angle moves by hue_factor turns, and each channel is
 * V - C * clamp(min(k, 4 - k), 0, 1) with C = max - min and k = (n + 6 * hue) mod 6,
 * n = 5, 3, 1 for R, G, B. Quantised back to uint8 as torchvision does: trunc(v * 255.999).
 * Built with jpeg_crop.c into _native.so by `make install`; see native.py.
 */
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
