"""What reading the code for CUDA found (../shared/docs/gpu-readiness.md), tested where a CPU can tell."""
from __future__ import annotations

import torch


def test_a_checkpoints_cuda_state_is_this_devices_whatever_the_gpu_count() -> None:
    from dedn.checkpoint import cuda_rng_state_of

    one = torch.arange(4, dtype=torch.uint8)
    assert cuda_rng_state_of(one, 3) is one  # new checkpoints: this process's device only
    old = [torch.full((4,), i, dtype=torch.uint8) for i in range(2)]  # older ones: every visible GPU's
    assert torch.equal(cuda_rng_state_of(old, 1), old[1])
    assert torch.equal(cuda_rng_state_of(old, 5), old[0])  # a resumed run seeing more GPUs than the saved one


def test_seeded_leaves_the_global_generator_where_it_was() -> None:
    from dedn.seeds import seeded

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        inside = torch.rand(2)
    assert torch.equal(inside, torch.rand(2, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.rand(3), expected)


def test_a_phase_lets_go_of_its_decoded_splits_when_it_ends(tmp_path) -> None:
    """Without the cycle collector (on a GPU the selection's device copies stayed into the final phase)."""
    import gc
    import weakref

    from toydata import write_toy_dataset

    from dedn.config import build_config
    from dedn.data import FeatureDataset
    from dedn.data.resident import decode_split
    from dedn.training.loop import run_phase

    root = write_toy_dataset(tmp_path / "toy")
    ds = FeatureDataset.open(root)
    cfg = build_config(None, {"dataset": "TOY", "data.path": str(root), "epochs": 1, "data.resident": "host",
                              "optim.max_steps_per_epoch": 2})
    decoded: list[weakref.ref] = []

    def loader(dataset, split):
        res = decode_split(dataset, split)
        decoded.append(weakref.ref(res.features))
        return res

    gc.collect()
    gc.disable()
    try:
        run_phase(cfg, ds, "select", split_loader=loader)
        assert len(decoded) == 3  # train, val_seen, val_unseen
        assert [r() is None for r in decoded] == [True] * 3
    finally:
        gc.enable()


def test_d3gzsl_losses_are_fp32_under_bf16_autocast() -> None:
    from dedn.families.d3gzsl.losses import D3Weights, d3_loss

    g = torch.Generator().manual_seed(0)
    n, e, k = 6, 8, 5
    seen = torch.tensor([0, 1, 2])
    args = dict(student_emb=torch.randn(n, e, generator=g), student_logits=torch.randn(n, k, generator=g),
                ood_repr=torch.randn(n, 2, generator=g), teacher_emb=torch.randn(n, e, generator=g),
                teacher_logits=torch.randn(n, 3, generator=g), labels=torch.tensor([0, 1, 2, 3, 4, 0]),
                real=torch.tensor([True, True, True, False, False, True]), seen_ids=seen,
                sigmoid=torch.nn.Sigmoid(), weights=D3Weights(1.0, 1.0, 1.0))
    bf16 = {k_: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k_, v in args.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = d3_loss(**bf16)
    plain = d3_loss(**{k_: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                       for k_, v in bf16.items()})
    for a, b in zip(under.parts().values(), plain.parts().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_a_worker_asks_ray_for_its_gpu_share(tmp_path) -> None:
    from dedn.config import build_config
    from dedn.training.driver import build_trainer
    from dedn.training.settings import TrainSettings

    settings = TrainSettings(num_workers=2, use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=1.0)
    trainer = build_trainer(build_config("cub"), settings, run_id=None, tracking_uri=None, semi_synthetic=True,
                            storage_path=str(tmp_path), name="share")
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 0.25}


def test_batches_for_a_gpu_come_in_pinned_memory(tmp_path, monkeypatch) -> None:
    """Readers asked to pin (the loop asks on CUDA) hand over page-locked batches on both host paths,
    streamed and host-resident; device-resident batches and readers not asked are left as they are.
    A CPU build cannot pin, so `Tensor.pin_memory` is replaced by a recorder here."""
    from toydata import write_toy_dataset

    from dedn.data import FeatureDataset
    from dedn.data.reader import ShardReader
    from dedn.data.resident import decode_split

    ds = FeatureDataset.open(write_toy_dataset(tmp_path / "toy"))
    pinned: list[tuple[int, ...]] = []

    def pin(t: torch.Tensor) -> torch.Tensor:
        pinned.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    host = decode_split(ds, "train")
    for resident in (None, host):
        pinned.clear()
        batches = list(ShardReader(ds, "train", batch_size=4, shuffle=False, resident=resident, pin_memory=True))
        assert pinned == [s for b in batches for s in (tuple(b.features.shape), tuple(b.labels.shape))]
        pinned.clear()
        list(ShardReader(ds, "train", batch_size=4, shuffle=False, resident=resident))
        assert pinned == []


def test_on_a_gpu_the_resident_budget_is_a_share_of_its_free_memory(tmp_path, monkeypatch) -> None:
    """auto on CUDA: the budget is data.resident_device_fraction of the memory free at the phase's start
    (read through torch.cuda.mem_get_info, replaced here), so a large GPU holds AWA2 at 14 x 14; the
    fixed resident_budget_mib still rules on a CPU and when the fraction is 0."""
    from toydata import write_toy_dataset

    from dedn.config import build_config
    from dedn.data import FeatureDataset
    from dedn.data.resident import ResidentData

    ds = FeatureDataset.open(write_toy_dataset(tmp_path / "toy"))
    free = 139 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 141 * 2**30))
    awa2_14x14 = int(17.6 * 2**30)
    gpu = ResidentData(ds, "auto", 8192, "cuda", device_fraction=0.5)
    where, reason = gpu._where(awa2_14x14)
    assert where == "device" and "data.resident_device_fraction=0.5 of the 139.0 GiB free on cuda" in reason
    assert gpu._where(80 * 2**30)[0] == "stream"
    assert ResidentData(ds, "auto", 8192, "cuda", device_fraction=0.0)._where(awa2_14x14)[0] == "stream"
    assert ResidentData(ds, "auto", 8192, "cpu", device_fraction=0.5)._where(awa2_14x14)[0] == "stream"
    assert build_config(None, {"dataset": "TOY"}).data.resident_device_fraction == 0.5
