"""Which classes a phase trains on (seen) and recognises zero-shot (unseen).

Selection trains on xlsa17 `train` classes and treats `val` classes as unseen; the final
protocol trains on all seen classes and tests on the unseen ones. Classes in neither set
(e.g. the test-unseen classes during selection) are excluded from every softmax and argmax,
so validation never looks at test classes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from dedn.data.class_side import ClassSide

# phase -> (training split, evaluation split of seen classes, evaluation split of unseen classes)
PHASES: dict[str, tuple[str, str, str]] = {
    "select": ("train", "val_seen", "val_unseen"),
    "final": ("trainval", "test_seen", "test_unseen"),
}
TEST_SPLITS = PHASES["final"][1:]  # never read while choosing anything
SELECTION_SPLITS = PHASES["select"]


@functools.lru_cache(maxsize=256)
def _class_mask(ids: tuple[int, ...], num_classes: int, device: str) -> torch.Tensor:
    m = torch.zeros(num_classes, dtype=torch.bool)
    m[list(ids)] = True
    return m.to(device)


@functools.lru_cache(maxsize=256)
def _class_index(ids: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor(sorted(ids), dtype=torch.long).to(device)


@dataclass(frozen=True)
class ClassProtocol:
    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        s, u = set(self.seen), set(self.unseen)
        if s & u:
            raise ValueError(f"ClassProtocol: seen and unseen classes overlap: {sorted(s & u)[:10]}")
        if any(not 0 <= c < self.num_classes for c in s | u):
            raise ValueError(f"ClassProtocol: class ids must lie in [0, {self.num_classes})")

    @classmethod
    def selection(cls, class_side: ClassSide) -> "ClassProtocol":
        return cls(tuple(map(int, class_side.train_classes)), tuple(map(int, class_side.val_classes)), class_side.num_classes)

    @classmethod
    def final(cls, class_side: ClassSide) -> "ClassProtocol":
        return cls(tuple(map(int, class_side.seen_classes)), tuple(map(int, class_side.unseen_classes)), class_side.num_classes)

    @classmethod
    def for_phase(cls, phase: str, class_side: ClassSide) -> "ClassProtocol":
        if phase not in PHASES:
            raise ValueError(f"phase: expected one of {'|'.join(PHASES)}, found {phase!r}")
        return cls.selection(class_side) if phase == "select" else cls.final(class_side)

    @classmethod
    def of_run(cls, protocol: str, class_side: ClassSide) -> "ClassProtocol":
        """The classes of a model trained under run config `protocol`: a final-phase model (protocol
        final, as the final phase and every registered model run) knows seen/unseen, any other the
        selection's train/val classes."""
        return cls.for_phase("final" if protocol == "final" else "select", class_side)

    def _mask(self, ids: tuple[int, ...], device: torch.device | str | None) -> torch.Tensor:
        """The (K,) bool mask of `ids`, built once per protocol and device (a loss asks every step; on a
        GPU each build is a host-to-device copy the step waits for). Shared: callers must not write to it."""
        return _class_mask(ids, self.num_classes, str(torch.device(device or "cpu")))

    def seen_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self._mask(self.seen, device)  # (K,) bool

    def unseen_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self._mask(self.unseen, device)  # (K,) bool

    def active_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Classes taking part in this phase: seen or unseen."""
        return self._mask(self.seen + self.unseen, device)  # (K,) bool

    def active_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The active class ids, ascending (the columns `x[..., active_mask]` keeps, in its order), for
        `index_select`: a boolean-mask index makes a GPU step wait for the count. Cached, shared."""
        return _class_index(self.seen + self.unseen, str(torch.device(device or "cpu")))

    def unseen_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The unseen class ids, ascending (see `active_index`)."""
        return _class_index(self.unseen, str(torch.device(device or "cpu")))

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.seen, dtype=np.int64), np.asarray(self.unseen, dtype=np.int64)
