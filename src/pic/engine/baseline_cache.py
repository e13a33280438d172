"""The baselines' cache, shared by every run of a user: the scores of the raw pixels and of the
network at random initialisation depend on the data, the evaluation settings, the code that
computes them and (random init) the initial weights, never on the method trained. A sweep, a
rerun or another method on the same data scores each baseline once.

Where: ``$PIC_CACHE_DIR`` (``off``: no cache), else ``$XDG_CACHE_HOME/pic``, else
``~/.cache/pic``; one JSON file per key in ``baselines/``, written atomically by rank 0. The key
is a sha256 of everything the scores depend on (:func:`baseline_key`): a change to any of them
scores again. Rank 0 reads the cache and tells the other ranks, so that every rank takes part
in the same collectives even where the nodes do not share the folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from omegaconf import DictConfig
from torch import nn

from .. import dist
from ..config import config_dict
from .checkpoint import atomic_write_text

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
# The code a baseline's scores come from: data loading and transforms (and the native decoder),
# the networks, the methods (their heads), the evaluation itself.
CODE = ("data", "csrc", "native.py", "networks", "models", "engine/knn.py", "engine/probe.py",
        "engine/features.py", "engine/baseline_cache.py")


def cache_dir() -> Path | None:
    """The cache's folder (see the module doc); None when ``PIC_CACHE_DIR=off``."""
    chosen = os.environ.get("PIC_CACHE_DIR")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pic"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the source files of ``CODE`` (paths and bytes) and torch's version."""
    h = hashlib.sha256(torch.__version__.encode())
    for entry in CODE:
        path = PACKAGE / entry
        files = sorted(p for p in path.rglob("*") if p.suffix in (".py", ".c", ".h")) \
            if path.is_dir() else [path]
        for file in files:
            h.update(str(file.relative_to(PACKAGE)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and values of every tensor)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def baseline_key(name: str, network: nn.Module, context: dict[str, Any]) -> str:
    """The cache key of baseline ``name`` computed by ``network``: ``context`` (JSON values,
    see :func:`baseline_context`), the code and, for a network with weights, its config
    (``context["network"]``), architecture and weights; a network without (the pixels) is
    the same function whatever the run's backbone."""
    common = {k: v for k, v in context.items() if k != "network"}
    parts: dict[str, Any] = {"baseline": name, "context": common, "code": code_digest()}
    if any(True for _ in network.state_dict()):
        parts["network"] = [context.get("network"), repr(network), weights_digest(network)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())["scores"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged entry: score again
        log.warning("baseline cache %s unreadable (%s): scoring again", path, err)
        return None


def _from_main(value: Any) -> Any:
    """Rank 0's ``value`` (JSON-able) on every rank."""
    if not dist.is_dist():
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def cached_scores(networks: dict[str, nn.Module], context: dict[str, Any],
                  compute: Callable[[dict[str, nn.Module]], dict[str, Any]]
                  ) -> dict[str, Any]:
    """Per name the scores of ``networks``: from the cache where it holds them, the others by
    ``compute`` (one call for all of them, e.g. one pass over the images), then stored.

    torch's CPU generator is left as found (a loader draws its seed from it): the training
    after draws the same numbers whether the cache held the baselines or not."""
    with torch.random.fork_rng(devices=[]):
        return _cached_scores(networks, context, compute)


def _cached_scores(networks: dict[str, nn.Module], context: dict[str, Any],
                   compute: Callable[[dict[str, nn.Module]], dict[str, Any]]
                   ) -> dict[str, Any]:
    folder = cache_dir()
    if folder is None:
        return compute(networks)
    paths = {name: folder / "baselines" / f"{baseline_key(name, net, context)}.json"
             for name, net in networks.items()}
    found = _from_main({name: _read(path) for name, path in paths.items()}
                       if dist.is_main() else None)
    for name in networks:
        if found[name] is not None:
            log.info("baseline %s: from the cache %s (same data, settings and code)", name,
                     paths[name])
    missing = {name: net for name, net in networks.items() if found[name] is None}
    if missing:
        found.update(compute(missing))
        if dist.is_main():
            for name in missing:
                _write(paths[name], {"baseline": name, "context": context,
                                     "scores": found[name]})
    return found


def _write(path: Path, entry: dict[str, Any]) -> None:
    try:
        atomic_write_text(json.dumps(entry, default=str), path)
    except OSError as err:  # a read-only or full cache costs a recompute next time, no more
        log.warning("baseline cache: could not write %s (%s)", path, err)


def baseline_context(cfg: DictConfig, bank_set: Any, val_set: Any,
                     device: torch.device) -> dict[str, Any]:
    """What a run's baselines depend on besides the code and the weights: the data (config and
    both splits' fingerprints), ``eval``, the task's ``probe``, the network's config (the
    method's too for head features) and the device type."""
    head = cfg.eval.features == "head"
    network = {"backbone": config_dict(cfg.backbone),
               "model": config_dict(cfg.model) if head else None}
    return {"data": config_dict(cfg.data), "eval": config_dict(cfg.eval),
            "fingerprints": [bank_set.fingerprint(), val_set.fingerprint()],
            "probe": config_dict(cfg.task).get("probe"), "device": device.type,
            "network": network}
