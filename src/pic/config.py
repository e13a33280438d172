"""Structured config schemas, generated from the classes the configs instantiate.

Every ``conf/<group>/<option>.yaml`` builds one callable through ``_target_`` and its keys are
that callable's parameters. Rather than writing each dataclass twice (once as the class, once
as its schema), :func:`register_schemas` reads the signature of every target and stores a
dataclass in Hydra's ConfigStore as ``schema_<group>_<option>``; the option file merges it
first (``defaults: [/schema_<group>_<option>@_here_, _self_]``). A misspelt key or a value of
the wrong type then fails during composition, with Hydra's message naming the full key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from .bounds import Range

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
_PRIMITIVES = (int, float, str, bool)


def _field_type(annotation: Any) -> Any:
    """Map a parameter annotation to a type OmegaConf can enforce (``Any`` otherwise)."""
    if annotation in _PRIMITIVES:
        return annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return typing.Optional[_field_type(inner[0])]  # noqa: UP045 (OmegaConf needs Optional)
        return Any
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        element = {a for a in args if a is not Ellipsis}
        item = _field_type(element.pop()) if len(element) == 1 else Any
        return list[item] if item is not Any else list[Any]
    if origin is dict or annotation is dict:
        return dict[str, Any]
    return Any


def _signature_chain(obj: Any) -> list[tuple[inspect.Parameter, Any]]:
    """(parameter, annotation with its ``Annotated`` metadata) of a callable's signature.

    A constructor that ends in ``**kwargs`` forwards them to its base class: the base's
    parameters follow (the first class up the MRO that defines ``__init__``), so options shared
    by a family of classes are declared once, in the base.
    """
    if not inspect.isclass(obj):
        hints = typing.get_type_hints(obj, include_extras=True)
        return [(p, hints.get(n, Any)) for n, p in inspect.signature(obj).parameters.items()]
    out: dict[str, tuple[inspect.Parameter, Any]] = {}
    for cls in obj.__mro__:
        if cls is object or "__init__" not in vars(cls):
            continue
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
        params = list(inspect.signature(cls.__init__).parameters.items())[1:]  # no self
        for name, param in params:
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                out.setdefault(name, (param, hints.get(name, Any)))
        if not any(p.kind is p.VAR_KEYWORD for _, p in params):
            break
    return list(out.values())


def _strip(annotation: Any) -> Any:
    """The type inside ``Annotated[type, ...]`` (the metadata is for :func:`bounds_of`)."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated \
        else annotation


@functools.lru_cache
def bounds_of(target: str) -> dict[str, Range]:
    """The :class:`~pic.bounds.Range` declared on each parameter of ``target`` that has one."""
    out = {}
    for param, annotation in _signature_chain(get_object(target)):
        if typing.get_origin(annotation) is Annotated:
            ranges = [m for m in annotation.__metadata__ if isinstance(m, Range)]
            if ranges:
                out[param.name] = ranges[0]
    return out


def schema_for(target: str) -> type:
    """A dataclass whose fields are the parameters of ``target`` (plus ``_target_``)."""
    obj = get_object(target)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target))]
    for param, annotation in _signature_chain(obj):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        name = param.name
        kind = _field_type(_strip(annotation))
        default = param.default
        if default is inspect.Parameter.empty:
            default = MISSING
        elif isinstance(default, list | tuple | dict):
            value = list(default) if isinstance(default, tuple) else default
            fields.append((name, kind, dataclasses.field(default_factory=lambda v=value: v)))
            continue
        elif default is not None and not isinstance(default, _PRIMITIVES):
            kind = Any  # an object default cannot be typed by OmegaConf
        fields.append((name, kind, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{obj.__name__}Config", fields)


class ConfigError(ValueError):
    """Values of a composed config outside the ranges their parameters declare."""


def check_config(cfg: DictConfig) -> None:
    """Check every value against the :class:`~pic.bounds.Range` its parameter declares, once,
    after composition: one error listing each key out of range with what it allows."""
    problems: list[str] = []
    _check_node(cfg, "", problems)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_node(node: Any, key: str, problems: list[str]) -> None:
    """Check ``node`` (at full key ``key``) and everything below it."""
    if OmegaConf.is_list(node):
        for i, item in enumerate(node):
            _check_node(item, f"{key}[{i}]", problems)
        return
    if not OmegaConf.is_dict(node):
        return
    prefix = f"{key}." if key else ""
    present = [k for k in node if not OmegaConf.is_missing(node, k)]
    target = node.get("_target_")
    if isinstance(target, str):
        values = {k: _plain(node[k]) for k in present}
        for name, bound in bounds_of(target).items():
            if name in values and not bound.admits(values[name], values):
                problems.append(f"{prefix}{name}={values[name]!r}: must be "
                                f"{bound.describe(values)}")
    for k in present:
        _check_node(node[k], f"{prefix}{k}", problems)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def schema_name(group: str, option: str) -> str:
    """``schema_<group>_<option>``: a top-level config rather than a group, so that ``--help``
    lists only the groups a user chooses from."""
    return f"schema_{group.replace('/', '_')}_{option}"


def register_schemas(conf_dir: Path = CONF_DIR) -> None:
    """Store a schema for every option file of ``conf_dir`` that has a ``_target_``.

    Option files of the ``experiment`` group and the primary config are global overlays, not
    callables, and have none. Call before Hydra composes a config.
    """
    store = ConfigStore.instance()
    for path in sorted(conf_dir.glob("*/**/*.yaml")):
        node = OmegaConf.load(path)
        target = node.get("_target_") if OmegaConf.is_dict(node) else None
        if target is None:
            continue
        group = path.parent.relative_to(conf_dir).as_posix()
        try:
            schema = schema_for(target)
        except (ImportError, AttributeError, ValueError) as err:
            raise RuntimeError(f"{path}: cannot build a schema for {target}: {err}") from err
        store.store(name=schema_name(group, path.stem), node=schema)
    store.store(name="schema_root", node=_root_schema())


def _root_schema() -> type:
    """Top level: one ``Any`` node per group (typed by its own schema) and the common keys."""
    groups = ["task", "model", "backbone", "data", "augmentation", "sampler", "optimizer",
              "schedule", "cluster", "logger"]
    fields: list[tuple[str, Any, Any]] = [(g, Any, dataclasses.field(default=MISSING))
                                          for g in groups]
    for key, target in (("trainer", "pic.engine.trainer.Trainer"), ("eval", "pic.engine.knn.KNN")):
        schema = schema_for(target)
        fields.append((key, schema, dataclasses.field(default_factory=schema)))
    fields += [
        ("seed", int, dataclasses.field(default=0)),
        ("auto_resume", bool, dataclasses.field(default=True)),
        ("allow_dataset_change", bool, dataclasses.field(default=False)),
        ("pretrained", typing.Optional[str], dataclasses.field(default=None)),  # noqa: UP045
        ("name", str, dataclasses.field(default="run")),
        ("output_dir", typing.Optional[str], dataclasses.field(default=None)),  # noqa: UP045
    ]
    return dataclasses.make_dataclass("RootConfig", fields)


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as plain, resolved containers (what travels to processes, jobs, checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def compose_config(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The config ``launch.py`` composes for ``overrides``, outside a Hydra app (tests, bench).

    Keys that read Hydra's runtime (``name``) need an override or ``return_hydra_config``.
    """
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides),
                       return_hydra_config=return_hydra_config)
