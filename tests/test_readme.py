"""The README's references stay true: every test, path, config option and make target it
names exists.

A README that cites ``test_x.py::test_y`` as the proof of a behaviour is only honest while that
test exists; a rename or a deleted test would leave the claim standing with nothing behind it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# `test_file.py::test_name`, or `::test_name` continuing the last file named (parameters cut).
TEST_REF = re.compile(r"`(?:tests/)?(test_\w+\.py)?::(test_\w+)(?:\[[^`\]]*\])?`")
# A path under one of the project's folders (a file, or a folder ending in /), or a test file.
PATH_REF = re.compile(r"(?<![\w./])((?:src|conf|sweeps|tests|bench)/[\w./-]*[\w/])"
                      r"|\b(test_\w+\.py)\b")
BUILT = (".so",)  # made by `make install`, not in the checkout
GROUPS = sorted(path.name for path in (ROOT / "conf").iterdir() if path.is_dir())
# `group=option` on a command line: a conf/<group>/<option>.yaml (not a `group.key=value`, and
# not a stem such as `experiment=small_<method>` or a placeholder such as `model=X`).
OPTION_REF = re.compile(rf"(?<![\w.])({'|'.join(GROUPS)})=([a-z0-9_]*[a-z0-9])(?![\w<*.])")


def defined_functions(path: Path) -> set[str]:
    """Names of the functions of a file, module level or in a class."""
    return {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def cited_tests() -> list[tuple[str, str]]:
    """(file, test) for every test the README names, in order."""
    cited, last_file = [], None
    for match in TEST_REF.finditer(README):
        last_file = match.group(1) or last_file
        assert last_file, f"README cites `::{match.group(2)}` before naming its file"
        cited.append((last_file, match.group(2)))
    return cited


def test_every_test_the_readme_cites_exists() -> None:
    cited = cited_tests()
    assert len(cited) >= 20  # the pattern still reads the README's form of citation
    missing = [f"{file}::{name}" for file, name in cited
               if not (ROOT / "tests" / file).is_file()
               or name not in defined_functions(ROOT / "tests" / file)]
    assert not missing, f"the README cites tests that do not exist: {missing}"


def test_every_path_the_readme_names_exists() -> None:
    named = {path or f"tests/{test_file}" for path, test_file in PATH_REF.findall(README)}
    assert len(named) >= 30  # the pattern still reads the README's paths
    missing = sorted(path for path in named
                     if not path.endswith(BUILT) and not (ROOT / path).exists())
    assert not missing, f"the README names paths that do not exist: {missing}"


def test_every_config_option_the_readme_names_exists() -> None:
    named = set(OPTION_REF.findall(README))
    assert len(named) >= 30  # the pattern still reads the README's command lines
    missing = sorted(f"{group}={option}" for group, option in named
                     if not (ROOT / "conf" / group / f"{option}.yaml").is_file())
    assert not missing, f"the README names config options that do not exist: {missing}"


def test_every_make_target_the_readme_names_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    # `make x` in text, or a code block's line that starts with it (not the word in prose).
    named = set(re.findall(r"(?:^|`)make ([a-z][\w-]*)", README, re.MULTILINE))
    assert {"train", "test"} <= named  # the two commands
    assert named <= targets, f"the README names make targets that do not exist: {named - targets}"
