"""Augmentations: each option builds a callable `image -> list[Tensor]` (the views of one image).

The pipelines are torchvision v2 transforms, so one pipeline accepts a PIL image (the default
decoder) or a uint8 tensor of shape (3, H, W) (the `torchvision` decoder) and returns float
tensors of shape (3, size, size), normalised with the dataset's mean/std.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

ImageLike = Image.Image | torch.Tensor


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """PIL or uint8 tensor -> float32 (3, H, W) normalised."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


class GaussianBlur:
    """Gaussian blur with sigma drawn uniformly from ``sigma`` (SimCLR, MoCo v2).

    Runs on PIL (``ImageFilter.GaussianBlur``, whose radius is the standard deviation): at 224 px
    it is ~6x faster than torchvision's tensor convolution, and ~300x at 32 px. Tensor images
    make a round trip through PIL.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: ImageLike) -> ImageLike:
        radius = float(torch.empty(1).uniform_(*self.sigma))
        if isinstance(image, Image.Image):
            return image.filter(ImageFilter.GaussianBlur(radius))
        pil = v2.functional.to_pil_image(image)
        return v2.functional.pil_to_tensor(pil.filter(ImageFilter.GaussianBlur(radius)))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


def simclr_colour(size: int, strength: float = 0.8, hue: float = 0.2) -> list[v2.Transform]:
    """SimCLR colour pipeline: jitter (p=0.8), grayscale (p=0.2), blur sigma 0.1-2 (p=0.5)."""
    return [
        v2.RandomApply([v2.ColorJitter(strength, strength, strength, hue)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
    ]


def _check_views(num_views: int) -> None:
    if num_views < 1:
        raise ValueError(f"augmentation: num_views must be >= 1, got {num_views}")


class MultiView:
    """Applies one random pipeline `num_views` times independently to the same image.

    Returns a list of `num_views` tensors, each (3, size, size).
    """

    def __init__(self, pipeline: Callable[[ImageLike], torch.Tensor], num_views: int) -> None:
        _check_views(num_views)
        self.pipeline = pipeline
        self.num_views = num_views

    def __call__(self, image: ImageLike) -> list[torch.Tensor]:
        return [self.pipeline(image) for _ in range(self.num_views)]

    def __repr__(self) -> str:
        return f"MultiView(num_views={self.num_views}, pipeline={self.pipeline})"


def simclr(size: int, mean: list[float], std: list[float], num_views: int = 2) -> MultiView:
    """SimCLR: RandomResizedCrop(size, 0.08-1), flip, colour jitter (0.8, 0.8, 0.8, 0.2) p=0.8,
    grayscale p=0.2, Gaussian blur p=0.5."""
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *simclr_colour(size),
            *_to_normalised_tensor(mean, std),
        ]
    )
    return MultiView(pipeline, num_views)


def mocov2(size: int, mean: list[float], std: list[float], num_views: int = 2) -> MultiView:
    """MoCo v2: RandomResizedCrop(size, 0.2-1), flip, colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
    grayscale p=0.2, Gaussian blur p=0.5."""
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
            *_to_normalised_tensor(mean, std),
        ]
    )
    return MultiView(pipeline, num_views)


def instdisc(size: int, mean: list[float], std: list[float], num_views: int = 1) -> MultiView:
    """InstDisc (and MoCo v1 with num_views=2): RandomResizedCrop(size, 0.2-1), flip,
    colour jitter (0.4, 0.4, 0.4, 0.4) always, grayscale p=0.2."""
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.RandomGrayscale(p=0.2),
            *_to_normalised_tensor(mean, std),
        ]
    )
    return MultiView(pipeline, num_views)


def linear(size: int, mean: list[float], std: list[float], num_views: int = 1) -> MultiView:
    """Linear-evaluation training: RandomResizedCrop(size, 0.08-1) + flip."""
    pipeline = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_normalised_tensor(mean, std),
        ]
    )
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

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        groups: list[CropGroup] | None = None,
    ) -> None:
        if groups is None:
            groups = [CropGroup(160, 1, [0.14, 1.0]), CropGroup(96, 3, [0.08, 0.14])]
        if len(groups) == 0:
            raise ValueError("augmentation.groups: at least one crop group is required")
        parsed = [_crop_group(i, g) for i, g in enumerate(groups)]
        # Stable sort: groups of equal size keep their order, largest resolution first.
        self.groups = sorted(parsed, key=lambda g: -g.size)
        self.pipelines = [
            v2.Compose(
                [
                    v2.RandomResizedCrop(g.size, scale=tuple(g.scale), antialias=True),
                    v2.RandomHorizontalFlip(),
                    *simclr_colour(g.size),
                    *_to_normalised_tensor(mean, std),
                ]
            )
            for g in self.groups
        ]

    def __call__(self, image: ImageLike) -> list[torch.Tensor]:
        pairs = zip(self.groups, self.pipelines, strict=True)
        return [p(image) for g, p in pairs for _ in range(g.count)]

    def __repr__(self) -> str:
        return f"MultiCrop(groups={self.groups})"
