"""Data selection of the feature head's trainer: a warm-started run must see only shards the
head has not seen, and workers write shard numbers out of order."""

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
