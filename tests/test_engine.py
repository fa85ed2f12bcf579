"""Tests of dedn.training.loop and dedn.checkpoint: bit-identical resume, non-finite loss, split hygiene, learning."""
from __future__ import annotations

import pytest
import torch

import dedn.training.loop as engine
from dedn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dedn.config import RunConfig, build_config
from dedn.errors import DatasetError, NonFiniteLossError
from dedn.families import get_family
from dedn.training.evaluate import evaluate
from dedn.training.loop import build_model, run_phase, run_protocol, train_one_epoch
from dedn.protocol import ClassProtocol
from dedn.data.reader import Batch, ShardReader, forbid_splits

# Tiny and fast: 3 steps an epoch, no lambda search unless a test asks for it.
TINY = {"optim.batch_size": 32, "optim.max_steps_per_epoch": 3, "optim.lr": 0.001, "eval.fit_weights": False,
        "eval.weight_grid_step": 0.25, "data.shuffle_buffer": 64}


def tiny_cfg(**over) -> RunConfig:
    return RunConfig().replace(**{**TINY, **over})


def _params(state: dict) -> dict[str, torch.Tensor]:
    return state["model"]


def build_optimizer(cfg, model):
    return get_family(cfg.model.name).optimizers(cfg, model)


class Collect:
    """A sink that keeps every report (and, when asked, saves the checkpoint of each epoch)."""

    def __init__(self, save_to=None, action=None):
        self.reports, self.save_to, self.action = [], save_to, action

    def on_epoch(self, report, state):
        self.reports.append(report)
        if self.save_to is not None:
            save_checkpoint(self.save_to, state())
        if self.action is not None:
            self.action()


def test_resume_is_bit_identical(tiny_dataset, tmp_path):
    cfg = tiny_cfg(**{"protocol": "select"})
    straight = run_phase(cfg, tiny_dataset, "select", epochs=2)

    path = tmp_path / "ckpt" / "epoch1.pt"
    run_phase(cfg, tiny_dataset, "select", epochs=1, sinks=[Collect(save_to=path)])
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and state["phase"] == "select" and state["config"] == cfg.to_dict()
    assert not list(path.parent.glob("*.tmp"))  # written via a temporary name
    resumed = run_phase(cfg, tiny_dataset, "select", epochs=2, resume=state)

    a, b = _params(straight.state), _params(resumed.state)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # RMSprop's running averages continue identically too
    sa, sb = straight.state["optimizers"]["model"]["state"], resumed.state["optimizers"]["model"]["state"]
    assert all(torch.equal(sa[i]["square_avg"], sb[i]["square_avg"]) for i in sa)
    assert [h.val for h in straight.history] == [h.val for h in resumed.history]
    assert resumed.best == straight.best


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    save_checkpoint(tmp_path / "obj.pt", {"x": DatasetError("f", "g", "h", "i")})  # not a plain type
    with pytest.raises(CheckpointError, match="obj.pt"):  # weights_only refuses to unpickle it
        load_checkpoint(tmp_path / "obj.pt")


# docs/method.md#optimisation
def test_non_finite_loss_raises_with_epoch_step_and_parts(tiny_dataset):
    cfg = tiny_cfg()
    model = build_model(cfg, tiny_dataset.class_side, tiny_dataset.feature_shape)
    opt = build_optimizer(cfg, model)
    protocol = ClassProtocol.for_phase("select", tiny_dataset.class_side)
    good = next(iter(ShardReader(tiny_dataset, "train", batch_size=8, shuffle=False)))
    bad = Batch(good.features.clone(), good.labels, good.sample_ids)
    bad.features[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"epoch 7, step 2: loss: expected a finite value, found loss=nan.*mal_c=nan") as e:
        train_one_epoch(model, [good, bad], opt, protocol, cfg, epoch=7)
    assert isinstance(e.value, FloatingPointError) and e.value.step == 2
    # the good step was taken, the bad one was not: parameters are finite and changed once
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_train_one_epoch_stats(tiny_dataset):
    cfg = tiny_cfg()
    model = build_model(cfg, tiny_dataset.class_side, tiny_dataset.feature_shape)
    protocol = ClassProtocol.for_phase("select", tiny_dataset.class_side)
    reader = ShardReader(tiny_dataset, "train", batch_size=16, shuffle=False)
    stats = train_one_epoch(model, reader, build_optimizer(cfg, model), protocol, cfg, max_steps=2)
    assert stats["steps"] == 2 and stats["images"] == 32
    assert {"loss", "mal_c", "mal_f", "align_c", "align_f", "distill"} <= stats["losses"].keys()
    assert set(stats["losses"]) <= set(get_family("dedn").loss_parts)  # the names logs and plots know
    assert 0 <= stats["data_wait_frac"] <= 1 and stats["seconds"] > 0


def test_model_init_depends_on_the_seed_only(tiny_dataset):
    cfg = tiny_cfg()
    a = build_model(cfg, tiny_dataset.class_side, tiny_dataset.feature_shape)
    torch.rand(10)  # global RNG moved: no effect on init
    b = build_model(cfg, tiny_dataset.class_side, tiny_dataset.feature_shape)
    c = build_model(cfg.replace(**{"optim.seed": 1}), tiny_dataset.class_side, tiny_dataset.feature_shape)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# docs/method.md#post-hoc-lambda-fit
def test_evaluate_all_reduce_and_lambda_search(tiny_dataset):
    cfg = tiny_cfg(**{"eval.fit_weights": True, "eval.weight_grid_step": 0.1})  # (0.8, 0.9) is on the grid
    model = build_model(cfg, tiny_dataset.class_side, tiny_dataset.feature_shape)
    protocol = ClassProtocol.for_phase("select", tiny_dataset.class_side)

    def readers():
        return [ShardReader(tiny_dataset, s, batch_size=50, shuffle=False) for s in ("val_seen", "val_unseen")]

    plain = evaluate(model, *readers(), protocol, cfg)
    calls = []

    class Doubling:  # two identical "ranks": every count doubles, so every fraction is unchanged
        def sum_(self, t):
            calls.append(t.numel())
            t.mul_(2)

        def max_(self, t):
            raise AssertionError("evaluation only sums")

    doubled = evaluate(model, *readers(), protocol, cfg, collective=Doubling())
    assert len(calls) == 2  # one all_reduce for the counts, one for the whole weight grid
    assert doubled.metrics == plain.metrics and doubled.best_metrics == plain.best_metrics
    assert doubled.best_weights == plain.best_weights and set(plain.best_weights) == {"lambda_rc", "lambda_e"}
    assert plain.best_metrics["H"] >= plain.metrics["H"] - 1e-9  # the grid holds the configured point
    assert [r.n for r in doubled.per_class] == [2 * r.n for r in plain.per_class]
    assert sum(r.n for r in plain.per_class) == tiny_dataset.split("val_seen").num_rows + tiny_dataset.split("val_unseen").num_rows


# docs/method.md#two-phase-protocol
def test_select_never_reads_test_splits_and_fit_runs_both_phases(tiny_dataset, monkeypatch):
    opened: list[str] = []

    class Recording(ShardReader):
        def __init__(self, dataset, split, **kw):
            opened.append(split)
            super().__init__(dataset, split, **kw)

    monkeypatch.setattr(engine, "ShardReader", Recording)
    cfg = tiny_cfg(**{"optim.epochs": 2, "eval.fit_weights": True})
    with forbid_splits({"trainval"}):  # select must not need trainval either
        sel = run_phase(cfg, tiny_dataset, "select")
    assert set(opened) == {"train", "val_seen", "val_unseen"}
    assert 1 <= sel.best.epoch <= 2 and sel.best_state is not None and len(sel.history) == 2

    # the select phase forbids the test splits itself
    with pytest.raises(DatasetError, match="test_seen"):
        run_phase(cfg, tiny_dataset, "select", sinks=[Collect(action=lambda: ShardReader(tiny_dataset, "test_seen", batch_size=4))])

    opened.clear()
    sink = Collect()
    res = run_protocol(cfg, tiny_dataset, sinks=[sink])
    reports = sink.reports
    assert res.protocol == "two_phase" and res.test_metrics is not None
    sel_reports = [r for r in reports if r.phase == "select"]
    fin_reports = [r for r in reports if r.phase == "final"]
    assert len(sel_reports) == 2 and len(fin_reports) == res.selection.epoch == res.final.epochs
    # the final phase used the selected weights
    assert get_family("dedn").configured_weights(res.final_cfg) == res.selection.weights
    assert res.final.state["selection"] == res.selection.to_dict()  # its checkpoints know the selection
    assert fin_reports[-1].test and all(r.test is None for r in reports[:-1])  # tested once, at the end
    assert opened.index("test_seen") > opened.index("trainval") and opened.count("test_seen") == 1
    assert set(res.test_metrics) == {"T", "U", "S", "H"}


# ---- learning acceptance ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cub_small(tmp_path_factory):
    """Semi-synthetic CUB: C=64, 3x3 maps, 12 images per class and split (train 1200 rows, val 1779)."""
    from conftest import cub_source
    from dedn.data import FeatureDataset
    from dedn.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("learn") / "cub_small"
    write_synthetic(root, "CUB", cub_source(), channels=64, height=3, width=3, images_per_class=12, seed=0, progress=False)
    return FeatureDataset.open(root)


# lr 10x the paper's and beta 10x lower: the paper's 80 epochs of 7057 images are ~11k steps;
# here ~28 steps an epoch for 3 epochs must show learning (6 until 2026-12-06: each claim below held
# at 3 with a wider margin, in half the time).
LEARN = ["protocol=select", "epochs=3", "optim.lr=0.001", "loss.beta=0.0001",
         "eval.fit_weights=true", "eval.weight_grid_step=0.1"]
CHANCE_H = 1 / 150  # 150 active classes during selection (100 train + 50 val)


def _val_h(ds, *overrides: str) -> float:
    res = run_phase(build_config("cub", LEARN + list(overrides)), ds, "select")
    print(overrides, "best", res.best)
    return res.best.metrics["H"]


@pytest.fixture(scope="module")
def learned(cub_small) -> dict[str, float]:
    """Validation H (best epoch, best lambdas) of each variant, trained identically."""
    return {
        "coarse": _val_h(cub_small, "model.experts=coarse"),
        "fine": _val_h(cub_small, "model.experts=fine"),
        "both_no_distill": _val_h(cub_small, "model.experts=both", "loss.distill=false"),
        "dedn": _val_h(cub_small, "model.experts=both", "loss.gamma=0.01"),
        "dedn_sse": _val_h(cub_small, "model.experts=both", "loss.gamma=0.01", "loss.distance=sse"),
    }


# docs/method.md#coarse-and-fine-experts
@pytest.mark.slow
def test_both_experts_learn_and_beat_single_experts(learned):
    # Observed (torch 2.13 CPU AVX512, seed 0, 2026-12-06): coarse 0.154, fine 0.172, both experts
    # (no distillation) 0.239.
    assert learned["coarse"] > 10 * CHANCE_H and learned["fine"] > 10 * CHANCE_H, learned
    assert learned["both_no_distill"] > max(learned["coarse"], learned["fine"]), learned


# docs/method.md#divergence-and-distance-terms
@pytest.mark.slow
def test_full_dedn_learns_and_the_mean_squared_distillation_is_what_lets_it(learned):
    # Observed (torch 2.13 CPU AVX512, seed 0, 2026-12-06): DEDN (JSD + mean squared error) 0.192;
    # with the summed squared error of eq. 12 as typeset 0.030 -- the term starts near 5e4 and swamps
    # MAL. Distillation does not beat both experts without it here (0.239): on this small
    # semi-synthetic set the paper's gain from distillation (Table 3) is not reproduced.
    assert learned["dedn"] > 10 * CHANCE_H, learned
    assert learned["dedn"] > 2 * learned["dedn_sse"], learned
