"""Attention heat maps of the two experts, as in Figure 4 of Rao et al. (IJCAI 2024).

For one image and a few attributes: row 1 is cExp's region attention, row 2 fExp's, one column
per attribute (titled with its name), one shared colour bar in "attention weight". The region
attention of attribute d is the softmax over the R = H x W regions of eq. 2, so each panel sums
to 1. With an image file the map is stretched over the image (bilinear) and blended on top;
without one the H x W grid itself is drawn, one cell per region.

Matplotlib with the headless Agg backend; PNGs are written to a temp name, then renamed.
No MLflow or Ray here (the job logs the PNGs).
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from dedn.atomic import save_figure
from dedn.checkpoint import load_checkpoint
from dedn.config import RunConfig
from dedn.data.reader import ShardReader
from dedn.errors import ConfigError, DatasetError
from dedn.families.capabilities import HasAttentionMaps
from dedn.inference import predictor_from_files
from dedn.training.driver import STATE_FILE
from dedn.training.loop import model_from_state

__all__ = [
    "SampleRows", "resolve_attributes", "parse_indices", "read_samples", "attention_maps",
    "heatmap_figure", "save_figure", "load_image", "image_files", "image_path", "load_model_from_checkpoint",
]

COLORBAR_LABEL = "attention weight"


# ---- inputs -------------------------------------------------------------------------------
def resolve_attributes(spec: Sequence[str | int], attribute_names: Sequence[str]) -> list[int]:
    """Attribute ids from names or 0-based ids; unknown names and ids raise ConfigError naming them.

    A name matches exactly, else case-insensitively, else as a unique case-insensitive substring
    (e.g. "belly_color::grey" for CUB's "has_belly_color::grey").
    """
    names = list(map(str, attribute_names))
    lower = [n.lower() for n in names]
    out: list[int] = []
    for item in spec:
        s = str(item).strip()
        if not s:
            continue
        if s in names:
            out.append(names.index(s))
        elif s.lower() in lower:
            out.append(lower.index(s.lower()))
        elif s.lstrip("-").isdigit():
            i = int(s)
            if not 0 <= i < len(names):
                raise ConfigError("heatmap.attributes", f"attribute ids in [0, {len(names)})", i, "arguments")
            out.append(i)
        else:
            hits = [j for j, n in enumerate(lower) if s.lower() in n]
            if len(hits) != 1:
                shown = ", ".join(names[j] for j in hits[:5]) if hits else "no attribute"
                raise ConfigError("heatmap.attributes", "an attribute name, a unique part of one, or an id", f"{s!r} ({shown})",
                                  "arguments")
            out.append(hits[0])
    if not out:
        raise ConfigError("heatmap.attributes", "at least one attribute", list(spec), "arguments")
    return out


def parse_indices(text: str, key: str = "heatmap.samples") -> list[int]:
    """'0,5' -> [0, 5]; row positions must be non-negative integers."""
    try:
        idx = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(key, "comma-separated row positions, e.g. 0,5", text, "arguments") from None
    if not idx or min(idx) < 0:
        raise ConfigError(key, "comma-separated row positions >= 0", text, "arguments")
    return idx


@dataclass
class SampleRows:
    """Rows picked from a split: features (N, C, H, W) float32, labels (N,), sample ids (N,), positions (N,)."""

    features: torch.Tensor
    labels: np.ndarray
    sample_ids: np.ndarray
    positions: list[int]


def read_samples(dataset: Any, split: str, positions: Sequence[int]) -> SampleRows:
    """The rows at `positions` (0-based, in the split's stored order) of a FeatureDataset split."""
    n = dataset.split(split).num_rows
    bad = [p for p in positions if not 0 <= p < n]
    if bad:
        raise ConfigError("heatmap.samples", f"row positions in [0, {n}) of split {split}", bad, "arguments")
    want = set(positions)
    found: dict[int, tuple[torch.Tensor, int, int]] = {}
    seen = 0
    for batch in ShardReader(dataset, split, batch_size=256, shuffle=False):
        for j in range(batch.labels.shape[0]):
            if seen + j in want:
                found[seen + j] = (batch.features[j], int(batch.labels[j]), int(batch.sample_ids[j]))
        seen += int(batch.labels.shape[0])
        if len(found) == len(want):
            break
    rows = [found[p] for p in positions]
    return SampleRows(torch.stack([r[0] for r in rows]).float(), np.array([r[1] for r in rows]),
                      np.array([r[2] for r in rows]), list(positions))


# ---- attention ----------------------------------------------------------------------------
@torch.no_grad()
def attention_maps(model: nn.Module, features: torch.Tensor, attribute_ids: Sequence[int], family: Any) -> dict[str, np.ndarray]:
    """Region attention for the chosen attributes, one entry per map the family names
    (`HasAttentionMaps.attention_maps`; DEDN: "cExp", "fExp"): {name: (N, A, H, W) float32}.

    features (N, C, H, W). Each map is (N, D, R) in the original attribute order with R = H*W in
    row-major (H, W) order (the features' flatten order); an ablated expert is absent.
    """
    if not isinstance(family, HasAttentionMaps):  # none defined (D3GZSL): say so before a forward
        raise ConfigError("model.name", "a model family with attention maps", family.name, "dedn.analysis.heatmap")
    net = getattr(model, "module", model)
    _, h, w = net.feature_shape
    was_training = net.training
    net.eval()
    try:
        out = net(features.float(), return_attention=True)
    finally:
        net.train(was_training)
    ids = torch.as_tensor(list(attribute_ids), dtype=torch.long)
    maps: dict[str, np.ndarray] = {}
    for label, att in family.attention_maps(out).items():
        att = att.float()[:, ids.to(att.device)]  # (N, A, R)
        maps[label] = att.reshape(att.shape[0], att.shape[1], h, w).cpu().numpy()  # (N, A, H, W)
    if not maps:
        raise ConfigError("model.name", "a model family with attention maps", family.name, "dedn.analysis.heatmap")
    return maps


# ---- images -------------------------------------------------------------------------------
def image_files(explicit: str | os.PathLike[str] | None) -> np.ndarray | None:
    """Relative image paths indexed by sample id, from `explicit` (an npz with `image_files`, e.g.
    xlsa17's image_labels.npz, or a text file with one path per line); None without one.

    Dataset directories hold features only, no image list, so the list always comes from the user.
    """
    if explicit:
        p = Path(explicit)
        try:
            if p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    if "image_files" not in z.files:
                        raise DatasetError(p, "image_files", "an array of image paths", f"arrays {z.files}")
                    return np.asarray(z["image_files"]).astype(str)
            return np.array([ln.strip() for ln in p.read_text().splitlines()], dtype=str)
        except (OSError, ValueError) as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(p, "file", "an npz with image_files or a text file of paths", f"{type(e).__name__}: {e}") from None
    return None


def image_path(files: np.ndarray | None, sample_id: int, image_root: str | os.PathLike[str] | None) -> Path | None:
    """The image file of a sample (image_root / files[sample_id]); None without a root or a list.

    xlsa17 lists start with the dataset's folder (e.g. "CUB_200_2011/images/..."); when that
    path does not exist under image_root, the part after the first folder is tried as well.
    Raises DatasetError when the list names a file that is not there.
    """
    if files is None or image_root is None or str(image_root) == "":
        return None
    if not 0 <= sample_id < len(files):
        raise DatasetError("image_files", f"sample {sample_id}", f"an index in [0, {len(files)})", sample_id)
    rel = Path(str(files[sample_id]))
    candidates = [Path(image_root) / rel]
    if len(rel.parts) > 1:
        candidates.append(Path(image_root) / Path(*rel.parts[1:]))
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError(candidates[0], "image", f"the image of sample {sample_id} under the image root", "no such file")


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image as (h, w, 3|4) array for imshow (JPEG and PNG through matplotlib/Pillow)."""
    import matplotlib.image as mpimg  # matplotlib (heavy) only when drawing

    try:
        return np.asarray(mpimg.imread(str(path)))
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(path, "image", "a readable image (PNG/JPEG)", f"{type(e).__name__}: {e}") from None


# ---- the figure ---------------------------------------------------------------------------
def heatmap_figure(maps: Mapping[str, np.ndarray], attribute_names: Sequence[str], *, image: np.ndarray | None = None,
                   title: str = "", semi_synthetic: bool = False, cmap: str | None = None, alpha: float = 0.5) -> Any:
    """The Figure 4 layout for ONE image: rows = the family's maps (DEDN: "cExp", "fExp"), columns = attributes.

    maps: {name: (A, H, W)} attention weights, rows in their order; attribute_names: A column titles.
    With `image` (h, w[, 3]) each map is drawn over it with extent = the image, otherwise on
    the H x W grid with one cell per region. Each heat map's AxesImage holds the (H, W) array
    itself (gid "attention:<expert>:<column>"). One colour scale shared by all panels, from the
    smallest to the largest weight shown; cmap defaults to jet over images, viridis on the grid.
    Returns the matplotlib Figure (Agg).
    """
    import matplotlib  # heavy, and the backend is set here, not by an import: only when drawing

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    experts = list(maps)
    if not experts:
        raise ValueError("heatmap_figure: no attention maps")
    a = maps[experts[0]].shape[0]
    for e in experts:
        if maps[e].ndim != 3 or maps[e].shape[0] != len(attribute_names) or maps[e].shape != maps[experts[0]].shape:
            raise ValueError(f"heatmap_figure: {e} maps {maps[e].shape} do not match "
                             f"{len(attribute_names)} attributes / {maps[experts[0]].shape}")
    h, w = maps[experts[0]].shape[1:]
    # one scale for every panel, so colours compare across experts and attributes; from the
    # smallest to the largest weight shown (an untrained, near-uniform map then shows its
    # small differences, and the colour bar says how small they are)
    vmin = min(float(np.min(maps[e])) for e in experts)
    vmax = max(float(np.max(maps[e])) for e in experts)
    norm = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-6)
    cmap = cmap or ("jet" if image is not None else "viridis")
    aspect = (image.shape[0] / image.shape[1]) if image is not None else h / w
    panel = 2.4
    fig, axes = plt.subplots(len(experts), a, figsize=(panel * a + 1.5, panel * aspect * len(experts) + 1.0),
                             squeeze=False, constrained_layout=True)
    mappable = None
    for r, e in enumerate(experts):
        for c in range(a):
            ax = axes[r][c]
            att = np.asarray(maps[e][c], dtype=np.float32)  # (H, W)
            if image is not None:
                ih, iw = image.shape[:2]
                ax.imshow(image, extent=(0, iw, ih, 0))
                mappable = ax.imshow(att, cmap=cmap, norm=norm, alpha=alpha, interpolation="bilinear",
                                     extent=(0, iw, ih, 0))
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                mappable = ax.imshow(att, cmap=cmap, norm=norm, interpolation="nearest")
                ax.set_xticks(range(w))
                ax.set_yticks(range(h))
                ax.tick_params(labelsize=7)
                if r == len(experts) - 1:
                    ax.set_xlabel("grid column", fontsize=8)
            mappable.set_gid(f"attention:{e}:{c}")
            if r == 0:
                ax.set_title(_short(attribute_names[c]), fontsize=9)
            if c == 0:
                ax.set_ylabel(e + ("" if image is not None else "\ngrid row"), fontsize=10)
    assert mappable is not None
    # an opaque scale: the heat maps' own alpha (over an image) would wash out the colour bar
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.85, label=COLORBAR_LABEL)
    full_title = (title + ("  [semi-synthetic data]" if semi_synthetic else "")).strip()
    if full_title:
        # wrapped to the figure's width: with one or two attributes a long title would be cut at both edges
        chars = max(24, int(fig.get_figwidth() * 72 / (10 * 0.6)))  # 10 pt text is about 6 pt per character
        fig.suptitle("\n".join(textwrap.wrap(full_title, chars, break_on_hyphens=False)), fontsize=10)
    return fig


def _short(name: str, limit: int = 34) -> str:
    """CUB names are long ('has_upper_tail_color::grey'): drop 'has_', keep the end when too long."""
    n = name[4:] if name.startswith("has_") else name
    return n if len(n) <= limit else "..." + n[-(limit - 3):]


# ---- models -------------------------------------------------------------------------------
def load_model_from_checkpoint(path: str | os.PathLike[str], dataset: Any) -> tuple[nn.Module, RunConfig]:
    """The network of a training checkpoint, on CPU, built on the dataset's class side.

    path: a training-loop checkpoint file (state.pt: {"model", "config", ...}), a Ray Train checkpoint
    folder holding state.pt, or a folder of registry model files (weights.pt, config.yaml, ...).
    """
    p = Path(path)
    if p.is_dir() and (p / "weights.pt").is_file():
        pred = predictor_from_files(p)
        return pred.model, pred.cfg
    if p.is_dir():
        p = p / STATE_FILE
    if not p.is_file():
        raise DatasetError(p, "checkpoint", "a state.pt file or a checkpoint folder", "no such file")
    state = load_checkpoint(p)
    if "model" not in state or "config" not in state:
        raise DatasetError(p, "checkpoint", "a dict with 'model' and 'config'", f"keys {sorted(state)[:8]}")
    cfg = RunConfig.from_dict(state["config"], source=str(p))
    return model_from_state(cfg, dataset, state["model"], state.get("meta")).eval(), cfg
