"""Decoding encoded image bytes (JPEG, PNG, ...) into what the transforms take.

Two decoders: `torchvision` (the default: torchvision.io.decode_image, libjpeg-turbo) returns a
uint8 tensor of shape (3, H, W), which the v2 transforms process as tensors; `pil` (Pillow, or
pillow-simd when installed in its place: `make install-simd`) returns an RGB PIL image.

Crop decoding: a training pipeline that starts with a random crop needs only the crop's pixels.
With the `torchvision` decoder and ``lazy=True`` a JPEG becomes a :class:`JPEGFile` (header
read, nothing decoded) and the pipeline decodes just the rectangle covering its crops, through
the small libjpeg wrapper ``jpeg_crop.c`` (part of the native library, see pic/native.py). The
pixels equal those of a full decode exactly; without the library every image is decoded whole.
bench/dataload.py measures both.
"""

from __future__ import annotations

import ctypes
import io
import logging

import PIL
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from .. import native

log = logging.getLogger(__name__)

DECODERS = ("pil", "torchvision")


class UnreadableImage(RuntimeError):
    """A lazily decoded image turned out to be corrupt when its pixels were needed."""


def crop_decoding() -> bool:
    """Whether JPEG crops are decoded alone (the library is built)."""
    return native.LIB is not None


class JPEGFile:
    """An encoded JPEG whose size is known and whose pixels are decoded on demand."""

    def __init__(self, data: bytes, height: int, width: int) -> None:
        self.data, self.height, self.width = data, height, width

    def region(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """uint8 (3, height, width): the rectangle's pixels, equal to a full decode's."""
        out = torch.empty(height, width, 3, dtype=torch.uint8)
        message = ctypes.create_string_buffer(200)
        assert native.LIB is not None
        if native.LIB.pic_jpeg_crop(self.data, len(self.data), left, top, width, height,
                                    out.data_ptr(), message):
            # jpeg_crop.c fails on what libjpeg only warns about (corrupt data, which the full
            # decoder may accept) and on CMYK: the full decoder decides.
            return self.decode()[:, top:top + height, left:left + width]
        return out.permute(2, 0, 1)

    def decode(self) -> torch.Tensor:
        """The whole image, uint8 (3, H, W)."""
        try:
            return decode(self.data, "torchvision")
        except Exception as err:
            raise UnreadableImage(str(err)) from err


def lazy_jpeg(data: bytes) -> JPEGFile | None:
    """A JPEGFile for JPEG bytes whose header reads, when the library is built; else None.

    A file must also end with the end-of-image marker: decoding stops after a crop's last row,
    so a truncated file would otherwise pass whenever its crops miss the missing part.
    """
    if native.LIB is None or not data.startswith(b"\xff\xd8") or not data.endswith(b"\xff\xd9"):
        return None
    width, height = ctypes.c_int(), ctypes.c_int()
    message = ctypes.create_string_buffer(200)
    if native.LIB.pic_jpeg_size(data, len(data), ctypes.byref(width), ctypes.byref(height),
                                message):
        return None  # the full decoder reports the error
    return JPEGFile(data, height.value, width.value)


def check_decoder(decoder: str) -> None:
    """Raise naming `data.decoder` unless it is one of DECODERS."""
    if decoder not in DECODERS:
        raise ValueError(f"data.decoder must be one of {DECODERS}, got {decoder!r}")


def pil_backend() -> str:
    """'pillow-simd <version>' or 'Pillow <version>': pillow-simd versions carry a .postN."""
    version = PIL.__version__
    return f"pillow-simd {version}" if ".post" in version else f"Pillow {version}"


def describe_decoder(decoder: str) -> str:
    """A one-line description of the active image backend, for the run log."""
    if decoder == "torchvision":
        import torchvision

        status = ("native library on: crop decoding, hue shift, blur" if crop_decoding()
                  else "native library off: `make install` builds it")
        return (f"torchvision {torchvision.__version__} decode_image + v2 tensor transforms "
                f"({status})")
    return f"PIL ({pil_backend()})"


def decode(data: bytes, decoder: str, lazy: bool = False) -> Image.Image | torch.Tensor | JPEGFile:
    """Decode one encoded image to RGB: PIL image, or uint8 tensor (3, H, W) for torchvision;
    with ``lazy`` a JPEG (torchvision decoder) may come back as a :class:`JPEGFile`.

    Raises on a corrupt or truncated file (the caller names the path).
    """
    if decoder == "torchvision" and lazy and (jpeg := lazy_jpeg(data)) is not None:
        return jpeg
    if decoder == "torchvision":
        # bytearray: torch.frombuffer needs a writable buffer to avoid a warning per image.
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            return decode_image(buffer, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # a format torchvision cannot read (BMP, TIFF): PIL decides if it is corrupt
    with Image.open(io.BytesIO(data)) as image:
        # convert() forces the full decode here, so a truncated file fails now, not later.
        return image.convert("RGB")
