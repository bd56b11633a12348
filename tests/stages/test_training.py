"""The Ray stages on the tiny pipeline: reference, specialists, score, generalist (issues 5, 6)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ama_ray import dpo
from ama_ray.models.loading import load_model, load_tokenizer
from ama_ray.storage import RunDir
from ama_ray.train.data import SPLITS, load_task_split, rows_of
from ama_ray.train.metrics import evaluate_rows

pytestmark = pytest.mark.timeout(600)


def _manifest(run_dir, *parts):
    return RunDir(str(run_dir)).unit(*parts).manifest()


def test_reference_equals_direct_computation(tiny_run):
    cfg, run_dir = tiny_run
    base = _manifest(run_dir, "reference", "arithmetic")["model"]
    model, tok = load_model(base), load_tokenizer(base)
    for task, split in zip(cfg.task_names, SPLITS):  # every split is covered
        rows = rows_of(load_task_split(RunDir(str(run_dir)), task, split, with_scores=False, limit=96))
        chosen, rejected = dpo.reference_logps(model, rows, tok.pad_token_id, batch_size=7)
        np.testing.assert_allclose([r["ref_chosen_logps"] for r in rows], chosen, rtol=0, atol=2e-5)
        np.testing.assert_allclose([r["ref_rejected_logps"] for r in rows], rejected, rtol=0, atol=2e-5)
        man = _manifest(run_dir, "reference", task)
        assert man["dtype"] == "float32" and man["padding_side"] == "right"


def test_base_policy_loss_is_log2_on_every_example(tiny_run):
    """At step 0 the generalist equals the reference: tokens, masks and dtypes agree across stages."""
    cfg, run_dir = tiny_run
    base = _manifest(run_dir, "reference", "arithmetic")["model"]
    model, tok = load_model(base), load_tokenizer(base)
    for task in cfg.task_names:
        rows = rows_of(load_task_split(RunDir(str(run_dir)), task, "train", with_scores=True, limit=64))
        with torch.no_grad():
            out = dpo.per_example_loss(model, dpo.collate(rows, tok.pad_token_id), [r["ref_chosen_logps"] for r in rows],
                                       [r["ref_rejected_logps"] for r in rows], cfg.dpo)
        assert torch.allclose(out["dpo_loss"], torch.full_like(out["dpo_loss"], math.log(2)), atol=1e-4)


def test_specialist_loss_equals_direct_computation(tiny_run):
    cfg, run_dir = tiny_run
    for task in cfg.task_names:
        spec_dir = f"{run_dir}/specialists/{task}/model"
        model, tok = load_model(spec_dir), load_tokenizer(spec_dir)
        rows = rows_of(load_task_split(RunDir(str(run_dir)), task, "test", with_scores=True))
        with torch.no_grad():
            out = dpo.per_example_loss(model, dpo.collate(rows, tok.pad_token_id), [r["ref_chosen_logps"] for r in rows],
                                       [r["ref_rejected_logps"] for r in rows], cfg.dpo)
        np.testing.assert_allclose([r["specialist_loss"] for r in rows], out["loss"].numpy(), atol=2e-5)


def test_each_specialist_beats_the_base_on_its_own_task(tiny_run):
    cfg, run_dir = tiny_run
    run = RunDir(str(run_dir))
    base = _manifest(run_dir, "reference", "arithmetic")["model"]
    loss_cfg = cfg.dpo
    for task in cfg.task_names:
        rows = [rows_of(load_task_split(run, task, "test", with_scores=False))]
        before = evaluate_rows(load_model(base), rows, loss_cfg, load_tokenizer(base).pad_token_id, 64)
        spec_dir = f"{run_dir}/specialists/{task}/model"
        after = evaluate_rows(load_model(spec_dir), rows, loss_cfg, load_tokenizer(spec_dir).pad_token_id, 64)
        acc = lambda sums: (sums[7, 0] / sums[4, 0]).item()  # noqa: E731 - logps_acc / count
        loss = lambda sums: (sums[1, 0] / sums[4, 0]).item()  # noqa: E731 - dpo_loss / count
        assert loss(after) < math.log(2) - 0.02, task
        assert acc(after) > acc(before), (task, acc(before), acc(after))


def test_specialists_ran_at_the_same_time(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir = tiny_run
    spans = []
    for task in cfg.task_names:
        acc = EventAccumulator(str(run_dir / "tensorboard" / "specialists" / task))
        acc.Reload()
        times = [e.wall_time for e in acc.Scalars("train/loss/mean")]
        spans.append((min(times), max(times)))
    latest_start = max(s for s, _ in spans)
    earliest_end = min(e for _, e in spans)
    assert latest_start < earliest_end, f"specialist step times do not overlap: {spans}"


def test_rerun_skips_committed_units(tiny_run, caplog):
    from ama_ray import pipeline

    cfg, run_dir = tiny_run
    before = {p: p.read_text() for p in run_dir.rglob("_manifest.json")}
    caplog.set_level(logging.INFO, logger="ama_ray.stages.generalist")
    pipeline.run(cfg, through="generalist")
    after = {p: p.read_text() for p in run_dir.rglob("_manifest.json")}
    assert before == after
    kept = ", ".join(f"{a}/seed{s}" for a in cfg.generalist.algorithms for s in cfg.generalist.seeds)
    assert f"already committed, kept: {kept}" in caplog.text  # said, as the other stages say it


def test_mixing_history_replays_through_the_pure_policy(tiny_run):
    from ama_ray.mixing import STAT_KEYS, make_policy
    from ama_ray.stages.generalist import train_sizes

    cfg, run_dir = tiny_run
    hist = pq.read_table(run_dir / "generalist" / "ama_s" / "seed0" / "mixing_history.parquet").to_pandas()
    tasks = cfg.task_names
    assert list(hist["step"]) == list(range(cfg.generalist.optim.steps))
    policy = make_policy("ama_s", tasks, train_sizes(RunDir(str(run_dir)), cfg), cfg.mixing)
    for _, row in hist.iterrows():
        np.testing.assert_array_equal(policy.weights(), [row[f"alpha/{t}"] for t in tasks])
        policy.update({k: np.array([row[f"{k}/{t}"] for t in tasks]) for k in STAT_KEYS})
    first = np.array([hist[f"alpha/{t}"].iloc[0] for t in tasks])
    last = np.array([hist[f"alpha/{t}"].iloc[-1] for t in tasks])
    np.testing.assert_allclose(first, 1 / 3)
    assert np.abs(last - first).max() > 0.02, "alpha never moved"


def test_task_counts_follow_alpha(tiny_run):
    """Pooled over steps, the drawn counts match the expected sum of B * alpha_t (chi-square)."""
    cfg, run_dir = tiny_run
    hist = pq.read_table(run_dir / "generalist" / "ama_s" / "seed0" / "mixing_history.parquet").to_pandas()
    tasks = cfg.task_names
    counts = np.array([hist[f"count/{t}"].sum() for t in tasks], dtype=float)
    batch = cfg.generalist.optim.batch_size * cfg.scaling.num_workers
    assert (hist[[f"count/{t}" for t in tasks]].sum(axis=1) == batch).all()
    expected = np.array([(hist[f"alpha/{t}"] * batch).sum() for t in tasks])
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, expected)  # 0.999 quantile of chi-square with 2 d.o.f.
    final = _manifest(run_dir, "generalist", "ama_s", "seed0")["final_metrics"]
    assert final["check/alpha_agree"] == 1.0 and final["check/replica_max_diff"] == 0.0
