"""The model, the training loop, the reader and resident data work without Ray or MLflow (issue 24, item 3).

`make lint` checks the imports statically (import-linter, pyproject.toml [tool.importlinter]); this
imports them, and trains one step, in a Python where `import ray` and `import mlflow` fail.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from toydata import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_RAY_OR_MLFLOW = textwrap.dedent("""
    import importlib.abc
    import sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "mlflow"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocked())
""")

SCRIPT = WITHOUT_RAY_OR_MLFLOW + textwrap.dedent("""
    import sys
    from pathlib import Path

    import dedn.data.reader, dedn.data.resident, dedn.nn.attention, dedn.nn.losses, dedn.training.loop
    from dedn.config import build_config
    from dedn.data import FeatureDataset
    from dedn.families import family_names, get_family
    from dedn.training.loop import run_protocol

    for name in family_names():  # every built-in family, its model and loss modules
        get_family(name)
    root = Path(sys.argv[1])
    cfg = build_config(None, {"dataset": "TOY", "data.path": str(root), "protocol": "select", "epochs": 1,
                              "optim.max_steps_per_epoch": 1, "optim.batch_size": 4})
    result = run_protocol(cfg, FeatureDataset.open(root))
    assert result.select is not None and len(result.select.history) == 1
    assert not {m.split(".")[0] for m in sys.modules} & {"ray", "mlflow"}
    print("ok", family_names())
""")


def test_the_model_the_loop_and_the_reader_need_neither_ray_nor_mlflow(tmp_path: Path) -> None:
    blocked = subprocess.run([sys.executable, "-c", WITHOUT_RAY_OR_MLFLOW + "import ray"], capture_output=True,
                             text=True, cwd=ROOT)
    assert blocked.returncode != 0 and "ray is blocked" in blocked.stderr  # the blocker works
    root = write_toy_dataset(tmp_path / "toy")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("ok"), out.stdout


WITHOUT_TORCH = WITHOUT_RAY_OR_MLFLOW.replace('("ray", "mlflow")', '("torch",)')

DECODE_SCRIPT = WITHOUT_TORCH + textwrap.dedent("""
    import sys

    import numpy as np

    import dedn.training.node_cache  # the module Ray imports in the node's decode actor
    from dedn.data import FeatureDataset
    from dedn.data.reader import decode_split_arrays

    got = decode_split_arrays(FeatureDataset.open(sys.argv[1]), "trainval")
    np.savez(sys.argv[2], features=got.features, labels=got.labels, sample_ids=got.sample_ids)
    assert "torch" not in sys.modules
""")


def test_the_nodes_decode_actor_needs_no_torch(tmp_path: Path) -> None:
    """The node-shared copy's actor (dedn.training.node_cache) decodes without torch: its process is
    about 1 CPU-s and 190 MB lighter, once per node and job. Its arrays equal the torch decode's
    and the streaming reader's."""
    import numpy as np

    from dedn.data import FeatureDataset
    from dedn.data.reader import ShardReader
    from dedn.data.resident import decode_split

    blocked = subprocess.run([sys.executable, "-c", WITHOUT_TORCH + "import torch"], capture_output=True, text=True,
                             cwd=ROOT)
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr  # the blocker works
    root = write_toy_dataset(tmp_path / "toy")
    out = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(root), str(tmp_path / "got.npz")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.load(tmp_path / "got.npz")
    want = decode_split(FeatureDataset.open(root), "trainval")
    assert got["features"].shape == tuple(want.features.shape) and got["features"].dtype == want.features.numpy().dtype
    assert np.array_equal(got["features"], want.features.numpy())
    assert np.array_equal(got["labels"], want.labels) and np.array_equal(got["sample_ids"], want.sample_ids)
    # and both equal what the streaming reader yields in order: a path of its own (batch by batch)
    streamed = list(ShardReader(FeatureDataset.open(root), "trainval", batch_size=7, shuffle=False))
    assert np.array_equal(got["sample_ids"], np.concatenate([b.sample_ids.numpy() for b in streamed]))
    assert np.array_equal(got["labels"], np.concatenate([b.labels.numpy() for b in streamed]))
    assert np.array_equal(got["features"].astype(np.float32), np.concatenate([b.features.numpy() for b in streamed]))
