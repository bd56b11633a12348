"""Batch inference on Ray Data shared by the reference and score stages.

Rows are sorted by length before they enter Ray Data, so each batch holds sequences of similar
length (little padding); the actor pool uses fractional CPUs so it cannot deadlock against the
rest of the pipeline on a small machine. Both stages call `ama_ray.dpo`, the same code training
runs, with right padding and the configured dtype: both are recorded in the manifests.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

from ama_ray.config import Config
from ama_ray.train.data import bucket_by_length

log = logging.getLogger(__name__)
PADDING_SIDE = "right"


class LogpScorer:
    """Ray Data callable: per-example sequence log-probs, and in score mode the per-example loss."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, threads: int, loss_cfg: dict | None):
        import torch

        from ama_ray.dpo import DPOLossConfig
        from ama_ray.models.loading import load_model, load_tokenizer

        check_model_path(model_path, "a reference/score inference actor")
        torch.set_num_threads(max(1, threads))
        self.model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        self.pad_id = load_tokenizer(model_path, trust_remote_code=trust_remote_code).pad_token_id
        self.loss_cfg = DPOLossConfig(**loss_cfg) if loss_cfg is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from ama_ray import dpo

        rows = [
            {"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r}
            for p, c, r in zip(batch["prompt_input_ids"], batch["chosen_input_ids"], batch["rejected_input_ids"])
        ]
        collated = dpo.collate(rows, self.pad_id, padding_side=PADDING_SIDE)
        out = {"example_id": batch["example_id"], "split": batch["split"]}
        with torch.no_grad():
            if self.loss_cfg is None:
                logps, _, _ = dpo.sequence_logps(self.model, collated)
                chosen, rejected = logps.chunk(2)
                out["ref_chosen_logps"], out["ref_rejected_logps"] = chosen.numpy(), rejected.numpy()
            else:
                res = dpo.per_example_loss(self.model, collated, batch["ref_chosen_logps"], batch["ref_rejected_logps"], self.loss_cfg)
                out["specialist_loss"] = res["loss"].numpy()
                out["specialist_dpo_loss"] = res["dpo_loss"].numpy()
        return out


def check_model_path(model_path: str, who: str) -> None:
    """Refuse a relative local model path handed to a Ray worker (ConfigError): it would mean the
    worker's own working directory. Hub ids pass."""
    from ama_ray.paths import looks_local, require_absolute

    if looks_local(model_path):
        require_absolute(model_path, "model.name", who)


def infer(cfg: Config, table: pa.Table, model_path: str, loss_cfg: dict | None) -> pa.Table:
    """Run `LogpScorer` over `table` (prepared columns + `split`) on a Ray Data actor pool."""
    import ray

    from ama_ray.cluster import check_fits, ensure_ray

    ensure_ray()
    ref = cfg.reference
    check_fits("inference actors", {"CPU": ref.cpus_per_actor, "GPU": ref.gpus_per_actor}, ref.num_actors, "reference.num_actors")
    table = bucket_by_length(table)
    blocks = max(1, math.ceil(table.num_rows / (ref.batch_size * 4)))
    per = math.ceil(table.num_rows / blocks)
    ds = ray.data.from_arrow([table.slice(i * per, per) for i in range(blocks)])
    ds = ds.map_batches(
        LogpScorer,
        fn_constructor_args=(model_path, cfg.model.dtype, cfg.model.trust_remote_code, max(1, int(ref.cpus_per_actor)), loss_cfg),
        batch_size=ref.batch_size,
        num_cpus=ref.cpus_per_actor,
        num_gpus=ref.gpus_per_actor or None,
        compute=ray.data.ActorPoolStrategy(size=ref.num_actors),
    )
    parts = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(parts) if parts else table.slice(0, 0)


def padding_share(table: pa.Table, batch_size: int) -> float:
    """Share of padded tokens among all tokens processed when `table` is batched in its order."""
    lengths = np.array(
        [len(p) + max(len(c), len(r)) for p, c, r in zip(
            table["prompt_input_ids"].to_pylist(), table["chosen_input_ids"].to_pylist(), table["rejected_input_ids"].to_pylist()
        )]
    )
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        padded += chunk.max() * len(chunk)
        real += chunk.sum()
    return float(1 - real / padded) if padded else 0.0
