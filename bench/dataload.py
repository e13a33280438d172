"""Images/s of one data-loader worker (one core): storage x image backend.

    python bench/dataload.py [--images 300] [--size 224] [--transform linear|simclr]
    python bench/dataload.py --ops [--size 224]     # each augmentation op alone

Generates ImageNet-like JPEGs (500x375, ~quality 90) in a temp dir, builds the folder and zip
layouts from them, and times `dataset[i]` over all images in one process with one thread,
which is what one loader worker does. Transform: `linear` is RandomResizedCrop(size) + flip +
float normalised tensor; `simclr` is the default pretraining augmentation, two views each with
colour jitter, grayscale and blur. Baseline: the same pipeline in stock torchvision v1
transforms on PIL images, as the authors' code wrote it. Prints a Markdown table. pillow-simd rows
appear when it is installed in place of Pillow (`make install-simd`; the backend column says
which PIL ran). With the torchvision decoder our transforms decode only the rectangle of a
JPEG that covers their crops (crop decoding, when `make install` has built it); the
"whole-image decode" row shows the same pipeline without it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1

from pic.data.base import IMAGENET_MEAN, IMAGENET_STD
from pic.data.decode import describe_decoder
from pic.data.folder import FolderData
from pic.data.make_zip import make_zip
from pic.data.transforms import GaussianBlur, adjust_hue, linear, simclr
from pic.data.zipdata import ZipData


def make_jpegs(root: Path, count: int, classes: int = 10) -> float:
    """Write `count` 500x375 JPEGs under root/{train,val}/<class>/; returns mean KiB."""
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(count):
        # Smooth colour field plus texture: compresses like a photo (~100 KiB at q90),
        # unlike pure noise.
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), np.int16)
        texture = rng.normal(0, 18, size=(375, 500, 3))
        pixels = (base + texture).clip(0, 255).astype(np.uint8)
        for split in ("train", "val") if i < classes else ("train",):
            path = root / split / f"c{i % classes:02d}" / f"img{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def seconds_per_pass(dataset) -> float:
    """Wall time of one pass of `dataset[i]` over the whole dataset."""
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return time.perf_counter() - start


def time_ops(size: int, repeats: int = 200) -> None:
    """Print the cost of each augmentation op on one size x size image: uint8 tensor vs PIL."""
    from torchvision.transforms.v2 import functional as F

    pixels = torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    image = F.to_pil_image(pixels)
    ops = {
        "brightness": lambda x: F.adjust_brightness(x, 1.3),
        "contrast": lambda x: F.adjust_contrast(x, 1.3),
        "saturation": lambda x: F.adjust_saturation(x, 1.3),
        "hue (torchvision)": lambda x: F.adjust_hue(x, 0.1),
        "hue (ours: colour.c on tensors)": lambda x: adjust_hue(x, 0.1),
        "grayscale": lambda x: F.rgb_to_grayscale(x, 3),
        "gaussian blur, sigma 1 (ours: colour.c on tensors)": GaussianBlur((1.0, 1.0)),
        "flip": F.horizontal_flip,
    }

    def best_ms(op, x) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                op(x)
            best = min(best, (time.perf_counter() - start) / repeats)
        return 1000 * best

    print(f"\nOne {size}x{size} image, one thread, best of 3 x {repeats} calls\n")
    print("| op | uint8 tensor ms | PIL ms |")
    print("|---|---:|---:|")
    for name, op in ops.items():
        print(f"| {name} | {best_ms(op, pixels):.3f} | {best_ms(op, image):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="JPEGs to generate and time")
    parser.add_argument("--size", type=int, default=224, help="crop size")
    parser.add_argument("--rounds", type=int, default=5, help="passes per configuration")
    parser.add_argument("--transform", choices=["linear", "simclr"], default="linear")
    parser.add_argument("--ops", action="store_true",
                        help="instead: the cost of each augmentation op, tensor vs PIL")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker = one core
    if args.ops:
        time_ops(args.size)
        return

    colour = [  # SimCLR's colour pipeline as the authors' code wrote it: v1 transforms, PIL blur
        v1.RandomApply([v1.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v1.RandomGrayscale(p=0.2),
        v1.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
    ] if args.transform == "simclr" else []
    baseline = v1.Compose(
        [
            v1.RandomResizedCrop(args.size),
            v1.RandomHorizontalFlip(),
            *colour,
            v1.ToTensor(),
            v1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    views = 2 if args.transform == "simclr" else 1

    def baseline_views(image: Image.Image) -> list[torch.Tensor]:
        return [baseline(image) for _ in range(views)]

    build = simclr if args.transform == "simclr" else linear
    ours = build(args.size, IMAGENET_MEAN, IMAGENET_STD, num_views=views)

    def ours_whole(image) -> list[torch.Tensor]:  # no accepts_jpeg_file: decoded whole first
        return ours(image)

    with tempfile.TemporaryDirectory() as tmp:
        folder, zipped = Path(tmp) / "folder", Path(tmp) / "zip"
        kib = make_jpegs(folder, args.images)
        make_zip(folder, zipped)
        configs = [
            ("folder", "pil", "torchvision v1 (seed baseline)", baseline_views, "no"),
            ("folder", "pil", "ours (v2)", ours, "no"),
            ("zip", "pil", "ours (v2)", ours, "no"),
            ("folder, cache full", "pil", "ours (v2)", ours, "full"),
            ("folder", "torchvision", "ours (v2), whole-image decode", ours_whole, "no"),
            ("folder", "torchvision", "ours (v2), crop decoding", ours, "no"),
            ("zip", "torchvision", "ours (v2), crop decoding", ours, "no"),
            ("folder, cache full", "torchvision", "ours (v2), crop decoding", ours, "full"),
            ("zip, cache full", "torchvision", "ours (v2), crop decoding", ours, "full"),
        ]
        datasets = []
        for storage, decoder, _, transform, cache in configs:
            factory = ZipData if storage.startswith("zip") else FolderData
            root = zipped if factory is ZipData else folder
            data = factory(str(root), cache_mode=cache, decoder=decoder)
            datasets.append(data.build("train", transform))
        # Interleave the configurations and keep each one's best pass: the machine is shared,
        # and a burst of load from elsewhere then hits one pass, not one configuration.
        best = [float("inf")] * len(configs)
        for _ in range(args.rounds):
            for k, dataset in enumerate(datasets):
                best[k] = min(best[k], seconds_per_pass(dataset))
        rates = [args.images / seconds for seconds in best]
        rows = [
            (storage, describe_decoder(decoder) if decoder == "pil" else "torchvision decode_image",
             transform_name, rate, rate / rates[0])
            for (storage, decoder, transform_name, _, _), rate in zip(configs, rates, strict=True)
        ]

    print(
        f"\n{args.images} generated JPEGs, 500x375, mean {kib:.0f} KiB; {args.transform} "
        f"transform, {views} view(s) of {args.size} px; "
        f"one process, one thread, best of {args.rounds} interleaved passes; "
        f"{describe_decoder('torchvision')}\n"
    )
    print("| storage | image backend | transform | img/s per worker | vs baseline |")
    print("|---|---|---|---:|---:|")
    for storage, backend, transform_name, rate, ratio in rows:
        print(f"| {storage} | {backend} | {transform_name} | {rate:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
