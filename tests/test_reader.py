"""Tests of dedn.data.reader: rank partition, seeded shuffling, class-balanced batches, workers, forbid_splits."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dedn.data import FeatureDataset
from dedn.errors import ConfigError, DatasetError
from dedn.data.loader import ShardIterableDataset
from dedn.data.reader import Batch, ShardReader, forbid_splits, partition_rows
from dedn.data.resident import decode_split
from test_dataset import FEATURE_SHAPE, ROWS, write_dataset  # the shared tiny-dataset builder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[FeatureDataset, dict]:
    root = tmp_path_factory.mktemp("reader") / "ds"
    # shard_bytes=1000: 6-row row groups, 24-row shards: trainval (61 rows) = 3 shards, 11 row groups.
    written = write_dataset(root, rows={**ROWS, "trainval": 61}, shard_bytes=1000)
    return FeatureDataset.open(root), written


def _ids(batches: list[Batch]) -> np.ndarray:
    return np.concatenate([b.sample_ids.numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def test_partition_rows_golden():
    unit_rows, order = np.array([3, 5, 2]), np.array([2, 0, 1])
    # Laid out: unit 2 -> rows [0, 2), unit 0 -> [2, 5), unit 1 -> [5, 10).
    assert partition_rows(unit_rows, order, 0, 3, False) == [(2, 0, 2), (0, 0, 1)]  # rows [0, 3)
    assert partition_rows(unit_rows, order, 1, 3, False) == [(0, 1, 3), (1, 0, 1)]  # rows [3, 6)
    assert partition_rows(unit_rows, order, 2, 3, False) == [(1, 1, 5)]  # rows [6, 10)
    assert partition_rows(unit_rows, order, 2, 3, True) == [(1, 1, 4)]  # rows [6, 9): 3 each
    assert partition_rows(unit_rows, order, 0, 1, False) == [(2, 0, 2), (0, 0, 3), (1, 0, 5)]


def test_values_match_what_was_written(data):
    ds, written = data
    batches = list(ShardReader(ds, "trainval", batch_size=7, shuffle=False))
    ids, labels, feats = written["trainval"]
    np.testing.assert_array_equal(_ids(batches), ids)  # shuffle=False keeps write order
    got = torch.cat([b.features for b in batches])
    assert got.dtype == torch.float32 and got.shape == (61, *FEATURE_SHAPE)
    np.testing.assert_array_equal(got.numpy(), feats.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(torch.cat([b.labels for b in batches]).numpy(), labels)
    assert batches[0].labels.dtype == torch.int64 and batches[0].sample_ids.dtype == torch.int64
    assert [len(b.labels) for b in batches] == [7] * 8 + [5]


def test_shuffled_values_stay_with_their_ids(data):
    ds, written = data
    ids, labels, feats = written["train"]
    pos = {int(i): k for k, i in enumerate(ids)}
    for b in ShardReader(ds, "train", batch_size=4, buffer_rows=5, seed=3, out_dtype=torch.float16):
        assert b.features.dtype == torch.float16
        rows = [pos[int(i)] for i in b.sample_ids]
        np.testing.assert_array_equal(b.features.numpy(), feats[rows].astype(np.float16))
        np.testing.assert_array_equal(b.labels.numpy(), labels[rows])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("split", ["trainval", "val_unseen", "train"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_read_disjoint_samples_covering_the_split(data, world_size, split, shuffle):
    ds, written = data
    seen = []
    for rank in range(world_size):
        r = ShardReader(ds, split, batch_size=3, shuffle=shuffle, rank=rank, world_size=world_size, buffer_rows=4)
        ids = _ids(list(r))
        n = ds.split(split).num_rows
        assert r.num_rows == len(ids) == (rank + 1) * n // world_size - rank * n // world_size
        seen.append(ids)
    all_ids = np.concatenate(seen)
    assert len(all_ids) == len(set(all_ids.tolist()))  # disjoint
    assert sorted(all_ids.tolist()) == sorted(written[split][0].tolist())  # union = the split


def test_epochs_reshuffle_and_seeds_reproduce(data):
    ds, written = data

    def order(seed, epoch, rank=0, world_size=1):
        r = ShardReader(ds, "trainval", batch_size=5, seed=seed, rank=rank, world_size=world_size)
        r.set_epoch(epoch)
        return _ids(list(r)).tolist()

    e0, e1 = order(0, 0), order(0, 1)
    assert e0 != e1 and sorted(e0) == sorted(e1) == sorted(written["trainval"][0].tolist())
    assert order(0, 1) == e1  # same seed and epoch: same order, from a fresh reader
    assert order(1, 0) != e0
    # Across ranks, a new epoch also changes which rank reads which samples.
    assert set(order(0, 0, 0, 2)) != set(order(0, 1, 0, 2))


def test_no_shuffle_is_identical_across_epochs(data):
    ds, _ = data
    r = ShardReader(ds, "trainval", batch_size=5, shuffle=False)
    first = _ids(list(r)).tolist()
    r.set_epoch(3)
    assert _ids(list(r)).tolist() == first == sorted(first)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("class_balanced", [False, True])
def test_equal_rows_gives_equal_lengths(data, world_size, class_balanced):
    ds, _ = data
    n = ds.split("trainval").num_rows
    lengths, all_ids = [], []
    for rank in range(world_size):
        r = ShardReader(ds, "trainval", batch_size=4, rank=rank, world_size=world_size, equal_rows=True,
                        buffer_rows=6, class_balanced=class_balanced)
        r.set_epoch(1)
        batches = list(r)
        assert r.num_rows == n // world_size
        assert len(batches) == len(r)
        lengths.append(len(r))
        all_ids.append(_ids(batches))
    assert len(set(lengths)) == 1
    ids = np.concatenate(all_ids)
    assert len(ids) == len(set(ids.tolist()))
    if not class_balanced:
        assert len(ids) == world_size * (n // world_size)  # only the <= W-1 leftover rows are skipped


@pytest.mark.parametrize("kw", [
    dict(), dict(drop_last=True), dict(shuffle=False), dict(shuffle=False, drop_last=True),
    dict(buffer_rows=0), dict(batch_size=100), dict(world_size=3, rank=2), dict(world_size=2, rank=1, drop_last=True),
    dict(class_balanced=True), dict(class_balanced=True, drop_last=True), dict(class_balanced=True, shuffle=False),
    dict(class_balanced=True, buffer_rows=0, world_size=2, rank=1),
])
@pytest.mark.parametrize("split", ["trainval", "val_unseen", "test_unseen"])
def test_len_matches_batches_yielded(data, kw, split):
    ds, _ = data
    kw = {"batch_size": 4, "buffer_rows": 8, **kw}
    r = ShardReader(ds, split, **kw)
    for epoch in (0, 1):
        r.set_epoch(epoch)
        batches = list(r)
        assert len(r) == len(batches)
        sizes = [len(b.labels) for b in batches]
        if kw.get("drop_last"):
            assert all(s == r._k for s in sizes)
        elif not kw.get("class_balanced"):
            assert sizes == [r._k] * (r.num_rows // r._k) + ([r.num_rows % r._k] if r.num_rows % r._k else [])
            assert len(_ids(batches)) == r.num_rows


# docs/reference-variant.md#shared-by-both-variants
@pytest.mark.parametrize("split,k", [("trainval", 4), ("train", 3), ("val_unseen", 1), ("test_unseen", 2)])
def test_class_balanced_batches_have_distinct_labels(data, split, k):
    ds, written = data
    r = ShardReader(ds, split, batch_size=50, class_balanced=True, buffer_rows=16, seed=5)
    batches = list(r)
    for b in batches:
        labels = b.labels.tolist()
        assert len(labels) == len(set(labels)) <= k  # min(#classes of the split, batch_size) distinct classes
    assert sum(len(b.labels) == k for b in batches) >= len(batches) // 2
    ids = _ids(batches)
    assert sorted(ids.tolist()) == sorted(written[split][0].tolist())  # every row read exactly once


def test_class_balanced_batch_size_caps_classes(data):
    ds, _ = data
    r = ShardReader(ds, "trainval", batch_size=2, class_balanced=True, buffer_rows=10)
    batches = list(r)
    assert all(len(b.labels) == 2 and b.labels[0] != b.labels[1] for b in batches[:-3])


def test_dataloader_workers_read_each_sample_once(data):
    ds, written = data
    reader = ShardReader(ds, "trainval", batch_size=4, buffer_rows=6, seed=1)
    dataset = ShardIterableDataset(reader, num_workers=2)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    batches = list(loader)
    ids = _ids(batches)
    assert len(ids) == len(set(ids.tolist())) == 61
    assert sorted(ids.tolist()) == sorted(written["trainval"][0].tolist())
    assert len(dataset) == len(batches) == len(loader)
    assert isinstance(batches[0], Batch) and batches[0].features.shape[1:] == FEATURE_SHAPE


def test_dataloader_worker_count_must_match(data):
    ds, _ = data
    dataset = ShardIterableDataset(ShardReader(ds, "train", batch_size=4), num_workers=0)
    assert len(list(DataLoader(dataset, batch_size=None))) == len(dataset) == 5
    with pytest.raises(ConfigError, match="num_workers"):
        list(DataLoader(ShardIterableDataset(ShardReader(ds, "train", batch_size=4), num_workers=3),
                        batch_size=None))


def test_forbid_splits(data):
    ds, _ = data
    with forbid_splits({"test_seen", "test_unseen"}):
        with pytest.raises(DatasetError, match=r"split: expected a split allowed here \(forbid_splits is active\), found 'test_seen'"):
            ShardReader(ds, "test_seen", batch_size=4)
        ShardReader(ds, "val_seen", batch_size=4)  # others stay allowed
        errors: list[BaseException] = []

        def in_thread():
            try:
                ShardReader(ds, "test_unseen", batch_size=4)
            except DatasetError as e:
                errors.append(e)
        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
        assert len(errors) == 1  # the ban holds in other threads too
        with forbid_splits({"test_seen"}):
            pass
        with pytest.raises(DatasetError):  # the inner block's exit must not lift the outer ban
            ShardReader(ds, "test_seen", batch_size=4)
    assert len(ShardReader(ds, "test_seen", batch_size=4)) == 3


@pytest.mark.parametrize("kw,key", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=2, rank=2, world_size=2), "rank"),
    (dict(batch_size=2, world_size=0), "world_size"), (dict(batch_size=2, buffer_rows=-1), "buffer_rows"),
    (dict(batch_size=2, out_dtype=torch.int64), "out_dtype"),
])
def test_bad_arguments(data, kw, key):
    ds, _ = data
    with pytest.raises(ConfigError, match=f"ShardReader: {key}: expected"):
        ShardReader(ds, "train", **kw)
    with pytest.raises(DatasetError, match="splits: expected one of"):
        ShardReader(ds, "everything", batch_size=2)


def test_memory_is_bounded_by_buffer_and_row_group(data, monkeypatch):
    """The buffer never holds more than buffer_rows + one row group (6 rows here).
    docs/performance.md#data-path"""
    ds, _ = data
    import dedn.data.reader as reader_mod

    peak = []
    original = reader_mod._Buffer.push

    def push(self, ids, labels, feats):
        original(self, ids, labels, feats)
        peak.append(self.n)
    monkeypatch.setattr(reader_mod._Buffer, "push", push)
    list(ShardReader(ds, "trainval", batch_size=4, buffer_rows=10))
    assert 10 <= max(peak) <= 10 + 6


# ---- resident data: the same plan gathered from one decoded tensor ------------------------------
def _same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.sample_ids, y.sample_ids) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.features, y.features)


def test_decode_holds_every_row_once_with_its_features(data):
    ds, written = data
    res = decode_split(ds, "trainval")
    assert res.num_rows == 61 and res.features.shape == (61, *FEATURE_SHAPE)
    assert res.features.dtype == torch.float16 and res.features.is_contiguous()
    ids, labels, feats = written["trainval"]
    order = np.argsort(res.sample_ids)
    assert np.array_equal(res.sample_ids[order], np.sort(ids))
    pos = {int(i): n for n, i in enumerate(ids)}
    for row in range(res.num_rows):
        j = pos[int(res.sample_ids[row])]
        assert res.labels[row] == labels[j]
        assert torch.equal(res.features[row], torch.from_numpy(feats[j]).to(torch.float16))


# Every semantic the streaming reader has: ranks x shuffle x class-balanced x drop_last x equal_rows.
@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("kw", [
    dict(shuffle=True, buffer_rows=16), dict(shuffle=False), dict(shuffle=True, buffer_rows=8, class_balanced=True),
    dict(shuffle=True, buffer_rows=8, class_balanced=True, drop_last=True, equal_rows=True),
    dict(shuffle=True, buffer_rows=5, drop_last=True, equal_rows=True)])
def test_resident_batches_equal_streaming_batches(data, world_size, kw):
    ds, _ = data
    res = decode_split(ds, "trainval")
    for epoch in (1, 2):
        union: list[np.ndarray] = []
        for rank in range(world_size):
            common = dict(batch_size=5, seed=3, rank=rank, world_size=world_size, **kw)
            streaming, resident = ShardReader(ds, "trainval", **common), ShardReader(ds, "trainval", resident=res, **common)
            streaming.set_epoch(epoch)
            resident.set_epoch(epoch)
            got = list(resident)
            _same_batches(list(streaming), got)
            assert len(resident) == len(got) == len(streaming)
            union.append(_ids(got))
        if not kw.get("drop_last"):  # disjoint shares whose union is the split
            allids = np.concatenate(union)
            assert np.unique(allids).size == allids.size == 61


def test_resident_class_balanced_batches_follow_the_rule(data):
    ds, _ = data
    res = decode_split(ds, "trainval")
    r = ShardReader(ds, "trainval", batch_size=3, buffer_rows=8, class_balanced=True, seed=1, resident=res)
    batches = list(r)
    assert all(len(set(b.labels.tolist())) == b.labels.numel() <= 3 for b in batches)  # distinct classes
    assert sum(b.labels.numel() for b in batches) == 61


def test_resident_must_be_the_readers_split(data):
    ds, _ = data
    res = decode_split(ds, "train")
    with pytest.raises(DatasetError, match="resident"):
        ShardReader(ds, "trainval", batch_size=4, resident=res)
