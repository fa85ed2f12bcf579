"""jobs/predict.py: score a split or a Parquet file of features with a registered model, with new classes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from toydata import load_job



def _predict_main():
    return load_job("predict").main


@pytest.fixture()
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dataset):
    """A DEDN (random init, calibration 0.5 so calibrated stacking matters) registered in a private store."""
    from dedn import tracking
    from dedn.tracking import registry
    from dedn.training import loop as engine
    from dedn.config import build_config

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config("cub", ["eval.calibration=0.5", f"data.path={tiny_dataset.root}"])
    model = engine.build_model(cfg, tiny_dataset.class_side, tiny_dataset.feature_shape).eval()
    run_id = tracking.start_training_run(cfg, name="t", semi_synthetic=True).run_id
    registry.register_model(model, cfg, tiny_dataset.class_side, run_id=run_id, val_metrics={"H": 0.1},
                            test_metrics={"H": 0.1}, semi_synthetic=tiny_dataset.semi_synthetic)
    return registry.load_predictor("models:/dedn-cub@champion")


@pytest.mark.timeout(120)
def test_predict_split_and_feature_file_agree_with_the_predictor(registered, tiny_dataset, tmp_path: Path):
    from dedn.data.reader import ShardReader

    main = _predict_main()
    out = tmp_path / "pred.parquet"
    assert main(["--data", str(tiny_dataset.root), "--split", "test_unseen", "--out", str(out)]) == 0
    t = pq.read_table(out).to_pydict()
    assert set(t) == {"sample_id", "class_id", "class_name", "kind", "score", "label"}
    batch = next(iter(ShardReader(tiny_dataset, "test_unseen", batch_size=10_000, shuffle=False)))
    want = registered.predict(batch.features)
    assert t["sample_id"] == batch.sample_ids.tolist() and t["class_id"] == want.tolist()
    names = tiny_dataset.class_side.class_names
    assert t["class_name"] == [names[i] for i in want]
    assert set(t["kind"]) <= {"seen", "unseen"}
    z = registered.calibrated(registered.scores(batch.features))
    np.testing.assert_allclose(t["score"], z.max(1), rtol=1e-6)
    # the same rows given as a Parquet file of features (a shard has the right columns)
    shard = tiny_dataset.root / tiny_dataset.split("test_unseen").shards[0].file
    out2 = tmp_path / "pred2.parquet"
    assert main(["--model", "models:/dedn-cub@champion", "--features", str(shard), "--out", str(out2)]) == 0
    t2 = pq.read_table(out2).to_pydict()
    assert sorted(zip(t2["sample_id"], t2["class_id"])) == sorted(zip(t["sample_id"], t["class_id"]))


@pytest.mark.timeout(120)
def test_extra_classes_can_win_without_retraining(registered, tiny_dataset, tmp_path: Path):
    from dedn.data.reader import ShardReader

    cs = tiny_dataset.class_side
    k, d = cs.num_classes, cs.num_attributes
    batch = next(iter(ShardReader(tiny_dataset, "test_unseen", batch_size=10_000, shuffle=False)))
    # scores are linear in a class's (normalised) attribute row: unit basis vectors as classes give each
    # sample's combined attribute embedding v (N, D); by Cauchy-Schwarz the class v_0 / |v_0| beats every
    # other class on sample 0
    v = registered.scores(batch.features, np.eye(d, dtype=np.float32))[:, k:]  # (N, D)
    best = v[0] / np.linalg.norm(v[0])
    rows = ["name," + ",".join(f"a{i}" for i in range(d)),
            "made_for_sample_0," + ",".join(repr(float(x)) for x in best),
            "copy_of_unseen," + ",".join(repr(float(x)) for x in cs.attributes_raw[int(cs.unseen_classes[0])])]
    csv = tmp_path / "new.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "pred.parquet"
    main = _predict_main()
    assert main(["--data", str(tiny_dataset.root), "--split", "test_unseen", "--extra-classes", str(csv),
                 "--out", str(out)]) == 0
    t = pq.read_table(out).to_pydict()
    assert len(t["sample_id"]) == tiny_dataset.split("test_unseen").num_rows
    assert (t["class_id"][0], t["class_name"][0], t["kind"][0]) == (k, "made_for_sample_0", "new")
    # the copy of an unseen class (id k + 1) ties with it everywhere; the known class, the lower id, wins
    assert k + 1 not in t["class_id"] and set(t["class_id"]) - set(range(k)) <= {k}
    # a bad file fails with exit code 2 and leaves no output behind
    bad = tmp_path / "bad.csv"
    bad.write_text("name,a1\nx,1\n")
    assert main(["--data", str(tiny_dataset.root), "--extra-classes", str(bad), "--out", str(tmp_path / "x.parquet")]) == 2
    assert not (tmp_path / "x.parquet").exists()


def _real_shaped_dataset(root: Path, class_side, shape=(32, 1, 1)):
    """The same dataset name and class side with real-shaped features (C x 1 x 1, not semi-synthetic): 1 row per class."""
    from dedn.data import SPLITS, DatasetWriter, FeatureDataset, split_classes

    rng = np.random.default_rng(3)
    with DatasetWriter(root, class_side=class_side, feature_shape=shape, semi_synthetic=False) as w:
        for i, split in enumerate(SPLITS):
            labels = split_classes(class_side, split)
            with w.split(split) as s:
                s.add(1000 * i + np.arange(labels.size, dtype=np.int64), labels,
                      rng.random((labels.size, *shape)).astype(np.float32) + 0.1)
    return FeatureDataset.open(root)


@pytest.mark.timeout(180)
def test_a_model_scores_only_data_of_its_identity(registered, tiny_dataset, tmp_path: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch):
    """Issue 27, item 2: a model on a dataset of other data fails before any feature is read, in one error line
    naming the model URI and its data, the dataset and its data."""
    import dedn.data.reader as reader
    from dedn import tracking
    from dedn.tracking import registry
    from dedn.training import loop as engine
    from dedn.config import build_config

    main = _predict_main()
    real = _real_shaped_dataset(tmp_path / "cub_real", tiny_dataset.class_side)
    want = registry.DataIdentity.of_dataset(tiny_dataset)
    assert registered.data_identity == want  # the identity travels with the model files
    have = registry.DataIdentity.of_dataset(real)

    class NoReads:
        def __init__(self, *a, **k):
            raise AssertionError("features were read before the identity check")

    out = tmp_path / "p.parquet"
    # only the reader is patched here: undo() would also drop the fixture's DEDN_HOME (the store)
    with monkeypatch.context() as patched:
        patched.setattr(reader, "ShardReader", NoReads)
        for model in (["--model", "models:/dedn-cub@champion"], []):  # explicit, and the default URI of the dataset
            capsys.readouterr()
            assert main(model + ["--data", str(real.root), "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.count("error:") == 1 and err.startswith(f"error: {real.root / 'dataset.json'}: data identity: "), err
            assert "model models:/dedn-cub@champion (version 1): " + str(want) in err, err
            assert f"found {have} (differs: feature shape [16, 2, 2] -> [32, 1, 1]; semi-synthetic -> real features)" in err
            assert "no version of dedn-cub was trained on this data" in err and "feature_shape: expected" not in err
            assert not out.exists()

    # the user's sequence: a model trained on the real-shaped data becomes champion and scores it;
    # the semi-synthetic data then needs its own version, which the error names
    cfg = build_config("cub", [f"data.path={real.root}"])
    model = engine.build_model(cfg, real.class_side, real.feature_shape).eval()
    run_id = tracking.start_training_run(cfg, name="real", semi_synthetic=False).run_id
    v = registry.register_model(model, cfg, real.class_side, run_id=run_id, val_metrics={"H": 0.01},
                                test_metrics={"H": 0.01}, semi_synthetic=False)
    assert v.champion and v.version == "2", v.champion_line()
    assert main(["--data", str(real.root), "--split", "test_unseen", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == real.split("test_unseen").num_rows
    capsys.readouterr()
    assert main(["--data", str(tiny_dataset.root), "--out", str(tmp_path / "q.parquet")]) == 2
    err = capsys.readouterr().err
    assert "models:/dedn-cub@champion (version 2)" in err and "versions trained on this data: models:/dedn-cub/1" in err, err
    assert main(["--model", "models:/dedn-cub/1", "--data", str(tiny_dataset.root), "--out", str(tmp_path / "q.parquet")]) == 0

    # a model logged before models recorded their data: checked on its feature shape only, with a note
    run_id = tracking.start_training_run(cfg, name="old", semi_synthetic=False).run_id
    registry.log_model(model, cfg, real.class_side, run_id=run_id, registered_model_name="dedn-cub")  # no identity
    capsys.readouterr()
    assert main(["--model", "models:/dedn-cub/3", "--data", str(real.root), "--out", str(tmp_path / "r.parquet")]) == 0
    assert "note: model models:/dedn-cub/3 records no data identity" in capsys.readouterr().err
    assert main(["--model", "models:/dedn-cub/3", "--data", str(tiny_dataset.root), "--out", str(tmp_path / "s.parquet")]) == 2
    assert "feature_shape: expected [32, 1, 1] (the model's), found [16, 2, 2]" in capsys.readouterr().err


# ---- bad inputs: one message naming the file and what was expected, exit code 2, nothing written --------
def _features_file(path: Path, rows: list, ids=None, dtype=None) -> Path:
    import pyarrow as pa

    ids = list(range(len(rows))) if ids is None else ids
    pq.write_table(pa.table({"sample_id": pa.array(ids), "features": pa.array(rows, type=dtype)}), path)
    return path


@pytest.mark.timeout(180)
def test_prediction_inputs_are_checked(registered, tiny_dataset, tmp_path: Path, capsys):
    import pyarrow as pa

    main = _predict_main()
    c, h, w = registered.feature_shape
    size = c * h * w
    good = np.random.default_rng(0).random((3, size)).astype(np.float32)
    out = tmp_path / "p.parquet"

    def fails(args: list[str], *needles: str) -> None:
        capsys.readouterr()
        assert main(args + (["--out", str(out)] if "--out" not in args else [])) == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, (n, err)
        assert not out.exists()

    model = ["--model", "models:/dedn-cub@champion"]
    # rows of different lengths whose total is right: refused, not silently shifted
    ragged = [good[0][: size - 1].tolist(), good[1].tolist() + [0.5], good[2].tolist()]
    f = _features_file(tmp_path / "ragged.parquet", ragged)
    fails(model + ["--features", str(f)], "ragged.parquet: features: expected", f"{size} values per row", "in row 0")
    # string columns
    f = _features_file(tmp_path / "strings.parquet", [["a"] * size])
    fails(model + ["--features", str(f)], "strings.parquet: features: expected a list of numbers")
    pq.write_table(pa.table({"sample_id": ["x"], "features": [good[0].tolist()]}), tmp_path / "sid.parquet")
    fails(model + ["--features", str(tmp_path / "sid.parquet")], "sid.parquet: sample_id: expected an integer column")
    # an all-zero feature map, and one too large to score
    f = _features_file(tmp_path / "zero.parquet", [good[0].tolist(), [0.0] * size], ids=[7, 8])
    fails(model + ["--features", str(f)], "zero.parquet: features: expected a feature map with non-zero values",
          "row 1 (sample_id 8)")
    f = _features_file(tmp_path / "huge.parquet", [(good[0] * 1e30).tolist()], ids=[5])
    fails(model + ["--features", str(f)], "huge.parquet: features: expected values the model can score", "sample_id 5")
    # extra classes: an all-zero attribute vector, a name the model already has
    d = registered.num_attributes
    head = "name," + ",".join(f"a{i}" for i in range(d))
    (tmp_path / "zero.csv").write_text(head + "\nnothing," + ",".join("0" for _ in range(d)) + "\n")
    fails(["--data", str(tiny_dataset.root), "--extra-classes", str(tmp_path / "zero.csv")],
          "zero.csv: attribute values: expected a non-zero attribute vector", "nothing")
    taken = registered.class_names[0]
    (tmp_path / "dup.csv").write_text(head + f"\n{taken}," + ",".join("1" for _ in range(d)) + "\n")
    fails(["--data", str(tiny_dataset.root), "--extra-classes", str(tmp_path / "dup.csv")],
          "dup.csv: name: expected names that are not already classes of the model", taken)
    # a model URI that does not exist; --out that is a directory
    fails(["--model", "models:/dedn-cub/99", "--data", str(tiny_dataset.root)], "model uri: expected a registered model",
          "models:/dedn-cub/99")
    capsys.readouterr()
    assert main(model + ["--data", str(tiny_dataset.root), "--out", str(tmp_path)]) == 2
    assert "--out: expected a Parquet file path" in capsys.readouterr().err
    # --out where it cannot be written (a file where a folder must be): one message, nothing written
    (tmp_path / "blocker").write_text("a file, not a folder")
    blocked = tmp_path / "blocker" / "sub" / "p.parquet"
    assert main(model + ["--data", str(tiny_dataset.root), "--out", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert f"{blocked}: cannot be written (Not a directory, errno 20: {tmp_path / 'blocker'}" in err, err
