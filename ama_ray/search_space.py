"""`tune.search_space`: which keys a study may vary and over which values, checked when the config
loads (pure: no Ray). `ama_ray.stages.tune` turns the checked domains into Ray Tune's.

Keys are dotted config keys under SEARCHABLE, plus `algorithm` (shorthand for
`generalist.algorithms=[X]`); each maps to one domain `{choice|grid|uniform|loguniform|randint:
[...]}`. Every candidate value (each listed value; the bounds of a range) must give a valid
config, so a bad study fails before any earlier stage runs.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from ama_ray.errors import ConfigError

SEARCHABLE = ("generalist.", "mixing.", "eval.", "scaling.")  # what trials may vary; the rest is shared
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")


def check_search_space(cfg) -> dict[str, tuple[str, list]]:
    """{key: (domain kind, its arguments)} of `cfg.tune.search_space`, every candidate checked.

    Raises ConfigError naming `tune.search_space.<key>`.
    """
    base = cfg.model_dump(mode="json")
    base["tune"]["search_space"] = {}  # candidates are checked one at a time, without the space
    out = {}
    for key, spec in cfg.tune.search_space.items():
        if key != "algorithm" and not key.startswith(SEARCHABLE):
            raise ConfigError(f"'{key}' is not a generalist setting: trials share the run's data, specialists and scores",
                              where=f"tune.search_space.{key}",
                              fix=f"search keys under {', '.join(SEARCHABLE)} or `algorithm`; compare other settings with separate runs")
        kind, args = domain_spec(key, spec)
        for value in candidates(kind, args):
            try:
                trial = trial_config(base, {key: value})
            except ConfigError as err:
                raise ConfigError(f"value {value!r} does not fit the config: {err.what}", where=f"tune.search_space.{key}",
                                  fix="use a dotted key from docs/configuration.md and values in its range") from None
            if trial.uses_specialists != cfg.uses_specialists:  # trials share one run's specialists and scores, or none
                raise ConfigError(f"value {value!r} would {'need' if trial.uses_specialists else 'drop'} the specialists, "
                                  "which every trial shares with the run", where=f"tune.search_space.{key}",
                                  fix="compare excess targets with separate runs (`ama-ray compare`), not within one study")
        out[key] = (kind, args)
    return out


def domain_spec(key: str, spec: Any) -> tuple[str, list]:
    """(kind, arguments) of one search-space entry; ConfigError naming the key when malformed."""
    where = f"tune.search_space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(f"domain {spec!r} is not one of {', '.join(DOMAINS)}", where=where,
                          fix="write e.g. {loguniform: [0.01, 1.0]} or {choice: [0.0, 0.1]}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{kind} needs a list of values", where=where, fix=f"write {{{kind}: [..]}}")
    if kind in ("uniform", "loguniform", "randint") and (len(args) != 2 or not args[0] < args[1]):
        raise ConfigError(f"{kind} needs [low, high] with low < high, got {args}", where=where, fix=f"write {{{kind}: [low, high]}}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"loguniform needs a positive low bound, got {args[0]}", where=where, fix="use uniform, or a low bound > 0")
    return kind, args


def candidates(kind: str, args: list) -> list:
    """The values a domain can produce at its edges: every listed value, or a range's bounds."""
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":  # high is exclusive
        return [args[0], args[1] - 1]
    return list(args)


def trial_config(base: dict, params: dict[str, Any]):
    """`base` (a config dump) with the sampled dotted keys applied, validated (ConfigError)."""
    from ama_ray.config import apply_override, validate

    raw = copy.deepcopy(base)
    for key, value in params.items():
        if key == "algorithm":
            key, value = "generalist.algorithms", [value]
        # JSON is YAML, so apply_override parses the value back exactly.
        apply_override(raw, f"{key}={json.dumps(value)}")
    return validate(raw, source="tune.search_space")


def max_evaluations(cfg) -> int:
    """Evaluations of the longest trial (ASHA's max_t, in training iterations)."""
    steps, every = [cfg.generalist.optim.steps], [cfg.eval.every_n_steps]
    for key, (kind, args) in check_search_space(cfg).items():
        if key == "generalist.optim.steps":
            steps += [int(v) for v in candidates(kind, args)]
        elif key == "eval.every_n_steps":
            every += [int(v) for v in candidates(kind, args)]
    return math.ceil(max(steps) / min(every))
