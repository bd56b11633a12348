"""Every invalid mixing setting is refused with an error naming the setting."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ama_ray.errors import ConfigError
from ama_ray.mixing import ALGORITHMS, MixingSettings, make_policy

TASKS = ("math", "safety", "code")


@pytest.mark.parametrize("key, value", [
    ("eta_alpha", -0.1), ("eta_alpha", math.nan), ("eta_alpha", "0.1"), ("eta_alpha", True),
    ("smoothing", -0.01), ("smoothing", 1.01), ("smoothing", math.inf),
    ("g_bound", 0.0), ("g_bound", -1.0), ("g_bound", math.inf),
    ("clip", "per_batch"), ("excess_target", "reference"), ("baseline_objective", "dpo"),
    ("initial_weights", [1, 2, 3]), ("fixed_weights", "math"),
])
def test_invalid_setting_names_its_key(key, value):
    with pytest.raises(ConfigError) as err:
        MixingSettings(**{key: value})
    assert err.value.where == f"mixing.{key}"
    assert f"mixing.{key}" in str(err.value)


@pytest.mark.parametrize("algorithm, settings, where, match", [
    ("ama_s", {"smoothing": 0.0}, "mixing.smoothing", "c > 0"),
    ("fixed", {}, "mixing.fixed_weights", "needs weights"),
    ("fixed", {"fixed_weights": {"math": 1, "safety": -1, "code": 1}}, "mixing.fixed_weights",
     "non-negative"),
    ("fixed", {"fixed_weights": {"math": 0, "safety": 0, "code": 0}}, "mixing.fixed_weights",
     "all weights are zero"),
    ("fixed", {"fixed_weights": {"math": 1, "safety": 1, "code": 1, "chat": 1}},
     "mixing.fixed_weights", "unknown tasks"),
    ("fixed", {"fixed_weights": {"math": 1, "safety": 1}}, "mixing.fixed_weights", "no weight"),
    ("fixed", {"fixed_weights": {"math": 1, "safety": math.nan, "code": 1}},
     "mixing.fixed_weights", "finite"),
    ("ama_r", {"initial_weights": {"math": 1, "safety": 0, "code": 1}},
     "mixing.initial_weights", "positive"),
    ("ama_s", {"initial_weights": {"math": 1, "coding": 1, "safety": 1}},
     "mixing.initial_weights", "unknown tasks"),
])
def test_invalid_algorithm_settings(algorithm, settings, where, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_policy(algorithm, TASKS, (10, 1, 1), MixingSettings(**settings))
    assert err.value.where == where


def test_valid_edges_are_accepted():
    assert make_policy("ama_r", TASKS, (1, 1, 1), MixingSettings(smoothing=0.0)).weights().sum() == 1
    p = make_policy("ama_s", TASKS, (1, 1, 1), MixingSettings(smoothing=1.0))
    assert p.weights().tolist() == [1 / 3] * 3
    p = make_policy("ama_s", TASKS, (1, 1, 1), MixingSettings(
        smoothing=0.5, initial_weights={"math": 2, "safety": 1, "code": 1}))
    np.testing.assert_allclose(p.weights(), [0.5 * 0.5 + 0.5 / 3, 0.5 * 0.25 + 0.5 / 3,
                                             0.5 * 0.25 + 0.5 / 3], rtol=1e-15)


@pytest.mark.parametrize("tasks, sizes, where", [
    ((), (), "data.tasks"), (("a", "a"), (1, 1), "data.tasks"),
    (("a", "b"), (1, 0), "data.tasks"), (("a", "b"), (1,), "data.tasks"),
    (("a", "b"), (1, 2.5), "data.tasks"),
])
def test_invalid_tasks_or_sizes(tasks, sizes, where):
    with pytest.raises(ConfigError) as err:
        make_policy("proportional", tasks, sizes, MixingSettings())
    assert err.value.where == where


def test_unknown_algorithm():
    with pytest.raises(ConfigError) as err:
        make_policy("ama_x", TASKS, (1, 1, 1), MixingSettings())
    assert err.value.where == "generalist.algorithms"
    assert set(ALGORITHMS) == {"proportional", "balanced", "fixed", "ama_r", "ama_s", "ama_h"}


def test_ama_r_batch_smaller_than_k_names_the_batch_size():
    p = make_policy("ama_r", TASKS, (1, 1, 1), MixingSettings())
    with pytest.raises(ConfigError) as err:
        p.sample(2, np.random.default_rng(0))
    assert err.value.where == "generalist.optim.batch_size"  # the key a user sets (the config refuses it first)


def test_mixing_package_imports_without_ray_or_torch():
    code = ("import sys, ama_ray.mixing, ama_ray.mixing.known_answer; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    package = Path(__file__).parents[2] / "ama_ray" / "mixing"
    for source in package.glob("*.py"):
        text = source.read_text()
        assert "import ray" not in text and "from ray" not in text, source


# A valid value different from the default, for every field; fixed/initial weights over TASKS.
OTHER_VALUE = {
    "eta_alpha": 0.9, "smoothing": 0.4, "clip": "none", "excess_target": "none", "g_bound": 0.05,
    "initial_weights": {"math": 5.0, "safety": 1.0, "code": 1.0}, "fixed_weights": {"math": 1.0, "safety": 2.0, "code": 3.0},
    "baseline_objective": "excess", "history_window": 10.0, "heldout_every": 3,
}


def _run(algorithm: str, settings: MixingSettings, steps: int = 6) -> list:
    """Records and objectives of a few updates on fixed random statistics (same for every call)."""
    import torch

    rng = np.random.default_rng(0)
    p = make_policy(algorithm, TASKS, [50, 30, 20], settings)
    out = []
    for _ in range(steps):
        count = rng.integers(1, 8, size=3).astype(float)
        loss, spec = rng.uniform(0, 2, size=3) * count, rng.uniform(0, 2, size=3) * count
        clipped = np.maximum(loss - spec, 0) + rng.uniform(0, 0.5, size=3) * count
        stats = {"sum_loss": loss, "sum_specialist_loss": spec, "sum_clipped_excess": clipped, "count": count}
        held = {f"heldout_{key}": value * 2 + (key != "count") * 0.25 for key, value in stats.items()} if p.wants_heldout(p.step) else {}
        rec = p.update({**stats, **held})
        out.append((rec["alpha"].tolist(), rec["g_hat"].tolist()))
    e = p.objective(torch.tensor([0.3, 1.2, 0.9]), torch.tensor([0.5, 0.4, 0.9]))
    return out + [e.tolist()]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fields_outside_used_settings_do_not_change_a_run(algorithm):
    """USED_SETTINGS decides which settings a committed generalist unit's hash covers: a field an
    algorithm does not list must not change its alpha, its estimates or its objective."""
    from ama_ray.mixing import USED_SETTINGS

    base = MixingSettings(fixed_weights=OTHER_VALUE["fixed_weights"] if algorithm == "fixed" else None)
    reference = _run(algorithm, base)
    assert set(OTHER_VALUE) == set(MixingSettings().to_dict()), "a new field needs an entry here"
    for field, value in OTHER_VALUE.items():
        if field in USED_SETTINGS[algorithm] or (algorithm == "fixed" and field == "fixed_weights"):
            continue
        changed = MixingSettings(**{**base.to_dict(), field: value})
        assert _run(algorithm, changed) == reference, f"{algorithm} reads {field}: add it to USED_SETTINGS"
    # and a listed field does matter somewhere (the mapping is not vacuous)
    listed = [f for f in USED_SETTINGS[algorithm] if f != "fixed_weights"]
    assert any(_run(algorithm, MixingSettings(**{**base.to_dict(), f: OTHER_VALUE[f]})) != reference for f in listed)


def test_generalist_hash_covers_only_the_algorithms_settings():
    from ama_ray.config import load_config
    from ama_ray.stages.generalist import generalist_hash

    weights = "mixing.fixed_weights={arithmetic: 1, refusal: 1, brackets: 1}"
    a = load_config(None, ["generalist.algorithms=[fixed, ama_s]", weights])
    b = load_config(None, ["generalist.algorithms=[fixed, ama_s]", weights.replace("brackets: 1", "brackets: 3")])
    c = load_config(None, ["generalist.algorithms=[fixed, ama_s]", weights, "mixing.eta_alpha=0.5"])
    assert generalist_hash(a, "ama_s", 0) == generalist_hash(b, "ama_s", 0) != generalist_hash(c, "ama_s", 0)
    assert generalist_hash(a, "fixed", 0) != generalist_hash(b, "fixed", 0)
    assert generalist_hash(a, "fixed", 0) == generalist_hash(c, "fixed", 0)
    assert generalist_hash(a, "balanced", 0) == generalist_hash(b, "balanced", 0) == generalist_hash(c, "balanced", 0)
