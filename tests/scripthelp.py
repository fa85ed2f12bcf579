"""A script's `--help`, run once per session as a user runs it: tests/test_quiet.py (every script starts
from outside the checkout) and tests/test_docs_commands.py (the flags the docs show) read the same
subprocess, not one each (the bench scripts import torch: about 1.5 s apiece)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@cache
def script_help(script: str, *sub: str) -> subprocess.CompletedProcess:
    """`python <checkout>/<script> [sub ...] --help` from an empty folder outside the checkout with nothing
    on PYTHONPATH: the script's own folder is all Python adds to the path, so `dedn` must come from the
    install."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory(prefix="dedn-help-") as cwd:
        return subprocess.run([sys.executable, str(ROOT / script), *sub, "--help"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=180)
