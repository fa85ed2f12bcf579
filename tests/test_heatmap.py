"""Tests of dedn.analysis.heatmap and jobs/heatmap.py: attention selection and layout, the figure, the PNG, the job."""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from torch import nn

from dedn.analysis import heatmap
from dedn.config import build_config
from dedn.errors import ConfigError, DatasetError
from dedn.families import get_family
from toydata import TOY_SHAPE, load_job, toy_class_side, write_toy_dataset

DEDN_FAMILY = get_family("dedn")  # which maps a model has is the family's to say
NAMES = ("has_bill_shape::curved", "has_belly_color::grey", "has_belly_color::white", "leg_color::white")


def test_resolve_attributes_by_name_part_and_id():
    assert heatmap.resolve_attributes(["has_bill_shape::curved", "HAS_BELLY_COLOR::GREY", "leg_color", "2"], NAMES) == [0, 1, 3, 2]
    with pytest.raises(ConfigError, match="belly_color"):  # ambiguous part names its matches
        heatmap.resolve_attributes(["belly_color"], NAMES)
    with pytest.raises(ConfigError, match="wing"):
        heatmap.resolve_attributes(["wing"], NAMES)
    with pytest.raises(ConfigError, match="7"):
        heatmap.resolve_attributes(["7"], NAMES)
    assert heatmap.parse_indices("0, 5") == [0, 5]
    with pytest.raises(ConfigError, match="heatmap.samples"):
        heatmap.parse_indices("a,1")


# ---- attention maps: selection and the R -> (H, W) layout against a known tensor ------------
@dataclass
class _Ex:
    region_attention: torch.Tensor | None


@dataclass
class _Out:
    coarse: _Ex | None
    fine: _Ex | None


class _FakeNet(nn.Module):
    """Returns a known region attention (N, D, R): value = 1000 n + 100 d + r."""

    def __init__(self, d: int, h: int, w: int, fine: bool = True):
        super().__init__()
        self.feature_shape, self.d, self.fine_on = (2, h, w), d, fine

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> _Out:
        n = x.shape[0]
        h, w = self.feature_shape[1:]
        att = (1000 * torch.arange(n)[:, None, None] + 100 * torch.arange(self.d)[None, :, None]
               + torch.arange(h * w)[None, None, :]).float()  # (N, D, R)
        return _Out(_Ex(att), _Ex(att + 0.5) if self.fine_on else None)


def test_attention_maps_pick_attributes_and_lay_regions_out_row_major():
    net = _FakeNet(d=5, h=3, w=4)
    maps = heatmap.attention_maps(net, torch.zeros(2, 2, 3, 4), [4, 1], DEDN_FAMILY)
    assert set(maps) == {"cExp", "fExp"} and maps["cExp"].shape == (2, 2, 3, 4)
    for n in range(2):
        for a, d in enumerate([4, 1]):
            for i in range(3):
                for j in range(4):
                    assert maps["cExp"][n, a, i, j] == 1000 * n + 100 * d + (i * 4 + j)
    np.testing.assert_array_equal(maps["fExp"], maps["cExp"] + 0.5)
    assert set(heatmap.attention_maps(_FakeNet(5, 3, 4, fine=False), torch.zeros(1, 2, 3, 4), [0], DEDN_FAMILY)) == {"cExp"}


def test_attention_maps_of_a_real_dedn_are_distributions():
    from dedn.training.loop import build_model

    model = build_model(build_config(None, {"dataset": "TOY"}), toy_class_side(), TOY_SHAPE)
    x = torch.rand(3, *TOY_SHAPE)
    maps = heatmap.attention_maps(model, x, [0, 7, 11], DEDN_FAMILY)
    for e in ("cExp", "fExp"):
        assert maps[e].shape == (3, 3, 3, 4)
        np.testing.assert_allclose(maps[e].sum(axis=(2, 3)), 1.0, rtol=1e-5)
    # against the paper's materialising form (impl="direct", one sub-network at a time): fExp's
    # attribute 7 lies in the "wing" cluster (ids 6-8), and the map must be that attribute's
    from dedn.families.dedn.model import DEDN

    cs = toy_class_side()
    direct = DEDN(model.cfg, word_vectors=torch.from_numpy(cs.word_vectors),
                  class_attributes=torch.from_numpy(cs.attributes), clusters=model.clusters, feature_shape=TOY_SHAPE,
                  impl="direct")
    direct.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = direct(x, return_attention=True)
    for e, ex in (("cExp", ref.coarse), ("fExp", ref.fine)):
        for a, d in enumerate([0, 7, 11]):
            np.testing.assert_allclose(maps[e][:, a], ex.region_attention[:, d].reshape(3, 3, 4).numpy(), rtol=1e-4,
                                       atol=1e-6)


# ---- the figure ---------------------------------------------------------------------------
def _attention_images(fig):
    return [im for ax in fig.axes for im in ax.get_images() if str(im.get_gid()).startswith("attention:")]


def test_grid_figure_layout_colorbar_and_png(tmp_path):
    rng = np.random.default_rng(0)
    maps = {e: rng.dirichlet(np.ones(12), size=3).reshape(3, 3, 4).astype(np.float32) for e in ("cExp", "fExp")}
    fig = heatmap.heatmap_figure(maps, NAMES[:3], title="CUB test_unseen row 0", semi_synthetic=True)
    ims = _attention_images(fig)
    assert len(ims) == 6
    assert all(im.get_array().shape == (3, 4) for im in ims)  # the H x W grid itself
    np.testing.assert_array_equal(np.asarray(ims[1].get_array()), maps["cExp"][1])  # row 1 cExp, column 2
    np.testing.assert_array_equal(np.asarray(ims[3].get_array()), maps["fExp"][0])  # row 2 fExp, column 1
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels[:3]] == ["bill_shape::curved", "belly_color::grey", "belly_color::white"]
    assert panels[0].get_ylabel().startswith("cExp") and panels[3].get_ylabel().startswith("fExp")
    cbar = [ax for ax in fig.axes if not ax.get_images()]
    assert len(cbar) == 1 and cbar[0].get_ylabel() == "attention weight"
    assert "semi-synthetic" in fig._suptitle.get_text()
    path = heatmap.save_figure(fig, tmp_path / "hm.png")
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert [p.name for p in tmp_path.iterdir()] == ["hm.png"]  # the temp file was renamed


def test_a_long_title_fits_a_one_attribute_figure():
    maps = {e: np.full((1, 3, 4), 1 / 12, np.float32) for e in ("cExp", "fExp")}
    title = "AWA2 test_unseen row 0 (sample 2000, class blue+whale), H x W feature grid"
    fig = heatmap.heatmap_figure(maps, NAMES[:1], title=title, semi_synthetic=True)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1  # not cut at either edge
    assert " ".join(fig._suptitle.get_text().split()) == title + " [semi-synthetic data]"  # wrapped, all of it


def test_overlay_on_an_image_keeps_the_grid_array():
    maps = {"cExp": np.full((2, 3, 4), 1 / 12, np.float32)}
    image = np.zeros((30, 40, 3), np.float32)
    fig = heatmap.heatmap_figure(maps, NAMES[:2], image=image)
    ims = _attention_images(fig)
    assert len(ims) == 2 and all(im.get_array().shape == (3, 4) for im in ims)
    assert all(im.get_extent() == [0, 40, 30, 0] for im in ims)  # stretched over the whole image
    assert all(len(ax.get_images()) == 2 for ax in fig.axes if ax.get_images())  # photo + heat map
    with pytest.raises(ValueError, match="attributes"):
        heatmap.heatmap_figure(maps, NAMES[:3])


def test_image_paths(tmp_path):
    ds_dir = tmp_path / "CUB_200_2011"
    (ds_dir / "images" / "001.Bird").mkdir(parents=True)
    mpimg.imsave(ds_dir / "images" / "001.Bird" / "a.png", np.zeros((8, 8, 3)))
    files = np.array(["CUB_200_2011/images/001.Bird/a.png", "CUB_200_2011/images/001.Bird/missing.png"])
    assert heatmap.image_path(files, 0, tmp_path) == ds_dir / "images" / "001.Bird" / "a.png"
    # the xlsa17 list starts with the dataset folder; a root that already is that folder works too
    assert heatmap.image_path(files, 0, ds_dir) == ds_dir / "images" / "001.Bird" / "a.png"
    with pytest.raises(DatasetError, match="missing.png"):
        heatmap.image_path(files, 1, tmp_path)
    assert heatmap.image_path(None, 0, tmp_path) is None and heatmap.image_path(files, 0, None) is None
    assert heatmap.load_image(ds_dir / "images" / "001.Bird" / "a.png").shape[:2] == (8, 8)


# ---- the job --------------------------------------------------------------------------------
def test_heatmap_job_from_a_checkpoint(tmp_path, capsys, monkeypatch):
    from dedn.checkpoint import save_checkpoint
    from dedn.data import FeatureDataset
    from dedn.training.loop import build_model

    data = write_toy_dataset(tmp_path / "toy")
    ds = FeatureDataset.open(data)
    cfg = build_config(None, {"dataset": "TOY", "data.path": str(data)})
    model = build_model(cfg, ds.class_side, ds.feature_shape)
    ckpt = save_checkpoint(tmp_path / "state.pt", {"model": model.state_dict(), "config": cfg.to_dict()})
    mpimg.imsave(tmp_path / "img.png", np.random.default_rng(0).random((24, 32, 3)))
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join("img.png" for _ in range(3000)))  # every sample id -> the one image

    job = load_job("heatmap")
    out = tmp_path / "out"
    assert job.main(["--checkpoint", str(ckpt), "--data", str(data), "--split", "test_unseen", "--samples", "0,4",
                     "--attributes", "attr0,attr7,11", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["heatmap_test_unseen_0_sample2000.png", "heatmap_test_unseen_4_sample2004.png"]
    assert mpimg.imread(pngs[0]).shape[1] > 400
    # overlaid on the image when its file is known: the figure is drawn with the image itself
    drawn_on = []
    real_figure = heatmap.heatmap_figure

    def recording_figure(maps, names, image=None, **kw):
        drawn_on.append(None if image is None else image.shape[:2])
        return real_figure(maps, names, image=image, **kw)

    monkeypatch.setattr(heatmap, "heatmap_figure", recording_figure)
    assert job.main(["--checkpoint", str(ckpt), "--data", str(data), "--samples", "1", "--attributes", "attr3",
                     "--image-root", str(tmp_path), "--image-files", str(listing), "--out", str(tmp_path / "ov")]) == 0
    assert len(list((tmp_path / "ov").glob("*.png"))) == 1
    assert drawn_on == [(24, 32)]  # the 24 x 32 image file, not the H x W grid
    assert job.main(["--checkpoint", str(ckpt), "--data", str(data), "--samples", "99", "--attributes", "attr3",
                     "--out", str(out)]) == 2
    assert "row positions in [0, 6)" in capsys.readouterr().err
    # without --out: a folder of this checkpoint's own under DEDN_HOME, never ./heatmaps
    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert job.main(["--checkpoint", str(ckpt), "--data", str(data), "--samples", "1", "--attributes", "attr3"]) == 0
    assert len(list((tmp_path / "home" / "heatmaps" / f"{tmp_path.name}-state.pt").glob("*.png"))) == 1
    assert not (tmp_path / "heatmaps").exists()
    assert job.default_out("models:/dedn-cub@champion") == tmp_path / "home" / "heatmaps" / "dedn-cub@champion"
