"""The config tree: every option composes, and mistakes fail at start-up naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Annotated

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from pic.bounds import Range
from pic.config import CONF_DIR, ConfigError, bounds_of, check_config, schema_for

from .helpers import ROOT, compose_config

CONTRACT = ["task", "model", "backbone", "data", "augmentation", "sampler", "optimizer",
            "schedule", "cluster", "logger", "experiment"]
OPTIONS = [(g, p.stem) for g in CONTRACT for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def test_every_group_of_the_contract_exists_with_an_option():
    for group in CONTRACT:
        assert list((CONF_DIR / group).glob("*.yaml")), f"conf/{group}/ has no option"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    if group != "experiment":
        node = cfg[group]
        assert node._target_  # every option builds one callable
    # Interpolations resolve except values a user must give (e.g. data.root of real datasets).
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    check_config(cfg)  # and every value as shipped is in its declared range


@pytest.mark.parametrize("override", ["model.temprature=0.1", "trainer.epoch=3",
                                      "optimizer.momentun=0.5"])
def test_a_misspelt_key_fails_naming_it(override):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(override)
    cause = err.value.__cause__
    assert isinstance(cause, ConfigAttributeError | ConfigKeyError)
    assert f"full_key: {override.split('=')[0]}" in str(cause)


@pytest.mark.parametrize("override", ["model.temperature=hot", "trainer.batch_size=1.5",
                                      "trainer.max_steps=many"])
def test_a_wrong_type_fails_naming_the_key(override):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(override)
    assert isinstance(err.value.__cause__, ValidationError)
    assert override.split("=")[0] in str(err.value.__cause__)


def test_a_misspelt_key_in_an_option_file_fails(tmp_path):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "bad.yaml").write_text(
        (CONF_DIR / "model" / "pic.yaml").read_text() + "temprature: 0.5\n")
    for path in CONF_DIR.rglob("*.yaml"):
        dest = conf / path.relative_to(CONF_DIR)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            dest.write_text(path.read_text())
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"--config-dir={conf}",
                          "model=bad", "--cfg", "job"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "temprature" in out.stderr + out.stdout


def test_command_line_group_choice_beats_the_method_default():
    cfg = compose_config("model=pic", "schedule=step")
    assert cfg.schedule._target_.endswith("Step")


def test_help_lists_groups_and_options():
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for group in CONTRACT:
        assert f"{group}:" in out
    assert "pic" in out and "digits" in out


# ---------------------------------------------------------------- ranges (issue 15 item 5)

OUT_OF_RANGE = [
    ("trainer.batch_size=0", "trainer.batch_size=0: must be > 0"),
    ("trainer.batch_size=-32", "trainer.batch_size=-32: must be > 0"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every=0: must be > 0"),
    ("trainer.log_every=0", "trainer.log_every=0: must be > 0"),
    ("trainer.epochs=-1", "trainer.epochs=-1.0: must be > 0"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5: must be > 0"),
    ("eval.k=0", "eval.k=0: must be > 0"),
    ("sampler=sliding_window sampler.window_size=512 sampler.stride=1024",
     "sampler.stride=1024: must be > 0 and <= window_size (512)"),
]


@pytest.mark.parametrize(("overrides", "message"), OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_a_value_out_of_range_fails_naming_the_key_and_the_range(overrides, message):
    cfg = compose_config(*overrides.split())
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert message in str(err.value)
    assert str(err.value).count("must be") == 1  # only the bad key


def test_every_key_out_of_range_is_in_one_error():
    cfg = compose_config("trainer.batch_size=0", "eval.k=-1", "trainer.max_steps=null")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert "trainer.batch_size=0" in str(err.value) and "eval.k=-1" in str(err.value)
    assert "max_steps" not in str(err.value)  # null: no cap, allowed


def test_a_list_is_checked_element_by_element():
    assert Range(gt=0).admits([1, 5, 20], {}) and not Range(gt=0).admits([1, 0], {})
    assert Range(gt=0, le="w").admits(3, {"w": 3}) and not Range(le="w").admits(4, {"w": 3})
    assert Range(le="w").admits(4, {"w": None})  # an unset bound does not apply


def test_out_of_range_stops_launch_before_anything_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "trainer.batch_size=0",
                          f"hydra.run.dir={tmp_path}", "logger=none"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "trainer.batch_size=0: must be > 0" in out.stderr + out.stdout
    assert not (tmp_path / "current.pth").exists()


# ---------------------------------------------------------------- schemas follow **kwargs (16)


class _Base:
    def __init__(self, size: Annotated[int, Range(ge=1)] = 3, tags: list[str] | None = None):
        pass


class _Child(_Base):
    def __init__(self, root: str, mode: str = "a", **kwargs):
        super().__init__(**kwargs)


def test_schema_follows_kwargs_to_the_base_class():
    import tests.test_config as here

    target = f"{here.__name__}._Child"
    fields = {f.name: f for f in dataclasses.fields(schema_for(target))}
    assert list(fields) == ["_target_", "root", "mode", "size", "tags"]
    assert fields["size"].type is int and fields["size"].default == 3
    assert bounds_of(target) == {"size": Range(ge=1)}


@pytest.mark.parametrize("option", ["folder", "zip"])
def test_folder_and_zip_schemas_have_the_shared_options_once_declared(option):
    cfg = compose_config(f"data={option}", "data.root=/x", "data.image_size=96")
    assert cfg.data.image_size == 96 and cfg.data.cache_mode == "no"
    with pytest.raises(ConfigError, match="data.image_size=0: must be > 0"):
        check_config(compose_config(f"data={option}", "data.root=/x", "data.image_size=0"))
