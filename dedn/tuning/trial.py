"""One trial of a sweep: the training job's own driver on a selection run, as a Tune function trainable.

Every trial is `dedn.training.driver.train` (protocol select, so no test shard is opened): a
TorchTrainer of one or N workers whose report rounds reach Tune as in Ray's Train/Tune interop
examples, relayed by the trial's own thread (`_train_reporting_to_tune` says why not by Tune's
`TuneReportCallback`) from a file the run's controller writes on the trial's node (`_RelayReports`). The trial function holds a sliver of CPU; its workers share the rest of
the trial's budget. MLflow stays with the Tune driver (`dedn.tuning.sweep.MLflowSweepCallback`).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from ray import tune
from ray.train import UserCallback
from ray.tune.integration import ray_train

from dedn.config import RunConfig, known_keys
from dedn.data import FeatureDataset
from dedn.data.reader import ShardReader, forbid_splits
from dedn.protocol import SELECTION_SPLITS, TEST_SPLITS, ClassProtocol
from dedn.training import driver
from dedn.training.evaluate import evaluate
from dedn.training.loop import model_from_state


DRIVER_CPUS = 0.01  # what a distributed trial's own function holds


def open_for_selection(path: str | os.PathLike[str]) -> Any:
    """Open a dataset directory and check only the selection splits' shards.

    A plain `FeatureDataset.open` reads the footer of every shard, test ones included; a sweep
    must not open test files at all.
    """
    return FeatureDataset.open(path, splits=SELECTION_SPLITS)


def trial_config(base: Mapping[str, Any], config: Mapping[str, Any], search_lambdas: bool) -> RunConfig:
    """The base config (a run config dict) with this trial's sampled dotted keys applied."""
    cfg = RunConfig.from_dict(base, source="sweep base config")
    over = {k: v for k, v in config.items() if k in known_keys(cfg.model.name)}
    over["protocol"] = "select"
    over["eval.fit_weights"] = not search_lambdas
    return cfg.replace(**over)


def _trial_id() -> str:
    try:
        return tune.get_context().get_trial_id() or "trial"
    except (RuntimeError, AttributeError):  # called outside a Tune session (tests)
        return "trial"


def trial(config: dict[str, Any], *, base: dict[str, Any], data: str, search_lambdas: bool = False, workers: int = 1,
          cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, storage: str = "") -> None:
    """Ray Tune function trainable: one selection run through the training job's own driver.

    A TorchTrainer of `workers` workers (`dedn.training.driver.train`, protocol select, so no
    test shard is opened) whose reports reach Tune through this thread. MLflow stays
    with the Tune driver (track=False here). Re-running a trial of the same name and storage
    resumes it from its last checkpoint (an interrupted sweep).
    """
    cfg = trial_config(base, config, search_lambdas).replace(**{"data.path": data})
    settings = driver.TrainSettings(num_workers=workers, cpus_per_worker=cpus_per_worker, use_gpu=gpus_per_worker > 0,
                                    gpus_per_worker=gpus_per_worker, max_failures=0, num_to_keep=1,
                             register=False, track=False, verbose=False, storage_path=storage,
                             name=_trial_id())
    _train_reporting_to_tune(cfg, settings)


class _RelayReports(UserCallback):
    """Runs in the Ray Train controller: each report round's metrics (rank 0's) and checkpoint folder
    (under Tune's `checkpoint_path` key, as Tune's TuneReportCallback sends it), one JSON line each,
    appended to `path`.

    Ray Train places a run's controller on the node of the process that calls `fit()` (the trial's
    own, `DataParallelTrainer._initialize_and_run_controller`), so a file of the trial's on that
    node reaches it. Ray's own callback sends the rounds through a queue actor instead: one more
    process per trial, polled (measured: 1.3 CPU-s of a 4-trial sweep's 16.4 per trial).
    """

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item[ray_train.CHECKPOINT_PATH_KEY] = checkpoint.path
        line = json.dumps(item, default=lambda v: v.item() if hasattr(v, "item") else str(v)) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:  # one write of a whole line; the reader waits for its end
            f.write(line)


@contextlib.contextmanager
def _report_file() -> Iterator[Path]:
    """An empty file of this trial's, on its node, removed after.

    In the trial's working directory (Tune's `working_dirs/<trial>` under the Ray session's
    folder), which is node-local and never synced: not in its trial folder (`get_trial_dir`), which
    Tune copies to the sweep's storage while the trial runs, so a copy could list the file as it
    was removed (CI: a traceback from Tune's syncer in the sweep's output) and left it in the
    results. A trial stopped early by ASHA, whose `finally` may not run, leaves it with the session's
    other files. Outside a Tune session (tests call `trial` directly) a temporary folder.
    """
    with warnings.catch_warnings():  # outside a session Ray warns and returns None: that case is handled here
        warnings.simplefilter("ignore")
        storage = tune.get_context().get_storage()
    working_dir = None if storage is None else storage.trial_working_directory
    with contextlib.ExitStack() as stack:
        if working_dir is None:
            working_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dedn-trial-"))
        folder = Path(working_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f".dedn-reports-{uuid.uuid4().hex[:12]}.jsonl"
        path.write_bytes(b"")
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


def _train_reporting_to_tune(cfg: RunConfig, settings: driver.TrainSettings, poll_s: float = 0.1) -> None:
    """`driver.train` in a thread of its own while this thread hands its reports to Tune, the last one
    before the function returns.

    Not Tune's TuneReportCallback (Ray 2.60): its reports go to a queue that the trial actor's main
    thread drains, while the function's own end-of-trial report (Tune's "__duplicate__", sent when the
    function returns) goes from this thread into a one-slot queue that the same main thread drains.
    When a run's last report still waits in the first queue as the function returns (a busy Tune
    driver, a run that ends quickly), the main thread moves it into the full slot and waits there for
    itself forever: the trial never ends (seen as a sweep hanging with its trials idle). Here only
    this thread reports, one report at a time, through Tune's own `tune.report`, in the order the
    controller wrote them (`_RelayReports`).
    """
    failed: list[BaseException] = []
    with _report_file() as path:

        def run() -> None:
            try:
                driver.train(cfg, settings, callbacks=[_RelayReports(str(path))])
            except BaseException as e:  # noqa: BLE001 - raised again in the trial's thread below
                failed.append(e)

        worker = threading.Thread(target=run, name="dedn-trial-run", daemon=True)
        worker.start()
        relayed, pending = 0, ""
        with path.open(encoding="utf-8") as f:
            while True:
                ended = not worker.is_alive()  # before reading: every line written before the run ended is read below
                pending += f.read()
                *lines, pending = pending.split("\n")  # a line still being written stays pending
                for line in lines:
                    tune.report(json.loads(line))
                    relayed += 1
                if ended:
                    break
                time.sleep(poll_s)
    worker.join()
    if failed:
        raise failed[0]
    if relayed == 0:  # a run reports every epoch: its controller ran where this file is not
        raise RuntimeError(f"trial {_trial_id()}: the run ended but none of its reports reached this trial's node "
                           "(Ray Train's controller is expected on the node that calls fit())")


def validation_weight_grid(cfg: RunConfig, dataset: Any, model_state: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
                           device: str = "cpu") -> dict[str, np.ndarray]:
    """Validation T, U, S, H at every point of the family's inference-weight grid.

    One `evaluate` pass over val_seen / val_unseen with the weight fit on; its counts give every
    grid point. Returns each weight's values (n_i,) and T, U, S, H each of shape (n_1, n_2, ...).
    """
    with forbid_splits(TEST_SPLITS):
        model = model_from_state(cfg, dataset, model_state, meta).to(device)
        protocol = ClassProtocol.selection(dataset.class_side)
        seen, unseen = (ShardReader(dataset, split, batch_size=cfg.eval.batch_size, shuffle=False)
                        for split in ("val_seen", "val_unseen"))
        search = evaluate(model, seen, unseen, protocol, cfg, device=device, fit_weights=True).search
        assert search is not None
        grid = search.metrics_grid(protocol)
    return {**{n: np.asarray(v) for n, v in zip(search.names, search.values)}, **{k: v.numpy() for k, v in grid.items()}}


def worker_resources(cpus: float, gpus: float, workers: int) -> tuple[float, float]:
    """(CPUs, GPUs) each of a trial's `workers` asks for, out of the trial's `cpus` and `gpus`.

    The trial function holds DRIVER_CPUS of the CPUs (it only waits on the Ray Train controller; 0
    CPU is refused): with --cpus-per-trial 2 on a 2-CPU node, workers asking for 1 CPU each next to
    it never started (the worker group timed out after 60 s, measured; docs/stack-notes.md#ray-tune).
    GPUs are split evenly: 0.5 per trial of one worker packs two trials onto a GPU.
    """
    return max(0.01, (cpus - DRIVER_CPUS) / workers), gpus / workers


def tune_trainable(spec_base: dict[str, Any], data: str, search_lambdas: bool, workers: int, cpus: float,
                   sweep_dir: Path, gpus: float = 0.0) -> Any:
    """The Tune trainable with its resources: the trial function drives a TorchTrainer of `workers`
    workers, which share the trial's `cpus` and `gpus` (`worker_resources`)."""
    per_cpu, per_gpu = worker_resources(cpus, gpus, workers)
    fn = tune.with_parameters(trial, base=spec_base, data=data, search_lambdas=search_lambdas, workers=workers,
                              cpus_per_worker=per_cpu, gpus_per_worker=per_gpu, storage=str(sweep_dir / "train"))
    return tune.with_resources(fn, {"CPU": DRIVER_CPUS})
