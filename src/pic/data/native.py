"""The package's small C library, loaded with ctypes (no Python headers needed to build it).

``make install`` builds ``_native.so`` from ``jpeg_crop.c`` (decode only a rectangle of a JPEG,
needs libjpeg's headers: ``apt install libjpeg-dev``) and ``colour.c`` (SimCLR's hue shift on
uint8 images). Each use has a pure-Python fallback with the same result; ``LIB`` is None when
the library is not built, and the run log says so.
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
    return lib


LIB = load()
