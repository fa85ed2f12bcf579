"""How often a training step waits for the device (issue 25, item 0; ../shared/docs/gpu-readiness.md #6).

On a GPU every call that needs a value on the host (`.item()`, `.tolist()`, `.cpu()`, a bool-mask
index, which must count the kept entries, a tensor built from Python data) stalls the launch queue
until the GPU catches up. This CPU test counts those calls in one DEDN and one MSDN training step
with a TorchFunctionMode. The one left is the loss parts' finiteness check: a NaN must stop the run
before that step's update (`StepContext.check_finite`).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from toydata import write_toy_dataset
from torch.overrides import TorchFunctionMode

HOST_VALUE = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero", "masked_select",
              "argwhere", "tensor", "as_tensor"}


class HostWaits(TorchFunctionMode):
    """Counts the torch calls that would wait for a GPU, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_VALUE:
            self.calls[name] += 1
        elif name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, list) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool) for i in index):
                self.calls[f"{name} by mask or list"] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_a_bool_mask_index_and_an_item() -> None:
    x, m = torch.arange(4.0), torch.tensor([True, False, True, False])
    with HostWaits() as w:
        x[m].sum().item()
    assert w.calls == Counter({"__getitem__ by mask or list": 1, "item": 1})


@pytest.mark.parametrize("model", ["dedn", "msdn"])
def test_a_training_step_waits_for_the_device_once(tmp_path: Path, model: str) -> None:
    from dedn.config import build_config
    from dedn.data import FeatureDataset
    from dedn.families import family_of
    from dedn.families.base import StepContext
    from dedn.protocol import ClassProtocol
    from dedn.training.loop import build_model

    root = write_toy_dataset(tmp_path / "toy")
    ds = FeatureDataset.open(root)
    # calibration on too, so every loss part that selects classes runs
    cfg = build_config(None, {"dataset": "TOY", "data.path": str(root), "model": model,
                              "loss.calibration_weight": 0.1})
    net = build_model(cfg, ds.class_side, ds.feature_shape)
    family = family_of(cfg)
    protocol = ClassProtocol.for_phase("select", ds.class_side)
    ctx = StepContext(cfg=cfg, protocol=protocol, optimizers=family.optimizers(cfg, net), device=torch.device("cpu"),
                      epoch=1, step=1)
    x, y = torch.randn(4, *ds.feature_shape), torch.tensor(protocol.seen[:4])
    family.train_step(net, x, y, ctx)  # the first step builds the class masks and ids once
    with HostWaits() as waits:
        parts = family.train_step(net, x, y, ctx)
    assert {"cal_c" if model == "dedn" else "cal_av", "distill"} <= set(parts)
    assert waits.calls == Counter({"tolist": 1}), waits.calls


def test_selecting_classes_by_ids_equals_selecting_by_mask() -> None:
    from dedn.nn.losses import calibration_loss, distance
    from dedn.protocol import ClassProtocol

    p = ClassProtocol(seen=(5, 0, 3), unseen=(6, 1), num_classes=8)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        a, b = torch.randn(6, 8, generator=g, dtype=dtype), torch.randn(6, 8, generator=g, dtype=dtype)
        for kind in ("mse", "sse", "cubic"):
            assert torch.equal(distance(a, b, kind, mask=p.active_mask()), distance(a, b, kind, mask=p.active_index()))
        by_mask = calibration_loss(a, p.seen_mask(), p.unseen_mask(), p.active_mask())
        by_ids = calibration_loss(a, p.seen_mask(), p.unseen_mask(), p.active_mask(), p.unseen_index())
        assert torch.equal(by_mask, by_ids)
    assert p.active_index().tolist() == [0, 1, 3, 5, 6] and p.active_mask() is p.active_mask()  # built once


@pytest.mark.parametrize("model", ["dedn", "msdn"])
def test_an_evaluation_batch_does_not_wait_for_the_device(tmp_path: Path, model: str) -> None:
    """The forward pass, the GZSL counts and the weight grid's counts of one batch: counts stay on the
    device and the labels' check is read once, with the counts (was about 15 waits a batch)."""
    from dedn.config import build_config
    from dedn.data import FeatureDataset
    from dedn.families import family_of
    from dedn.metrics import GZSLCounts
    from dedn.protocol import ClassProtocol
    from dedn.training.evaluate import weight_search
    from dedn.training.loop import build_model

    root = write_toy_dataset(tmp_path / "toy")
    ds = FeatureDataset.open(root)
    cfg = build_config(None, {"dataset": "TOY", "data.path": str(root), "model": model})
    net = build_model(cfg, ds.class_side, ds.feature_shape).eval()
    family = family_of(cfg)
    protocol = ClassProtocol.for_phase("select", ds.class_side)
    counts, search = GZSLCounts(protocol.num_classes), weight_search(cfg, protocol.num_classes, family)
    weights = family.configured_weights(cfg)
    x = torch.randn(4, *ds.feature_shape)

    def batch(y: torch.Tensor, side: str) -> None:
        with torch.no_grad():
            parts = family.score_parts(net(x))
        counts.update(family.combine(cfg, parts, weights), y, protocol, side=side, calibration=cfg.eval.calibration)
        search.update(parts, y, protocol, side=side)

    seen, unseen = torch.tensor(protocol.seen[:4]), torch.tensor((protocol.unseen * 4)[:4])
    batch(seen, "seen")  # the first batch builds the protocol's columns and masks once
    with HostWaits() as waits:
        batch(seen, "seen")
        batch(unseen, "unseen")
    assert waits.calls == Counter(), waits.calls
    assert counts.counts[3:].sum(1).tolist() == [8, 4]  # read once, on the host: seen and unseen totals
    assert search.totals.sum(1).tolist() == [8, 4]


def test_d3gzsls_distillation_loss_waits_for_nothing_on_its_real_rows() -> None:
    """L_D3's real rows are the batch's tail: sliced, they need no count from the device (a bool mask,
    as before, made six waits a call); both give the same loss."""
    from dedn.families.d3gzsl.losses import D3Weights, d3_loss

    g = torch.Generator().manual_seed(0)
    n_u, n_r, k, ks, e = 5, 7, 6, 4, 8
    labels = torch.cat([torch.tensor([4, 5, 4, 5, 4]), torch.randint(0, ks, (n_r,), generator=g)])
    args = dict(student_emb=torch.randn(n_u + n_r, e, generator=g), student_logits=torch.randn(n_u + n_r, k, generator=g),
                ood_repr=torch.randn(n_u + n_r, 2, generator=g), teacher_emb=torch.randn(n_u + n_r, e, generator=g),
                teacher_logits=torch.randn(n_u + n_r, ks, generator=g), labels=labels, seen_ids=torch.arange(ks),
                sigmoid=torch.nn.Sigmoid(), weights=D3Weights())
    mask = torch.cat([torch.zeros(n_u, dtype=torch.bool), torch.ones(n_r, dtype=torch.bool)])
    with HostWaits() as waits:
        sliced = d3_loss(real=slice(n_u, None), **args)
    assert waits.calls == Counter(), waits.calls
    with HostWaits() as waits:
        masked = d3_loss(real=mask, **args)
    assert waits.calls == Counter({"__getitem__ by mask or list": 6})
    assert torch.allclose(sliced.total, masked.total, rtol=1e-6, atol=0)
