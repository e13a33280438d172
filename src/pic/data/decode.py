"""Decoding encoded image bytes (JPEG, PNG, ...) into what the transforms take.

Two decoders: `torchvision` (the default: torchvision.io.decode_image, libjpeg-turbo) returns a
uint8 tensor of shape (3, H, W), which the v2 transforms process as tensors, ~1.7x the images/s
of the PIL pipeline per core (bench/dataload.py); `pil` (Pillow, or pillow-simd when installed
in its place: `make install-simd`) returns an RGB PIL image.
"""

from __future__ import annotations

import io
import logging

import PIL
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

log = logging.getLogger(__name__)

DECODERS = ("pil", "torchvision")


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

        return f"torchvision {torchvision.__version__} decode_image + v2 tensor transforms"
    return f"PIL ({pil_backend()})"


def decode(data: bytes, decoder: str) -> Image.Image | torch.Tensor:
    """Decode one encoded image to RGB: PIL image, or uint8 tensor (3, H, W) for torchvision.

    Raises on a corrupt or truncated file (the caller names the path).
    """
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
