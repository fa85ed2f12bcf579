"""The package as a user installs it: a built wheel (not this checkout), installed outside it, imports
from there, finds its package data (presets, search spaces) and runs a tiny training job from an
unrelated working directory. What the jobs do is other tests' business (test_toy_family runs train,
sweep and compare end to end); only what the wheel alone can break is checked here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # its jobs start their own Ray: no module Ray

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(420)
def test_the_wheel_installs_finds_its_data_and_trains_outside_the_checkout(tiny_dataset, tmp_path: Path) -> None:
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("dedn-*.whl")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=180)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(PYTHONPATH=str(site), DEDN_HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0")  # conftest's HEALTH_CHECK: in os.environ

    def run(*args: str, timeout: float = 300) -> str:
        p = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        return p.stdout

    where = run("-c", "import dedn.families.dedn as f, dedn.config as c; print(f.__file__); "
                      "print(c.load_preset('cub').loss.beta, len(f.FAMILY.presets()), f.FAMILY.search_space_file())")
    assert where.splitlines()[0].startswith(str(site)), where  # the wheel's copy, not the checkout's
    assert "0.001 3 " in where and str(site) in where.splitlines()[1]  # presets and the search space are package data
    out = run(str(ROOT / "jobs" / "train.py"), "--data", str(tiny_dataset.root), "--preset", "cub", "--num-workers", "1",
              "protocol=final", "epochs=1", "optim.max_steps_per_epoch=2", "eval.batch_size=64")
    assert "registered model dedn-cub version 1" in out
