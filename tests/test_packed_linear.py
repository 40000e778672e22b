"""oneDNN-reordered linear weights (workers/packed_linear.py): the same map as nn.Linear, one copy of
every weight, and greedy decoding through the packed static verifier equal to the target alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.protocol import Propose
from tests.conftest import tiny_gpt2, tiny_llama
from workers.packed_linear import PackedLinear, available, prepack_linears
from workers.static_verifier import StaticVerifier, make_verifier

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 3, 48), (1, 7, 48)])
def test_a_packed_linear_computes_the_same_map(bias, shape):
    torch.manual_seed(0)
    dense = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        want = dense(x)
        got = PackedLinear.from_linear(dense)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prepacking_replaces_every_linear_once_and_keeps_tied_weights():
    model = tiny_llama(1)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as the default target's head is
    ids = torch.tensor([[5, 9, 33, 2, 71, 8]])
    with torch.no_grad():
        want = model(ids).logits
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model) == linears
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model) == 0  # idempotent
    # the tied head keeps its dense weight (the embedding needs it); the projections hold only the packed one
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "weight")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_the_factory_prepacks_on_the_cpu_unless_told_not_to():
    packed = tiny_llama(1)
    make_verifier(packed, load_config(None, []))
    assert isinstance(packed.model.layers[0].mlp.up_proj, PackedLinear)
    dense = tiny_llama(1)
    make_verifier(dense, load_config(None, ["verifier.prepack=false"]))
    assert type(dense.model.layers[0].mlp.up_proj) is nn.Linear
    gpt2 = tiny_gpt2(1)  # transformers' Conv1D projections stay; its head is a Linear
    make_verifier(gpt2, load_config(None, []))
    assert isinstance(gpt2.lm_head, PackedLinear)


@torch.no_grad()
def test_greedy_through_a_prepacked_static_verifier_equals_the_target_alone():
    """Rounds of random drafts (some right, most wrong) through the packed verifier commit exactly
    the tokens that the unpacked target's own greedy decoding produces."""
    reference = tiny_llama(1, layers=3)
    prompt = [3, 17, 42, 8, 99, 5, 61]
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)[0, len(prompt):].tolist()
    served = tiny_llama(1, layers=3)
    assert prepack_linears(served) > 0
    verifier = StaticVerifier(served, max_sessions=4, limits=load_config(None, []).limits, kv_cache_mb=8.0)
    rng = torch.Generator().manual_seed(0)
    out: list[int] = []
    step = 0
    while len(out) < len(want):
        # draft a few tokens: the true continuation with one token replaced at a random place
        k = int(torch.randint(0, 5, (1,), generator=rng))
        draft = list(want[len(out):len(out) + k])
        if draft and torch.rand(1, generator=rng).item() < 0.6:
            draft[int(torch.randint(0, len(draft), (1,), generator=rng))] = int(torch.randint(1, 256, (1,), generator=rng))
        item = Propose("s", step, len(prompt) + len(out), draft, history=list(prompt) if step == 0 else None)
        (verdict,) = verifier.verify_batch([item])
        assert not verdict.error, verdict.detail
        out += [*draft[: verdict.accepted], verdict.token]
        step += 1
    assert out[: len(want)] == want
    assert step < len(want)  # some drafts were accepted


def test_without_the_onednn_ops_the_model_keeps_its_linears(monkeypatch):
    import workers.packed_linear as packed_linear

    monkeypatch.setattr(packed_linear, "available", lambda: False)
    model = tiny_llama(1)
    assert packed_linear.prepack_linears(model) == 0
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp.down_proj) is nn.Linear


def test_eval_drafters_times_a_rung_packed_and_measures_its_alpha_and_size_as_loaded(monkeypatch):
    """`sled eval drafters` drafts as the device does (packed weights) but measures α on the rung
    as loaded, and counts its parameters before packing drops the dense copies."""
    from training import eval_drafters
    from training.heldout_alpha import acceptance

    torch.manual_seed(3)
    reference = tiny_llama(2)
    rung = tiny_llama(2)
    rung.load_state_dict(reference.state_dict())
    monkeypatch.setattr(eval_drafters, "load_rung", lambda *a, **k: rung)
    sequences = []
    with torch.no_grad():  # a prompt, the reference's own greedy tokens, then noise: 0 < α < 1
        for _ in range(3):
            ids = reference.generate(torch.randint(0, 100, (1, 8)), max_new_tokens=8, do_sample=False)[0].tolist()
            sequences.append((ids + torch.randint(0, 100, (8,)).tolist(), 8))
        want = acceptance(lambda ids: reference(input_ids=ids).logits, sequences, 4)
    assert 0 < want["alpha"] < 1
    report = eval_drafters._model_rung(None, "tiny", "pi5", sequences, [s[0][:8] for s in sequences], 4, None, 0)
    assert report["alpha"] == round(want["alpha"], 4)
    assert report["params"] == sum(p.numel() for p in reference.parameters())
    assert report["draft_weights_packed"] and not any(type(m) is nn.Linear for m in rung.modules())
    assert report["draft_tokens_per_s"] > 0
