/* Gathering and scattering rows of a table by index (PIC's sampled classifier).
 *
 * A step moves a few thousand rows chosen at random from a table of up to ~10^8 rows, so each
 * row starts with a cache (and often TLB) miss. Prefetching the rows a few indices ahead
 * overlaps those misses; rows are then copied with memcpy. On the development machine a gather
 * plus a scatter of 4,352 rows of a 10^7-row table took 0.36 ms this way, 2.1 ms with torch's
 * index_select / index_copy_. Rows are raw bytes (float32 or 16-bit values and two int32).
 * Indices must be in range: the caller checks.
 */
#include <string.h>

#define AHEAD 16 /* rows prefetched ahead of the one being copied */

static void prefetch_row(const char *row, long bytes, int write) {
    for (long b = 0; b < bytes; b += 64) {
        if (write)
            __builtin_prefetch(row + b, 1, 0);
        else
            __builtin_prefetch(row + b, 0, 0);
    }
}

/* out[i] = table[rows[i]] for i < n; rows of `bytes` bytes. */
void pic_gather_rows(const char *table, const long long *rows, long n, long bytes, char *out) {
    for (long i = 0; i < n; i++) {
        if (i + AHEAD < n) prefetch_row(table + rows[i + AHEAD] * bytes, bytes, 0);
        memcpy(out + i * bytes, table + rows[i] * bytes, (size_t)bytes);
    }
}

/* table[rows[i]] = in[i] for i < n. */
void pic_scatter_rows(char *table, const long long *rows, long n, long bytes, const char *in) {
    for (long i = 0; i < n; i++) {
        if (i + AHEAD < n) prefetch_row(table + rows[i + AHEAD] * bytes, bytes, 1);
        memcpy(table + rows[i] * bytes, in + i * bytes, (size_t)bytes);
    }
}
