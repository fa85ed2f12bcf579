"""From images to a dataset directory: the authors' feature extraction, streamed through Ray Data.

    images (res101.mat order) -> decode + resize + crop (CPU tasks, uint8) -> backbone (actors,
    one GPU each or CPU) -> blocks of the output in res101 order -> `convert.write_dataset`

The authors' `preprocessing.py` holds every map in memory and writes one HDF5 file at the end
(about 19 GB for CUB at 14 x 14 in float32). Here nothing is held beyond a few batches in flight
and one block being assembled: features stream from the actors to the driver in res101.mat order
(Ray Data's `preserve_order`) and are written, one block of consecutive images at a time, into a
work folder beside the output (`.<name>.extract/`). Each block is written under a temporary name
and its sha256 recorded after it; a re-run with the same inputs and settings keeps every block
whose checksum holds and computes only the others. When all blocks are whole they are streamed
into the dataset writer (shards in the storage dtype, checksums, manifest) and the work folder
is removed.

Images: xlsa17's `image_files` are the paths on the authors' machine. The prefix to strip is the
shortest leading part after which the first images exist under the image root (or `strip_prefix`);
it is reported. A missing or undecodable image stops the run with one line naming it; with
`skip_bad` it is left out instead, listed in `<out>.skipped.tsv`, and every other image keeps its
own label and split (images are addressed by their res101.mat index throughout).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from dedn.atomic import write_bytes, write_text
from dedn.data.convert import write_dataset
from dedn.data.format import sha256_file
from dedn.data.images import DEFAULT_SIZE, load_crop, normalize
from dedn.data.sources import build_class_side, image_labels_arrays, load_xlsa17, make_splits
from dedn.errors import ConfigError, DatasetError

__all__ = ["DEFAULT_BACKBONE", "ExtractSettings", "ExtractReport", "extract_images", "locate_images", "load_backbone"]

DEFAULT_BACKBONE = "dedn.nn.resnet:resnet101_trunk"
DECODE_MEMORY = 256 * 2**20  # what a decoding task reserves: a batch of decoded full-size images and their crops
BLOCK_BYTES = 64 * 2**20  # stored feature bytes per block: the unit of resume, and what the driver holds at most


@dataclass(frozen=True)
class ExtractSettings:
    """How to extract: the backbone, its input size and the Ray resources it runs on."""

    size: int | None = None  # crop side w; None: the authors' per dataset (images.DEFAULT_SIZE)
    backbone: str = DEFAULT_BACKBONE  # "module:callable"; callable(weights=...) -> nn.Module, (B,3,w,w) -> (B,C,H,W)
    weights: str | None = None  # the backbone's weights file (None: its default, torch's hub cache for ResNet-101)
    precision: str = "fp32"  # or "bf16" (autocast); the authors used fp32
    batch_size: int = 32  # images per backbone call
    actors: int = 1  # backbone actors
    gpus_per_actor: float | None = None  # None: 1 when the cluster has a GPU, else 0 (CPU actors)
    cpus_per_actor: float = 1.0
    decode_batch: int = 16  # images per decoding task
    strip_prefix: str | None = None  # None: found from the image root
    skip_bad: bool = False

    def check(self) -> None:
        for key, value, ok, want in (
            ("size", self.size, self.size is None or self.size >= 32, "an input side of at least 32 pixels"),
            ("precision", self.precision, self.precision in ("fp32", "bf16"), "fp32 or bf16"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "a positive image count"),
            ("actors", self.actors, self.actors >= 1, "at least one backbone actor"),
            ("gpus_per_actor", self.gpus_per_actor, self.gpus_per_actor is None or self.gpus_per_actor >= 0,
             "a GPU count >= 0 (fractions share a GPU)"),
            ("cpus_per_actor", self.cpus_per_actor, self.cpus_per_actor > 0, "a positive CPU count"),
            ("decode_batch", self.decode_batch, self.decode_batch >= 1, "a positive image count"),
            ("backbone", self.backbone, self.backbone.count(":") == 1, "module:callable"),
        ):
            if not ok:
                raise ConfigError(key, want, value, source="from-images")


@dataclass
class ExtractReport:
    out: Path
    stripped_prefix: str
    feature_shape: tuple[int, int, int]
    blocks: int
    reused_blocks: int  # whole blocks of an earlier run, checksums verified
    computed_images: int  # images that went through the backbone in this run
    skipped: dict[int, str] = field(default_factory=dict)  # res101 index -> "path: reason"
    up_to_date: bool = False  # the output was already made from the same inputs and settings: nothing done

    def summary(self) -> str:
        if self.up_to_date:
            return (f"{self.out} is up to date: made from the same images, files, backbone and settings "
                    f"(its checksums verified); nothing computed")
        lines = [f"image paths: stripped {self.stripped_prefix!r}" if self.stripped_prefix else
                 "image paths: used as they are (nothing stripped)",
                 f"features: {list(self.feature_shape)} per image; {self.computed_images} images through the backbone, "
                 f"{self.reused_blocks} of {self.blocks} blocks reused from an earlier run (checksums verified)"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} bad images, listed in {skipped_list(self.out)}")
        return "\n".join(lines)


def skipped_list(out: Path) -> Path:
    return out.parent / f"{out.name}.skipped.tsv"


def extraction_record(out: Path) -> Path:
    """What a finished extraction was made from (inputs' checksums, backbone, settings), beside the dataset."""
    return out.parent / f"{out.name}.extract.json"


# ---------------------------------------------------------------- images and backbone

def locate_images(image_root: Path, image_files: np.ndarray, res101: Path,
                  strip_prefix: str | None = None) -> tuple[list[str], str]:
    """Paths relative to `image_root`, and the prefix stripped from res101.mat's `image_files`.

    Without `strip_prefix`, the prefix is the shortest leading run of path components after which
    one of the first images exists under the root (the authors cut a dataset-specific number).
    """
    files = [str(f) for f in image_files]
    if strip_prefix is None:
        strip_prefix = _find_prefix(image_root, files)
    rel = []
    for i, f in enumerate(files):
        if not f.startswith(strip_prefix):
            raise DatasetError(res101, "image_files", f"paths starting with {strip_prefix!r} (the prefix stripped "
                               "from the first images)", f"{f!r} (image {i + 1}, 1-based)")
        rel.append(f[len(strip_prefix):])
    return rel, strip_prefix


def _find_prefix(root: Path, files: list[str], probe: int = 20) -> str:
    if not root.is_dir():
        raise DatasetError(root, "image root", "a folder of images", "no such folder")
    for f in files[:probe]:
        parts = f.split("/")
        for k in range(len(parts)):
            tail = "/".join(parts[k:])
            if tail and (root / tail).is_file():
                return "/".join(parts[:k]) + ("/" if k else "")
    raise DatasetError(root, "image root", f"a folder holding the first images of res101.mat or a tail of their "
                       f"paths (e.g. {files[0]!r})", "none of them there")


def load_backbone(spec: str, weights: str | None = None):
    """`module:callable` called as callable(weights=...) (or with no argument when `weights` is None and it
    takes none); returns the network in eval mode on CPU."""
    import torch  # heavy: the driver builds the network once to read its output shape

    module_name, _, attr = spec.partition(":")
    try:
        factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError("backbone", "module:callable importable here and on the Ray workers", spec,
                          source=f"from-images ({type(e).__name__}: {e})") from None
    takes_weights = "weights" in inspect.signature(factory).parameters
    if weights is not None and not takes_weights:
        raise ConfigError("weights", f"no --weights: {spec} takes no weights argument", weights, source="from-images")
    model = factory(weights=weights) if takes_weights else factory()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError("backbone", "a callable returning a torch.nn.Module", f"{spec} -> {type(model).__name__}",
                          source="from-images")
    return model.eval()


def feature_shape(model, size: int) -> tuple[int, int, int]:
    """The backbone's output shape (C, H, W) for one size x size image, read from a forward pass."""
    import torch

    with torch.inference_mode():
        out = model(torch.zeros(1, 3, size, size))
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or not out.is_floating_point():
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError("backbone", "a network mapping (B, 3, w, w) to float (B, C, H, W) feature maps", found,
                          source="from-images")
    return tuple(int(x) for x in out.shape[1:])  # type: ignore[return-value]


# ---------------------------------------------------------------- the Ray Data stages

def _decode(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A decoding task: image files -> uint8 crops; a bad image becomes a zero crop and its error."""
    crops = np.zeros((len(batch["id"]), size, size, 3), np.uint8)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            crops[i] = load_crop(str(path), size)
            errors.append("")
        except DatasetError as e:
            errors.append(json.dumps([e.file, e.field, e.expected, str(e.found)]))
    return {"id": batch["id"], "crop": crops, "error": np.array(errors, dtype=object)}


class _Backbone:
    """A backbone actor: normalises the crops (the authors' ToTensor + Normalize) and runs the network."""

    def __init__(self, spec: str, weights: str | None, precision: str):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_backbone(spec, weights).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)  # cuDNN's fast layout for convolutions
        self.model = model
        self.dtype = torch.bfloat16 if precision == "bf16" else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(normalize(batch["crop"])).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None):
            out = self.model(x).float()
        return {"id": batch["id"], "features": out.cpu().numpy(), "error": batch["error"]}


def _image_error(text: str) -> DatasetError:
    file, fld, expected, found = json.loads(text)
    return DatasetError(file, fld, expected, found)


# ---------------------------------------------------------------- blocks: the unit of resume

class _Blocks:
    """The work folder: blocks of consecutive images (res101 order), each an .npz and its sha256."""

    def __init__(self, folder: Path, identity: dict[str, Any], overwrite: bool):
        self.folder = folder
        record = folder / "identity.json"
        if folder.exists() and overwrite:
            shutil.rmtree(folder)
        if record.is_file():
            old = json.loads(record.read_text())
            if old != identity:
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise DatasetError(folder, "unfinished extraction", "one of the same inputs and settings, to resume "
                                   "(or --overwrite to discard it)", f"one that differs in {diff}")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            write_text(record, json.dumps(identity, indent=1, sort_keys=True))

    def _paths(self, k: int) -> tuple[Path, Path]:
        return self.folder / f"block-{k:05d}.npz", self.folder / f"block-{k:05d}.sha256"

    def whole(self, k: int) -> bool:
        data, digest = self._paths(k)
        return data.is_file() and digest.is_file() and sha256_file(data) == digest.read_text().strip()

    def write(self, k: int, ids: np.ndarray, features: np.ndarray, skipped: dict[int, str]) -> None:
        buf = io.BytesIO()
        np.savez(buf, ids=ids, features=features, skipped_ids=np.array(sorted(skipped), np.int64),
                 skipped_why=np.array([skipped[i] for i in sorted(skipped)], dtype=str))
        data, digest = self._paths(k)
        digest.unlink(missing_ok=True)  # a block without its digest is not whole, whatever happens next
        write_bytes(data, buf.getvalue(), fsync=True)
        write_text(digest, sha256_file(data))

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        with np.load(self._paths(k)[0]) as z:
            return z["ids"], z["features"], dict(zip(z["skipped_ids"].tolist(), z["skipped_why"].tolist()))


def _image_stats(images: Path, files: list[str]) -> str:
    """A digest of every image's size and modification time: an image replaced since is noticed (the
    blocks' identity leaves it out, so that fixing a bad image and re-running resumes)."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = (images / f).stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
        except OSError:
            h.update(b"missing\0")
    return h.hexdigest()


def _sha256_strings(values: list[str]) -> str:
    h = hashlib.sha256()
    for v in values:
        h.update(v.encode())
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------- the job

def extract_images(images: str | Path, res101: str | Path, att_splits: str | Path, word_vectors: str | Path,
                   name: str, out: str | Path, settings: ExtractSettings = ExtractSettings(), *,
                   attribute_dir: str | Path | None = None, storage_dtype: str = "float16", seed: int = 0,
                   overwrite: bool = False, progress: bool = True, shard_bytes: int | None = None,
                   block_images: int | None = None, address: str | None = None) -> ExtractReport:
    """Extract backbone features of every image of res101.mat and write the dataset directory `out`.

    Every input file is read and checked before Ray starts (`address`: the cluster to join, as
    `ray_cluster.init_ray` finds it; else an embedded Ray), and Ray starts only when some block
    is still to compute; a block of an earlier run with the same identity
    (inputs, backbone, weights, size, dtype, precision) is reused when its checksum holds.
    """
    settings.check()
    images, res101, out = Path(images), Path(res101), Path(out)
    arrays = image_labels_arrays(res101, att_splits)
    if "image_files" not in arrays:
        raise DatasetError(res101, "image_files", "the image paths (N x 1 cell), as xlsa17's res101.mat has them",
                           "no image_files")
    labels = arrays["labels"]
    src = load_xlsa17(name, att_splits, word_vectors, attribute_dir).with_labels(labels, str(res101), seed)
    splits = make_splits(labels, src.locs, seed, src.origin)
    class_side = build_class_side(src)
    files, prefix = locate_images(images, arrays["image_files"], res101, settings.strip_prefix)
    size = settings.size or DEFAULT_SIZE.get(name.upper())
    if size is None:
        raise ConfigError("size", f"--size for a dataset other than {sorted(DEFAULT_SIZE)}", None, source="from-images")
    model = load_backbone(settings.backbone, settings.weights)
    shape = feature_shape(model, size)
    del model
    n = labels.size
    if block_images is not None and block_images < 1:
        raise ConfigError("block_images", "a positive image count", block_images, source="from-images")
    per_block = block_images or max(1, BLOCK_BYTES // (int(np.prod(shape)) * np.dtype(storage_dtype).itemsize))
    num_blocks = -(-n // per_block)
    identity = {
        "images": _sha256_strings(files), "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
        "backbone": settings.backbone,
        "weights": sha256_file(Path(settings.weights)) if settings.weights else None,
        "size": size, "precision": settings.precision, "storage_dtype": storage_dtype,
        "feature_shape": list(shape), "block_images": per_block,
    }
    made = {**{k: v for k, v in identity.items() if k != "block_images"}, "name": name, "seed": seed,
            "att_splits": sha256_file(Path(att_splits)), "word_vectors": sha256_file(Path(word_vectors)),
            "image_stats": _image_stats(images, files)}
    record = extraction_record(out)
    if out.exists() and not overwrite:
        if record.is_file() and json.loads(record.read_text()) == made and out.joinpath("dataset.json").is_file():
            from dedn.data.dataset import FeatureDataset  # the whole check: manifest, class side, shard checksums

            FeatureDataset.open(out)
            kept = skipped_list(out)
            skipped = ({int(ln.split("\t")[0]) - 1: ln.split("\t", 2)[2] for ln in kept.read_text().splitlines()}
                       if kept.is_file() else {})
            return ExtractReport(out, prefix, shape, num_blocks, num_blocks, 0, skipped, up_to_date=True)
        made_by = " made from other inputs or settings" if record.is_file() else ""
        raise DatasetError(out, "root", "a path that does not exist yet (or --overwrite)", f"an existing path{made_by}")
    blocks = _Blocks(out.parent / f".{out.name}.extract", identity, overwrite)
    todo = [k for k in range(num_blocks) if not blocks.whole(k)]
    missing: dict[int, str] = {}
    for k in todo:
        for i in range(k * per_block, min(n, (k + 1) * per_block)):
            if not (images / files[i]).is_file():
                missing[i] = f"{images / files[i]}: no such file"
    if missing and not settings.skip_bad:
        first = min(missing)
        more = f" ({len(missing) - 1} more missing; --skip-bad leaves them out)" if len(missing) > 1 else ""
        raise DatasetError(images / files[first], "image", f"image {first + 1} of {res101} (1-based)",
                           f"no such file{more}")
    computed = _run_pipeline(images, files, blocks, todo, per_block, n, missing, size, shape, settings,
                             storage_dtype, progress, address) if todo else 0

    skipped: dict[int, str] = {}

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for k in range(num_blocks):
            ids, feats, bad = blocks.read(k)
            skipped.update(bad)
            yield ids, labels[ids], feats

    for k in range(num_blocks):  # the skipped set before writing: a split must not wait for a skipped image
        with np.load(blocks._paths(k)[0]) as z:
            skipped.update(zip(z["skipped_ids"].tolist(), z["skipped_why"].tolist()))
    write_dataset(out, class_side, splits, chunks(), feature_shape=shape, storage_dtype=storage_dtype, source="images",
                  overwrite=overwrite, progress=progress, shard_bytes=shard_bytes, total=n - len(skipped),
                  skipped=np.array(sorted(skipped), np.int64))
    listing = skipped_list(out)
    if skipped:
        write_text(listing, "".join(f"{i + 1}\t{files[i]}\t{why}\n" for i, why in sorted(skipped.items())))
    else:
        listing.unlink(missing_ok=True)
    write_text(record, json.dumps(made, indent=1, sort_keys=True))  # a re-run with the same of all this: up to date
    shutil.rmtree(blocks.folder, ignore_errors=True)
    return ExtractReport(out, prefix, shape, num_blocks, num_blocks - len(todo), computed, skipped)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def _run_pipeline(images: Path, files: list[str], blocks: _Blocks, todo: list[int], per_block: int, n: int,
                  missing: dict[int, str], size: int, shape: tuple[int, int, int], settings: ExtractSettings,
                  storage_dtype: str, progress: bool, address: str | None) -> int:
    """Stream the images of the blocks in `todo` through decode tasks and backbone actors; write each block
    as it completes. Returns the number of images the backbone saw."""
    import ray

    from dedn.training.ray_cluster import init_ray  # Ray on use: a fully resumed run never starts it

    init_ray(address=address)
    gpus = settings.gpus_per_actor
    have = _cluster_gpus()
    if gpus is None:
        gpus = 1.0 if have >= 1 else 0.0
    if gpus > have:
        raise ConfigError("gpus_per_actor", f"at most the cluster's GPUs ({have:g})", gpus, source="from-images")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # blocks are consecutive images: keep res101 order
    ctx.enable_progress_bars = False  # one bar, ours, in images/s
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its start-up and progress-bar notes
    ids = [i for k in todo for i in range(k * per_block, min(n, (k + 1) * per_block)) if i not in missing]
    expected = {k: min(n, (k + 1) * per_block) - k * per_block for k in todo}
    pending: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in todo}
    bad: dict[int, dict[int, str]] = {k: {} for k in todo}
    got = {k: 0 for k in todo}
    for i, why in missing.items():
        bad[i // per_block][i] = why
        got[i // per_block] += 1
    store = np.dtype(storage_dtype)

    def finish(k: int) -> None:
        parts = pending.pop(k)
        b_ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        feats = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, *shape), store)
        order = np.argsort(b_ids, kind="stable")
        blocks.write(k, b_ids[order], feats[order], bad.pop(k))

    for k in [k for k in todo if got[k] == expected[k]]:  # blocks of missing images only
        finish(k)
    if not ids:
        return 0
    items = [{"id": i, "path": str(images / files[i])} for i in ids]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // settings.decode_batch)))
    # Decoding in CPU tasks of its own (Ray Data spreads tasks over the cluster). With remote arguments equal to the actors'
    # Ray Data fuses it into them (one actor then decodes serially, as on a 1-CPU-actor cluster it did);
    # the memory a decoding task asks for (a batch of full-size decoded images) keeps them apart.
    ds = ds.map_batches(_decode, fn_kwargs={"size": size}, batch_size=settings.decode_batch, batch_format="numpy",
                        num_cpus=1, memory=DECODE_MEMORY)
    ds = ds.map_batches(_Backbone, fn_constructor_kwargs={"spec": settings.backbone, "weights": settings.weights,
                                                          "precision": settings.precision},
                        batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=settings.actors),
                        num_gpus=gpus,
                        num_cpus=settings.cpus_per_actor, batch_format="numpy")
    bar = tqdm(total=len(ids), unit="img", desc="features", disable=not progress, smoothing=0.1)
    seen = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            b_ids = np.asarray(batch["id"], np.int64)
            feats = np.asarray(batch["features"])
            if feats.shape[1:] != shape:
                raise DatasetError(settings.backbone, "features", f"shape {list(shape)} per image (the probe's)",
                                   list(feats.shape[1:]))
            errors = np.asarray(batch["error"])
            stop = None
            for j in np.flatnonzero([bool(e) for e in errors]).tolist():
                err = _image_error(errors[j])
                if not settings.skip_bad:
                    stop = err  # the rows before it still complete their blocks: a re-run resumes after them
                    b_ids, feats, errors = b_ids[:j], feats[:j], errors[:j]
                    break
                bad[int(b_ids[j]) // per_block][int(b_ids[j])] = str(err)
            ok = np.array([not e for e in errors], bool)
            finite = np.isfinite(feats.reshape(len(b_ids), -1)).all(axis=1)
            if not finite[ok].all():
                i = int(b_ids[ok][~finite[ok]][0])
                raise DatasetError(images / files[i], "features", "finite backbone output", "NaN/inf")
            with np.errstate(over="ignore"):
                stored = feats[ok].astype(store)
            if not np.isfinite(stored).all():
                raise DatasetError(images / files[int(b_ids[ok][0])], "features",
                                   f"values representable in {storage_dtype}", "overflow to inf")
            for k in np.unique(b_ids // per_block).tolist():
                sel = (b_ids // per_block == k)
                pending[k].append((b_ids[sel & ok], stored[sel[ok]]))
                got[k] += int(sel.sum())
                if got[k] == expected[k]:
                    finish(k)
            if stop is not None:
                raise stop
            seen += len(b_ids)
            bar.update(len(b_ids))
    finally:
        bar.close()
    if pending:
        raise DatasetError(blocks.folder, "blocks", f"all of blocks {sorted(pending)} complete", "images missing "
                           "from the pipeline's output")
    return seen
