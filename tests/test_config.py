from pathlib import Path

import pytest

from ama_ray.config import ALGORITHMS, config_reference, dump_yaml, load_config, validate
from ama_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_laptop_default_loads():
    cfg = load_config()
    assert cfg.task_names == ["arithmetic", "refusal", "brackets"]
    assert set(cfg.generalist.algorithms) <= set(ALGORITHMS)


def test_overrides_parse_as_yaml_and_index_lists():
    cfg = load_config(None, ["mixing.eta_alpha=0.3", "generalist.algorithms=[ama_r, fixed]", "data.tasks.1.size=77",
                             "mixing.fixed_weights={arithmetic: 2, refusal: 1, brackets: 1}"])
    assert cfg.mixing.eta_alpha == 0.3
    assert cfg.generalist.algorithms == ["ama_r", "fixed"]
    assert cfg.data.tasks[1].size == 77
    assert cfg.mixing.fixed_weights == {"arithmetic": 2, "refusal": 1, "brackets": 1}


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("mixing.bogus=1", "mixing.bogus", "allowed keys here: eta_alpha"),
        ("mixing.smoothing=2", "mixing.smoothing", "in [0, 1]"),
        ("dpo.beta=abc", "dpo.beta", "valid number"),
        ("dpo.beta=-1", "dpo.beta", "beta must be > 0"),
        ("dpo.loss_type=ipo dpo.label_smoothing=0.1", "dpo.label_smoothing", "sigmoid' only"),
        ("generalist.algorithms=[ama_r] generalist.optim.batch_size=2", "generalist.optim.batch_size", "at least 3"),
        ("generalist.algorithms=[foo]", "generalist.algorithms", "allowed: proportional"),
        ("data.tasks.0.name=refusal", "data.tasks", "duplicate task names"),
        ("specialists.optim.batch_size=5", "specialists.optim", "multiple of grad_accum"),
        ("data.tasks.9.size=1", "data.tasks.9", "out of range"),
        ("scaling=3", "scaling", "valid dictionary"),
    ],
)
def test_bad_values_name_the_key(override, key, hint):
    if override.startswith("specialists"):
        override = [override, "specialists.optim.grad_accum=2"]
    else:
        override = override.split(" ")
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    msg = str(err.value)
    assert f"'{key}" in msg and hint in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "overrides, key, hint",
    [
        (["generalist.algorithms=[fixed]"], "mixing.fixed_weights", "needs weights"),
        (["generalist.algorithms=[fixed]", "mixing.fixed_weights={arithmetic: 1, refusal: 1, brackts: 1}"],
         "mixing.fixed_weights", "unknown tasks ['brackts']"),
        (["generalist.algorithms=[fixed]", "mixing.fixed_weights={arithmetic: 1, refusal: 1}"],
         "mixing.fixed_weights", "brackets"),
        (["generalist.algorithms=[ama_s]", "mixing.smoothing=0"], "mixing.smoothing", "c > 0"),
        (["mixing.initial_weights={arithmetic: 1}"], "mixing.initial_weights", "brackets"),
    ],
)
def test_mixing_settings_are_checked_against_the_tasks_when_the_config_is_read(overrides, key, hint):
    """A policy that cannot be built fails on load, before any stage runs (not at the generalist)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.where == key and hint in str(err.value)


def test_task_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of benchmark, path, hf_dataset"):
        validate({"data": {"tasks": [{"name": "a", "benchmark": "arithmetic", "path": "x.jsonl"}]}})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["mixing.eta_alpha=0.7"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_configuration_doc_is_generated_from_the_classes():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == config_reference(), "docs/configuration.md is stale: run `ama-ray config-docs > docs/configuration.md`"


def test_lora_per_stage_falls_back_to_model_lora_and_moves_only_its_stages_hash():
    from ama_ray.stages.generalist import generalist_hash
    from ama_ray.stages.specialists import specialist_hash

    plain = load_config(None, ["storage.path=/tmp/x"])
    lora_spec = load_config(None, ["storage.path=/tmp/x", "specialists.lora={enabled: true, r: 4}"])
    lora_gen = load_config(None, ["storage.path=/tmp/x", "generalist.lora={enabled: true}"])
    everywhere = load_config(None, ["storage.path=/tmp/x", "model.lora.enabled=true", "generalist.lora={enabled: false}"])
    assert not plain.lora_for("specialist").enabled and not plain.lora_for("generalist").enabled
    assert lora_spec.lora_for("specialist").r == 4 and not lora_spec.lora_for("generalist").enabled
    assert everywhere.lora_for("specialist").enabled and not everywhere.lora_for("generalist").enabled
    # Each stage's own LoRA moves its own hash (and the generalist's follows its specialists' through the scores).
    assert specialist_hash(lora_gen) == specialist_hash(plain) and generalist_hash(lora_gen, "ama_s", 0) != generalist_hash(plain, "ama_s", 0)
    assert specialist_hash(lora_spec) != specialist_hash(plain)
    assert validate(yaml_round_trip(lora_spec)) == lora_spec


def yaml_round_trip(cfg):
    import yaml

    return yaml.safe_load(dump_yaml(cfg))
