"""Merging the specialists (`ama_ray.merging`) against hand computations: TIES on a few numbers,
averaging and task arithmetic on state dicts, and LoRA merges against the adapters' own factors."""

from __future__ import annotations

import math

import pytest
import torch

from ama_ray import merging

pytestmark = pytest.mark.timeout(60)


def _ties(base, tuned, lam, density):
    return merging.merge_state({"w": base}, [{"w": t} for t in tuned], "ties", lam, density)["w"]


def test_ties_matches_a_hand_computation():
    base = torch.ones(4)
    tau1, tau2 = torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-4.0, 2.0, 0.1, -1.0])
    # density 0.5 keeps two entries of each: [3, 0, 0, -2] and [-4, 2, 0, 0]. The elected sign is
    # that of the sum [-1, 2, 0, -2] (0 counts as +): [-, +, +, -]. Entries agreeing with it:
    # -4 | 2 | none (zeros have sign 0) | -2; each averaged over the agreeing ones, times λ = 0.5.
    merged = _ties(base, [base + tau1, base + tau2], 0.5, density=0.5)
    assert torch.allclose(merged, base + torch.tensor([-2.0, 1.0, 0.0, -1.0]))
    # density 1 trims nothing: the sum [-1, 1, 0.6, -3] elects [-, +, +, -]; entries 0 and 1 keep
    # one value each (-4 and 2), entries 2 and 3 average both (0.3 and -1.5).
    merged = _ties(base, [base + tau1, base + tau2], 1.0, density=1.0)
    assert torch.allclose(merged, base + torch.tensor([-4.0, 2.0, 0.3, -1.5]))


def test_average_and_task_arithmetic_on_state_dicts():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=gen), "ids": torch.arange(5)}
    tuned = [{"w": base["w"] + torch.randn(3, 4, generator=gen), "ids": torch.arange(5) + 1} for _ in range(3)]
    average = merging.merge_state(base, tuned, "average", None, 0.5)
    assert torch.allclose(average["w"], torch.stack([t["w"] for t in tuned]).mean(0), atol=1e-6)
    assert torch.equal(average["ids"], base["ids"])  # buffers that are not weights stay the base's
    arithmetic = merging.merge_state(base, tuned, "task_arithmetic", 0.3, 0.5)
    assert torch.allclose(arithmetic["w"], base["w"] + 0.3 * sum(t["w"] - base["w"] for t in tuned), atol=1e-6)
    half = {"w": base["w"].half(), "ids": base["ids"]}
    assert merging.merge_state(half, [{**t, "w": t["w"].half()} for t in tuned], "average", None, 0.5)["w"].dtype == torch.float16
    # Every method is linear in λ: one delta per method serves the whole grid.
    delta = merging.delta_state(base, tuned, "ties", 0.5)
    for lam in (0.25, 2.0):
        assert torch.allclose(merging.apply_delta(base, delta, lam)["w"], merging.merge_state(base, tuned, "ties", lam, 0.5)["w"])
        assert torch.allclose(merging.apply_delta(base, delta, lam)["w"] - base["w"], lam * delta["w"], atol=1e-6)
    with pytest.raises(ValueError, match="lacks 1 of the base's tensors"):
        merging.merge_state(base, [{"w": base["w"]}], "average", None, 0.5)


def test_candidates_and_selection():
    assert merging.candidates("average", [0.5, 1.0]) == [None]
    assert merging.candidates("ties", [0.5, 1.0]) == [0.5, 1.0]
    with pytest.raises(ValueError, match="unknown merging method"):
        merging.candidates("slerp", [1.0])
    scores = {0.25: {merging.SELECT: 0.4}, 0.5: {merging.SELECT: math.nan}, 1.0: {merging.SELECT: 0.2}, 2.0: {merging.SELECT: 0.2}}
    assert merging.best_candidate(scores) == 1.0  # the lowest; NaN skipped; a tie keeps the first
    with pytest.raises(ValueError, match="no merging candidate"):
        merging.best_candidate({0.5: {merging.SELECT: None}})


def _lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(config)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: real updates
    model = get_peft_model(base, LoraConfig(**lora), adapter_name="first")
    model.add_adapter("second", LoraConfig(**lora))
    return model


def _updates(model, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B A of every LoRA layer, from the adapter's own factors."""
    from peft.tuners.lora import LoraLayer

    return {name: module.scaling[adapter] * module.lora_B[adapter].weight @ module.lora_A[adapter].weight
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("method,lam", [("average", None), ("task_arithmetic", 0.7)])
def test_lora_merges_equal_the_weighted_sum_of_the_adapters_updates(method, lam):
    from peft.tuners.lora import LoraLayer

    model = _lora_model()
    deltas = [_updates(model, "first"), _updates(model, "second")]
    bases = {name: m.base_layer.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    names = merging.add_lora_candidates(model, ["first", "second"], method, [lam or 1.0], density=0.5)
    assert list(names.values()) == [lam]
    merged = model.merge_and_unload(adapter_names=list(names))
    w = 0.5 if method == "average" else lam
    for name, weight in bases.items():
        layer = merged.get_submodule(name.removeprefix("base_model.model."))
        assert torch.allclose(layer.weight, weight + w * (deltas[0][name] + deltas[1][name]), atol=1e-5), name


def test_lora_ties_merges_through_peft():
    model = _lora_model()
    names = merging.add_lora_candidates(model, ["first", "second"], "ties", [0.5, 1.0], density=0.5)
    assert list(names.values()) == [0.5, 1.0]
    ids = torch.tensor([[1, 2, 3, 4]])
    outs = []
    for name in names:
        model.set_adapter(name)
        outs.append(model(input_ids=ids).logits)
    assert torch.isfinite(outs[0]).all() and not torch.allclose(outs[0], outs[1])  # λ changes the model
