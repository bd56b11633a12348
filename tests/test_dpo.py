"""The one DPO loss against TRL's DPOTrainer, a float64 recomputation, and invariances."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch

from ama_ray.dpo import (
    DPOLossConfig,
    batch_metrics,
    collate,
    dpo_loss,
    per_example_loss,
    reference_logps,
    sequence_logps,
)
from ama_ray.errors import ConfigError
from ama_ray.models.loading import load_model, load_tokenizer
from ama_ray.models.tiny import build_tiny

WORDS = "the a cat dog sat ran on under mat box red blue fast slow sure no yes maybe".split()


def _phrase(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _rows(n: int, seed: int, equal_chosen: bool = False) -> list[dict]:
    """Preference rows; with `equal_chosen` every chosen answer is 3 digits (same token count)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"Q: {_phrase(rng, 1, 6)}?"
        chosen = f" {rng.randint(100, 999)}" if equal_chosen else f" {_phrase(rng, 1, 5)}"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": f" {_phrase(rng, 1, 7)} {rng.randint(0, 99)}"})
    return rows


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [f"Q: {_phrase(rng, 1, 8)}? {_phrase(rng, 1, 8)} {rng.randint(0, 999)}" for _ in range(500)]
    return str(build_tiny(tmp_path_factory.mktemp("tiny"), texts, hidden_size=32, num_heads=2, intermediate_size=64))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def models(tiny_dir):
    """(policy, reference): the policy is the reference with noise added, so losses differ from log 2."""
    ref = load_model(tiny_dir)
    policy = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return policy.eval(), ref.eval()


def _tokenize(tokenizer, rows: list[dict]) -> list[dict]:
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [tokenizer.eos_token_id]
    return [
        {
            "prompt_input_ids": ids(r["prompt"]),
            "chosen_input_ids": ids(r["chosen"]) + eos,
            "rejected_input_ids": ids(r["rejected"]) + eos,
        }
        for r in rows
    ]


def _trl_loss(tmp_path, policy, ref, tokenizer, rows, *, loss_type, loss_weights=None, precompute=False):
    """TRL's DPOTrainer loss on one batch of `rows`, and its tokenized rows."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        beta=0.1,
        loss_type=loss_type,
        loss_weights=loss_weights,
        per_device_train_batch_size=len(rows),
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=3,
        max_length=None,
        report_to=[],
    )
    # TRL patches the models it is given (fused LM head): hand it copies.
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trl_rows = [trainer.train_dataset[i] for i in range(len(rows))]
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(trl_rows)).item()
    return loss, trl_rows


def _as_ours(trl_rows: list[dict]) -> list[dict]:
    return [
        {
            "prompt_input_ids": r["prompt_ids"],
            "chosen_input_ids": r["chosen_ids"],
            "rejected_input_ids": r["rejected_ids"],
        }
        for r in trl_rows
    ]


@pytest.mark.timeout(60)
def test_mean_loss_matches_trl_sigmoid_with_reference_model_and_precomputed(tmp_path, models, tokenizer):
    policy, ref = models
    rows = _rows(6, seed=1)
    trl_loss, trl_rows = _trl_loss(tmp_path, policy, ref, tokenizer, rows, loss_type=["sigmoid"])
    examples = _as_ours(trl_rows)
    ref_c, ref_r = reference_logps(ref, examples, tokenizer.pad_token_id, batch_size=4)
    with torch.no_grad():
        ours = per_example_loss(policy, collate(examples, tokenizer.pad_token_id), ref_c, ref_r, DPOLossConfig())
    assert abs(trl_loss - math.log(2)) > 1e-3  # the policy really differs from the reference
    assert ours["loss"].mean().item() == pytest.approx(trl_loss, abs=2e-6)

    # Precomputed reference: TRL's stored ref log-probs equal ours.
    trl_pre, pre_rows = _trl_loss(tmp_path, policy, ref, tokenizer, rows, loss_type=["sigmoid"], precompute=True)
    assert trl_pre == pytest.approx(trl_loss, abs=2e-6)
    np.testing.assert_allclose([r["ref_chosen_logps"] for r in pre_rows], ref_c, atol=1e-5)
    np.testing.assert_allclose([r["ref_rejected_logps"] for r in pre_rows], ref_r, atol=1e-5)


@pytest.mark.timeout(60)
def test_ipo_matches_trl(tmp_path, models, tokenizer):
    policy, ref = models
    trl_loss, trl_rows = _trl_loss(tmp_path, policy, ref, tokenizer, _rows(6, seed=8), loss_type=["ipo"])
    examples = _as_ours(trl_rows)
    ref_c, ref_r = reference_logps(ref, examples, tokenizer.pad_token_id, batch_size=8)
    with torch.no_grad():
        out = per_example_loss(
            policy, collate(examples, tokenizer.pad_token_id), ref_c, ref_r, DPOLossConfig(beta=0.1, loss_type="ipo")
        )
    assert out["loss"].mean().item() == pytest.approx(trl_loss, rel=1e-6, abs=1e-5)


@pytest.mark.timeout(60)
def test_sft_weight_matches_trl_sigmoid_plus_sft(tmp_path, models, tokenizer):
    """TRL's `sft` term is a token mean over the batch; ours is per example. With equal chosen
    lengths they coincide; in general ours weighted by chosen length equals TRL's."""
    policy, ref = models
    cfg = DPOLossConfig(sft_weight=0.7)
    for rows, equal in ((_rows(5, seed=2, equal_chosen=True), True), (_rows(5, seed=3), False)):
        trl_loss, trl_rows = _trl_loss(
            tmp_path, policy, ref, tokenizer, rows, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]
        )
        examples = _as_ours(trl_rows)
        ref_c, ref_r = reference_logps(ref, examples, tokenizer.pad_token_id, batch_size=8)
        with torch.no_grad():
            out = per_example_loss(policy, collate(examples, tokenizer.pad_token_id), ref_c, ref_r, cfg)
        n_chosen = torch.tensor([float(len(e["chosen_input_ids"])) for e in examples])
        token_mean_nll = (out["nll"] * n_chosen).sum() / n_chosen.sum()
        assert out["dpo_loss"].mean().item() + 0.7 * token_mean_nll.item() == pytest.approx(trl_loss, abs=2e-6)
        if equal:
            assert out["loss"].mean().item() == pytest.approx(trl_loss, abs=2e-6)


def _float64_reference(model, examples, ref_c, ref_r, cfg):
    """Per-example losses by an independent path: one unpadded sequence at a time, float64."""
    beta, label_smoothing, sft_weight = cfg.beta, cfg.label_smoothing, cfg.sft_weight
    model64 = copy.deepcopy(model).double()
    losses, nlls = [], []
    for ex, rc, rr in zip(examples, ref_c, ref_r):
        logp, n = {}, {}
        for key in ("chosen_input_ids", "rejected_input_ids"):
            prompt, completion = ex["prompt_input_ids"], ex[key]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logprobs = torch.log_softmax(model64(input_ids=ids).logits[0], dim=-1)
            logp[key] = sum(logprobs[len(prompt) + j - 1, tok].item() for j, tok in enumerate(completion))
            n[key] = len(completion)
        dc, dr = logp["chosen_input_ids"] - float(rc), logp["rejected_input_ids"] - float(rr)
        if cfg.loss_type == "sigmoid":
            z = beta * (dc - dr)
            loss = (1 - label_smoothing) * math.log1p(math.exp(-z)) + label_smoothing * math.log1p(math.exp(z))
        else:
            loss = (dc / n["chosen_input_ids"] - dr / n["rejected_input_ids"] - 1 / (2 * beta)) ** 2
        nll = -logp["chosen_input_ids"] / n["chosen_input_ids"]
        losses.append(loss + sft_weight * nll)
        nlls.append(nll)
    return np.array(losses), np.array(nlls)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "cfg",
    [
        DPOLossConfig(beta=0.1),
        DPOLossConfig(beta=0.5, label_smoothing=0.2, sft_weight=0.3),
        DPOLossConfig(beta=0.2, loss_type="ipo", sft_weight=1.0),
    ],
    ids=["sigmoid", "smoothed+sft", "ipo+sft"],
)
def test_per_example_values_equal_float64_recomputation(models, tokenizer, cfg):
    policy, ref = models
    examples = _tokenize(tokenizer, _rows(7, seed=4))
    # Arbitrary reference values: the recomputation must follow them, whatever they are.
    ref_c = np.linspace(-40.0, -10.0, 7).astype(np.float32)
    ref_r = np.linspace(-15.0, -45.0, 7).astype(np.float32)
    with torch.no_grad():
        out = per_example_loss(policy, collate(examples, tokenizer.pad_token_id), ref_c, ref_r, cfg)
    expected, expected_nll = _float64_reference(policy, examples, ref_c, ref_r, cfg)
    np.testing.assert_allclose(out["loss"].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["nll"].numpy(), expected_nll, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(expected, 4))) == len(expected)  # distinct values: no accidental match


@pytest.mark.timeout(30)
def test_policy_equal_to_reference_gives_log2(models, tokenizer):
    _, ref = models
    examples = _tokenize(tokenizer, _rows(9, seed=5))
    ref_c, ref_r = reference_logps(ref, examples, tokenizer.pad_token_id, batch_size=4)
    batch = collate(examples, tokenizer.pad_token_id, padding_side="left")
    with torch.no_grad():
        out = per_example_loss(ref, batch, ref_c, ref_r, DPOLossConfig(beta=0.1))
        ipo = per_example_loss(ref, batch, ref_c, ref_r, DPOLossConfig(beta=0.25, loss_type="ipo"))
    np.testing.assert_allclose(out["loss"].numpy(), math.log(2), atol=1e-4)
    np.testing.assert_allclose(out["chosen_rewards"].numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(ipo["loss"].numpy(), (1 / (2 * 0.25)) ** 2, atol=1e-4)


def _gpt2(tokenizer):
    """A tiny GPT-2: absolute position embeddings, so wrong position ids would show (RoPE hides them)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_side_and_batch_composition_do_not_change_logps(models, tokenizer, arch):
    policy = models[0] if arch == "llama" else _gpt2(tokenizer)
    examples = _tokenize(tokenizer, _rows(8, seed=6))
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        right, n_right, _ = sequence_logps(policy, collate(examples, pad, "right"))
        left, n_left, _ = sequence_logps(policy, collate(examples, pad, "left"))
        # Example 0 alone, and next to a much longer example, in both layouts.
        longer = dict(examples[1], prompt_input_ids=examples[1]["prompt_input_ids"] * 4)
        alone, _, _ = sequence_logps(policy, collate(examples[:1], pad, "left"))
        mixed, _, _ = sequence_logps(policy, collate([longer, examples[0]], pad, "left"))
    np.testing.assert_allclose(left.numpy(), right.numpy(), atol=1e-5)
    assert torch.equal(n_left, n_right)
    b = len(examples)
    np.testing.assert_allclose(alone.numpy(), right[[0, b]].numpy(), atol=1e-5)
    np.testing.assert_allclose(mixed[[1, 3]].numpy(), right[[0, b]].numpy(), atol=1e-5)
    assert n_right[0].item() == len(examples[0]["chosen_input_ids"])


def test_collate_layout():
    examples = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 1], "rejected_input_ids": [8, 9, 1]},
        {"prompt_input_ids": [4], "chosen_input_ids": [1], "rejected_input_ids": [2, 1]},
    ]
    right = collate(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7, 1, 0], [4, 1, 0, 0, 0], [5, 6, 8, 9, 1], [4, 2, 1, 0, 0]]
    assert right["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert right["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    left = collate(examples, pad_token_id=0, padding_side="left")
    assert left["input_ids"][1].tolist() == [0, 0, 0, 4, 1]
    assert left["position_ids"][1].tolist() == [0, 0, 0, 0, 1]
    assert left["completion_mask"][3].tolist() == [0, 0, 0, 1, 1]


def test_dpo_loss_hand_computed_values():
    t = torch.tensor
    # logratios: chosen +2, rejected -1 -> d = 3; beta 0.5 -> z = 1.5
    losses, cr, rr = dpo_loss(t([-8.0]), t([-11.0]), t([-10.0]), t([-10.0]), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert (cr.item(), rr.item()) == pytest.approx((1.0, -0.5))
    # IPO, lengths 4 and 2: (2/4 - (-1)/2 - 1/(2*0.5))^2 = (1 - 1)^2 = 0
    ipo, _, _ = dpo_loss(
        t([-8.0]), t([-11.0]), t([-10.0]), t([-10.0]), beta=0.5, loss_type="ipo",
        chosen_n_tokens=t([4.0]), rejected_n_tokens=t([2.0]),
    )  # fmt: skip
    assert ipo.item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="n_tokens"):
        dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), beta=0.1, loss_type="ipo")


def test_batch_metrics_hand_computed():
    t = torch.tensor
    out = {
        "loss": t([1.0, 3.0]),
        "chosen_rewards": t([0.5, -0.1]),
        "rejected_rewards": t([0.1, 0.3]),
        "chosen_logps": t([-5.0, -9.0]),
        "rejected_logps": t([-6.0, -8.0]),
    }
    m = batch_metrics(out)
    assert m["loss"] == pytest.approx(2.0)
    assert m["rewards/accuracies"] == 0.5 and m["logps/accuracies"] == 0.5
    assert m["rewards/margins"] == pytest.approx(0.0)
    assert m["rewards/chosen"] == pytest.approx(0.2) and m["logps/rejected"] == pytest.approx(-7.0)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"beta": 0.0}, "dpo.beta"),
        ({"loss_type": "hinge"}, "dpo.loss_type"),
        ({"label_smoothing": 0.5}, "dpo.label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "dpo.label_smoothing"),
        ({"sft_weight": -1.0}, "dpo.sft_weight"),
    ],
)
def test_loss_config_rejects_bad_values(kwargs, key):
    with pytest.raises(ConfigError) as err:
        DPOLossConfig(**kwargs)
    assert err.value.where == key


@pytest.mark.timeout(30)
def test_loss_backpropagates_to_the_policy(models, tokenizer):
    policy, ref = models
    model = copy.deepcopy(policy).train()
    examples = _tokenize(tokenizer, _rows(4, seed=7))
    ref_c, ref_r = reference_logps(ref, examples, tokenizer.pad_token_id, batch_size=4)
    batch = collate(examples, tokenizer.pad_token_id)
    out = per_example_loss(model, batch, ref_c, ref_r, DPOLossConfig(sft_weight=0.5))
    out["loss"].mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert not out["chosen_logps"].requires_grad


def _plain_sequence_logps(model, batch, with_means: bool = False):
    """The straightforward computation: float32 log-softmax over every position's full logits
    (and, with `with_means`, each row's mean logit over its completion tokens)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits[:, :-1].float()
    mask = batch["completion_mask"][:, 1:].bool()
    token = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    logps = torch.where(mask, token, torch.zeros_like(token)).sum(dim=1)
    if not with_means:
        return logps
    means = torch.where(mask, logits.detach().mean(dim=-1), torch.zeros_like(token)).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return logps, means


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("kind", ["mask", "int", None])
def test_logps_skip_prompt_logits_and_chunk_the_log_softmax(models, tokenizer, arch, padding_side, chunk, kind, monkeypatch):
    """The model is asked only for the logits a loss is taken on (`logits_to_keep`: a boolean
    mask of the completion-predicting positions where the model slices through transformers'
    `slice_logits_to_keep`, else the last k positions from the first completion token on, else all),
    the float32 log-softmax runs in chunks (chunk=1: one token or row at a time), and values and
    gradients equal the plain full-vocabulary computation."""
    import copy

    import ama_ray.dpo as dpo_module

    if chunk is not None:
        monkeypatch.setattr(dpo_module, "LOGIT_CHUNK_ELEMENTS", chunk)
    policy = copy.deepcopy(models[0] if arch == "llama" else _gpt2(tokenizer)).eval()  # eval: no dropout between the two passes
    assert dpo_module._logits_to_keep_kind(policy) == "mask"  # both architectures slice through slice_logits_to_keep
    monkeypatch.setitem(dpo_module._LOGITS_TO_KEEP, type(policy), kind)  # the other paths, as other models take them
    batch = collate(_tokenize(tokenizer, _rows(6, seed=9)), tokenizer.pad_token_id, padding_side)
    asked = []
    forward = policy.forward
    monkeypatch.setattr(policy, "forward", lambda *a, **kw: asked.append(kw.get("logits_to_keep")) or forward(*a, **kw))
    batch["completion_mask"][1] = 0  # a row with no completion token (truncated away) sums to 0 on every path
    got, n_tokens, got_means = sequence_logps(policy, batch)
    got.sum().backward()
    got_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    want, want_means = _plain_sequence_logps(policy, batch, with_means=True)
    want.sum().backward()
    assert got[1] == 0 and n_tokens[1] == 0 and got_means[1] == 0
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(got_means.numpy(), want_means.numpy(), atol=1e-5)
    for g, w in zip(got_grads, (p.grad for p in policy.parameters())):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    mask = batch["completion_mask"][:, 1:].bool()
    assert torch.equal(n_tokens, mask.sum(dim=1).float())
    first = int(mask.any(dim=0).nonzero()[0])
    assert first > 0
    if kind == "mask":  # exactly the positions that predict a completion token: no prompt, no padding
        assert asked[0].dtype == torch.bool and torch.equal(asked[0][:, :-1], mask) and not asked[0][:, -1].any()
    elif kind == "int":
        assert asked[0] == batch["input_ids"].shape[1] - first
    else:
        assert asked[0] is None


def test_how_a_model_takes_logits_to_keep_is_read_from_the_forward_it_runs(models):
    """A boolean mask only for a forward that slices through transformers' `slice_logits_to_keep`;
    an int for a forward that has the argument but slices itself (remote code); none without it."""
    import ama_ray.dpo as dpo_module

    base = type(models[0])

    class SlicesItself(base):
        def forward(self, input_ids=None, logits_to_keep: int = 0, **kwargs):
            out = super().forward(input_ids=input_ids, **kwargs)
            out.logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
            return out

    class NoArgument(base):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)

    assert dpo_module._logits_to_keep_kind(models[0]) == "mask"
    assert dpo_module._logits_to_keep_kind(SlicesItself(models[0].config)) == "int"
    assert dpo_module._logits_to_keep_kind(NoArgument(models[0].config)) is None


def test_logps_of_rows_without_completion_tokens_are_zero(models, tokenizer):
    """A micro-batch whose rows hold no completion token (e.g. truncated away) gives zeros, not an error."""
    batch = collate(_tokenize(tokenizer, _rows(2, seed=3)), tokenizer.pad_token_id)
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    logps, n_tokens, means = sequence_logps(models[0], batch)
    assert logps.tolist() == [0.0] * 4 and n_tokens.tolist() == [0.0] * 4 and means.tolist() == [0.0] * 4


def _direct_nll(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Per-token NLL of a completion by plain cross-entropy on one unpadded sequence."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    targets = ids[0, 1:]
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return float(losses[len(prompt_ids) - 1 :].mean())


def test_sft_objective_is_the_completion_nll_without_a_reference(models, tokenizer):
    policy, _ = models
    rows = _rows(6, seed=11)
    examples = [{"prompt_input_ids": tokenizer(r["prompt"])["input_ids"],
                 "chosen_input_ids": tokenizer(r["chosen"])["input_ids"] + [tokenizer.eos_token_id]} for r in rows]
    cfg = DPOLossConfig(objective="sft")
    batch = collate(examples, tokenizer.pad_token_id, pairs=False)  # no rejected side needed
    assert batch["input_ids"].shape[0] == len(examples)
    policy.eval()
    with torch.no_grad():
        out = per_example_loss(policy, batch, None, None, cfg)
    assert set(out) == {"loss", "nll", "chosen_logps"}
    want = [_direct_nll(policy, ex["prompt_input_ids"], ex["chosen_input_ids"]) for ex in examples]
    np.testing.assert_allclose(out["loss"].numpy(), want, rtol=1e-5, atol=1e-6)
    assert DPOLossConfig().to_dict() == {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "sft_weight": 0.0}
    assert cfg.to_dict()["objective"] == "sft" and DPOLossConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="dpo.objective"):
        DPOLossConfig(objective="ppo")
    with pytest.raises(ConfigError, match="dpo.sft_weight"):
        DPOLossConfig(objective="sft", sft_weight=0.5)
