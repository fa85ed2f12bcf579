"""Streaming, rank-partitioned, seeded reading of a split's Parquet shards into feature batches.

(One module on purpose: the partition, the shuffle buffer, the read-ahead thread and the
integrity checks all work on the same (shard, row group) units; apart, each would have to
re-derive or pass around that bookkeeping.)

Partition (every sample of a split is read exactly once per epoch across ranks):

1. units = (shard, row group) in manifest order, each with its row count (Parquet footers only);
2. the unit list is permuted by a generator seeded with (seed, epoch), identical on every rank
   (no permutation when shuffle=False);
3. the permuted units are laid end to end (N rows) and rank r takes rows [r*N//W, (r+1)*N//W)
   of that concatenation; a unit cut between two ranks is read by both, each keeping its rows.
   With equal_rows=True every rank takes exactly N//W rows, [r*(N//W), (r+1)*(N//W)); the
   <= W-1 rows past W*(N//W) are skipped this epoch (which ones changes with the reshuffle);
4. DataLoader workers of a rank take disjoint pieces (piece i goes to worker i % num_workers);
5. rows pass through a shuffle buffer of `buffer_rows` rows seeded by (seed, epoch, rank, worker).

Memory: the buffer (buffer_rows + one row group of rows, in storage dtype) plus one decoded
row group; never the split.

Class-balanced batches (the reference sampler draws min(#classes, B) distinct classes, one
sample each, with replacement across iterations). Streaming approximation used here: whenever
the buffer holds >= max(buffer_rows, k) rows, a batch takes one random buffered row from each
of k random classes present in the buffer (k = min(#classes of the split, batch_size)); if
fewer than k classes are buffered, the batch holds one row of each class present. At the end
of the epoch the buffer is drained the same way, so every row is read once; late batches can
be smaller than k (drop_last drops every batch smaller than k, and its rows, for this epoch).
Because batch sizes then depend on labels, len() replays the sampler on the label column
alone (4 bytes a row) of the pieces concerned.

Resident data (`resident=ResidentSplit`, made by `dedn.data.resident.decode_split`): the
whole split decoded once into one contiguous (N, C, H, W) tensor (host or device memory), rows
laid out in manifest unit order. The reader then runs the very same plan on it: the same
partition, the same shuffle buffer and the same draws, but the buffer holds row numbers instead
of features (the draws depend only on buffer sizes and labels), and each batch is gathered by
index from the tensor. So resident and streaming readers yield identical batches (features,
labels, sample ids, order) for every (seed, epoch, rank, worker), class-balanced mode included.

Integrity (every check raises DatasetError naming the shard file):

- checksums: before its first row group is read, each shard's whole file is hashed and compared
  with the sha256 in dataset.json, once per shard per ShardReader (verify_checksums=True, the
  default); the hash runs on the read-ahead thread, beside training. `verify_checksums()` does it
  up front (ShardIterableDataset calls it before DataLoader worker processes fork, so they
  inherit the result). Chosen over Parquet page CRCs verified on every read; the figures are in
  `ShardReader.verify_checksums`.
- finiteness: every decoded piece of features is checked for NaN/inf (bit test for float16,
  about 0.02 s per 100 MB); the error names the row within the shard and its sample_id;
- Arrow errors (a damaged page header, a truncated file) become DatasetError with the path.

torch is imported where tensors are made (batches, `ResidentSplit.from_arrays`): `decode_split_arrays`
reads a split into numpy without it, so the node's decode actor (dedn.training.node_cache) is a
process without torch. The torch `IterableDataset` for a DataLoader is dedn.data.loader's.
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedn.data.dataset import FeatureDataset
from dedn.data.format import arrow_error, check_finite_features, check_shard_schema, check_shard_sha256, split_classes
from dedn.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    import torch

__all__ = ["Batch", "DecodedSplit", "ResidentSplit", "ShardReader", "decode_split_arrays", "forbid_splits", "partition_rows"]

# --- forbidden splits (e.g. the test splits during hyper-parameter tuning) -----------------
_forbidden: Counter[str] = Counter()
_forbidden_lock = threading.Lock()


@contextmanager
def forbid_splits(splits: Iterable[str]) -> Iterator[None]:
    """Inside the block, constructing a ShardReader on any of `splits` raises DatasetError.

    Process-wide (every thread), nestable; e.g. a tuning job wraps trials in
    `with forbid_splits({"test_seen", "test_unseen"}):` so no trial can peek at the test set.
    """
    names = set(splits)
    with _forbidden_lock:
        _forbidden.update(names)
    try:
        yield
    finally:
        with _forbidden_lock:
            _forbidden.subtract(names)
            for n in [n for n, c in _forbidden.items() if c <= 0]:
                del _forbidden[n]


def _is_forbidden(split: str) -> bool:
    with _forbidden_lock:
        return _forbidden[split] > 0


class Batch(NamedTuple):
    """One batch: features (B, C, H, W) out_dtype, labels (B,) int64, sample_ids (B,) int64."""

    features: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor


class DecodedSplit(NamedTuple):
    """A whole split in numpy (`decode_split_arrays`): features (N, C, H, W) in storage dtype,
    labels (N,) and sample_ids (N,) int64; rows in manifest unit order (shard, row group)."""

    features: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray


@dataclass(frozen=True)
class ResidentSplit:
    """A whole split decoded once: features (N, C, H, W) in storage dtype (host or device memory),
    labels (N,) and sample_ids (N,) int64 numpy; rows in manifest unit order (shard, row group)."""

    split: str
    features: torch.Tensor
    labels: np.ndarray
    sample_ids: np.ndarray
    shared: bool = False  # a read-only view of a node-shared copy (dedn.training.node_cache)

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device: str | torch.device) -> "ResidentSplit":
        """The same rows with features on `device` (one copy; self when already there)."""
        import torch  # on use (module docstring)

        device = torch.device(device)
        if self.features.device == device:
            return self
        return ResidentSplit(self.split, self.features.to(device), self.labels, self.sample_ids)

    @classmethod
    def from_arrays(cls, split: str, arrays: DecodedSplit, *, shared: bool = False) -> "ResidentSplit":
        """A split decoded into numpy (`decode_split_arrays`) as a ResidentSplit: features viewed as a
        tensor, no copy."""
        import torch  # on use (module docstring)

        return cls(split, torch.from_numpy(arrays.features), arrays.labels, arrays.sample_ids, shared=shared)


@dataclass(frozen=True)
class _Unit:
    shard: int  # index into the split's shards
    row_group: int
    num_rows: int
    first_row: int = 0  # the row group's first row within its shard (for error messages)


Piece = tuple[int, int, int]  # (unit index, first row, end row) within the unit


def partition_rows(unit_rows: np.ndarray, order: np.ndarray, rank: int, world_size: int,
                   equal_rows: bool) -> list[Piece]:
    """Rank `rank`'s pieces (unit, start, stop) of the units laid end to end in `order`.

    unit_rows: (U,) rows of each unit; order: (U,) a permutation of range(U).
    """
    n = int(unit_rows.sum())
    if equal_rows:
        per = n // world_size
        lo, hi = rank * per, (rank + 1) * per
    else:
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    pieces: list[Piece] = []
    offset = 0
    for u in order.tolist():
        rows = int(unit_rows[u])
        start, stop = max(lo - offset, 0), min(hi - offset, rows)
        if start < stop:
            pieces.append((u, start, stop))
        offset += rows
        if offset >= hi:
            break
    return pieces


class _Buffer:
    """Fixed-capacity row buffer; popping fills the holes from the tail (O(batch) copies)."""

    def __init__(self, capacity: int, feature_size: int, dtype: np.dtype | None, keep_order: bool):
        self.ids = np.empty(capacity, np.int64)
        self.labels = np.empty(capacity, np.int64)
        self.feats = None if dtype is None else np.empty((capacity, feature_size), dtype)  # (cap, C*H*W)
        self.n = 0
        self.keep_order = keep_order

    def push(self, ids: np.ndarray, labels: np.ndarray, feats: np.ndarray | None) -> None:
        m = ids.shape[0]
        self.ids[self.n:self.n + m] = ids
        self.labels[self.n:self.n + m] = labels
        if self.feats is not None:
            self.feats[self.n:self.n + m] = feats
        self.n += m

    def pop(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Remove rows idx (distinct) and return them in idx order."""
        out = (self.ids[idx], self.labels[idx], None if self.feats is None else self.feats[idx])
        n, b = self.n, idx.shape[0]
        if self.keep_order:  # compact, keeping the order of the rows that stay
            keep = np.ones(n, bool)
            keep[idx] = False
            src = np.flatnonzero(keep)
            if src.size and src[-1] != src.size - 1:
                self._move(src, np.arange(src.size))
        else:
            holes = idx[idx < n - b]
            if holes.size:
                tail = np.ones(b, bool)
                tail[idx[idx >= n - b] - (n - b)] = False
                self._move(np.flatnonzero(tail) + (n - b), holes)
        self.n -= b
        return out

    def _move(self, src: np.ndarray, dst: np.ndarray) -> None:
        self.ids[dst] = self.ids[src]
        self.labels[dst] = self.labels[src]
        if self.feats is not None:
            self.feats[dst] = self.feats[src]


class ShardReader:
    """Iterates one split of a FeatureDataset as Batches; see the module docstring for the contract."""

    def __init__(
        self,
        dataset: FeatureDataset,
        split: str,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_rows: int = 2048,
        class_balanced: bool = False,
        drop_last: bool = False,
        equal_rows: bool = False,
        out_dtype: torch.dtype | None = None,
        verify_checksums: bool = True,
        resident: ResidentSplit | None = None,
        pin_memory: bool = False,
    ):
        if _is_forbidden(split):
            raise DatasetError(dataset.root, "split", "a split allowed here (forbid_splits is active)", repr(split))
        info = dataset.split(split)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size", "a positive int", batch_size, "ShardReader")
        if not isinstance(world_size, int) or world_size < 1:
            raise ConfigError("world_size", "a positive int", world_size, "ShardReader")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError("rank", f"an int in [0, {world_size})", rank, "ShardReader")
        if not isinstance(buffer_rows, int) or buffer_rows < 0:
            raise ConfigError("buffer_rows", "a non-negative int", buffer_rows, "ShardReader")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError("seed", "a non-negative int", seed, "ShardReader")
        if out_dtype is not None:  # None: float32, named when the first batch is made (torch on use)
            import torch

            if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
                raise ConfigError("out_dtype", "a floating torch dtype", out_dtype, "ShardReader")
        self.dataset, self.split, self.info = dataset, split, info
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.buffer_rows = rank, world_size, buffer_rows
        self.class_balanced, self.drop_last, self.equal_rows = class_balanced, drop_last, equal_rows
        self.out_dtype = out_dtype
        self.pin_memory = bool(pin_memory)  # for batches bound to a GPU (the training loop sets it on CUDA)
        self.verify = bool(verify_checksums)
        self._verified: set[int] = set()  # shards whose sha256 matched the manifest (kept across epochs)
        self.epoch = 0
        self._allowed = split_classes(dataset.class_side, split)
        # Rows per batch: class-balanced batches hold one row of each of k distinct classes.
        self._k = min(self._allowed.size, batch_size) if class_balanced else batch_size
        self._units = self._read_units()
        self._unit_rows = np.array([u.num_rows for u in self._units], dtype=np.int64)
        self._unit_start = np.concatenate([[0], np.cumsum(self._unit_rows)[:-1]]).astype(np.int64)  # row of unit u
        self._count_cache: dict[tuple[int, int], list[list[int]]] = {}
        if resident is not None:
            n = int(self._unit_rows.sum())
            shape = (n, *dataset.feature_shape)
            if resident.split != split or tuple(resident.features.shape) != shape:
                raise DatasetError(dataset.root, "resident", f"split {split} decoded as {shape}",
                                   f"split {resident.split} {tuple(resident.features.shape)}")
        self.resident = resident

    def _read_units(self) -> list[_Unit]:
        """(shard, row group, rows) for the split, from Parquet footers, checked against the manifest."""
        units = []
        for s, shard in enumerate(self.info.shards):
            path = self.dataset.shard_path(shard)
            try:
                pf = pq.ParquetFile(path)
            except FileNotFoundError:
                raise DatasetError(path, "file", f"a shard of split {self.split} (dataset.json)", "no such file") from None
            except (OSError, pa.ArrowException) as e:
                raise DatasetError(path, "file", "a Parquet file", arrow_error(e)) from None
            with pf:
                check_shard_schema(path, pf.schema_arrow, self.dataset.storage_dtype, self.dataset.feature_size)
                md = pf.metadata
                if md.num_rows != shard.num_rows:
                    raise DatasetError(path, "num_rows", f"{shard.num_rows} (dataset.json)", md.num_rows)
                first = 0
                for g in range(md.num_row_groups):
                    rows = md.row_group(g).num_rows
                    if rows > 0:
                        units.append(_Unit(s, g, rows, first))
                    first += rows
        return units

    def verify_checksums(self, shards: Iterable[int] | None = None) -> None:
        """Hash shards (indices into the split's shards; default: every shard this rank may read)
        and DatasetError for one whose sha256 differs from dataset.json; each shard once per reader.

        Reading does this lazily, before a shard's first row group; call it to pay up front
        (e.g. before forking DataLoader workers, which then inherit the verified set). Whole-file
        sha256 once per run was chosen over Parquet page CRCs verified on every read: on a 100 MB
        float16 shard (2 CPUs, page cache warm) sha256 takes 0.10-0.11 s once, while page CRC
        verification adds 0.04-0.09 s to each 0.22-0.27 s read, every epoch; sha256 also covers
        the footer and page headers, and datasets already written have sha256 values in
        dataset.json but no page CRCs (pages without one are not checked).
        """
        if not self.verify:
            return
        if shards is None:
            shards = self._rank_shards()
        for s in shards:
            self._check_shard(s)

    def _rank_shards(self) -> list[int]:
        """Shards this rank may read in some epoch: all of them when units are reshuffled per epoch."""
        if self.shuffle:
            return sorted({u.shard for u in self._units})
        return sorted({self._units[u].shard for u, _, _ in self._pieces(self.rank)})

    def _check_shard(self, s: int) -> None:
        if self.verify and s not in self._verified:
            check_shard_sha256(self.dataset.shard_path(self.info.shards[s]), self.info.shards[s].sha256)
            self._verified.add(s)

    def decode_arrays(self) -> DecodedSplit:
        """Every row of the split, decoded once into numpy (storage dtype), without torch.

        Each shard's sha256, the labels and the finiteness are checked as in streaming; row groups
        are read one ahead on a thread, by the same source streaming uses (`_ParquetSource`).
        """
        n, f = int(self._unit_rows.sum()), self.dataset.feature_size
        feats = np.empty((n, f), np.dtype(self.dataset.storage_dtype))
        labels, ids = np.empty(n, np.int64), np.empty(n, np.int64)
        units = [(u, 0, int(r)) for u, r in enumerate(self._unit_rows)]
        with _ParquetSource(self, True).read_ahead(units) as loaded:
            for (u, _, rows), (got_ids, got_labels, got_feats) in zip(units, loaded):
                lo = int(self._unit_start[u])
                ids[lo:lo + rows], labels[lo:lo + rows], feats[lo:lo + rows] = got_ids, got_labels, got_feats
        return DecodedSplit(feats.reshape(n, *self.dataset.feature_shape), labels, ids)

    # --- epoch plan ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds the unit permutation and the shuffle buffer."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError("epoch", "a non-negative int", epoch, "ShardReader.set_epoch")
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._units))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self._units))

    def _pieces(self, rank: int) -> list[Piece]:
        return partition_rows(self._unit_rows, self._order(), rank, self.world_size, self.equal_rows)

    @staticmethod
    def _worker_pieces(pieces: list[Piece], worker: int, num_workers: int) -> list[Piece]:
        return pieces[worker::num_workers]

    @property
    def num_rows(self) -> int:
        """Rows this rank reads this epoch."""
        return sum(stop - start for _, start, stop in self._pieces(self.rank))

    def _counts(self, num_workers: int) -> list[list[int]]:
        """Batches each (rank, worker) would yield this epoch before any equal_rows cap."""
        key = (self.epoch, num_workers)
        if key not in self._count_cache:
            ranks = range(self.world_size) if self.equal_rows else [self.rank]
            table = [[0] * num_workers for _ in range(self.world_size)]
            for r in ranks:
                pieces = self._pieces(r)
                for w in range(num_workers):
                    mine = self._worker_pieces(pieces, w, num_workers)
                    if self.class_balanced:
                        table[r][w] = sum(1 for _ in self._stream(mine, r, w, self._label_source()))
                    else:
                        rows = sum(stop - start for _, start, stop in mine)
                        table[r][w] = rows // self._k if self.drop_last else math.ceil(rows / self._k)
            self._count_cache = {key: table}  # only the current epoch is worth keeping
        return self._count_cache[key]

    def _caps(self, num_workers: int) -> list[int]:
        """Batches each worker of this rank yields; with equal_rows all ranks total the same."""
        table = self._counts(num_workers)
        caps = list(table[self.rank])
        if self.equal_rows:
            excess = sum(caps) - min(sum(row) for row in table)
            for w in reversed(range(num_workers)):  # trim from the last workers, deterministically
                cut = min(excess, caps[w])
                caps[w] -= cut
                excess -= cut
        return caps

    def num_batches(self, num_workers: int = 1) -> int:
        """Batches this rank yields this epoch when its pieces are split over `num_workers` streams."""
        return sum(self._caps(max(1, num_workers)))

    def __len__(self) -> int:
        return self.num_batches(1)

    # --- reading ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self.iter_worker(0, 1)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """Batches of stream `worker` of `num_workers` (DataLoader workers) of this rank."""
        import torch  # on use (module docstring)

        out_dtype = torch.float32 if self.out_dtype is None else self.out_dtype
        cap = self._caps(num_workers)[worker]
        if cap == 0:
            return
        mine = self._worker_pieces(self._pieces(self.rank), worker, num_workers)
        c, h, w = self.dataset.feature_shape
        res = self.resident
        done = 0
        for ids, labels, feats in self._stream(mine, self.rank, worker, self._feature_source()):
            if res is not None:  # ids are row numbers of the resident tensor: gather the batch by index
                rows = torch.from_numpy(ids).to(res.device, non_blocking=True)
                x = res.features.index_select(0, rows)
                ids = res.sample_ids[ids]
            else:
                assert feats is not None
                x = torch.from_numpy(feats).view(-1, c, h, w)  # (B, C, H, W) storage dtype
            x, y = x.to(out_dtype), torch.from_numpy(labels)
            if self.pin_memory and x.device.type == "cpu":
                # page-locked host memory: the consumer's `.to(cuda, non_blocking=True)` is then an
                # asynchronous copy that overlaps the step, not a blocking one through a staging buffer
                x, y = x.pin_memory(), y.pin_memory()
            yield Batch(x, y, torch.from_numpy(ids))
            done += 1
            if done == cap:
                return

    # A source turns pieces (unit, start, stop) into (ids, labels, features or None) for the buffer.
    def _feature_source(self) -> "_Source":
        return _ResidentSource(self) if self.resident is not None else _ParquetSource(self, True)

    def _label_source(self) -> "_Source":
        return _ResidentSource(self) if self.resident is not None else _ParquetSource(self, False)

    def _resident_rows(self, piece: Piece) -> tuple[np.ndarray, np.ndarray, None]:
        """A piece as row numbers of the resident tensor (in the ids slot) and their labels; no features."""
        u, start, stop = piece
        rows = np.arange(self._unit_start[u] + start, self._unit_start[u] + stop, dtype=np.int64)
        assert self.resident is not None
        return rows, self.resident.labels[rows], None

    def _load(self, files: dict[int, pq.ParquetFile], piece: Piece, with_features: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows [start, stop) of one row group: ids (n,), labels (n,), features (n, C*H*W) or None."""
        u, start, stop = piece
        unit = self._units[u]
        shard = self.info.shards[unit.shard]
        path = self.dataset.shard_path(shard)
        self._check_shard(unit.shard)  # sha256 against dataset.json before the shard's first read
        columns = ["sample_id", "label", "features"] if with_features else ["label"]
        try:
            if unit.shard not in files:
                files[unit.shard] = pq.ParquetFile(path)
            table = files[unit.shard].read_row_group(unit.row_group, columns=columns)
            labels = table.column("label").to_numpy()[start:stop].astype(np.int64)
            if with_features:
                ids = table.column("sample_id").to_numpy()[start:stop]
                col = table.column("features").combine_chunks()
                # flatten() honours slicing offsets; to_numpy is zero-copy for a null-free float column.
                flat = col.flatten().to_numpy(zero_copy_only=False)
        except (OSError, pa.ArrowException) as e:  # a damaged page header, a truncated or replaced file
            raise DatasetError(path, f"row group {unit.row_group}", "a readable Parquet row group",
                               arrow_error(e)) from None
        bad = np.setdiff1d(labels, self._allowed)
        if bad.size:
            raise DatasetError(path, "label",
                               f"classes of split {self.split} ({self._allowed.size} classes)",
                               f"other classes {bad[:5].tolist()}")
        if not with_features:
            return np.zeros(stop - start, np.int64), labels, None
        feats = flat.reshape(-1, self.dataset.feature_size)[start:stop]  # (n, C*H*W)
        check_finite_features(path, feats, ids, unit.first_row + start)
        return ids, labels, feats

    def _stream(self, pieces: list[Piece], rank: int, worker: int, source: "_Source") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Push pieces (read by `source`) through the shuffle buffer and yield (ids, labels, features) batches.

        A source without features (labels only for len(), or row numbers of resident data) gives
        the same batches: the random draws depend only on buffer sizes and labels.
        """
        if not pieces:
            return
        k = self._k
        threshold = max(self.buffer_rows, k) if self.shuffle else k
        capacity = threshold + max(stop - start for _, start, stop in pieces)
        dtype = np.dtype(self.dataset.storage_dtype) if source.with_features else None
        buf = _Buffer(capacity, self.dataset.feature_size, dtype, keep_order=not self.shuffle)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker]) if self.shuffle else None
        pick: Callable[[], np.ndarray] = (lambda: self._pick_balanced(buf, rng)) if self.class_balanced \
            else (lambda: self._pick_uniform(buf, rng))
        with source.read_ahead(pieces) as loaded_pieces:
            for loaded in loaded_pieces:
                buf.push(*loaded)
                while buf.n >= threshold:
                    batch = buf.pop(pick())
                    if not (self.drop_last and batch[0].shape[0] < k):
                        yield batch
        while buf.n > 0:
            batch = buf.pop(pick())
            if self.drop_last and batch[0].shape[0] < k:
                if not self.class_balanced:
                    break  # uniform: only the final, partial batch is ever short
                continue
            yield batch

    def _pick_uniform(self, buf: _Buffer, rng: np.random.Generator | None) -> np.ndarray:
        b = min(self._k, buf.n)
        if rng is None:
            return np.arange(b)
        return rng.choice(buf.n, size=b, replace=False)

    def _pick_balanced(self, buf: _Buffer, rng: np.random.Generator | None) -> np.ndarray:
        """One random buffered row from each of up to k random classes present in the buffer."""
        n = buf.n
        order = np.arange(n) if rng is None else rng.permutation(n)
        _, first = np.unique(buf.labels[:n][order], return_index=True)
        rows = order[first]  # one row per class present, sorted by class
        if rng is None:
            return np.sort(rows)[: self._k]  # deterministic: the first k classes to appear
        return rng.permutation(rows)[: self._k]


def decode_split_arrays(dataset: FeatureDataset, split: str) -> DecodedSplit:
    """A whole split decoded in this process into numpy, in manifest order, checked as in streaming;
    no torch (the node's decode actor, dedn.training.node_cache)."""
    return ShardReader(dataset, split, batch_size=1, shuffle=False).decode_arrays()


Loaded = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # (ids or resident row numbers, labels, features)


class _Source:
    """Where a reader's pieces come from; `read_ahead(pieces)` is a context yielding them loaded."""

    with_features = False

    @contextmanager
    def read_ahead(self, pieces: list[Piece]) -> Iterator[Iterator[Loaded]]:
        raise NotImplementedError


class _ResidentSource(_Source):
    """Pieces as row numbers of the reader's resident tensor (no read: everything is decoded)."""

    def __init__(self, reader: ShardReader):
        self.reader = reader

    @contextmanager
    def read_ahead(self, pieces: list[Piece]) -> Iterator[Iterator[Loaded]]:
        yield (self.reader._resident_rows(p) for p in pieces)


class _ParquetSource(_Source):
    """Pieces read from the shards (features, or labels only), one piece ahead on a thread.

    Parquet decoding releases the GIL, so the next row group is read while the caller trains on
    this one. Pieces are pushed in the same order, so batches are identical with or without it;
    only the loader thread touches the open files.
    """

    def __init__(self, reader: ShardReader, with_features: bool):
        self.reader, self.with_features = reader, with_features

    @contextmanager
    def read_ahead(self, pieces: list[Piece]) -> Iterator[Iterator[Loaded]]:
        files: dict[int, pq.ParquetFile] = {}
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dedn-shard-read")

        def loaded() -> Iterator[Loaded]:
            ahead = loader.submit(self.reader._load, files, pieces[0], self.with_features)
            for i in range(len(pieces)):
                got = ahead.result()
                if i + 1 < len(pieces):
                    ahead = loader.submit(self.reader._load, files, pieces[i + 1], self.with_features)
                yield got

        try:
            yield loaded()
        finally:
            loader.shutdown(wait=True, cancel_futures=True)  # no read may be in flight when files close
            for f in files.values():
                f.close()
