"""Augmentations: each option builds a callable `image -> list[Tensor]` (the views of one image).

The pipelines are torchvision v2 transforms, so one pipeline accepts a PIL image (the `pil`
decoder) or a uint8 tensor of shape (3, H, W) (the `torchvision` decoder) and returns float
tensors of shape (3, size, size), normalised with the dataset's mean/std.

A training pipeline starts with a random resized crop, which :class:`MultiView` and
:class:`MultiCrop` apply themselves (:class:`RandomResizedCrop`): the crops of all views are
drawn from the image's size first, so that a lazily decoded JPEG (:class:`~.decode.JPEGFile`)
is decoded only in the rectangle covering them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from .. import native
from .decode import JPEGFile

ImageLike = Image.Image | torch.Tensor
Box = tuple[int, int, int, int]  # top, left, height, width


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """PIL or uint8 tensor -> float32 (3, H, W) normalised."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


class GaussianBlur:
    """Gaussian blur with sigma drawn uniformly from ``sigma`` (SimCLR, MoCo v2).

    PIL images: ``ImageFilter.GaussianBlur`` (whose radius is the standard deviation; a chain
    of box blurs approximating the Gaussian), as in the authors' code. uint8 (3, H, W) tensors:
    the exact separable Gaussian of the native library (colour.c: kernel radius ceil(3 sigma),
    edges replicated), ~5x faster than the PIL round trip; without the library, that round trip.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: ImageLike) -> ImageLike:
        radius = float(torch.empty(1).uniform_(*self.sigma))
        if isinstance(image, Image.Image):
            return image.filter(ImageFilter.GaussianBlur(radius))
        if native.LIB is not None and image.dtype == torch.uint8 and image.ndim == 3:
            return gaussian_blur(image, radius)
        pil = v2.functional.to_pil_image(image)
        return v2.functional.pil_to_tensor(pil.filter(ImageFilter.GaussianBlur(radius)))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 (C, H, W) blurred by the native library's separable Gaussian."""
    assert native.LIB is not None
    channels, height, width = image.shape
    radius = min(math.ceil(3 * sigma), 64)
    image = image.contiguous()
    out = torch.empty_like(image)
    scratch = torch.empty((height + 2 * radius) * width + width + 2 * radius)
    native.LIB.pic_gaussian_blur(image.data_ptr(), out.data_ptr(), channels, height, width,
                                 sigma, scratch.data_ptr())
    return out


def adjust_hue(image: ImageLike, hue_factor: float) -> ImageLike:
    """torchvision's adjust_hue; on a uint8 (3, H, W) tensor through the native library
    (colour.c: ~10x faster, within 1 of torchvision's value at ~0.01% of the pixels)."""
    if (native.LIB is None or not isinstance(image, torch.Tensor) or image.dtype != torch.uint8
            or image.ndim != 3 or image.shape[0] != 3):
        return v2.functional.adjust_hue(image, hue_factor)
    image = image.contiguous()
    out = torch.empty_like(image)
    native.LIB.pic_adjust_hue(image.data_ptr(), out.data_ptr(), image[0].numel(), hue_factor)
    return out


class ColorJitter:
    """torchvision's ColorJitter: brightness, contrast and saturation factors drawn uniformly
    from [max(0, 1 - x), 1 + x], the hue shift from [-h, h], the four adjustments applied in a
    random order (the same draws, in the same order, as torchvision), with the fast
    :func:`adjust_hue`. A zero leaves its adjustment out."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0) -> None:
        if not 0 <= hue <= 0.5 or min(brightness, contrast, saturation) < 0:
            raise ValueError(f"ColorJitter: need brightness, contrast, saturation >= 0 and "
                             f"0 <= hue <= 0.5; got {brightness}, {contrast}, {saturation}, {hue}")
        self.factors = (brightness, contrast, saturation, hue)
        self.ranges = [(max(0.0, 1 - x), 1 + x) if x else None
                       for x in (brightness, contrast, saturation)] + [(-hue, hue) if hue else None]
        self.ops = (v2.functional.adjust_brightness, v2.functional.adjust_contrast,
                    v2.functional.adjust_saturation, adjust_hue)

    def __call__(self, image: ImageLike) -> ImageLike:
        order = torch.randperm(4).tolist()
        values = [None if r is None else float(torch.empty(1).uniform_(*r)) for r in self.ranges]
        for i in order:
            if values[i] is not None:
                image = self.ops[i](image, values[i])
        return image

    def __repr__(self) -> str:
        return "ColorJitter(brightness={}, contrast={}, saturation={}, hue={})".format(
            *self.factors)


def simclr_colour(strength: float = 0.8, hue: float = 0.2, blur: float = 0.5
                  ) -> list[v2.Transform]:
    """SimCLR colour pipeline: jitter (p=0.8), grayscale (p=0.2), blur sigma 0.1-2 (p=``blur``;
    0 leaves it out, as SimCLR's CIFAR recipe and the peers' small-image configs do)."""
    return [
        v2.RandomApply([ColorJitter(strength, strength, strength, hue)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        *_blur(blur),
    ]


def _blur(p: float) -> list[v2.Transform]:
    if not 0 <= p <= 1:
        raise ValueError(f"augmentation.blur={p}: a probability in [0, 1]")
    return [v2.RandomApply([GaussianBlur((0.1, 2.0))], p=p)] if p else []


def _check_views(num_views: int) -> None:
    if num_views < 1:
        raise ValueError(f"augmentation: num_views must be >= 1, got {num_views}")


class RandomResizedCrop:
    """torchvision's RandomResizedCrop in two halves: :meth:`box` draws the rectangle from the
    image size alone (area fraction in ``scale``, log-uniform aspect ratio in ``ratio``, ten
    tries, then the largest centred crop of clamped ratio), :meth:`apply` crops and resizes
    (bilinear, antialiased)."""

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def box(self, height: int, width: int) -> Box:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                return top, left, h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def apply(self, image: ImageLike, box: Box) -> ImageLike:
        out = v2.functional.resized_crop(image, *box, [self.size, self.size], antialias=True)
        # A crop-decoded tensor is (H, W, 3) in memory, which resizes ~2x faster; the small
        # result is made contiguous, where the tensor kernels that follow are fastest.
        return out.contiguous() if isinstance(out, torch.Tensor) else out

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def image_size(image: ImageLike | JPEGFile) -> tuple[int, int]:
    """(height, width) of a PIL image, a (..., H, W) tensor or a JPEGFile."""
    if isinstance(image, Image.Image | JPEGFile):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def random_crops(image: ImageLike | JPEGFile, crops: Sequence[RandomResizedCrop]
                 ) -> list[ImageLike]:
    """One crop of the image per entry of ``crops``. A JPEGFile is decoded only in the
    rectangle that covers all of them."""
    boxes = [crop.box(*image_size(image)) for crop in crops]
    if isinstance(image, JPEGFile):
        top, left = min(b[0] for b in boxes), min(b[1] for b in boxes)
        bottom = max(b[0] + b[2] for b in boxes)
        right = max(b[1] + b[3] for b in boxes)
        image = image.region(top, left, bottom - top, right - left)
        boxes = [(t - top, lf - left, h, w) for t, lf, h, w in boxes]
    return [crop.apply(image, box) for crop, box in zip(crops, boxes, strict=True)]


def decoded(image: ImageLike | JPEGFile) -> ImageLike:
    return image.decode() if isinstance(image, JPEGFile) else image


class MultiView:
    """Applies one random pipeline `num_views` times independently to the same image: a random
    resized crop (``crop``; none for the deterministic evaluation transform), then
    ``pipeline``. Returns a list of `num_views` tensors, each (3, size, size)."""

    #: The dataset may hand over a JPEGFile instead of decoded pixels (see decode.py).
    accepts_jpeg_file = True

    def __init__(self, pipeline: Callable[[ImageLike], torch.Tensor], num_views: int,
                 crop: RandomResizedCrop | None = None) -> None:
        _check_views(num_views)
        self.pipeline = pipeline
        self.num_views = num_views
        self.crop = crop

    def __call__(self, image: ImageLike | JPEGFile) -> list[torch.Tensor]:
        if self.crop is None:
            image = decoded(image)
            return [self.pipeline(image) for _ in range(self.num_views)]
        return [self.pipeline(view) for view in random_crops(image, [self.crop] * self.num_views)]

    def __repr__(self) -> str:
        return f"MultiView(num_views={self.num_views}, crop={self.crop}, pipeline={self.pipeline})"


def simclr(size: int, mean: list[float], std: list[float], num_views: int = 2,
           blur: float = 0.5, min_scale: float = 0.08) -> MultiView:
    """SimCLR: RandomResizedCrop(size, ``min_scale``-1: 0.08, the paper's), flip, colour jitter
    (0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, Gaussian blur p=``blur`` (0.5)."""
    if not 0 < min_scale <= 1:
        raise ValueError(f"augmentation.min_scale={min_scale}: an area fraction in (0, 1]")
    pipeline = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            *simclr_colour(blur=blur),
            *_to_normalised_tensor(mean, std),
        ]
    )
    return MultiView(pipeline, num_views, RandomResizedCrop(size, (min_scale, 1.0)))


def mocov2(size: int, mean: list[float], std: list[float], num_views: int = 2,
           blur: float = 0.5) -> MultiView:
    """MoCo v2: RandomResizedCrop(size, 0.2-1), flip, colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
    grayscale p=0.2, Gaussian blur p=``blur`` (0.5)."""
    pipeline = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *_blur(blur),
            *_to_normalised_tensor(mean, std),
        ]
    )
    return MultiView(pipeline, num_views, RandomResizedCrop(size, (0.2, 1.0)))


def instdisc(size: int, mean: list[float], std: list[float], num_views: int = 1) -> MultiView:
    """InstDisc (and MoCo v1 with num_views=2): RandomResizedCrop(size, 0.2-1), flip,
    colour jitter (0.4, 0.4, 0.4, 0.4) always, grayscale p=0.2."""
    pipeline = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.RandomGrayscale(p=0.2),
            *_to_normalised_tensor(mean, std),
        ]
    )
    return MultiView(pipeline, num_views, RandomResizedCrop(size, (0.2, 1.0)))


def linear_eval_resized_crop(size: int, mean: list[float], std: list[float],
                             num_views: int = 1) -> MultiView:
    """Linear-evaluation training, ImageNet protocol: RandomResizedCrop(size, 0.08-1) + flip."""
    pipeline = v2.Compose([v2.RandomHorizontalFlip(), *_to_normalised_tensor(mean, std)])
    return MultiView(pipeline, num_views, RandomResizedCrop(size, (0.08, 1.0)))


def linear_eval_padded_crop(size: int, mean: list[float], std: list[float],
                            num_views: int = 1) -> MultiView:
    """Linear-evaluation training, small-image (CIFAR) protocol: resize to ``size``, pad by
    size/8 (4 px at 32) with zeros, random ``size`` crop, flip. A RandomResizedCrop down to 8%
    of a 32-px image leaves a few pixels of a digit: the probe then learns from noise."""
    pipeline = v2.Compose([
        v2.Resize((size, size), antialias=True),
        v2.RandomCrop(size, padding=max(1, size // 8)),
        v2.RandomHorizontalFlip(),
        *_to_normalised_tensor(mean, std),
    ])
    return MultiView(pipeline, num_views)


def eval_transform(size: int, mean: list[float], std: list[float]) -> MultiView:
    """Validation / kNN features: resize the short side to size*256/224, centre-crop `size`.

    Deterministic; returns a list with one (3, size, size) tensor like the training transforms.
    """
    pipeline = v2.Compose(
        [
            v2.Resize(int(round(size * 256 / 224)), antialias=True),
            v2.CenterCrop(size),
            *_to_normalised_tensor(mean, std),
        ]
    )
    return MultiView(pipeline, 1)


@dataclass(frozen=True)
class CropGroup:
    """`count` crops of `size` px, RandomResizedCrop area fraction in `scale` = [min, max]."""

    size: int
    count: int
    scale: list[float]


def _crop_group(i: int, group: CropGroup | Mapping) -> CropGroup:
    """Accept a CropGroup or a config mapping; one error naming the group at fault."""
    if not isinstance(group, CropGroup):
        try:
            group = CropGroup(**dict(group))
        except TypeError as e:
            raise ValueError(
                f"augmentation.groups[{i}]: expected keys size, count, scale; got {dict(group)}"
            ) from e
    lo_hi = list(group.scale)
    if group.size < 1 or group.count < 1 or len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ValueError(
            f"augmentation.groups[{i}]: need size >= 1, count >= 1 and scale [min, max] with "
            f"0 < min <= max <= 1; got {group}"
        )
    return group


class MultiCrop:
    """Multi-crop: for each crop group, `count` crops at `size` with the SimCLR colour pipeline.

    Returns a flat list of sum(count) tensors grouped by resolution, largest first, so that
    crops of one resolution are adjacent and can pass the backbone together. Default: PIC's one
    160-px crop (scale 0.14-1) and three 96-px crops (scale 0.08-0.14).
    """

    accepts_jpeg_file = True  # as MultiView

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        groups: list[CropGroup] | None = None,
        blur: float = 0.5,
    ) -> None:
        if groups is None:
            groups = [CropGroup(160, 1, [0.14, 1.0]), CropGroup(96, 3, [0.08, 0.14])]
        if len(groups) == 0:
            raise ValueError("augmentation.groups: at least one crop group is required")
        parsed = [_crop_group(i, g) for i, g in enumerate(groups)]
        # Stable sort: groups of equal size keep their order, largest resolution first.
        self.groups = sorted(parsed, key=lambda g: -g.size)
        self.crops = [RandomResizedCrop(g.size, g.scale) for g in self.groups
                      for _ in range(g.count)]
        pipelines = [
            v2.Compose(
                [
                    v2.RandomHorizontalFlip(),
                    *simclr_colour(blur=blur),
                    *_to_normalised_tensor(mean, std),
                ]
            )
            for g in self.groups
        ]
        self.pipelines = [p for g, p in zip(self.groups, pipelines, strict=True)
                          for _ in range(g.count)]  # one per crop

    def __call__(self, image: ImageLike | JPEGFile) -> list[torch.Tensor]:
        views = random_crops(image, self.crops)
        return [p(view) for p, view in zip(self.pipelines, views, strict=True)]

    def __repr__(self) -> str:
        return f"MultiCrop(groups={self.groups})"
