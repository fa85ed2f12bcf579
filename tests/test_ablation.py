"""Tests of dedn.analysis.ablation and jobs/ablate.py: the settings really differ, the table, a reduced run on Ray Train."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from dedn.analysis import ablation
from dedn.config import build_config
from dedn.errors import ConfigError
from toydata import TOY_SHAPE, load_job, toy_class_side, write_toy_dataset


# ---- the settings -----------------------------------------------------------------------------
def test_settings_cover_table3_and_figure5_in_paper_order():
    assert [s.label for s in ablation.DEDN_TABLE3] == [
        "cExp w/o L_distill", "fExp w/o L_distill", "DEDN w/o L_distill", "DAN w/o CA", "DEDN w/o L_mal",
        "DAN w/o L_align", "DEDN (full)"]
    assert [s.key for s in ablation.DEDN_FIGURE5] == ["kmeans", "halved"]
    settings = ablation.family_settings("dedn")  # what dedn.analysis.ablation registers for DEDN
    assert tuple(settings.values()) == ablation.DEDN_SETTINGS
    for s in settings.values():  # each names every switch of Table 3, so the base config cannot leak in
        assert set(s.overrides) >= set(ablation.DEDN_FULL)
    assert settings["full"].overrides == ablation.DEDN_FULL
    # the cluster studies use the paper's cluster layout whatever the variant (SUN's reference slip is manual-only)
    assert settings["kmeans"].overrides["model.cluster_layout"] == settings["halved"].overrides["model.cluster_layout"] == "paper"
    # two settings never mean the same thing
    assert len({tuple(sorted(s.overrides.items())) for s in settings.values()}) == len(settings)


def test_select_settings_keys_groups_and_errors():
    assert [s.key for s in ablation.select_settings(["full", "no_ca"])] == ["no_ca", "full"]  # table order
    assert [s.key for s in ablation.select_settings(["figure5"])] == ["kmeans", "halved"]
    assert len(ablation.select_settings(None)) == 9
    with pytest.raises(ConfigError, match="nope"):
        ablation.select_settings(["full", "nope"])


def test_studies_are_registered_by_family_name_in_the_analysis():
    with pytest.raises(ConfigError, match=r"model.name: expected a model family with registered ablation settings \(dedn\), found 'msdn'"):
        ablation.family_settings("msdn")  # MSDN registers none
    with pytest.raises(ConfigError, match="model.name: expected one of"):
        ablation.family_settings("gpt")
    mine = ablation.Setting("no_distill", "MSDN w/o distillation", "table", (("loss.distill", False),),
                            full=(("loss.distill", True),))
    try:  # what a family's own module does (found through DEDN_FAMILY_MODULES)
        ablation.register_ablations("msdn", [mine])
        assert ablation.select_settings(model="msdn") == [mine] and ablation.switch_keys("msdn") == ("loss.distill",)
    finally:
        ablation._ABLATIONS.pop("msdn")


def test_user_overrides_of_switches_are_refused():
    ablation.check_base_overrides({"epochs": "1", "loss.beta": "0.01"})
    for key in ("distill", "model.experts", "channel_attention", "loss.mal"):
        with pytest.raises(ConfigError, match=rf"^overrides: {key}: expected a key the ablation settings do not set"):
            ablation.check_base_overrides({key: "false"})


def _param_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def test_every_setting_builds_a_different_model_and_loss():
    """The full list at config/model level: parameters, clusters and loss parts show each switch."""
    from dedn.families.dedn.losses import dedn_loss
    from dedn.nn.losses import cross_entropy_loss
    from dedn.training.loop import build_model
    from dedn.protocol import ClassProtocol

    cs = toy_class_side()
    base = build_config(None, {"dataset": "TOY"})
    proto = ClassProtocol.final(cs)
    x = torch.rand(4, *TOY_SHAPE)
    y = torch.tensor([0, 1, 2, 3])
    built = {}
    for s in ablation.select_settings():
        cfg = ablation.setting_config(base, s)
        model = build_model(cfg, cs, TOY_SHAPE)
        out = model(x)
        built[s.key] = (cfg, model, out, dedn_loss(out, y, proto, cfg.loss, cfg.variant))

    names = {k: _param_names(v[1]) for k, v in built.items()}
    assert any(n.startswith("coarse.") for n in names["full"]) and any(n.startswith("fine.") for n in names["full"])
    assert not any(n.startswith("fine.") for n in names["cexp_no_distill"]), "cExp-only model has fine parameters"
    assert not any(n.startswith("coarse.") for n in names["fexp_no_distill"]), "fExp-only model has coarse parameters"
    assert any(n.endswith(".w3") for n in names["full"])
    assert not any(n.endswith((".w3", ".w4")) for n in names["no_ca"]), "no-CA model has channel parameters"
    assert built["no_ca"][2].coarse.o_channel is None and built["no_ca"][2].fine.o_channel is None
    assert len(built["full"][1].fine) == 4 and len(built["halved"][1].fine) == 2  # halved: half the clusters
    assert len(built["kmeans"][1].fine) == 4
    assert built["kmeans"][1].clusters != built["full"][1].clusters  # K-Means on word vectors, not the manual split

    parts = {k: set(v[3]) for k, v in built.items()}
    assert {"mal_c", "mal_f", "align_c", "align_f", "distill"} <= parts["full"]
    assert "distill" not in parts["no_distill"] and "align_c" in parts["no_distill"]
    assert {"align_c", "align_f"}.isdisjoint(parts["no_align"]) and "distill" in parts["no_align"]
    assert parts["cexp_no_distill"] == {"loss", "mal_c", "align_c"}
    assert parts["fexp_no_distill"] == {"loss", "mal_f", "align_f"}
    # w/o L_mal: the classification term is plain cross-entropy; with MAL (margin) it is not
    active = proto.active_mask()
    out_nm, l_nm = built["no_mal"][2], built["no_mal"][3]
    torch.testing.assert_close(l_nm["mal_c"], cross_entropy_loss(out_nm.coarse.scores, y, active))
    out_f, l_f = built["full"][2], built["full"][3]
    assert not torch.allclose(l_f["mal_c"], cross_entropy_loss(out_f.coarse.scores, y, active))


# ---- the table --------------------------------------------------------------------------------
def _results() -> list[ablation.AblationResult]:
    s = ablation.family_settings("dedn")
    return [
        ablation.AblationResult(s["cexp_no_distill"], {"T": 0.746, "U": 0.624, "S": 0.714, "H": 0.666}, run_id="r1"),
        ablation.AblationResult(s["no_ca"], error="RuntimeError: boom"),
        ablation.AblationResult(s["full"], {"T": 0.774, "U": 0.709, "S": 0.70, "H": 0.704}, run_id="r3"),
        ablation.AblationResult(s["kmeans"], {"T": 0.7649, "U": 0.70, "S": 0.69, "H": 0.6951}, run_id="r4"),
    ]


def test_markdown_table_layout_golden():
    md = ablation.format_markdown(_results(), "CUB", semi_synthetic=True)
    lines = md.splitlines()
    assert "semi-synthetic" in lines[0]
    assert lines[2] == "| Setting (CUB (semi-synthetic)) | T | U | S | H |"
    assert lines[4] == "| cExp w/o L_distill | 74.6 | 62.4 | **71.4** | 66.6 |"
    assert lines[5] == "| DAN w/o CA (failed: RuntimeError: boom) | - | - | - | - |"
    assert lines[6] == "| DEDN (full) | **77.4** | **70.9** | 70.0 | **70.4** |"
    assert lines[7] == "| DEDN, K-Means clusters | 76.5 | 70.0 | 69.0 | 69.5 |"
    assert "semi-synthetic" not in ablation.format_markdown(_results(), "CUB", semi_synthetic=False)


def test_csv_and_files_written_atomically(tmp_path):
    paths = ablation.write_table(_results(), tmp_path, "CUB", semi_synthetic=True)
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["setting"] for r in rows] == ["cexp_no_distill", "no_ca", "full", "kmeans"]
    assert rows[2] == {"dataset": "CUB", "semi_synthetic": "true", "setting": "full", "label": "DEDN (full)", "T": "77.4",
                       "U": "70.9", "S": "70.0", "H": "70.4", "run_id": "r3", "error": ""}
    assert rows[1]["T"] == "-" and rows[1]["error"].startswith("RuntimeError")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation.csv", "ablation.md"]  # no temp files left


def test_run_ablation_records_failures_and_keeps_going():
    base = build_config(None, {"dataset": "TOY"})
    seen = []

    def train_one(setting, cfg):
        seen.append((setting.key, cfg.model.experts, cfg.loss.distill, cfg.model.channel_attention))
        if setting.key == "no_ca":
            raise RuntimeError("worker died")
        return ablation.AblationResult(setting, {"T": 0.5, "U": 0.5, "S": 0.5, "H": 0.5})

    res = ablation.run_ablation(base, ablation.select_settings(["cexp_no_distill", "no_ca", "full"]), train_one)
    assert seen == [("cexp_no_distill", "coarse", False, True), ("no_ca", "both", True, False), ("full", "both", True, True)]
    assert [r.ok for r in res] == [True, False, True] and "worker died" in res[1].error
    with pytest.raises(RuntimeError):
        ablation.run_ablation(base, ablation.select_settings(["no_ca"]), train_one, keep_going=False)


def test_cluster_study_plot_is_labelled(tmp_path):
    import matplotlib.image as mpimg

    s = ablation.family_settings("dedn")
    res = [ablation.AblationResult(s["full"], {"T": 0.77, "U": 0.7, "S": 0.7, "H": 0.70}),
           ablation.AblationResult(s["kmeans"], {"T": 0.76, "U": 0.7, "S": 0.7, "H": 0.69}),
           ablation.AblationResult(s["halved"], {"T": 0.76, "U": 0.7, "S": 0.7, "H": 0.698})]
    path = ablation.plot_cluster_study(res, tmp_path / "cluster.png", "CUB", semi_synthetic=True)
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    # both metrics are drawn as bars: matplotlib's first two colours (H: C0 blue, T: C1 orange) cover real area
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        near = (abs(img[..., :3] - np.array(rgb) / 255).max(-1) < 0.02).mean()
        assert near > 0.01, (rgb, near)
    assert ablation.plot_cluster_study(res[:1], tmp_path / "none.png", "CUB", semi_synthetic=False) is None
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.png"]


# ---- end to end on Ray Train --------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ablation_job_end_to_end(tmp_path, monkeypatch, capsys):
    """no-CA and cExp-only, 1 epoch each on Ray Train, under one MLflow parent run. Two settings (three
    until 2026-12-06): each maps to its own config and network, and the table keeps Table 3's order;
    "full" is the default DEDN, which every other training test runs."""
    from dedn import tracking
    from dedn.checkpoint import load_checkpoint

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_toy_dataset(tmp_path / "toy")
    job = load_job("ablate")
    rc = job.main(["--data", str(data), "--settings", "no_ca,cexp_no_distill", "--num-workers", "1",
                   "--out", str(tmp_path / "out"), "--quiet", "epochs=1", "protocol=final", "eval.batch_size=64"])
    assert rc == 0, capsys.readouterr().err[-3000:]

    md = (tmp_path / "out" / "ablation.md").read_text()
    labels = [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| ") and "Setting" not in ln]
    assert labels == ["cExp w/o L_distill", "DAN w/o CA"]  # Table 3's order, not the command line's
    assert "TOY (semi-synthetic)" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "ablation.csv").read_text())))
    for r in rows:
        for k in "TUSH":
            assert 0.0 <= float(r[k]) <= 100.0 and len(r[k].split(".")[1]) == 1

    client = tracking.client()
    exp = client.get_experiment_by_name("dedn-toy-ablation")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["dedn.ablation.setting"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"no_ca", "cexp_no_distill"}
    assert {r["run_id"] for r in rows} == {c.info.run_id for c in children.values()}
    assert children["no_ca"].data.params["model.channel_attention"] == "False"
    assert children["cexp_no_distill"].data.params["model.experts"] == "coarse"
    assert children["no_ca"].data.params["model.experts"] == "both"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ablation.md", "ablation.csv"}
    assert parent.data.tags["semi_synthetic"] == "true" and parent.info.status == "FINISHED"

    # the trained networks really differ: read each child's final checkpoint
    keys = {k: set(load_checkpoint(Path(c.data.tags["dedn.checkpoint_dir"]) / "state.pt")["model"])
            for k, c in children.items()}
    assert any(k.startswith("fine.") for k in keys["no_ca"]) and not any(k.endswith((".w3", ".w4")) for k in keys["no_ca"])
    assert any(k.endswith(".w3") for k in keys["cexp_no_distill"])  # channel attention on
    assert not any(k.startswith("fine.") for k in keys["cexp_no_distill"])
