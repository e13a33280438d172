/* Decode one rectangle of a JPEG with libjpeg(-turbo): the rows above it are skipped without
 * colour conversion or upsampling (jpeg_skip_scanlines), the columns outside it are not
 * reconstructed (jpeg_crop_scanline), and decoding stops after its last row.
 *
 * Plain C ABI for ctypes (no Python headers): built with the other csrc/ files into
 * _native.so by `make install`; see src/pic/native.py.
 * Every libjpeg error and warning (corrupt or truncated data) makes the call fail with the
 * message in `msg`; the caller then decodes the whole image with its usual decoder, which
 * decides whether the file is bad.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define MSG_LEN 200

struct error_state {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
    char *msg;
};

static void fail(j_common_ptr info) {
    struct error_state *err = (struct error_state *)info->err;
    char text[JMSG_LENGTH_MAX];
    (*info->err->format_message)(info, text);
    snprintf(err->msg, MSG_LEN, "%s", text);
    longjmp(err->jump, 1);
}

static void message(j_common_ptr info, int level) {
    if (level < 0) fail(info); /* a warning: corrupt data that libjpeg would paper over */
}

/* Errors and warnings of `info` go to fail(), which writes `msg` and jumps to err->jump. */
static void on_errors(struct jpeg_decompress_struct *info, struct error_state *err, char *msg) {
    info->err = jpeg_std_error(&err->mgr);
    err->mgr.error_exit = fail;
    err->mgr.emit_message = message;
    err->msg = msg;
}

/* Called after setjmp: an error in here jumps back to the caller. */
static void read_header(struct jpeg_decompress_struct *info, const unsigned char *data,
                        unsigned long size) {
    jpeg_create_decompress(info);
    jpeg_mem_src(info, data, size);
    jpeg_read_header(info, TRUE);
}

/* Width and height of the image in `data`; 0 on success. */
int pic_jpeg_size(const unsigned char *data, unsigned long size, int *width, int *height,
                  char *msg) {
    struct jpeg_decompress_struct info;
    struct error_state err;
    on_errors(&info, &err, msg);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&info);
        return -1;
    }
    read_header(&info, data, size);
    *width = (int)info.image_width;
    *height = (int)info.image_height;
    jpeg_destroy_decompress(&info);
    return 0;
}

/* RGB pixels of the rectangle (left, top, width, height) into out (height x width x 3);
 * 0 on success. */
int pic_jpeg_crop(const unsigned char *data, unsigned long size, int left, int top, int width,
                  int height, unsigned char *out, char *msg) {
    struct jpeg_decompress_struct info;
    struct error_state err;
    unsigned char *volatile line = NULL;
    on_errors(&info, &err, msg);
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&info);
        free(line);
        return -1;
    }
    read_header(&info, data, size);
    info.out_color_space = JCS_RGB; /* grayscale is expanded; CMYK fails (caller falls back) */
    jpeg_start_decompress(&info);
    if (left < 0 || top < 0 || width < 1 || height < 1 ||
        (JDIMENSION)(left + width) > info.output_width ||
        (JDIMENSION)(top + height) > info.output_height) {
        snprintf(msg, MSG_LEN, "rectangle (%d, %d, %d, %d) outside the %ux%u image", left, top,
                 width, height, info.output_width, info.output_height);
        jpeg_destroy_decompress(&info);
        return -1;
    }
    /* The decoded span starts at an iMCU boundary at or left of its requested start. Chroma
     * upsampling differs at a span's edges from a full decode (no neighbour), so the span
     * reaches one pixel past the rectangle on each side where the image allows: the
     * rectangle's pixels then equal those of a full decode exactly. */
    int first = left > 0 ? left - 1 : 0;
    int end = (JDIMENSION)(left + width) < info.output_width ? left + width + 1 : left + width;
    JDIMENSION x = (JDIMENSION)first, span = (JDIMENSION)(end - first);
    jpeg_crop_scanline(&info, &x, &span);
    line = malloc((size_t)span * 3);
    if (line == NULL) {
        snprintf(msg, MSG_LEN, "out of memory");
        jpeg_destroy_decompress(&info);
        return -1;
    }
    if (top > 0) jpeg_skip_scanlines(&info, (JDIMENSION)top);
    size_t offset = (size_t)(left - (int)x) * 3, row_bytes = (size_t)width * 3;
    for (int r = 0; r < height; r++) {
        JSAMPROW row = line;
        jpeg_read_scanlines(&info, &row, 1);
        memcpy(out + (size_t)r * row_bytes, line + offset, row_bytes);
    }
    jpeg_abort_decompress(&info); /* the rows below are never decoded */
    jpeg_destroy_decompress(&info);
    free(line);
    return 0;
}
