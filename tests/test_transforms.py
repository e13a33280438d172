"""Augmentations: view counts and shapes, multi-crop grouping, normalisation, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pic.data import transforms as T

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def random_image(h: int = 40, w: int = 50, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def as_tensor(image: Image.Image) -> torch.Tensor:
    """What the torchvision decoder yields: uint8 (3, H, W)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize(
    "build, views",
    [(T.simclr, 2), (T.mocov2, 2), (T.instdisc, 1), (T.linear_eval_resized_crop, 1)],
)
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("as_input", [lambda im: im, as_tensor])
def test_views_have_the_crop_size(build, views, size, as_input):
    transform = build(size, MEAN, STD)
    out = transform(as_input(random_image()))
    assert len(out) == views
    assert all(v.shape == (3, size, size) and v.dtype == torch.float32 for v in out)
    assert len(build(size, MEAN, STD, num_views=3)(random_image())) == 3


def test_views_are_independent_draws():
    a, b = T.simclr(32, MEAN, STD)(random_image())
    assert not torch.equal(a, b)


@pytest.mark.parametrize("build", [T.simclr, T.mocov2, T.instdisc, T.linear_eval_resized_crop])
def test_augmentation_is_deterministic_under_a_seed(build):
    transform = build(32, MEAN, STD, num_views=2)
    torch.manual_seed(7)
    first = transform(random_image())
    torch.manual_seed(7)
    again = transform(random_image())
    torch.manual_seed(8)
    other = transform(random_image())
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


@pytest.mark.parametrize("build", [T.linear_eval_resized_crop, T.eval_transform])
def test_constant_image_is_normalised_with_mean_and_std(build):
    """Crops, flips and resizes keep a constant image constant: only normalisation is left."""
    rgb = (51, 128, 204)
    image = Image.new("RGB", (40, 30), rgb)
    out = build(24, MEAN, STD)(image)[0]
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD, strict=True)])
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 24, 24).float())


def test_eval_transform_resizes_then_centre_crops():
    # Sizes chosen so that resize and crop offsets are integers: no rounding convention matters.
    size = 28
    image = random_image(64, 96, seed=3)
    out = T.eval_transform(size, MEAN, STD)(image)
    assert len(out) == 1
    # Independent computation with PIL: short side to 28 * 256 / 224 = 32, centre crop 28.
    resized = image.resize((48, 32), Image.BILINEAR)
    crop = np.asarray(resized.crop((10, 2, 38, 30)), dtype=np.float64)
    expected = (crop / 255 - np.array(MEAN)) / np.array(STD)
    got = out[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert torch.equal(out[0], T.eval_transform(size, MEAN, STD)(image)[0])


def test_multicrop_default_is_pic_one_large_three_small():
    out = T.MultiCrop(MEAN, STD)(random_image(100, 120))
    assert [tuple(v.shape) for v in out] == [(3, 160, 160)] + [(3, 96, 96)] * 3


def test_multicrop_groups_crops_by_resolution_largest_first():
    groups = [
        {"size": 16, "count": 2, "scale": [0.05, 0.2]},
        {"size": 32, "count": 1, "scale": [0.3, 1.0]},
        {"size": 24, "count": 3, "scale": [0.1, 0.5]},
    ]
    transform = T.MultiCrop(MEAN, STD, groups=groups)
    sizes = [v.shape[-1] for v in transform(random_image())]
    assert sizes == [32, 24, 24, 24, 16, 16]


def test_multicrop_is_deterministic_under_a_seed():
    transform = T.MultiCrop(MEAN, STD, groups=[{"size": 16, "count": 2, "scale": [0.1, 1.0]}])
    torch.manual_seed(1)
    a = transform(random_image())
    torch.manual_seed(1)
    b = transform(random_image())
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize(
    "groups, message",
    [
        ([], "at least one crop group"),
        ([{"size": 16, "count": 1}], r"groups\[0\]: expected keys size, count, scale"),
        ([{"size": 16, "count": 1, "scale": [0.1, 1.0], "extra": 1}], r"groups\[0\]"),
        (
            [
                {"size": 16, "count": 1, "scale": [0.1, 1.0]},
                {"size": 8, "count": 0, "scale": [0.1, 0.2]},
            ],
            r"groups\[1\]: need size >= 1, count >= 1",
        ),
        ([{"size": 16, "count": 1, "scale": [0.5, 0.2]}], r"groups\[0\]: need"),
    ],
)
def test_multicrop_bad_groups_are_named(groups, message):
    with pytest.raises(ValueError, match=message):
        T.MultiCrop(MEAN, STD, groups=groups)


@pytest.mark.parametrize("min_scale", [0.08, 0.5])
def test_simclr_crops_cover_at_least_min_scale_of_the_image(min_scale):
    crop = T.simclr(32, MEAN, STD, min_scale=min_scale).crop
    areas = []
    for _ in range(500):
        _, _, h, w = crop.box(32, 32)
        areas.append(h * w / 32**2)
    # Rounding h and w to whole pixels moves the area by < (h + w + 1) / 32² of the target.
    assert min(areas) >= min_scale - 65 / 32**2 and max(areas) <= 1.0
    assert min(areas) < min_scale + 0.1  # the bound is reached, not only respected


@pytest.mark.parametrize("min_scale", [0.0, 1.5])
def test_min_scale_outside_0_1_is_named(min_scale):
    with pytest.raises(ValueError, match="augmentation.min_scale"):
        T.simclr(32, MEAN, STD, min_scale=min_scale)


def test_num_views_must_be_positive():
    with pytest.raises(ValueError, match="num_views"):
        T.simclr(32, MEAN, STD, num_views=0)


def test_blur_on_pil_and_without_the_native_library_is_pil_s(monkeypatch):
    from pic import native

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    blur = T.GaussianBlur((1.0, 1.0))
    out = np.asarray(blur(image), dtype=np.float64)
    assert out.std() < np.asarray(image, dtype=np.float64).std()  # smoothing lowers variance
    monkeypatch.setattr(native, "LIB", None)
    from_tensor = blur(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert from_tensor.dtype == torch.uint8
    np.testing.assert_array_equal(from_tensor.permute(1, 2, 0).numpy(), out.astype(np.uint8))


def gaussian_reference(image: torch.Tensor, sigma: float) -> np.ndarray:
    """Separable Gaussian in float64 with numpy: radius ceil(3 sigma), edges replicated."""
    r = int(np.ceil(3 * sigma))
    taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    a = image.double().numpy()
    h, w = a.shape[1:]
    rows = np.pad(a, ((0, 0), (0, 0), (r, r)), mode="edge")
    a = sum(t * rows[:, :, j:j + w] for j, t in enumerate(taps))
    cols = np.pad(a, ((0, 0), (r, r), (0, 0)), mode="edge")
    return np.floor(sum(t * cols[:, j:j + h, :] for j, t in enumerate(taps)) + 0.5)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.37, 2.0])
@pytest.mark.parametrize("h, w", [(33, 47), (5, 7)])  # 5x7: smaller than the kernel at sigma 2
def test_native_blur_is_the_separable_gaussian(sigma, h, w):
    from pic import native

    assert native.LIB is not None, "the native library is not built: `make install`"
    image = as_tensor(random_image(h, w, seed=2))
    fast = T.gaussian_blur(image, sigma).double().numpy()
    assert np.abs(fast - gaussian_reference(image, sigma)).max() <= 1  # float32 rounding only


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_native_blur_is_close_to_pil_s(sigma):
    """PIL approximates the same Gaussian with box blurs (the authors' blur): close, not equal."""
    from .test_decode import photo

    pixels = photo(64, 64, seed=4)
    fast = T.gaussian_blur(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), sigma)
    pil = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(sigma)))
    diff = np.abs(fast.permute(1, 2, 0).double().numpy() - pil)
    assert diff.mean() < 1 and diff.max() <= 8


# ---------------------------------------------------------------- colour jitter, hue shift
def hsv_reference(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """The hue rotation pixel by pixel with the standard library's HSV conversion, float64."""
    import colorsys

    out = torch.empty_like(image)
    for y in range(image.shape[1]):
        for x in range(image.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*(image[:, y, x].double() / 255).tolist())
            rgb = colorsys.hsv_to_rgb((h + hue_factor) % 1.0, s, v)
            out[:, y, x] = torch.tensor([int(c * 255.999) for c in rgb], dtype=torch.uint8)
    return out


@pytest.mark.parametrize("hue_factor", [0.0, 0.1, -0.23, 0.37, 0.5, -0.5])
def test_native_hue_shift_matches_hsv_rotation(hue_factor: float) -> None:
    from pic import native

    assert native.LIB is not None, "the native library is not built: `make install`"
    image = as_tensor(random_image(24, 40, seed=5))
    image[:, :4] = 77  # gray pixels, which have no hue
    image[0, 4:8] = image[1, 4:8]  # ties for the largest channel
    fast = T.adjust_hue(image, hue_factor).int()
    for other in (hsv_reference(image, hue_factor), T.v2.functional.adjust_hue(image, hue_factor)):
        diff = (fast - other.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float rounding only


def test_hue_shift_without_the_native_library_is_torchvision_s(monkeypatch) -> None:
    from pic import native

    monkeypatch.setattr(native, "LIB", None)
    image = as_tensor(random_image())
    assert torch.equal(T.adjust_hue(image, 0.3), T.v2.functional.adjust_hue(image, 0.3))


@pytest.mark.parametrize("factors", [(0.8, 0.8, 0.8, 0.2), (0.4, 0.4, 0.4, 0.1), (0.4, 0, 0, 0)])
def test_colour_jitter_draws_and_applies_as_torchvision(factors) -> None:
    ours, theirs = T.ColorJitter(*factors), T.v2.ColorJitter(*factors)
    for seed in range(8):
        image = random_image(seed=seed)
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = theirs(image)
        assert np.array_equal(np.asarray(a), np.asarray(b))  # PIL: the very same kernels
        torch.manual_seed(seed)
        a = ours(as_tensor(image)).int()
        torch.manual_seed(seed)
        b = theirs(as_tensor(image)).int()
        assert (a - b).abs().max() <= 1  # tensors: the native hue shift's rounding


def _has_blur(transform) -> bool:
    return "GaussianBlur" in repr(transform)


@pytest.mark.parametrize("build", [T.simclr, T.mocov2])
def test_blur_probability_zero_leaves_blur_out(build):
    assert _has_blur(build(32, MEAN, STD)) and not _has_blur(build(32, MEAN, STD, blur=0.0))
    assert len(build(32, MEAN, STD, num_views=2, blur=0.0)(random_image())) == 2
    with pytest.raises(ValueError, match="augmentation.blur"):
        build(32, MEAN, STD, blur=1.5)


def test_multicrop_blur_option():
    groups = [T.CropGroup(32, 1, [0.14, 1.0]), T.CropGroup(16, 2, [0.08, 0.14])]
    assert not any(_has_blur(p) for p in T.MultiCrop(MEAN, STD, groups, blur=0.0).pipelines)
    assert all(_has_blur(p) for p in T.MultiCrop(MEAN, STD, groups).pipelines)
