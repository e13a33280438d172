"""The config tree: every option composes, and mistakes fail at start-up naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from pic.config import CONF_DIR

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
