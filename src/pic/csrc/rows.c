/* Gathering and scattering rows of a float32 table by index (PIC's sampled classifier).
 *
 * A step moves a few thousand rows chosen at random from a table of up to ~10^8 rows, so each
 * row starts with a cache (and often TLB) miss. Prefetching the rows a few indices ahead
 * overlaps those misses; rows are then copied with memcpy. On the development machine a gather
 * plus a scatter of 4,352 rows of a 10^7-row table took 0.36 ms this way, 2.1 ms with torch's
 * index_select / index_copy_. Indices must be in range: the caller checks.
 */
#include <string.h>

#define AHEAD 16 /* rows prefetched ahead of the one being copied */

static void prefetch_row(const float *row, long bytes, int write) {
    for (long b = 0; b < bytes; b += 64) {
        if (write)
            __builtin_prefetch((const char *)row + b, 1, 0);
        else
            __builtin_prefetch((const char *)row + b, 0, 0);
    }
}

/* out[i] = table[rows[i]] for i < n; rows of `width` floats. */
void pic_gather_rows(const float *table, const long long *rows, long n, long width,
                     float *out) {
    const long bytes = width * (long)sizeof(float);
    for (long i = 0; i < n; i++) {
        if (i + AHEAD < n) prefetch_row(table + rows[i + AHEAD] * width, bytes, 0);
        memcpy(out + i * width, table + rows[i] * width, (size_t)bytes);
    }
}

/* table[rows[i]] = in[i] for i < n. */
void pic_scatter_rows(float *table, const long long *rows, long n, long width,
                      const float *in) {
    const long bytes = width * (long)sizeof(float);
    for (long i = 0; i < n; i++) {
        if (i + AHEAD < n) prefetch_row(table + rows[i + AHEAD] * width, bytes, 1);
        memcpy(table + rows[i] * width, in + i * width, (size_t)bytes);
    }
}
