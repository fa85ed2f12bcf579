"""`prepare_data.py from-images`: images -> backbone features on Ray Data -> a dataset, resumable.

The end-to-end test runs on a small image tree for the real CUB class side (tests/imagetree.py)
with a tiny backbone (tests/backbones.py); the checks before Ray starts run without Ray.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cub_source
from toydata import load_job

pytestmark = pytest.mark.skipif(cub_source() is None, reason="needs ../shared/data/CUB (the real class side)")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    from imagetree import make_cub_image_tree

    return make_cub_image_tree(cub_source(), tmp_path_factory.mktemp("tree"))


def _argv(tree, out: Path, *extra: str) -> list[str]:
    return ["from-images", "--images", str(tree.images), "--res101", str(tree.res101), "--att-splits",
            str(tree.att_splits), "--word-vectors", str(tree.word_vectors), "--attribute-dir", str(cub_source()),
            "--name", "CUB", "--out", str(out), "--size", "32", "--backbone", "backbones:tiny", "--no-progress",
            *extra]


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _expected_features(tree, ids: np.ndarray) -> np.ndarray:
    """What the authors' logic gives for these images: crop, normalise, the backbone, one image at a time."""
    from backbones import tiny

    from dedn.data.images import load_image

    net = tiny().eval()
    with torch.no_grad():
        return np.stack([net(torch.from_numpy(load_image(tree.images / tree.files[i], 32))[None])[0].numpy()
                         for i in ids.tolist()])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_images_to_dataset_resume_skip_bad_train_and_predict(tree, tmp_path: Path, capsys, monkeypatch):
    """A corrupt JPEG stops the run naming it, after the blocks before it are whole; `--skip-bad` resumes
    them without recomputing, leaves that image out (listed) and shifts no other image's label or split;
    the features are the backbone's on the authors' preprocessing; the dataset trains and predicts."""
    from dedn.data import FeatureDataset
    from dedn.data.reader import ShardReader

    prepare = load_job("prepare_data").main
    bad_id = 430  # in the fifth block of 100 (blocks 0-3 are whole when it is met)
    bad_path = tree.images / tree.files[bad_id]
    good_bytes = bad_path.read_bytes()
    bad_path.write_bytes(good_bytes[: len(good_bytes) // 2])  # a truncated file: Pillow cannot decode it
    out = tmp_path / "cub-images"
    try:
        assert prepare(_argv(tree, out, "--block-images", "100", "--dtype", "float32")) == 2
        line = _one_error_line(capsys)
        assert str(bad_path) in line and "an image Pillow can decode" in line
        assert not out.exists()
        work = tmp_path / ".cub-images.extract"
        assert sorted(p.name for p in work.glob("block-*.sha256")) == [f"block-{k:05d}.sha256" for k in range(4)]

        assert prepare(_argv(tree, out, "--block-images", "100", "--dtype", "float32", "--skip-bad")) == 0
        printed = capsys.readouterr().out
        assert f"stripped '{tree.prefix}'" in printed
        assert "100 images through the backbone, 4 of 5 blocks reused" in printed  # only the fifth block again
        assert not work.exists()
        # the same command again: nothing to compute
        assert prepare(_argv(tree, out, "--block-images", "100", "--dtype", "float32", "--skip-bad")) == 0
        assert "is up to date" in capsys.readouterr().out and not work.exists()
    finally:
        bad_path.write_bytes(good_bytes)
    listing = (tmp_path / "cub-images.skipped.tsv").read_text().splitlines()
    assert len(listing) == 1 and listing[0].startswith(f"{bad_id + 1}\t{tree.files[bad_id]}\t")
    # the bad image replaced since (or other settings): the dataset is not up to date for that command
    assert prepare(_argv(tree, out, "--block-images", "100", "--dtype", "float32", "--skip-bad")) == 2
    assert "an existing path made from other inputs or settings" in _one_error_line(capsys)

    ds = FeatureDataset.open(out)
    assert ds.source == "images" and ds.feature_shape == (16, 2, 2)
    seen = {}
    for split in ("trainval", "test_seen", "test_unseen"):
        ids, labels, feats = [], [], []
        for b in ShardReader(ds, split, batch_size=64, shuffle=False, drop_last=False):
            ids.append(b.sample_ids.numpy())
            labels.append(b.labels.numpy())
            feats.append(b.features.numpy())
        ids, labels, feats = np.concatenate(ids), np.concatenate(labels), np.concatenate(feats)
        assert np.array_equal(labels, tree.labels[ids]), split  # each image keeps its own label
        np.testing.assert_allclose(feats, _expected_features(tree, ids), rtol=1e-5, atol=1e-6)
        seen[split] = set(ids.tolist())
    everything = set(range(len(tree.files)))
    assert seen["trainval"] | seen["test_seen"] | seen["test_unseen"] == everything - {bad_id}
    assert len(seen["trainval"]) + len(seen["test_seen"]) + len(seen["test_unseen"]) == len(tree.files) - 1

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_job("train").main(["--data", str(out), "--preset", "cub", "--name", "from-images", "--num-workers", "1",
                                   "epochs=2"]) == 0
    pred = tmp_path / "pred.parquet"
    assert load_job("predict").main(["--model", "models:/dedn-cub@champion", "--data", str(out), "--split",
                                     "test_unseen", "--out", str(pred)]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(pred).to_pydict()
    assert sorted(table["sample_id"]) == sorted(seen["test_unseen"])


def test_a_missing_image_is_named_before_ray_starts(tree, tmp_path: Path, capsys):
    """A missing file stops the job with one line naming it and its res101.mat position; Ray never starts
    (the autouse guard fails a test that starts Ray unmarked)."""
    prepare = load_job("prepare_data").main
    gone = tree.images / tree.files[7]
    kept = gone.read_bytes()
    gone.unlink()
    try:
        assert prepare(_argv(tree, tmp_path / "ds")) == 2
    finally:
        gone.write_bytes(kept)
    line = _one_error_line(capsys)
    assert str(gone) in line and "image 8 of" in line and "no such file" in line


def test_an_unfinished_extraction_resumes_only_with_the_same_settings(tree, tmp_path: Path, capsys):
    prepare = load_job("prepare_data").main
    gone = tree.images / tree.files[0]
    kept = gone.read_bytes()
    gone.unlink()
    try:
        assert prepare(_argv(tree, tmp_path / "ds", "--strip-prefix", tree.prefix)) == 2
        capsys.readouterr()
    finally:
        gone.write_bytes(kept)
    assert (tmp_path / ".ds.extract" / "identity.json").is_file()
    argv = _argv(tree, tmp_path / "ds")
    argv[argv.index("--size") + 1] = "48"
    assert prepare(argv) == 2
    line = _one_error_line(capsys)
    assert ".ds.extract" in line and "differs in ['size']" in line and "--overwrite" in line


@pytest.mark.parametrize("change, message", [
    (("--images", "EMPTY"), "none of them there"),
    (("--strip-prefix", "/elsewhere/"), "paths starting with '/elsewhere/'"),
    (("--backbone", "backbones:nothing_here"), "backbone: expected module:callable importable"),
    (("--backbone", "backbones:flat"), "(B, C, H, W) feature maps, found (1, 3)"),
    (("--batch-size", "0"), "batch_size: expected a positive image count"),
])
def test_bad_inputs_are_one_line_before_ray(tree, tmp_path: Path, capsys, change, message):
    prepare = load_job("prepare_data").main
    argv = _argv(tree, tmp_path / "ds")
    key, value = change
    if value == "EMPTY":
        value = str(tmp_path)
    if key in argv:
        argv[argv.index(key) + 1] = value
    else:
        argv += [key, value]
    assert prepare(argv) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "ds").exists()


def test_backbone_weights_are_loaded_and_checked(tmp_path: Path):
    from backbones import tiny

    from dedn.errors import ConfigError, DatasetError
    from dedn.extraction import load_backbone
    from dedn.nn.resnet import ResNetTrunk, resnet101_trunk

    state = {k: v + 1 for k, v in tiny().state_dict().items()}
    torch.save(state, tmp_path / "tiny.pt")
    loaded = load_backbone("backbones:tiny", str(tmp_path / "tiny.pt"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ConfigError, match="takes no weights argument"):
        load_backbone("backbones:flat", str(tmp_path / "tiny.pt"))

    trunk = ResNetTrunk()
    # torchvision's resnet101 has 44,549,160 parameters; less its classifier (2048 x 1000 + 1000): 42,500,160
    assert sum(p.numel() for p in trunk.parameters()) == 42_500_160
    with torch.no_grad():
        assert trunk.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
    full = dict(trunk.state_dict(), **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(full, tmp_path / "r101.pth")
    assert torch.equal(resnet101_trunk(tmp_path / "r101.pth").conv1.weight, trunk.conv1.weight)
    torch.save({**full, "layer5.0.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(DatasetError, match=r"odd.pth: backbone weights: expected torchvision resnet101 parameter names"):
        resnet101_trunk(tmp_path / "odd.pth")
    with pytest.raises(DatasetError, match="no such file"):
        resnet101_trunk(tmp_path / "none.pth")


def test_resnet_weights_from_the_hub_cache_or_a_clear_message(tmp_path: Path, monkeypatch):
    """Without --weights the file comes from torch's hub cache (torch downloads it there, hash checked);
    when that fails the message names the cache file, the URL and --weights."""
    import urllib.error

    from dedn.errors import DatasetError
    from dedn.nn import resnet

    def offline(*_a, **_k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(DatasetError) as e:
        resnet.resnet101_trunk()
    assert str(tmp_path / "checkpoints" / "resnet101-63fe2227.pth") in str(e.value)
    assert "--weights FILE" in str(e.value) and resnet.IMAGENET1K_V1_URL in str(e.value)


def test_the_trunk_equals_torchvisions_resnet101_without_its_last_two_layers():
    """Same weights, same input: our trunk and torchvision's `nn.Sequential(*list(resnet101().children())[:-2])`
    (the authors' extractor) give the same maps. Runs where torchvision imports (a GPU node)."""
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - the CPU build of torch: torchvision's operators do not load
        pytest.skip(f"torchvision does not import here ({type(e).__name__}); run on a GPU node")
    from dedn.nn.resnet import ResNetTrunk

    ref = torchvision.models.resnet101(weights=None).eval()
    ours = ResNetTrunk().eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    authors = torch.nn.Sequential(*list(ref.children())[:-2]).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), authors(x))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_asking_for_gpus_the_cluster_lacks_fails_at_once(tree, tmp_path: Path, capsys):
    prepare = load_job("prepare_data").main
    assert prepare(_argv(tree, tmp_path / "ds", "--gpus-per-actor", "1")) == 2
    assert "gpus_per_actor: expected at most the cluster's GPUs (0), found 1.0" in _one_error_line(capsys)


def test_the_extraction_equals_the_authors_logic_on_the_same_weights(tree):
    """The authors' preprocessing.py on torchvision (Resize, CenterCrop, ToTensor, Normalize; resnet101 less
    its last two layers) against ours (Pillow/numpy preprocessing, our trunk) on the same random weights:
    the maximum absolute difference of the maps. Runs where torchvision imports (a GPU node)."""
    try:
        import torchvision
        from torchvision import transforms
    except Exception as e:  # noqa: BLE001 - the CPU build of torch: torchvision's operators do not load
        pytest.skip(f"torchvision does not import here ({type(e).__name__}); run on a GPU node")
    from PIL import Image

    from dedn.data.images import IMAGENET_MEAN, IMAGENET_STD, load_image
    from dedn.nn.resnet import ResNetTrunk

    torch.manual_seed(0)
    ref = torchvision.models.resnet101(weights=None).eval()
    authors = torch.nn.Sequential(*list(ref.children())[:-2]).eval()
    ours = ResNetTrunk().eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    size = 64
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())])
    paths = [tree.images / f for f in tree.files[:10]]
    with torch.no_grad():
        a = authors(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths]))
        b = ours(torch.stack([torch.from_numpy(load_image(p, size)) for p in paths]))
    diff = (a - b).abs().max().item()
    print(f"max |authors - ours| over {len(paths)} images' maps: {diff:.3g}")
    assert diff == 0.0
