"""Several processes on one new store at once: store creation and champion promotion (issue 12, item 5)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import register_at_once

H = [0.31, 0.42, 0.27, 0.39, 0.40, 0.35, 0.41, 0.29]  # validation H of the versions, registered 2 per process


@pytest.mark.timeout(240)
def test_concurrent_first_use_and_registrations_end_on_the_best_version(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    codes = register_at_once({"DEDN_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": None}, "toy-conc", H)
    assert codes == [0, 0, 0, 0], "a process failed (store creation or registration)"

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from dedn import tracking

    c = tracking.client()
    versions = c.search_model_versions("name='toy-conc'")
    assert len(versions) == 8
    by_h = {float(v.tags["val_H"]): str(v.version) for v in versions}
    champion = str(c.get_model_version_by_alias("toy-conc", "champion").version)
    assert champion == by_h[max(H)]
