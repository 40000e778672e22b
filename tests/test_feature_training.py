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
