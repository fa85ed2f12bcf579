"""Training runs in the store: create one (params, tags, nesting), continue one, and mark the orphans
a dead driver left RUNNING. Every MLflow call goes through `dedn.tracking.store`."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from dedn.procs import process_start
from dedn.tracking.location import tracking_uri
from dedn.tracking.names import DRIVER_TAG, experiment_name
from dedn.tracking.store import client, finish_run, run_tags, set_tags, start_run

if TYPE_CHECKING:
    from dedn.config import RunConfig

__all__ = ["Run", "start_training_run", "reopen_run", "mark_orphans"]


@dataclass
class Run:
    """A run created by the driver: its ids and where it lives."""

    run_id: str
    experiment_id: str
    experiment_name: str
    tracking_uri: str

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_tags(self.run_id, tags)

    def finish(self, status: str = "FINISHED") -> None:
        finish_run(self.run_id, status)


def start_training_run(cfg: "RunConfig", *, name: str, semi_synthetic: bool, experiment: str = "",
                       parent_run_id: str = "", tags: Mapping[str, str] | None = None) -> Run:
    """A training run: the full resolved config as params, the run tags, nested when parent_run_id is given.

    Runs of this experiment that a dead driver on this host left RUNNING are marked KILLED first.
    """
    exp = experiment or experiment_name(cfg.dataset)
    mark_orphans(exp)
    all_tags = run_tags(cfg, semi_synthetic=semi_synthetic, data_path=cfg.data.path,
                        extra={"ray_train_run": name, DRIVER_TAG: _driver_id(), **(tags or {})})
    exp_id, run_id = start_run(name, experiment=exp, tags=all_tags, params=cfg.flat(), parent_run_id=parent_run_id)
    return Run(run_id, exp_id, exp, tracking_uri())


def reopen_run(run_id: str) -> Run | None:
    """The run a resumed training continues (its history stays whole), RUNNING again; None if the store lacks it."""
    from mlflow.exceptions import MlflowException  # mlflow on use (dedn.tracking.store's docstring)

    c = client()
    try:
        run = c.get_run(run_id)
    except MlflowException:
        return None
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, DRIVER_TAG, _driver_id())
    exp = c.get_experiment(run.info.experiment_id)
    return Run(run_id, run.info.experiment_id, exp.name, tracking_uri())


def _driver_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{process_start(pid) or ''}"


def mark_orphans(experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment` whose driver ran on this host and is gone; their ids.

    A driver is identified by host, pid and process start time (a reused pid is not the same
    driver). Runs opened on other hosts are left alone: from here their driver cannot be seen.
    """
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        return []
    host = socket.gethostname()
    killed = []
    for run in client().search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'"):
        who = run.data.tags.get(DRIVER_TAG, "")
        h, _, rest = who.partition(":")
        pid_s, _, started = rest.partition(":")
        if h != host or not pid_s.isdigit():
            continue
        now = process_start(int(pid_s))
        alive = now is not None and (now == started or not (now and started))
        if not alive:
            client().set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
    return killed
