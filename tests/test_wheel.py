"""The package as a user installs it: a built wheel (not this checkout), installed outside it, imports
from there, finds its package data (presets, search spaces) and runs a tiny training job from an
unrelated working directory. What the jobs do is other tests' business (test_toy_family runs train,
sweep and compare end to end); only what the wheel alone can break is checked here.

The build, the install, the import check, the tiny dataset and the job are subprocesses, one after the
other: they start with the session (marker `early`, tests/conftest.py) and the test checks what they
did when its turn comes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_install_and_train(folder: Path) -> tuple[dict[str, subprocess.CompletedProcess], Path]:
    """Each step's outcome, by name, up to the first that failed, and the folder installed into. Only
    subprocesses (conftest's `early`): the tiny dataset too is made by the checkout's prepare_data.py on
    the installed package (the session's fixtures do not exist yet), and the job starts a Ray of its own."""
    from conftest import EARLY_ENV, cub_source

    wheels, site, work, data = folder / "wheels", folder / "site", folder / "elsewhere", folder / "cub_tiny"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_TMPDIR", "MLFLOW_"))}
    env.update(PYTHONPATH=str(site), DEDN_HOME=str(folder / "home"), RAY_USAGE_STATS_ENABLED="0", **EARLY_ENV)  # conftest's HEALTH_CHECK: in os.environ
    source = ["--source-dir", str(cub_source())] if cub_source() is not None else []
    where = ("import dedn.families.dedn as f, dedn.config as c; print(f.__file__); "
             "print(c.load_preset('cub').loss.beta, len(f.FAMILY.presets()), f.FAMILY.search_space_file())")
    pip_env = {**os.environ, **EARLY_ENV}
    chain = [  # name, command, working directory, environment
        ("build", ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)], ROOT, pip_env),
        ("install", ["-m", "pip", "install", "--no-deps", "--no-index", "--find-links", str(wheels), "-q", "--target",
                     str(site), "dedn"], ROOT, pip_env),
        ("where", ["-c", where], work, env),
        ("data", [str(ROOT / "jobs" / "prepare_data.py"), "synthetic", "--name", "CUB", "--out", str(data), *source,
                  "--channels", "16", "--height", "2", "--width", "2", "--images-per-class", "2", "--no-progress"], work, env),
        ("train", [str(ROOT / "jobs" / "train.py"), "--data", str(data), "--preset", "cub", "--num-workers", "1",
                   "protocol=final", "epochs=1", "optim.max_steps_per_epoch=2", "eval.batch_size=64"], work, env),
    ]
    steps = {}
    for name, args, cwd, step_env in chain:
        steps[name] = subprocess.run([sys.executable, *args], cwd=cwd, env=step_env, capture_output=True, text=True,
                                     timeout=300)
        if steps[name].returncode != 0:
            break
    return steps, site


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.early.with_args(_build_install_and_train)  # with_args: a lone callable would be decorated
def test_the_wheel_installs_finds_its_data_and_trains_outside_the_checkout(early_result) -> None:
    steps, site = early_result
    for name in ("build", "install", "where", "data", "train"):
        assert name in steps, f"not run: a step before {name} failed"
        done = steps[name]
        assert done.returncode == 0, f"{name}: {(done.stdout + done.stderr)[-4000:]}"
        if name == "install":
            assert len(list((site.parent / "wheels").glob("dedn-*.whl"))) == 1
    where = steps["where"].stdout
    assert where.splitlines()[0].startswith(str(site)), where  # the wheel's copy, not the checkout's
    assert "0.001 3 " in where and str(site) in where.splitlines()[1]  # presets and the search space are package data
    assert "registered model dedn-cub version 1" in steps["train"].stdout
