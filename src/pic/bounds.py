"""Allowed ranges of numeric parameters, declared in their annotations.

    def __init__(self, batch_size: Annotated[int, Positive] = 256,
                 stride: Annotated[int, Range(gt=0, le="window_size")] = 16384): ...

The annotation is where a reader looks for what a parameter takes; :func:`pic.config.check_config`
reads these ranges from every ``_target_`` of a composed config and refuses the run at start-up
with one error naming each key out of range. Plain Python ignores the metadata, so the classes
stay usable (and unchecked) outside a config. This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

_OPS = (("gt", ">", operator.gt), ("ge", ">=", operator.ge), ("lt", "<", operator.lt),
        ("le", "<=", operator.le))


@dataclass(frozen=True)
class Range:
    """Bounds on a number: each of ``gt``/``ge``/``lt``/``le`` a number or the name of another
    parameter of the same callable (``le="window_size"``). ``None`` values pass (an optional
    parameter left unset); a list is checked element by element."""

    gt: float | str | None = None
    ge: float | str | None = None
    lt: float | str | None = None
    le: float | str | None = None

    def describe(self, siblings: dict[str, Any] | None = None) -> str:
        """E.g. ``> 0`` or ``> 0 and <= window_size (16384)``."""
        parts = []
        for name, symbol, _ in _OPS:
            bound = getattr(self, name)
            if bound is None:
                continue
            if isinstance(bound, str) and siblings is not None and bound in siblings:
                parts.append(f"{symbol} {bound} ({siblings[bound]})")
            else:
                parts.append(f"{symbol} {bound}")
        return " and ".join(parts)

    def admits(self, value: Any, siblings: dict[str, Any]) -> bool:
        """Whether ``value`` (a number, a list of numbers or None) is in range; a bound naming a
        sibling that is unset (None or absent) does not apply."""
        if value is None:
            return True
        if isinstance(value, list | tuple):
            return all(self.admits(v, siblings) for v in value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return True  # a type error is the schema's to report
        for name, _, op in _OPS:
            bound = getattr(self, name)
            if isinstance(bound, str):
                bound = siblings.get(bound)
            if bound is not None and not op(value, bound):
                return False
        return True


Positive = Range(gt=0)
NonNegative = Range(ge=0)
