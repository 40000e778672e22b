"""Data selection of the feature head's trainer: a warm-started run must see only shards the
head has not seen, and workers write shard numbers out of order."""

import pytest
import torch

from training.train_feature_head import load_feature_records


def _shard(path, first_id, layers=(2, -1), hidden=4, n=5):
    records = [{"ids": torch.arange(first_id, first_id + n), "feature_layers": list(layers),
                "features": torch.randn(n, len(layers), hidden).half(),
                "top_ids": torch.zeros(n, 2, dtype=torch.int32), "top_logits": torch.zeros(n, 2)}]
    torch.save(records, path)


def test_first_shard_selects_by_number_not_rank(tmp_path):
    for number in (0, 1, 2, 3, 5, 7, 10):  # 4, 6, 8, 9 not written yet (another worker's)
        _shard(tmp_path / f"shard_{number:04d}.pt", first_id=100 * number)
    seen = sorted(int(r["ids"][0]) // 100 for r in load_feature_records(tmp_path, (-1,), first_shard=5))
    assert seen == [5, 7, 10]
    assert len(load_feature_records(tmp_path, (-1,), first_shard=5, max_shards=2)) == 2


def test_only_the_asked_feature_layers_are_kept(tmp_path):
    _shard(tmp_path / "shard_0000.pt", first_id=0)
    (record,) = load_feature_records(tmp_path, (-1,))
    assert record["features"].shape == (5, 4)
    (both,) = load_feature_records(tmp_path, (2, -1))
    assert both["features"].shape == (5, 8)


def test_widening_a_head_to_more_layers_keeps_what_it_computes(tiny_models):
    """A head grown from the top layer to (low, top) starts where the saved head was: the added
    layer's features change nothing until training gives them weight."""
    from pipeline.models import load_causal_lm
    from training.train_feature_head import widen_inputs
    from workers.feature_head import build_head, spec_for

    torch.manual_seed(3)
    target = load_causal_lm(str(tiny_models["target"]))
    head = build_head(target, spec_for(target), torch.arange(40)).eval()
    wide = widen_inputs(head, target, (1, -1)).eval()
    h = head.spec.hidden
    feats, tokens = torch.randn(2, 7, 2 * h), torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        before = head.unrolled(feats[..., h:], tokens, levels=2)
        after = wide.unrolled(feats, tokens, levels=2)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after))
        feats[..., :h] += 1.0  # the added layer: no weight yet, at any unroll level
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(wide.unrolled(feats, tokens, levels=2), after))
    with pytest.raises(ValueError, match="include"):
        widen_inputs(head, target, (1, 2))


def _random_head(target, layers):
    from workers.feature_head import build_head, spec_for
    import dataclasses

    head = build_head(target, dataclasses.replace(spec_for(target), layers=layers), torch.arange(40))
    with torch.no_grad():  # fc off its identity start, so that entries depend on both halves
        head.fc.weight.add_(0.3 * torch.randn_like(head.fc.weight))
    return head.eval()


def test_deepening_a_head_keeps_what_it_computes_and_then_trains_the_added_layer(tiny_models):
    """The added layer joins in front with its residual branches at zero: the grown head's
    output equals the saved one's to the bit, and its gradients reach the added layer."""
    from pipeline.models import load_causal_lm
    from training.train_feature_head import deepen

    torch.manual_seed(4)
    target = load_causal_lm(str(tiny_models["target"]))
    head = _random_head(target, 1)
    deep = deepen(head, target, 2)
    assert deep.spec.layers == 2 and len(deep.layers) == 2
    assert torch.equal(deep.layers[1].q_proj.weight, head.layers[0].q_proj.weight)  # the trained layer, now last
    assert torch.equal(deep.layers[0].q_proj.weight, target.model.layers[0].self_attn.q_proj.weight)
    feats, tokens = torch.randn(2, 7, head.spec.hidden), torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(head.unrolled(feats, tokens, 3), deep.unrolled(feats, tokens, 3)))
    deep.requires_grad_(True)
    sum(o.pow(2).sum() for o in deep.unrolled(feats, tokens, 2)).backward()
    assert deep.layers[0].o_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot be cut"):
        deepen(deep, target, 1)


@pytest.mark.parametrize("layers", [1, 2])
def test_training_unroll_is_what_drafting_through_the_cache_computes(tiny_models, layers):
    """Level j of the teacher-forced unroll at entry t must be the feature the device predicts
    at draft step j + 1 (its cache of true entries up to t - j, then its own chain): otherwise
    training would teach a head that drafting does not run."""
    from pipeline.models import load_causal_lm
    from workers.feature_head import HeadCache

    torch.manual_seed(6)
    target = load_causal_lm(str(tiny_models["target"]))
    head = _random_head(target, layers)
    feats, tokens = torch.randn(1, 9, head.spec.hidden), torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        outs = head.unrolled(feats, tokens, 3)
        t, levels = 6, 3
        start = t - (levels - 1)  # the last true entry of a chain whose level-2 entry is t
        cache = HeadCache()
        predicted = head.extend(cache, head.entry(feats[:, : start + 1], tokens[:, 1 : start + 2]), 0)[:, -1:]
        assert torch.allclose(predicted, outs[0][:, start : start + 1], atol=1e-5)
        for j in range(1, levels):
            entry = start + j
            predicted = head.extend(cache, head.entry(predicted, tokens[:, entry + 1 : entry + 2]), entry)
            assert torch.allclose(predicted, outs[j][:, entry : entry + 1], atol=1e-5), j
        assert len(cache.kv) == layers and cache.length == start + levels
        cache.crop(start + 1)
        assert all(k.shape[2] == start + 1 for k, _ in cache.kv)


def test_a_head_saved_before_decoder_stacks_still_loads(tiny_models, tmp_path):
    """Heads saved with one decoder layer named it "layer."; the committed one is such a file."""
    from safetensors.torch import load_file, save_file
    from pipeline.models import load_causal_lm
    from workers.feature_head import load_head, save_head

    target = load_causal_lm(str(tiny_models["target"]))
    head = _random_head(target, 1)
    save_head(head, tmp_path, {}, int8=False)
    tensors = load_file(str(tmp_path / "head.safetensors"))
    save_file({k.replace("layers.0.", "layer."): v for k, v in tensors.items()}, str(tmp_path / "head.safetensors"))
    loaded = load_head(target, tmp_path)
    assert torch.equal(loaded.layers[0].q_proj.weight, head.layers[0].q_proj.weight.half().float())


def test_a_validation_set_from_shards_takes_the_heads_layers_and_cuts_like_the_held_out_set(tmp_path):
    """`sled eval drafters --validation DIR` (training/feature_eval.py shard_heldout): records with
    at least 8 continuation tokens, every ``every``-th, cut to ``new_tokens`` continuation tokens,
    with the features of the layers the head was trained on, in its order."""
    from training.feature_eval import shard_heldout

    records = []
    for i, (length, prompt_len) in enumerate([(30, 10), (12, 10), (40, 5), (20, 4)]):
        feats = torch.arange(length * 3 * 2, dtype=torch.float16).reshape(length, 3, 2) + 1000 * i
        records.append({"ids": torch.arange(length) + i, "prompt_len": prompt_len, "feature_layers": [2, 15, -1],
                        "features": feats})
    torch.save(records[:2], tmp_path / "shard_0000.pt")
    torch.save(records[2:], tmp_path / "shard_0001.pt")
    got = shard_heldout(tmp_path, (-1,), new_tokens=16, every=1)
    assert [(len(ids), n) for ids, n, _ in got] == [(26, 10), (21, 5), (20, 4)]  # the 2-token one dropped
    assert torch.equal(got[1][2], records[2]["features"][:21, 2, :])
    fused = shard_heldout(tmp_path, (15, -1), new_tokens=16, every=2)
    assert len(fused) == 2 and fused[1][2].shape == (20, 4)
    assert torch.equal(fused[1][2], records[3]["features"][:20, [1, 2], :].reshape(20, 4))
    with pytest.raises(ValueError, match="not \\[7\\]"):
        shard_heldout(tmp_path, (7,))
