"""Several processes on one new store at once: store creation and champion promotion (issue 12, item 5)."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
from conftest import registering_processes

H = [0.31, 0.42, 0.27, 0.39, 0.40, 0.35, 0.41, 0.29]  # validation H of the versions, registered 2 per process


def _register_two(home: str, start: "mp.synchronize.Barrier", hs: list[float], out: "mp.Queue") -> None:
    os.environ["DEDN_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from dedn import tracking
    from dedn.tracking.registry import CHAMPION, promote_best

    start.wait()  # every process creates the store and registers at the same moment
    tracking.init_store()
    c = tracking.client()
    try:
        c.create_registered_model("toy-conc")
    except Exception:  # noqa: BLE001 - another process created it first
        pass
    for h in hs:
        mv = c.create_model_version("toy-conc", source=f"file:///nowhere/{h}", run_id=None)
        c.set_model_version_tag("toy-conc", mv.version, "val_H", f"{h:.6f}")
        promote_best("toy-conc")
    out.put(str(c.get_model_version_by_alias("toy-conc", CHAMPION).version))


@pytest.mark.timeout(240)
def test_concurrent_first_use_and_registrations_end_on_the_best_version(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = registering_processes()
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_register_two, args=(str(tmp_path / "home"), start, H[2 * i:2 * i + 2], out))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(200)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0], "a process failed (store creation or registration)"

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from dedn import tracking

    c = tracking.client()
    versions = c.search_model_versions("name='toy-conc'")
    assert len(versions) == 8
    by_h = {float(v.tags["val_H"]): str(v.version) for v in versions}
    champion = str(c.get_model_version_by_alias("toy-conc", "champion").version)
    assert champion == by_h[max(H)]
