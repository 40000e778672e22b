"""The drafter ladder: export round trip on a tiny target, the loss, α bookkeeping, committed files."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from pipeline.packed_weights import pack, unpack
from training.heldout_alpha import acceptance, accepted_lengths
from training.distill_loss import candidate_distill_loss
from training.drafter_net import LadderSpec, build_drafter_net
from training.ladder import LADDER_DIR, RUNGS, load_rung
from training.train_drafters import grown_spec, ladder_spec, load_ladder_weights, save_ladder

SPEC = LadderSpec(rungs=("small", "medium", "big"), stem_layers=2, partition_layers=(1, 1, 2))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_target():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def draft_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy drafting one token at a time through the KV cache, as the drafter worker does."""
    cache, ids, out = DynamicCache(), torch.tensor([prompt]), []
    for _ in range(n):
        step = model(input_ids=ids, cache=cache, use_cache=True)
        cache = step.past_key_values
        ids = step.logits[:, -1:].argmax(-1)
        out.append(int(ids))
    return out


def test_exported_rungs_match_the_training_graph(tiny_target, tmp_path):
    net, embed = build_drafter_net(tiny_target, SPEC, init_from_target=False, seed=1)
    with torch.no_grad():  # the export is int8 rows / fp16: round the trained weights so both sides agree
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(unpack(pack({"w": p}))["w"])
    save_ladder(net, SPEC, tmp_path, {"target": "tiny"})
    ids = torch.randint(0, 100, (1, 12))
    for k, name in enumerate(SPEC.rungs):
        model = load_rung(name, target=tiny_target, folder=tmp_path)
        assert model.config.num_hidden_layers == SPEC.depth(k)
        expected = net.eval().rung_outputs(ids, [k])[k] @ embed.T
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        # drafting through the cache agrees with a full forward over the drafted sequence
        drafted = draft_greedy(model, ids[0].tolist(), 5)
        full = model(input_ids=torch.tensor([ids[0].tolist() + drafted])).logits[0].argmax(-1)
        assert drafted == full[ids.shape[1] - 1 : -1].tolist()


def test_a_saved_ladder_warm_starts_the_training_graph(tiny_target, tmp_path):
    """`--init-from` a ladder folder: a fresh training graph given the saved weights computes
    what the saved ladder computes (a random init differs, so the load is what makes it agree)."""
    net, embed = build_drafter_net(tiny_target, SPEC, init_from_target=False, seed=1)
    save_ladder(net, SPEC, tmp_path, {"target": "tiny"})
    spec = ladder_spec(tmp_path)
    assert spec == SPEC
    fresh, _ = build_drafter_net(tiny_target, spec, init_from_target=False, seed=2)
    ids = torch.randint(0, 100, (1, 12))
    before = fresh.eval().rung_outputs(ids, [2])[2]
    load_ladder_weights(fresh, spec, tmp_path)
    for k, name in enumerate(SPEC.rungs):
        saved = load_rung(name, target=tiny_target, folder=tmp_path)(input_ids=ids).logits
        torch.testing.assert_close(fresh.rung_outputs(ids, [k])[k] @ embed.T, saved, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before, fresh.rung_outputs(ids, [2])[2], atol=1e-3)


def test_export_stores_only_what_training_changed(tiny_target, tmp_path):
    net, _ = build_drafter_net(tiny_target, SPEC, seed=1)
    save_ladder(net, SPEC, tmp_path, {"target": "tiny"})
    with safe_open(str(tmp_path / "ladder.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == (torch.int8 if k.endswith(".q") else torch.float16) for k in keys)
        assert any(k.endswith(".q") for k in keys)  # matrices are stored int8
    layers = {int(k.split(".")[1]) for k in keys if k.startswith("layers.")}
    assert layers == set(range(SPEC.stem_layers, SPEC.stem_layers + SPEC.trained_layers()))  # no stem, each once
    assert sum(k.startswith("norms.") for k in keys) == len(SPEC.rungs)
    assert not any("embed" in k or "lm_head" in k for k in keys)


def test_a_warm_started_ladder_extends_the_lineage_of_the_one_it_started_from(tiny_target, tmp_path):
    """ladder.json's `export` line grows by a clause per training run, and `weights` names the layout."""
    import json

    net, _ = build_drafter_net(tiny_target, SPEC, seed=1)
    first, second = tmp_path / "first", tmp_path / "second"
    save_ladder(net, SPEC, first, {"target": "tiny", "spec": {"partition_layers": [1, 1, 2]}, "steps": 10,
                                   "lr": 1e-3, "data": "d1", "init_from": None})
    save_ladder(net, SPEC, second, {"target": "tiny", "steps": 5, "lr": 2e-4, "data": "d2",
                                    "init_from": str(first)}, weights="fp16")
    one, two = (json.loads((d / "ladder.json").read_text()) for d in (first, second))
    assert one["export"] == "trained from the target with partitions [1, 1, 2], 10 steps at lr 0.001 on d1"
    assert two["export"] == one["export"] + "; then a warm-started round, 5 steps at lr 0.0002 on d2"
    assert (one["weights"], two["weights"]) == ("int8", "fp16")


def test_int4_delta_stores_differences_from_the_base_in_half_the_bytes_of_int8():
    torch.manual_seed(0)
    base = {"w": torch.randn(48, 192), "v": torch.randn(8, 64)}
    state = {"w": base["w"] + 0.1 * torch.randn(48, 192), "v": torch.randn(8, 32), "n": torch.randn(192)}
    packed = pack(state, mode="int4-delta", base=base)
    assert set(packed) == {"w.d4", "w.d4scale", "v.q", "v.scale", "n"}  # v's base has another shape: int8
    assert packed["w.d4"].dtype == torch.uint8 and packed["w.d4"].shape == (48, 96)
    back = unpack(packed, base=base)
    step = (state["w"] - base["w"]).abs().reshape(48, 3, 64).amax(2, keepdim=True) / 7
    assert ((back["w"] - state["w"]).abs().reshape(48, 3, 64) <= step / 2 + 1e-3).all()  # half a step per group
    nbytes = lambda t: sum(x.numel() * x.element_size() for x in t.values())  # noqa: E731
    assert nbytes({k: v for k, v in packed.items() if k.startswith("w.")}) < 0.6 * nbytes(pack({"w": state["w"]}))
    with pytest.raises(KeyError, match="difference from the target"):
        unpack(packed)


def test_a_ladder_stored_as_differences_loads_against_its_target(tiny_target, tmp_path):
    net, embed = build_drafter_net(tiny_target, SPEC, seed=1)
    base = tiny_target.model.state_dict()
    with torch.no_grad():  # fine-tuning moves the layers a little away from the target's copies;
        depth = SPEC.stem_layers  # then round them as the export does, so both sides agree
        for k, part in enumerate(net.partitions):
            for layer in list(part.layers)[SPEC.stem_layers:] if k == 0 else part.layers:
                for key, p in layer.named_parameters():
                    name = f"layers.{depth}.{key}"
                    p.add_(0.01 * torch.randn_like(p))
                    p.copy_(unpack(pack({name: p}, mode="int4-delta", base=base), base=base)[name])
                depth += 1
    save_ladder(net, SPEC, tmp_path, {"target": "tiny"}, weights="int4-delta", base=base)
    with safe_open(str(tmp_path / "ladder.safetensors"), "pt") as f:
        assert any(k.endswith(".d4") for k in f.keys()) and not any(k.endswith(".q") for k in f.keys())
    ids = torch.randint(0, 100, (1, 12))
    for k, name in enumerate(SPEC.rungs):
        expected = net.eval().rung_outputs(ids, [k])[k] @ embed.T
        torch.testing.assert_close(load_rung(name, target=tiny_target, folder=tmp_path)(input_ids=ids).logits,
                                   expected, atol=1e-4, rtol=1e-4)


def test_a_grown_ladder_keeps_its_saved_rungs_and_starts_the_new_one_from_the_target(tiny_target, tmp_path):
    """`--grow`: the saved rungs come back as saved; the new partition starts as the target's
    layers at its depth, with its rung named for the next device class."""
    saved = LadderSpec(rungs=("pi5", "orin"), stem_layers=2, partition_layers=(1, 1))
    net, embed = build_drafter_net(tiny_target, saved, init_from_target=False, seed=1)
    save_ladder(net, saved, tmp_path, {"target": "tiny"}, weights="fp16")
    spec = grown_spec(ladder_spec(tmp_path), (2,))
    assert spec.rungs == ("pi5", "orin", "large") and spec.partition_layers == (1, 1, 2)
    grown, _ = build_drafter_net(tiny_target, spec, seed=2)
    load_ladder_weights(grown, saved, tmp_path, tiny_target)
    ids = torch.randint(0, 100, (1, 12))
    for k, name in enumerate(saved.rungs):
        torch.testing.assert_close(grown.eval().rung_outputs(ids, [k])[k] @ embed.T,
                                   load_rung(name, target=tiny_target, folder=tmp_path)(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    for layer, depth in zip(grown.partitions[2].layers, (4, 5)):
        for key, value in layer.state_dict().items():
            assert torch.equal(value, tiny_target.model.layers[depth].state_dict()[key])
    with pytest.raises(ValueError, match="at most 4 rungs"):
        grown_spec(spec, (1, 1))


def test_unknown_rung_is_refused(tiny_target, tmp_path):
    net, _ = build_drafter_net(tiny_target, SPEC)
    save_ladder(net, SPEC, tmp_path, {"target": "tiny"})
    with pytest.raises(ValueError, match="unknown rung"):
        load_rung("tpu-pod", target=tiny_target, folder=tmp_path)


def test_candidate_loss_equals_full_softmax_when_candidates_cover_the_vocabulary():
    torch.manual_seed(0)
    vocab, dim = 30, 8
    embed = torch.randn(vocab, dim)
    hidden = torch.randn(2, 5, dim)
    full_logits = torch.randn(2, 5, vocab)
    top_logits, top_ids = full_logits.topk(4, dim=-1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding is ignored
    batch = {"mask": mask, "top_ids": top_ids, "top_logits": top_logits}
    loss = candidate_distill_loss(hidden, batch, embed, top_k=4, random_negatives=5000)
    log_probs = (hidden[mask] @ embed.T).log_softmax(-1)
    picked = log_probs.gather(1, top_ids[mask])
    expected = 0.5 * -(top_logits[mask].softmax(-1) * picked).sum(-1).mean() + 0.5 * -picked[:, 0].mean()
    torch.testing.assert_close(loss, expected)


def test_accepted_lengths_walk_rounds_of_gamma():
    assert accepted_lengths([True] * 11, 4) == [4, 4, 1]  # 4 accepted + 1 target token per round
    assert accepted_lengths([False, True, True, False, True], 4) == [0, 2, 1]
    assert accepted_lengths([], 4) == []


def test_acceptance_counts_only_continuation_positions():
    sequences = [([5, 6, 7, 8, 9], 2)]  # continuation 7 8 9, predicted from positions 1 2 3

    def logits(ids):  # right about 7 and 9, wrong about 8; the prompt position's guess does not count
        return torch.nn.functional.one_hot(torch.tensor([[0, 7, 0, 9, 0]]), 10).float()

    stats = acceptance(logits, sequences, gamma=4)
    assert stats["alpha"] == pytest.approx(2 / 3) and stats["positions"] == 3


def test_acceptance_by_prompt_kind_adds_up_to_the_whole():
    sequences = [([5, 6, 7, 8, 9], 2), ([5, 6, 7, 8, 9], 2), ([1, 2, 3], 1)]

    def logits(ids):  # the argmax is always the next token: every draft agrees
        return torch.nn.functional.one_hot(torch.roll(ids, -1), 10).float()

    stats = acceptance(logits, sequences, gamma=4, kinds=["question", "prose", "question"])
    by_kind = stats["by_kind"]
    assert by_kind["question"]["positions"] == 5 and by_kind["prose"]["positions"] == 3
    assert by_kind["question"]["alpha"] == by_kind["prose"]["alpha"] == stats["alpha"] == 1.0
    # one round each: 3 and 2 drafts accepted (the continuation ends), then the target's token
    assert by_kind["question"]["tokens_per_round"] == pytest.approx(1 + (3 + 2) / 2)


def test_prompt_kinds_tell_questions_continuations_and_prose_apart():
    from pipeline.models import load_tokenizer
    from training.distill_prompts import build_prompts, prompt_kinds

    tokenizer = load_tokenizer("smollm2")
    prompts = build_prompts(tokenizer, held_out=False, n_chat=6, n_prose=6, seed=3)
    kinds = prompt_kinds(tokenizer, [tokenizer(p).input_ids for p in prompts])
    assert kinds[:6] == ["question"] * 6  # chat questions first, then prose alternating raw / continue
    assert kinds[6:] == ["prose", "continue"] * 3


def test_committed_ladder_loads_and_every_rung_drafts():
    """The committed weights (drafters/ladder) against the real default target."""
    from pipeline.models import load_causal_lm

    target = load_causal_lm("smollm2")
    total = sum(p.stat().st_size for p in Path(LADDER_DIR).iterdir())
    assert total <= 64 * 2**20
    prompt = [1, 9690, 198, 2683, 314, 253, 5356, 30]
    depths = []
    for name in RUNGS:
        model = load_rung(name, target=target)
        assert model.config.vocab_size == target.config.vocab_size
        assert torch.equal(model.get_output_embeddings().weight, target.get_input_embeddings().weight)
        drafted = draft_greedy(model, prompt, 4)
        assert all(0 <= t < target.config.vocab_size for t in drafted)
        depths.append(model.config.num_hidden_layers)
    assert depths == sorted(depths) and depths[-1] < target.config.num_hidden_layers


def test_heldout_prompts_are_disjoint_from_training_prompts():
    from pipeline.models import load_tokenizer
    from training.heldout_alpha import heldout_prompts
    from training.distill_prompts import TEMPLATE_SETS, TRAIN_TOPIC_SETS, build_prompts

    tokenizer = load_tokenizer("smollm2")
    heldout = heldout_prompts(tokenizer)
    # every topic set the distillation data has used, and every set of question forms
    train = [p for topic_set in TRAIN_TOPIC_SETS
             for p in build_prompts(tokenizer, held_out=False, n_chat=1120, n_prose=1500, topic_set=topic_set)]
    train += [p for template_set in TEMPLATE_SETS
              for p in build_prompts(tokenizer, held_out=False, n_chat=4000, n_prose=0,
                                     topic_set=tuple(TRAIN_TOPIC_SETS), template_set=template_set)]
    assert len(heldout) == 48 and not set(heldout) & set(train)
    # no held-out passage shares a 60-character span with a training prompt
    train_text = "\n".join(train)
    spans = [p[i : i + 60] for p in heldout for i in range(0, max(1, len(p) - 60), 60)]
    shared = [s for s in spans if "<|im_start|>" not in s and "You are a helpful" not in s and s in train_text]
    assert not shared


def test_training_topic_lists_share_no_topic():
    """Each further data set asks about new topics (and none of the held-out ones)."""
    from training.distill_prompts import HELDOUT_TOPICS, TRAIN_TOPIC_SETS

    lists = [*TRAIN_TOPIC_SETS.values(), HELDOUT_TOPICS]
    seen: set[str] = set()
    for topics in lists:
        lowered = {t.lower() for t in topics}
        assert len(lowered) == len(topics) and not lowered & seen, lowered & seen
        seen |= lowered


def test_question_forms_share_no_template():
    """Each set of question forms is new, and none is a held-out one."""
    from training.distill_prompts import HELDOUT_TEMPLATES, TEMPLATE_SETS

    seen = {t.lower() for t in HELDOUT_TEMPLATES}
    for templates in TEMPLATE_SETS.values():
        lowered = {t.lower() for t in templates}
        assert len(lowered) == len(templates) and not lowered & seen, lowered & seen
        assert all(t.count("{t}") == 1 for t in templates)
        seen |= lowered


def fake_record(n: int, k: int = 4) -> dict:
    return {"ids": torch.arange(n, dtype=torch.int32), "prompt_len": 1,
            "top_ids": torch.zeros(n, k, dtype=torch.int32), "top_logits": torch.zeros(n, k, dtype=torch.float16)}


def test_distill_batches_respect_the_token_budget_and_reload_new_shards():
    from training.distill_dataset import endless_batches

    pool = [fake_record(n) for n in (5, 6, 7, 30)]
    it = endless_batches(lambda: list(pool), tokens_per_batch=21, top_k=4, seed=0)
    first_epoch = [next(it)[1] for _ in range(2)]
    assert sorted(int(b["mask"].sum()) for b in first_epoch) == [18, 30]  # 5+6+7 together, 30 alone
    assert all(b["ids"].numel() <= 30 for b in first_epoch)  # padded size within budget (or one sequence)
    pool.append(fake_record(3))  # a shard written while training runs joins at the next epoch
    second_epoch = [next(it)[1] for _ in range(3)]  # [3 5 6], [7], [30]
    assert sum(int(b["mask"].sum()) for b in second_epoch) == 5 + 6 + 7 + 3 + 30


def test_continuation_only_masks_prompt_positions():
    from training.distill_dataset import collate

    record = fake_record(6)
    record["prompt_len"] = 4
    assert collate([record], 4)["mask"][0].tolist() == [True] * 6
    # position 3 (the prompt's last token) predicts the first generated token, so it stays
    assert collate([record], 4, continuation_only=True)["mask"][0].tolist() == [False] * 3 + [True] * 3


def test_full_vocabulary_term_penalises_tokens_outside_the_candidates():
    torch.manual_seed(0)
    embed = torch.randn(40, 8)
    hidden = torch.randn(1, 6, 8)
    top_logits, top_ids = torch.randn(1, 6, 40).topk(2, dim=-1)
    batch = {"mask": torch.ones(1, 6, dtype=torch.bool), "top_ids": top_ids, "top_logits": top_logits}
    base = candidate_distill_loss(hidden, batch, embed, top_k=2, random_negatives=0)
    # push up a token that is never a candidate: only the full-vocabulary term can notice
    outsider = next(t for t in range(40) if t not in top_ids)
    boosted = embed.clone()
    boosted[outsider] = hidden[0].mean(0) * 50
    assert candidate_distill_loss(hidden, batch, boosted, top_k=2, random_negatives=0) == pytest.approx(float(base))
    with_full = candidate_distill_loss(hidden, batch, boosted, top_k=2, random_negatives=0, full_vocab_positions=6)
    assert with_full > base + 1.0
