"""Sort a flat folder of validation images into class folders, from a map file.

    python -m pic.data.sort_val FLAT_DIR MAP_FILE

Each MAP_FILE line is `<file name><tab or spaces><class folder name>` (e.g.
`ILSVRC2012_val_00000001.JPEG n01751748`); the image moves to FLAT_DIR/<class>/<file name>.
Everything is checked before anything moves, so a bad map file leaves the folder untouched.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .tool import run_tool


def read_moves(flat_dir: Path, map_file: Path) -> list[tuple[Path, Path]]:
    """(source, destination) per map line; one error naming the file and line at fault."""
    if not flat_dir.is_dir():
        raise FileNotFoundError(f"{flat_dir} is not a folder")
    if not map_file.is_file():
        raise FileNotFoundError(f"map file {map_file} not found")
    moves = []
    seen: set[str] = set()
    with open(map_file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(
                    f"{map_file}:{number}: expected '<file name> <class>', got {line.strip()!r}"
                )
            name, label = fields
            if "/" in name or "/" in label or label in (".", ".."):
                raise ValueError(f"{map_file}:{number}: names must not contain '/': {line!r}")
            if name in seen:
                raise ValueError(f"{map_file}:{number}: {name} is listed twice")
            seen.add(name)
            source = flat_dir / name
            if not source.is_file():
                raise FileNotFoundError(f"{map_file}:{number}: {source} does not exist")
            moves.append((source, flat_dir / label / name))
    if not moves:
        raise ValueError(f"map file {map_file} lists no images")
    return moves


def sort_val(flat_dir: Path, map_file: Path) -> int:
    """Move every listed image into its class folder; returns the number moved."""
    moves = read_moves(flat_dir, map_file)
    for source, destination in moves:
        destination.parent.mkdir(exist_ok=True)
        source.rename(destination)
    return len(moves)


def main(argv: list[str] | None = None) -> int:
    def work(flat_dir: Path, map_file: Path) -> str:
        moved = sort_val(flat_dir, map_file)
        return f"moved {moved} images into class folders under {flat_dir}"

    return run_tool("sort_val", "Move flat validation images into class folders: each MAP_FILE "
                    "line '<file name> <class>' moves FLAT_DIR/<file name> to "
                    "FLAT_DIR/<class>/<file name>.",
                    {"flat_dir": "folder holding the images",
                     "map_file": "lines '<file name> <class folder name>'"}, work, argv)


if __name__ == "__main__":
    sys.exit(main())
