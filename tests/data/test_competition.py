"""The benchmark's tasks compete (issue 3, acceptance b), measured with DPO from the tiny SFT base."""

from __future__ import annotations

from collections import Counter

import pytest

from ama_ray.data import benchmark
from benchmarks.competition_measure import (
    BASE,
    CompetitionSettings,
    competition_verdict,
    format_table,
    measure_competition,
    tokenize_rows,
)

# 150 steps, 1,000 training rows per task: ~5 s per run on one thread. Measured by hand at
# these settings (tiny base with sft_chosen_share 0.5, sft_steps 800), seeds 0-4: the largest
# drop of another task below the base 13-24 points (brackets, after only-arithmetic or
# only-refusal); refusal's `refuse` rows 18-25% at the base, 0% after only-arithmetic, its
# answered rows 66-82% -> 100%. With a base SFT'd on chosen only: refuse rows 100% -> 0%.
SETTINGS = CompetitionSettings(steps=150, train_examples_per_task=1000, eval_examples_per_task=200, seed=0, data_seed=0)
RUNS = [BASE, "only-arithmetic", "only-refusal"]


@pytest.fixture(scope="module")
def measured(model_cache):
    from ama_ray.models.tiny import ensure_tiny_base

    return measure_competition(str(ensure_tiny_base(model_cache)), SETTINGS, runs=RUNS)


@pytest.mark.timeout(240)
def test_one_task_alone_lowers_another_by_at_least_ten_points(measured):
    base = measured[BASE]
    # The base is its own reference: implicit rewards are 0 up to float noise (a tie is no win).
    assert all(base[t]["rewards/accuracies"] <= 0.02 for t in benchmark.TASKS)
    # Acceptance (b), the criterion itself (measured 13-24 points on seeds 0-4).
    verdict = competition_verdict(measured)
    assert verdict["max_drop"] >= 0.10, format_table([measured])
    # The specialists learn their own task (rewards against the base): not broken runs.
    assert measured["only-arithmetic"]["arithmetic"]["rewards/accuracies"] >= 0.55
    assert measured["only-refusal"]["refusal"]["rewards/accuracies"] >= 0.95


@pytest.mark.timeout(240)
def test_arithmetic_alone_stops_the_refusals_that_the_refusal_task_wants(measured):
    base, only = measured[BASE]["refusal"], measured["only-arithmetic"]["refusal"]
    # Flagged arithmetic prefers the answer over the refusal after a refused request: DPO on
    # it removes every refusal of the refusal task's `refuse` rows, and only those fall.
    assert only["logps/accuracies/refuse"] <= 0.05
    assert base["logps/accuracies/refuse"] - only["logps/accuracies/refuse"] >= 0.10
    assert only["logps/accuracies/hard_negative"] >= 0.95
    assert only["logps/accuracies/benign"] >= 0.95


@pytest.mark.timeout(240)
def test_per_kind_accuracies_add_up_to_the_task_accuracy(measured):
    for task in benchmark.TASKS:
        # The held-out rows are the first ones the generator yields for the data seed.
        rows = benchmark.generate(task, SETTINGS.eval_examples_per_task, seed=SETTINGS.data_seed)
        counts = Counter(r["meta"]["kind"] for r in rows)
        metrics = measured["only-arithmetic"][task]
        weighted = sum(metrics[f"logps/accuracies/{k}"] * n for k, n in counts.items()) / len(rows)
        assert weighted == pytest.approx(metrics["logps/accuracies"], abs=1e-6)


def test_verdict_and_table_on_hand_made_numbers():
    def run(a, r, b):
        return {t: {"logps/accuracies": v, "rewards/accuracies": v / 2} for t, v in zip(benchmark.TASKS, (a, r, b))}

    results = {BASE: run(0.9, 1.0, 0.8), "only-arithmetic": run(0.95, 0.7, 0.75), "all": run(0.99, 1.0, 0.8)}
    verdict = competition_verdict(results)
    assert verdict["max_drop"] == pytest.approx(0.3)  # refusal 1.0 -> 0.7
    assert verdict["max_gap"] == pytest.approx(0.04)  # arithmetic: all 0.99 vs only 0.95
    assert verdict["competes"] == 1.0
    assert competition_verdict(results, drop=0.31)["competes"] == 0.0
    table = format_table([results, {k: run(0.5, 0.5, 0.5) for k in results}]).splitlines()
    assert table[0].startswith("| run | arithmetic logps acc | arithmetic rewards acc | refusal logps acc")
    assert table[2] == "| base | 70.0 (50-90) | 35.0 (25-45) | 75.0 (50-100) | 37.5 (25-50) | 65.0 (50-80) | 32.5 (25-40) |"


def test_tokenize_rows_matches_the_prepare_stage_layout():
    class Tok:  # one id per character: enough to check layout, EOS and kind
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens):
            assert add_special_tokens is False
            return {"input_ids": [[ord(c) for c in text] for text in texts]}

    row = {"prompt": "ab", "chosen": " c", "rejected": " d", "meta": {"kind": "plain"}}
    assert tokenize_rows(Tok(), [row]) == [
        {"prompt_input_ids": [97, 98], "chosen_input_ids": [32, 99, 0], "rejected_input_ids": [32, 100, 0], "kind": "plain"}
    ]
