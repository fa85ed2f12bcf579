"""Every dedn error crosses a process boundary intact: pickle round trip keeps type, message and attributes.

The error classes are found in the package's source (any class deriving, directly or through
another, from DednError), so a subclass added later is tested without touching this file.
"""
from __future__ import annotations

import ast
import copy
import importlib
import inspect
import pickle
from pathlib import Path

import pytest

import dedn
from dedn.errors import ConfigError, DatasetError, DednError, NonFiniteLossError, is_retryable

PACKAGE = Path(dedn.__file__).resolve().parent


def _error_classes_in_source() -> list[tuple[str, str]]:
    """(module, class name) of every class in dedn/ whose bases lead to DednError (by name, to a fixpoint)."""
    classes = []  # (module, name, base names)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("dedn", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, (ast.Name, ast.Attribute))}
                classes.append((module, node.name, bases))
    names, found = {"DednError"}, set()
    while True:
        new = {(m, n) for m, n, bases in classes if bases & names} - found
        if not new:
            return sorted(found)
        found |= new
        names |= {n for _, n in new}


ERROR_CLASSES = _error_classes_in_source()

# Example constructor arguments; a class not listed gets a string for each required parameter.
EXAMPLES = {
    "DatasetError": (("/data/cub/shards/trainval-00003.parquet", "features", "finite values", "NaN in row 7"), {}),
    "ConfigError": (("k", "e", "f"), {}),
    "NonFiniteLossError": ((3, 17, {"loss": float("nan"), "L_cls": 1.5}), {}),
    "CheckpointError": (("/runs/x/state.pt", "a checkpoint file", "no such file"), {}),
}


def _example(cls: type) -> DednError:
    if cls.__name__ in EXAMPLES:
        args, kwargs = EXAMPLES[cls.__name__]
        return cls(*args, **kwargs)
    params = [p for p in inspect.signature(cls.__init__).parameters.values()][1:]
    args = [f"<{p.name}>" for p in params
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kwargs = {p.name: f"<{p.name}>" for p in params if p.default is p.empty and p.kind == p.KEYWORD_ONLY}
    if not params:
        args = ["message"]
    return cls(*args, **kwargs)


def _assert_same(a: BaseException, b: BaseException) -> None:
    assert type(b) is type(a)
    assert str(b) == str(a)
    assert b.args == a.args
    assert {k: repr(v) for k, v in vars(b).items()} == {k: repr(v) for k, v in vars(a).items()}  # repr: NaN != NaN


def test_the_known_errors_are_found():
    found = {n for _, n in ERROR_CLASSES}
    assert {"DatasetError", "ConfigError", "NonFiniteLossError", "CheckpointError"} <= found


@pytest.mark.parametrize("module,name", ERROR_CLASSES, ids=[f"{m}.{n}" for m, n in ERROR_CLASSES])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_every_error_round_trips_through_pickle(module, name, protocol):
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # another module of the package being restructured; not this test's subject
        pytest.skip(f"{module} does not import: {e}")
    cls = getattr(mod, name)
    assert issubclass(cls, DednError) and cls.retryable is False
    err = _example(cls)
    back = pickle.loads(pickle.dumps(err, protocol=protocol))
    _assert_same(err, back)
    _assert_same(err, copy.deepcopy(err))
    with pytest.raises(cls):  # and it can be raised again as itself
        raise back


def test_issue_reproduction():
    err = pickle.loads(pickle.dumps(ConfigError("k", "e", "f")))
    assert str(err) == "config: k: expected e, found 'f'"
    assert (err.key, err.expected, err.found, err.source) == ("k", "e", "f", "config")


def test_attributes_changed_after_construction_and_notes_survive():
    err = DatasetError("/d/dataset.json", "splits", "x", "y")
    err.add_note("while opening the dataset for phase final")
    err.extra = {"rank": 1}
    back = pickle.loads(pickle.dumps(err))
    _assert_same(err, back)
    assert back.__notes__ == ["while opening the dataset for phase final"] and back.extra == {"rank": 1}


def test_subclass_with_its_own_constructor_survives():
    class ShardGone(DatasetError):  # keyword-only arguments and a different message than __init__'s args
        def __init__(self, *, shard: str, rank: int):
            self.rank = rank
            super().__init__(shard, "file", "a shard", f"gone on rank {rank}")

    globals()["ShardGone"] = ShardGone  # pickled by reference: it must be importable by name
    ShardGone.__qualname__ = "ShardGone"
    try:
        err = ShardGone(shard="/d/shards/a.parquet", rank=3)
        back = pickle.loads(pickle.dumps(err))
        _assert_same(err, back)
        assert back.rank == 3 and back.file == "/d/shards/a.parquet"
    finally:
        del globals()["ShardGone"]


def test_non_finite_loss_error_message():
    err = NonFiniteLossError(2, 40, {"loss": float("inf"), "L_cls": 0.25})
    assert str(err) == ("epoch 2, step 40: loss: expected a finite value, found loss=inf, L_cls=0.25 "
                        "(try a lower optim.lr, optim.grad_clip > 0, or check the features for NaN/inf)")
    assert isinstance(err, FloatingPointError) and (err.epoch, err.step, err.parts) == (2, 40, {"loss": float("inf"), "L_cls": 0.25})


def test_retryable_marks_user_errors():
    assert DednError.retryable is False
    assert not is_retryable(ConfigError("optim.seed", "a non-negative int", -1))
    try:
        try:
            raise DatasetError("/d/s.parquet", "sha256", "a", "b")
        except DatasetError as e:
            raise RuntimeError("worker failed") from e
    except RuntimeError as wrapped:
        assert not is_retryable(wrapped)  # looked through the explicit cause
    assert is_retryable(ConnectionError("node lost"))
    try:
        try:
            raise ConfigError("k", "e", "f")
        except ConfigError:
            raise OSError("disk gone")  # noqa: B904 - merely during handling (the case tested): judged on its own
    except OSError as e:
        assert is_retryable(e)
