"""The benchmark's tasks compete (issue 3, acceptance b), measured with DPO from the tiny SFT base."""

from __future__ import annotations

from collections import Counter

import pytest

from ama_ray.data import benchmark
from ama_ray.data.competition import (
    BASE,
    CompetitionSettings,
    competition_verdict,
    format_table,
    generate_without_flagged_arithmetic,
    measure_competition,
    tokenize_rows,
)

# 150 steps, 1,000 training rows per task: ~5 s per run on one thread. Seeds 0-2 measured by
# hand at these settings: refusal logps/accuracies 100 -> 53 / 49.5 / 48 after only-arithmetic,
# its `refuse` rows 100 -> 0 / 0 / 0; with arithmetic's flagged share at 0 instead, refusal
# ends at 91.5 / 90 / 80 and its `refuse` rows at 84 / 90 / 62.
SETTINGS = CompetitionSettings(steps=150, train_examples_per_task=1000, eval_examples_per_task=200, seed=1, data_seed=1)


@pytest.fixture(scope="module")
def measured(model_cache):
    from ama_ray.models.tiny import ensure_tiny_base

    base_dir = str(ensure_tiny_base(model_cache))
    results = measure_competition(base_dir, SETTINGS, runs=[BASE, "only-arithmetic"])
    ablation = measure_competition(
        base_dir, SETTINGS, runs=["only-arithmetic"], generate=generate_without_flagged_arithmetic
    )
    return results, ablation["only-arithmetic"]


@pytest.mark.timeout(240)
def test_arithmetic_alone_lowers_refusal_by_at_least_ten_points(measured):
    results, _ = measured
    base, only = results[BASE], results["only-arithmetic"]
    # The SFT base already prefers every chosen answer: a drop is measured from near 100%.
    assert base["refusal"]["logps/accuracies"] >= 0.95
    assert base["arithmetic"]["logps/accuracies"] >= 0.95
    # The base is its own reference: implicit rewards are 0 up to float noise (a tie is no win).
    assert base["refusal"]["rewards/accuracies"] <= 0.02
    # Acceptance (b): measured drop 47-53 points on seeds 0-2; 10 is the criterion.
    verdict = competition_verdict(results)
    assert verdict["competes"] == 1.0
    assert base["refusal"]["logps/accuracies"] - only["refusal"]["logps/accuracies"] >= 0.25
    # The specialist itself learns (rewards against the base; 87-94 measured): not a broken run.
    assert only["arithmetic"]["rewards/accuracies"] >= 0.75


@pytest.mark.timeout(240)
def test_the_drop_comes_from_the_flagged_arithmetic_rows(measured):
    results, ablation = measured
    only = results["only-arithmetic"]
    # Flagged arithmetic prefers the answer over the refusal after a refused request, which
    # is the opposite of refusal's `refuse` rows: those flip, the answered kinds do not.
    assert only["refusal"]["logps/accuracies/refuse"] <= 0.2
    assert only["refusal"]["logps/accuracies/hard_negative"] >= 0.9
    assert only["refusal"]["logps/accuracies/benign"] >= 0.9
    # Same recipe without the flagged share: most `refuse` rows survive (62-90 measured), and
    # refusal loses 32-40 points fewer.
    assert ablation["refusal"]["logps/accuracies/refuse"] >= 0.4
    assert ablation["refusal"]["logps/accuracies"] - only["refusal"]["logps/accuracies"] >= 0.2


@pytest.mark.timeout(240)
def test_per_kind_accuracies_add_up_to_the_task_accuracy(measured):
    results, _ = measured
    for task in benchmark.TASKS:
        # The held-out rows are the first ones the generator yields for the data seed.
        rows = benchmark.generate(task, SETTINGS.eval_examples_per_task, seed=SETTINGS.data_seed)
        counts = Counter(r["meta"]["kind"] for r in rows)
        metrics = results["only-arithmetic"][task]
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
