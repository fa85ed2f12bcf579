"""Issue 11: no import-path edits, and a quick start without library banners.

- No module changes the interpreter's import path: jobs and tools import the installed `dedn`,
  tests load a job by file path (toydata.load_job).
- Every job script starts (`--help`) from outside the checkout with nothing on PYTHONPATH.
- pyproject.toml builds without a setuptools deprecation banner (the SPDX `license` string, with the
  setuptools floor that reads it).
"""
from __future__ import annotations

import os
import re
import tomllib
import warnings
from pathlib import Path

import pytest
from scripthelp import script_help

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "venv", "build", "dist", ".git", ".pytest_cache", "__pycache__"}
PATH_EDIT = re.compile(r"\bsys\.path\s*(\.\s*(insert|append|extend|remove|pop|clear)\b|\[[^\]]*\]\s*=|\+=|=(?!=))")


def _sources() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def test_no_import_path_edits():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in _sources()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if PATH_EDIT.search(line)]
    assert not hits, "import-path edits (install the package instead):\n" + "\n".join(hits)


@pytest.mark.parametrize("script", sorted(p.relative_to(ROOT).as_posix() for p in
                                          [*(ROOT / "jobs").glob("*.py"), *(ROOT / "bench").glob("*.py"),
                                           ROOT / "tools" / "pack_assets.py"]))
def test_script_starts_from_anywhere(script):
    """The script's own folder is all Python adds to the path: `dedn` must come from the install
    (`--help` from an empty folder, nothing on PYTHONPATH; shared with tests/test_docs_commands.py)."""
    r = script_help(script)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_pyproject_license_is_spdx_with_matching_setuptools_floor():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert isinstance(meta["project"]["license"], str)  # PEP 639; the table form is deprecated
    floors = [re.match(r"setuptools\s*>=\s*([\d.]+)", r) for r in meta["build-system"]["requires"]]
    floor = next(tuple(int(x) for x in m.group(1).split(".")) for m in floors if m)
    assert floor >= (77,), "setuptools reads an SPDX `project.license` string from 77.0 on"


def test_pyproject_applies_without_setuptools_warnings(monkeypatch):
    """What the build backend does with pyproject.toml during `pip install -e .`, minus the build."""
    pytest.importorskip("setuptools", minversion="77")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    from setuptools.warnings import SetuptoolsWarning

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), "pyproject.toml")
    banners = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, SetuptoolsWarning)]
    assert not banners, banners
    assert dist.metadata.license_expression == "MIT"
