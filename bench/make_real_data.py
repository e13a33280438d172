"""Real image data for the benchmarks: Fashion-MNIST from Debian's `dataset-fashion-mnist`.

The only registries reachable here are PyPI and Debian's; Debian packages Fashion-MNIST
(Zalando Research, MIT/Expat licence: 60,000 train + 10,000 test grayscale 28×28 images of
10 clothing classes) as IDX files under /usr/share/datasets/fashion-mnist/. This script writes
them as PNG folder trees for `data=folder` (`root/train/<class>/*.png`, `root/val/<class>/*.png`):

- ``fashion-mnist``: all 60,000 train images, the 10,000 test images as `val`;
- ``fashion-mnist-10k``: the first 1,000 train images of each class (10,000; in the file's
  order, so it is the same subset every time), the same 10,000 test images as `val`.

    apt-get install dataset-fashion-mnist            # or: apt-get download + --source DEB
    python bench/make_real_data.py [--out /work/data] [--source DIR_OR_DEB]

Class folders are named ``<label>_<name>`` so that sorted order is the label order. Each tree is
written into a temporary folder beside it and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped): uint8 array of shape (n,) for labels or (n, 28, 28) for images."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} bytes of data for shape {shape}")
    return array.reshape(shape)


def source_dir(source: str | None, scratch: Path) -> Path:
    """The folder holding the IDX files: the installed package, a folder, or a .deb to unpack."""
    path = Path(source) if source else PACKAGE_DIR
    if path.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(path), str(scratch)], check=True)
        path = scratch / PACKAGE_DIR.relative_to("/")
    missing = [n for pair in FILES.values() for n in pair if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: missing {', '.join(missing)}; install it with "
            "`apt-get install dataset-fashion-mnist`, or pass --source the .deb of "
            "`apt-get download dataset-fashion-mnist`")
    return path


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` images of every class, in the file's order."""
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])
    return np.sort(keep)


def write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray,
                indices: np.ndarray) -> None:
    """PNG files root/split/<label>_<class>/<original index>.png for the given indices."""
    for c, name in enumerate(CLASSES):
        (root / split / f"{c}_{name}").mkdir(parents=True, exist_ok=True)
    for i in indices:
        c = int(labels[i])
        path = root / split / f"{c}_{CLASSES[c]}" / f"{i:05d}.png"
        Image.fromarray(images[i], mode="L").save(path)


def write_tree(out: Path, name: str, data: dict, train_indices: np.ndarray) -> None:
    """Write one tree into a temporary folder beside `out/name`, then move it into place."""
    final = out / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    write_split(tmp, "train", *data["train"], train_indices)
    write_split(tmp, "val", *data["val"], np.arange(len(data["val"][1])))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    print(f"{final}: {len(train_indices)} train, {len(data['val'][1])} val images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/work/data")
    parser.add_argument("--source", default=None, help="folder with the IDX files, or the .deb")
    parser.add_argument("--per-class", type=int, default=1000, help="train images per class (10k)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        src = source_dir(args.source, Path(scratch))
        data = {split: (read_idx(src / images), read_idx(src / labels))
                for split, (images, labels) in FILES.items()}
    for split, (images, labels) in data.items():
        if images.shape[0] != labels.shape[0] or labels.max() >= len(CLASSES):
            raise ValueError(f"{src}: {split} images {images.shape} and labels disagree")
    write_tree(out, "fashion-mnist", data, np.arange(len(data["train"][1])))
    write_tree(out, "fashion-mnist-10k", data, first_per_class(data["train"][1], args.per_class))


if __name__ == "__main__":
    main()
