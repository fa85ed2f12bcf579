"""Fault soak: N rounds of a small training run, each with a random fault, and a table of what happened.

    .venv/bin/python tools/soak.py --rounds 20 [--seed 0] [--workdir DIR] [--num-workers 1]

Faults: none, worker_kill (SIGKILL a Ray Train worker mid-run; Ray restarts the group from the
last checkpoint), driver_kill (SIGKILL the driver, then the same --name again), driver_term
(SIGTERM, then again), disk_full (a checkpoint write fails part-way, then again), corrupt_shard
(bytes flipped in the middle of a shard), concurrent (two runs that register at the same time),
second_run (a second run started on the same machine while the first trains: each has its own Ray,
both finish with the clean metrics), store_readonly (the tracking store stops taking writes
mid-run: one `error:` line naming it, exit 2, then the same --name continues the same MLflow run
once the store takes writes again).

Every round must end with the clean run's final metrics or with a clear message (exit 2, the
file named), and after every round the store is checked for what must never be left: a
checkpoint that does not load or a partial copy, an MLflow run still RUNNING, a champion alias on
a version worse than the best. The data are a tiny SEMI-SYNTHETIC CUB-shaped set: the metrics
only check that faults change nothing, they are not benchmark results.

Each run is a separate driver process, `jobs/train.py` itself (its SIGTERM handling included). A
fault injected from inside the run (disk_full) comes from the test-side training plugin
`tests/faults.py`, named in the run's environment (DEDN_TRAIN_PLUGINS, tests/ on PYTHONPATH);
production code has none.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dedn import tracking
from dedn.procs import descendants, running
from dedn.training.ray_cluster import AGENT_TITLES

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"  # the faults plugin (tests/faults.py)
FAULTS = ("none", "worker_kill", "driver_kill", "driver_term", "disk_full", "corrupt_shard", "concurrent", "second_run",
          "store_readonly")
COLUMNS = ("round", "fault", "at", "outcome", "T/U/S/H %", "same", "store", "seconds", "verdict")


# ---- faults from inside a run --------------------------------------------------------------------
def faults_plugin(**options: Any) -> dict[str, str]:
    """DEDN_TRAIN_PLUGINS for a run that injects these faults (`tests/faults.py`, loaded by path here;
    the runs import it as `faults`, tests/ being on their PYTHONPATH)."""
    import importlib.util

    from dedn.training.callbacks import PLUGINS_ENV

    faults = sys.modules.get("faults")
    if faults is None:
        spec = importlib.util.spec_from_file_location("faults", TESTS / "faults.py")
        assert spec is not None and spec.loader is not None
        faults = importlib.util.module_from_spec(spec)
        sys.modules["faults"] = faults  # its dataclass looks its module up there
        spec.loader.exec_module(faults)
    return {PLUGINS_ENV: json.dumps(faults.plugin(**options))}


# ---- the orchestrator ----------------------------------------------------------------------------
@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path
    run_dir: Path

    def wait(self, timeout: float = 600) -> tuple[int, dict[str, Any] | None, str]:
        """Exit code, the run's final record (metrics from MLflow, exact), the last `error:` line."""
        rc = self.popen.wait(timeout)
        text = self.log.read_text(errors="replace")
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        return rc, (run_record(self.run_dir) if rc == 0 else None), errors[-1] if errors else ""


def run_record(run_dir: Path) -> dict[str, Any] | None:
    """The MLflow run a run folder belongs to: its id, final metrics (test, last validation, losses), registered version."""
    record = run_dir / "mlflow_run.json"
    if not record.is_file():
        return None
    run_id = json.loads(record.read_text())["run_id"]
    run = tracking.client().get_run(run_id)
    # what a fault must not change: losses, validation and test (perf/ and system/ are timings and load)
    timing = ("images_per_s", "epoch_time_s", "data_wait_frac", "rss_mib", "seconds")
    metrics = {k: v for k, v in run.data.metrics.items()
               if k.startswith(("train/", "final/", "val/", "test/")) and not k.endswith(timing)}
    return {"run_id": run_id, "metrics": metrics, "version": run.data.tags.get(tracking.REGISTERED_TAG)}


@dataclass
class Soak:
    work: Path
    data: Path
    num_workers: int
    overrides: list[str]
    env: dict[str, str] = field(default_factory=dict)
    n: int = 0

    def start(self, name: str, *, data: Path | None = None, faults: dict[str, Any] | None = None,
              register: bool = False, extra: tuple[str, ...] = ()) -> Proc:
        """jobs/train.py on `data` (default: the soak's) as a process of its own; faults: the options of
        the faults plugin (tests/faults.py) for this run."""
        self.n += 1
        argv = ["--data", str(data or self.data), "--preset", "cub", *self.overrides, *extra,
                "--num-workers", str(self.num_workers), "--name", name, "--max-failures", "2",
                *([] if register else ["--no-register"])]
        log = self.work / "logs" / f"{self.n:03d}-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**self.env, **(faults_plugin(**faults) if faults else {})}
        with open(log, "w") as f:
            popen = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *argv], stdout=f,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.work)
        return Proc(popen, log, self.storage(name))

    def storage(self, name: str) -> Path:
        return self.work / "home" / "ray_results" / name


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for_checkpoint(soak: Soak, name: str, epoch: int, proc: Proc, timeout: float = 300) -> bool:
    """True once select epoch `epoch`'s checkpoint exists; False if the run ended first."""
    target = soak.storage(name) / f"select-epoch{epoch:04d}"
    end = time.time() + timeout
    while time.time() < end:
        if target.is_dir():
            return True
        if proc.popen.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@contextmanager
def read_only_store(db: Path) -> Iterator[str]:
    """The sqlite store takes no writes inside the block, even for root (file modes do not stop root):
    immutable (`chattr +i`) where the file system allows it, else held locked by another process."""
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode == 0:
        try:
            yield "immutable"
        finally:
            subprocess.run(["chattr", "-i", str(db)], check=True)
        return
    hold = ("import sqlite3, sys\ncon = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "con.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield "locked"
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=30)


def check_store(work: Path) -> list[str]:
    """What must never be left: a partial or unloadable checkpoint, a RUNNING run, a champion on a worse version."""
    from dedn.checkpoint import CheckpointError, load_checkpoint  # heavy: after the arguments (see the imports above)
    from dedn.tracking.registry import CHAMPION, best_version

    problems = []
    storage = work / "home" / "ray_results"
    partial = [p for p in storage.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
    if partial:
        problems.append(f"partial files: {[str(p) for p in partial[:3]]}")
    for state in storage.rglob("state.pt"):
        try:
            load_checkpoint(state)
        except CheckpointError as e:
            problems.append(f"unloadable checkpoint {state}: {e}")
    c = tracking.client()
    exps = [e.experiment_id for e in c.search_experiments()]
    running = [r.info.run_id for r in c.search_runs(exps, "attributes.status = 'RUNNING'")] if exps else []
    if running:
        problems.append(f"{len(running)} run(s) RUNNING with no driver: {running[:3]}")
    for rm in c.search_registered_models():
        versions = c.search_model_versions(f"name='{rm.name}'")
        best = best_version(versions)
        try:
            champ = str(c.get_model_version_by_alias(rm.name, CHAMPION).version)
        except Exception:  # noqa: BLE001 - no alias at all is also a failure here
            champ = None
        if best is not None and champ != str(best):
            problems.append(f"{rm.name}: champion on v{champ}, best validation H is v{best}")
    return problems


def same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    return bool(a and b) and a["metrics"] == b["metrics"]


def tush(result: dict[str, Any] | None) -> str:
    m = (result or {}).get("metrics", {})
    return "/".join(f"{100 * m[k]:.1f}" for k in ("test/T", "test/U", "test/S", "test/H")) if "test/H" in m else "-"


def run_round(soak: Soak, i: int, fault: str, rng: random.Random, clean: dict[str, Any], epochs: int) -> dict[str, str]:
    name = f"r{i:02d}-{fault}"
    k = rng.randint(1, epochs - 1)  # the selection epoch after whose checkpoint the fault comes
    row = {"round": str(i), "fault": fault, "at": "-", "outcome": "", "T/U/S/H %": "", "same": ""}

    def finish(result: dict[str, Any] | None) -> None:
        row["T/U/S/H %"] = tush(result)
        row["same"] = "yes" if same(result, clean) else "NO"

    if fault == "none":
        rc, result, err = soak.start(name).wait()
        row["outcome"] = "finished" if rc == 0 else f"rc {rc}: {err[:80]}"
        finish(result)
    elif fault == "worker_kill":
        proc = soak.start(name)
        row["at"] = f"after epoch {k}"
        if wait_for_checkpoint(soak, name, k, proc):
            workers = [p for p in descendants(proc.popen.pid) if "RayTrainWorker" in cmdline(p)]
            for p in workers:
                os.kill(p, signal.SIGKILL)
            row["at"] += f", {len(workers)} worker(s) killed"
        else:
            row["at"] += " (the run ended first: not injected)"
        rc, result, err = proc.wait()
        row["outcome"] = "finished (restarted)" if rc == 0 else f"rc {rc}: {err[:80]}"
        finish(result)
    elif fault in ("driver_kill", "driver_term"):
        proc = soak.start(name)
        row["at"] = f"after epoch {k}"
        sig = signal.SIGKILL if fault == "driver_kill" else signal.SIGTERM
        lingering: list[int] = []
        if wait_for_checkpoint(soak, name, k, proc):
            below = {p: cmdline(p).split(" ", 1)[0] for p in descendants(proc.popen.pid)}
            proc.popen.send_signal(sig)
            rc1 = proc.popen.wait(120)
            # GCS, raylet, workers: gone at once. After a SIGKILL, Ray's two agents wait out a 60 s
            # call to the dead GCS; the next start (the resume below) reaps them.
            end = time.time() + 15
            while time.time() < end and any(not below[p].startswith(AGENT_TITLES) for p in running(list(below))):
                time.sleep(0.25)
            core = [p for p in running(list(below)) if not below[p].startswith(AGENT_TITLES)]
            lingering = [p for p in running(list(below)) if below[p].startswith(AGENT_TITLES)]
            row["at"] += f", driver rc {rc1}, Ray left after 15 s: {len(core)} core, {len(lingering)} agents"
        else:
            row["at"] += " (the run ended first: not injected)"
        first = run_record(soak.storage(name))
        rc, result, err = soak.start(name).wait()
        reaped = not running(lingering)
        row["outcome"] = ("resumed" if rc == 0 else f"rc {rc}: {err[:80]}") + (
            ", same MLflow run" if result and first and result["run_id"] == first["run_id"] else ", NEW MLflow run") + (
            "" if reaped else f", {len(running(lingering))} agents NOT reaped")
        finish(result)
    elif fault == "disk_full":
        marker = soak.work / f"{name}.marker"
        faults = {"fail_rank": 0, "fail_epoch": k, "fail_marker": str(marker), "fail_kind": "disk_full"}
        rc1, _, err1 = soak.start(name, faults=faults).wait()
        row["at"] = f"checkpoint of epoch {k}"
        msg_ok = rc1 == 2 and "could not be written" in err1 and marker.exists()
        rc, result, err = soak.start(name, faults=faults).wait()  # the marker exists: no fault now
        row["outcome"] = ("message, then resumed" if msg_ok and rc == 0 else f"rc {rc1}/{rc}: {(err1 or err)[:80]}")
        finish(result)
    elif fault == "corrupt_shard":
        data = soak.work / f"data-{name}"
        shutil.copytree(soak.data, data)
        shards = sorted(data.rglob("*.parquet"))
        shard = shards[rng.randrange(len(shards))]
        raw = bytearray(shard.read_bytes())
        mid = len(raw) // 2
        raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
        shard.write_bytes(bytes(raw))
        row["at"] = str(shard.relative_to(data))
        rc, result, err = soak.start(name, data=data).wait()
        named = rc == 2 and shard.name in err
        row["outcome"] = "message naming the shard" if named else f"rc {rc}: {err[:80]}"
        row["T/U/S/H %"], row["same"] = "-", "n/a"
        shutil.rmtree(data)
    elif fault == "second_run":
        first = soak.start(name)
        row["at"] = f"after epoch {k} of the first"
        if not wait_for_checkpoint(soak, name, k, first):
            row["at"] += " (the run ended first: not injected)"
        second = soak.start(f"{name}-2")
        outs = [first.wait(), second.wait()]
        row["outcome"] = "both finished" if all(o[0] == 0 for o in outs) else "; ".join(f"rc {o[0]}: {o[2][:60]}" for o in outs)
        row["T/U/S/H %"] = " and ".join(tush(o[1]) for o in outs)
        row["same"] = "yes" if all(same(o[1], clean) for o in outs) else "NO"
    elif fault == "store_readonly":
        proc = soak.start(name)
        row["at"] = f"after epoch {k}"
        db = soak.work / "home" / "mlflow.db"
        rc1, err1 = None, ""
        if wait_for_checkpoint(soak, name, k, proc):
            with read_only_store(db) as how:
                rc1, _, err1 = proc.wait()
            row["at"] += f" ({how})"
        else:
            row["at"] += " (the run ended first: not injected)"
        msg_ok = rc1 is None or (rc1 == 2 and str(db) in err1 and "Traceback" not in proc.log.read_text(errors="replace"))
        first = run_record(soak.storage(name))
        rc, result, err = soak.start(name).wait()  # the store takes writes again: the same --name continues
        row["outcome"] = (("message, then resumed" if msg_ok and rc == 0 else f"rc {rc1}/{rc}: {(err1 or err)[:80]}")
                          + (", same MLflow run" if result and first and result["run_id"] == first["run_id"]
                             else ", NEW MLflow run"))
        finish(result)
    elif fault == "concurrent":
        procs = [soak.start(f"{name}-{j}", register=True, extra=(f"optim.seed={rng.randrange(1000)}",)) for j in range(2)]
        outs = [p.wait() for p in procs]
        row["at"] = "2 runs registering"
        row["outcome"] = "both finished and registered" if all(o[0] == 0 and o[1] and o[1]["version"] for o in outs) \
            else "; ".join(f"rc {o[0]}: {o[2][:60]}" for o in outs)
        row["T/U/S/H %"] = " and ".join(tush(o[1]) for o in outs)
        row["same"] = "n/a"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder (removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--faults", nargs="*", default=list(FAULTS), choices=FAULTS)
    args = p.parse_args(argv)

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="dedn-soak-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEDN_HOME": str(work / "home"), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    os.environ.update({"DEDN_HOME": env["DEDN_HOME"]})
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from dedn.data.synthetic import write_synthetic  # heavy: after the arguments (see the imports above)

    data = work / "cub-tiny"
    if not (data / "dataset.json").is_file():
        write_synthetic(data, "CUB", None, channels=16, height=2, width=2, images_per_class=2, seed=0, progress=False)
    # the demo's settings (calibrated stacking, lr 1e-3) so that the tiny set learns a little
    overrides = ["variant=reference", "optim.lr=0.001", f"epochs={args.epochs}", "optim.max_steps_per_epoch=4",
                 "eval.batch_size=64"]
    soak = Soak(work, data, args.num_workers, overrides, env)
    print(f"soak: {args.rounds} rounds, seed {args.seed}, {args.num_workers} worker(s), work folder {work} "
          "(SEMI-SYNTHETIC tiny CUB-shaped data)", flush=True)
    t0 = time.time()
    rc, clean, err = soak.start("clean").wait()
    if rc != 0 or clean is None:
        print(f"the clean run failed (rc {rc}): {err}; log: {soak.work / 'logs'}", file=sys.stderr)
        return 1
    print(f"clean run: test T/U/S/H {tush(clean)} % in {time.time() - t0:.0f} s", flush=True)

    rng = random.Random(args.seed)
    rows, failures = [], 0
    for i in range(1, args.rounds + 1):
        fault = rng.choice(args.faults)
        t = time.time()
        row = run_round(soak, i, fault, rng, clean, args.epochs)
        problems = check_store(work)
        ok = not problems and row["same"] in ("yes", "n/a") and not row["outcome"].startswith("rc ")
        if fault.startswith("driver"):  # the same MLflow run continued, and the embedded Ray went with the driver
            ok = ok and "NEW MLflow run" not in row["outcome"] and "NOT reaped" not in row["outcome"] \
                and ("left after 15 s: 0 core" in row["at"] or "not injected" in row["at"])
        if fault == "store_readonly":  # the run the store could not end is continued, not replaced
            ok = ok and "NEW MLflow run" not in row["outcome"]
        row.update(seconds=f"{time.time() - t:.0f}", store="ok" if not problems else "; ".join(problems)[:120],
                   verdict="PASS" if ok else "FAIL")
        failures += not ok
        rows.append(row)
        print(" | ".join(row[c] for c in COLUMNS), flush=True)

    cols = COLUMNS
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] for c in cols) + " |")
    print(f"\n{len(rows) - failures}/{len(rows)} rounds passed in {time.time() - t0:.0f} s "
          f"(clean run: test T/U/S/H {tush(clean)} %; SEMI-SYNTHETIC data)")
    if not args.keep and args.workdir is None and failures == 0:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
