"""The device check runs on a bare node: no Ray, MLflow or Optuna (issue 25, item 1), here on the CPU.

A GPU node lent for a few minutes has torch, numpy, pyarrow and scipy but none of those; the check
must get through every part there, write its report after each, and say which part failed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BARE = textwrap.dedent("""
    import importlib.abc, runpy, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "mlflow", "optuna"):
                raise ImportError(f"{name} is not installed on a bare GPU node")
            return None

    sys.meta_path.insert(0, Blocked())
    sys.argv = ["bench/gpu_check.py", *sys.argv[1:]]
    runpy.run_path("bench/gpu_check.py", run_name="__main__")
""")


def _run(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEDN_HOME": str(tmp_path / "home"), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", BARE, "--device", "cpu", "--images-per-class", "1", "--hw", "2",
                           "--skip-steps", "--steps", "4", "--pack-steps", "3", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def _whole_check(folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    from conftest import EARLY_ENV

    return _run(folder, "--out", str(folder / "report"), "--pack", "1", "2", env_extra=EARLY_ENV), folder


@pytest.mark.slow  # about 16 s: a subprocess, a generated dataset, two loop runs and three packed loops
@pytest.mark.early.with_args(_whole_check)  # one subprocess, its own folder: it runs from the session's start
def test_the_device_check_runs_every_part_without_ray_mlflow_or_optuna(early_result) -> None:
    out, tmp_path = early_result
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {k: v["ok"] for k, v in report["parts"].items()} == {"gemm": True, "data": True, "loop": True,
                                                              "packed_loops": True, "extraction": True,
                                                              **({"bf16_vs_fp32": True} if "bf16_vs_fp32" in
                                                                 report["parts"] else {})}
    packed = report["packed_loops"]
    assert [r["loops"] for r in packed] == [1, 2] and all(r["images_per_s_total"] > 0 for r in packed)
    assert packed[1]["images_per_s_per_loop"] == packed[1]["images_per_s_total"] / 2
    cores = len(os.sched_getaffinity(0))  # each loop its share of the cores, as a trial its whole CPUs
    assert [r["threads_per_loop"] for r in packed] == [cores, max(1, cores // 2)]
    assert report["loop_backend"] == "gloo" and report["data"]["feature_shape"] == [2048, 2, 2]
    rows = {r["data.resident"]: r for r in report["loop"]}
    assert set(rows) == {"host", "off"}
    for r in rows.values():  # the same epoch, held or streamed: the same images, a positive rate
        assert r["images"] == rows["off"]["images"] > 0 and r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] < 1
    assert rows["host"]["resident_mib"] > 0 == rows["off"]["resident_mib"]
    assert "== 3. the training loop under DDP" in (tmp_path / "report" / "console.txt").read_text()
    ex = report["extraction"]  # part 5: ResNet-101 at 448 and the decode rate feeding it
    assert ex["backbone_images_per_s"]["fp32"] > 0 and ex["decode_images_per_s_per_core"] > 0
    assert 0 < ex["cpu_side_share_of_backbone"] <= 1 and ex["cores"] >= 1


def test_a_failing_part_is_recorded_and_the_next_parts_still_run(tmp_path: Path) -> None:
    out = _run(tmp_path, "--out", str(tmp_path / "report"), "--data", str(tmp_path / "no-such-dataset"), "--pack",
               "--skip-extract")
    assert out.returncode == 1
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["parts"]["gemm"]["ok"] and report["gemm_gflop_s"]["fp32"] > 0
    assert not report["parts"]["loop"]["ok"] and "no-such-dataset" in report["parts"]["loop"]["error"]
    assert "FAILED parts: loop" in out.stdout
