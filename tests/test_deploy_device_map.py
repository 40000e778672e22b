"""A target larger than one device: its layers placed by accelerate's device_map. There is no
second GPU here, so the placements are CPU and disk (accelerate's hooks move each offloaded
layer's weights in for its forward, the code path of a model spread over several GPUs), and
SLED's batched verification through the dispatched model must equal the target alone."""

import random

from transformers import AutoModelForCausalLM

from pipeline.config import LimitsConfig, load_config
from pipeline.models import load_causal_lm
from pipeline.protocol import Propose
from pipeline.reference import greedy_reference
from tests.conftest import TINY_VOCAB
from workers.target import TargetVerifier


def sled_greedy(model, prompts: list[list[int]], new_tokens: int, refs: list[list[int]], seed: int = 0) -> list[list[int]]:
    """Every session in one batch per round; drafts are noisy copies of the right answer, so
    rounds accept some tokens and reject others."""
    rng = random.Random(seed)
    verifier = TargetVerifier(model, max_sessions=16, limits=LimitsConfig())
    hist = [list(p) for p in prompts]
    for round_ in range(new_tokens):
        items, owners = [], []
        for i, (h, p) in enumerate(zip(hist, prompts)):
            done = len(h) - len(p)
            if done >= new_tokens:
                continue
            draft = [t if rng.random() > 0.3 else rng.randrange(TINY_VOCAB) for t in refs[i][done : done + rng.randint(0, 4)]]
            items.append(Propose(f"s{i}", round_, len(h), draft, history=list(h) if round_ == 0 else None))
            owners.append(i)
        if not items:
            break
        for i, item, verdict in zip(owners, items, verifier.verify_batch(items)):
            assert not verdict.error, verdict
            hist[i] += item.draft[: verdict.accepted] + [verdict.token]
    return [h[len(p) : len(p) + new_tokens] for h, p in zip(hist, prompts)]


def _prompts(n=4):
    rng = random.Random(5)
    return [[rng.randrange(TINY_VOCAB) for _ in range(rng.randint(2, 12))] for _ in range(n)]


def test_layers_split_over_placements_verify_like_the_target_alone(tiny_models, tmp_path):
    plain = load_causal_lm(str(tiny_models["target"]))
    device_map = {  # the shape of a two-GPU map, {"model.layers.0": 0, "model.layers.1": 1, ...}
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
        "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu",
    }
    spread = AutoModelForCausalLM.from_pretrained(str(tiny_models["target"]), device_map=device_map,
                                                  offload_folder=str(tmp_path / "offload")).eval()
    assert spread.hf_device_map == device_map
    assert hasattr(spread.model.layers[1], "_hf_hook")  # dispatched by accelerate, not one device
    prompts = _prompts()
    refs = [greedy_reference(plain, p, 24) for p in prompts]
    assert sled_greedy(spread, prompts, 24, refs) == refs


def test_device_map_auto_from_the_configuration(tiny_models):
    """The verifier's own loading call with `verifier.device_map = "auto"` and `max_memory`."""
    config = load_config(None, [f'verifier.target="{tiny_models["target"]}"', 'verifier.device_map="auto"',
                                'verifier.max_memory={"cpu"="1GiB"}'], environ={})
    v = config.verifier
    model = load_causal_lm(v.target, dtype=v.dtype, device=v.device, device_map=v.device_map, max_memory=v.max_memory)
    plain = load_causal_lm(str(tiny_models["target"]))
    prompts = _prompts(3)
    refs = [greedy_reference(plain, p, 16) for p in prompts]
    assert sled_greedy(model, prompts, 16, refs, seed=1) == refs
