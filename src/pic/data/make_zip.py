"""Build the zip format from an image folder tree.

    python -m pic.data.make_zip SRC DST

SRC holds `train/<class>/*` and `val/<class>/*` (the `data=folder` layout); DST receives
`train.zip`, `val.zip`, `train_map.txt` and `val_map.txt` (the `data=zip` layout). Images are
stored uncompressed (JPEGs do not compress further, and stored members read fastest); labels
are the positions of the sorted train class names, so both formats give identical datasets.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from .folder import list_classes, scan_folder
from .tool import run_tool


def make_zip(src: Path, dst: Path) -> dict[str, int]:
    """Write DST/{split}.zip and DST/{split}_map.txt for each split; returns images per split."""
    classes = list_classes(src / "train")
    dst.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        list_classes(src / split)
        paths, labels, _ = scan_folder(src / split, classes)
        with (
            zipfile.ZipFile(dst / f"{split}.zip", "w", zipfile.ZIP_STORED) as archive,
            open(dst / f"{split}_map.txt", "w", encoding="utf-8") as map_file,
        ):
            for path, label in zip(paths, labels, strict=True):
                name = path.relative_to(src / split).as_posix()
                archive.write(path, name)
                map_file.write(f"{name}\t{label}\n")
        counts[split] = len(paths)
    return counts


def main(argv: list[str] | None = None) -> int:
    def work(src: Path, dst: Path) -> str:
        counts = make_zip(src, dst)
        return "\n".join(f"{dst / (split + '.zip')}: {n} images" for split, n in counts.items())

    return run_tool("make_zip", "Convert an image folder tree (SRC/{train,val}/<class>/*) into "
                    "the zip format: DST/{train,val}.zip + DST/{train,val}_map.txt.",
                    {"src": "folder with train/<class>/* and val/<class>/*",
                     "dst": "output folder (created if missing)"}, work, argv)


if __name__ == "__main__":
    sys.exit(main())
