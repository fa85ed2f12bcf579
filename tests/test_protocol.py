import numpy as np
import pytest
import torch

from dedn.data.class_side import ClassSide, normalize_rows
from dedn.protocol import PHASES, ClassProtocol


def _side():
    k, d = 6, 3
    return ClassSide(
        name="T", class_names=tuple(f"c{i}" for i in range(k)), attribute_names=("a", "b", "c"),
        attributes_raw=np.ones((k, d)), attributes=normalize_rows(np.ones((k, d))), word_vectors=np.ones((d, 2), np.float32),
        seen_classes=np.array([0, 1, 2, 3]), unseen_classes=np.array([4, 5]),
        train_classes=np.array([0, 1, 2]), val_classes=np.array([3]),
    )


# docs/method.md#two-phase-protocol
def test_selection_excludes_test_unseen_classes():
    p = ClassProtocol.selection(_side())
    assert p.seen == (0, 1, 2) and p.unseen == (3,)
    assert p.active_mask().tolist() == [True, True, True, True, False, False]
    assert PHASES["select"] == ("train", "val_seen", "val_unseen")


def test_final_protocol_masks():
    p = ClassProtocol.for_phase("final", _side())
    assert torch.equal(p.seen_mask(), torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool))
    assert torch.equal(p.unseen_mask(), ~p.seen_mask())


def test_overlap_and_range_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        ClassProtocol((0, 1), (1,), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ClassProtocol((0,), (3,), 3)
    with pytest.raises(ValueError, match="phase"):
        ClassProtocol.for_phase("test", _side())


def test_normalize_rows_keeps_zero_rows():
    x = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(x, [[0.6, 0.8], [0, 0]]) and x.dtype == np.float32
