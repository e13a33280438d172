"""The package's small C library, loaded with ctypes (no Python headers needed to build it).

``make install`` builds ``_native.so`` from ``csrc/``: ``jpeg_crop.c`` (decode only a
rectangle of a JPEG; needs libjpeg's headers: ``apt install libjpeg-dev``), ``colour.c``
(SimCLR's hue shift and Gaussian blur on uint8 images) and ``rows.c`` (the sampled PIC
classifier's row gathers and scatters). Without it the Python paths run: whole-image decoding
(same pixels), torchvision's hue shift (within 1/255), PIL's blur (the authors' code's box-blur
approximation of the same Gaussian) and torch's index_select / index_copy_ (same rows).
``LIB`` is None then, and the run log says so.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

PATH = Path(__file__).with_name("_native.so")


def load() -> ctypes.CDLL | None:
    if not PATH.is_file():
        return None
    lib = ctypes.CDLL(str(PATH))
    lib.pic_jpeg_size.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_int),
                                  ctypes.POINTER(ctypes.c_int), ctypes.c_char_p]
    lib.pic_jpeg_crop.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p]
    lib.pic_adjust_hue.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                   ctypes.c_float]
    lib.pic_adjust_hue.restype = None
    lib.pic_gaussian_blur.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                      ctypes.c_void_p]
    lib.pic_gaussian_blur.restype = None
    for name in ("pic_gather_rows", "pic_scatter_rows"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                       ctypes.c_long, ctypes.c_void_p]
        getattr(lib, name).restype = None
    return lib


LIB = load()
