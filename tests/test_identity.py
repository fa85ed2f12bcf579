"""Data identity of registered versions (issue 27, item 2): the class-side fingerprint, the tags, which
versions compete for `champion`, and the line a registration prints. No MLflow store needed."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
from toydata import toy_class_side

from dedn.tracking.registry import (DataIdentity, RegisteredVersion, best_version, class_side_fingerprint,
                                    competing_versions)

# the toy class side's fingerprint, pinned: a change to the hashing makes every recorded version look
# like other data (it must come with a new "dedn class side vN" prefix and a migration, not silently)
TOY_FINGERPRINT = "97882ab841344d288458ff0f52e1d75e4097e53c842bab36a7425d94f3a9a411"


def test_fingerprint_is_deterministic_and_sees_what_matters():
    cs = toy_class_side()
    assert class_side_fingerprint(cs) == TOY_FINGERPRINT
    # the same class side however its arrays are held: dtype, split order, a copy
    same = dataclasses.replace(cs, attributes=cs.attributes.astype(np.float64), seen_classes=cs.seen_classes[::-1].copy(),
                               unseen_classes=list(cs.unseen_classes))
    assert class_side_fingerprint(same) == TOY_FINGERPRINT
    # word vectors and clusters shape a model, not the data it scores
    assert class_side_fingerprint(dataclasses.replace(cs, word_vectors=cs.word_vectors * 2, clusters={})) == TOY_FINGERPRINT
    attrs = cs.attributes.copy()
    attrs[0, 0] += 1e-3
    changed = {
        "class names": dataclasses.replace(cs, class_names=("other",) + cs.class_names[1:]),
        "attribute names": dataclasses.replace(cs, attribute_names=cs.attribute_names[::-1]),
        "attributes": dataclasses.replace(cs, attributes=attrs),
        "seen/unseen": dataclasses.replace(cs, seen_classes=np.arange(5), unseen_classes=np.array([5, 6, 7])),
        "val split": dataclasses.replace(cs, train_classes=np.arange(5), val_classes=np.array([5])),
    }
    prints = {k: class_side_fingerprint(v) for k, v in changed.items()}
    assert TOY_FINGERPRINT not in prints.values() and len(set(prints.values())) == len(prints)


def _ident(shape=(16, 2, 2), semi=True, name="AWA1", cs=TOY_FINGERPRINT) -> DataIdentity:
    return DataIdentity(name, shape, cs, semi)


def test_identity_tags_round_trip_and_unknown_tags():
    a = _ident()
    tags = a.tags()
    assert tags == {"data_name": "AWA1", "data_feature_shape": "[16, 2, 2]", "data_class_side": TOY_FINGERPRINT,
                    "semi_synthetic": "true"}
    assert DataIdentity.from_tags({**tags, "val_H": "0.3"}) == a
    assert DataIdentity.from_json(a.to_json()) == a
    # registered before identities: only the old semi_synthetic tag, or half-written / edited tags
    assert DataIdentity.from_tags({"val_H": "0.3", "semi_synthetic": "true"}) is None
    assert DataIdentity.from_tags({**tags, "data_feature_shape": "16x2x2"}) is None
    assert DataIdentity.from_tags({**tags, "semi_synthetic": "maybe"}) is None
    assert DataIdentity.from_json(None) is None
    b = _ident((2048, 1, 1), semi=False, cs="cd34" * 16)
    assert a.differences(b) == ["feature shape [16, 2, 2] -> [2048, 1, 1]", f"class side {TOY_FINGERPRINT[:12]} -> cd34cd34cd34",
                                "semi-synthetic -> real features"]
    assert a.differences(a) == []


def _v(version: int, h: float | None, ident: DataIdentity | None = None, **extra: str):
    tags = {**({} if ident is None else ident.tags()), **({} if h is None else {"val_H": repr(h)}), **extra}
    return SimpleNamespace(version=str(version), tags=tags)


def test_only_versions_of_the_newest_data_compete():
    semi, real = _ident(), _ident((2048, 1, 1), semi=False)
    # the user's report: version 1 on semi-synthetic data has the higher H; version 2 is on real-shaped data
    assert best_version([_v(1, 0.5, semi), _v(2, 0.3, real)]) == "2"
    # on the same data, validation H decides (a tie keeps the earlier version)
    assert best_version([_v(1, 0.5, semi), _v(2, 0.3, real), _v(3, 0.4, real), _v(4, 0.4, real)]) == "3"
    # back to the older data: its own best version, not the newest
    assert best_version([_v(1, 0.5, semi), _v(2, 0.3, real), _v(3, 0.1, semi)]) == "1"
    # no version records an identity (all registered before this rule): every version competes, as before
    assert best_version([_v(1, 0.3), _v(2, 0.5), _v(3, 0.4)]) == "2"
    # versions that record none stop competing once one does (even a better one, even a newer one:
    # e.g. a version whose tags are still being written by a concurrent registration)
    assert best_version([_v(1, 0.9), _v(2, 0.3, semi), _v(3, 0.8)]) == "2"
    assert [v.version for v in competing_versions([_v(1, 0.9), _v(2, 0.3, semi), _v(3, 0.8)])] == ["2"]
    # no finite H among the competitors: the newest of them
    assert best_version([_v(1, 0.5, semi), _v(2, None, real), _v(3, None, real)]) == "3"
    assert best_version([]) is None


def test_registration_line_names_what_differs():
    semi = _ident(cs="ab12" * 16)
    real = _ident((2048, 1, 1), semi=False, cs="cd34" * 16)

    def line(version, champion_version, identity, prev_version, prev_identity, champion_identity):
        return RegisteredVersion("dedn-awa1", version, f"models:/dedn-awa1/{version}", champion_version == version, 0.5,
                                 champion_version, identity, prev_version, prev_identity, champion_identity).champion_line()

    assert line("2", "2", real, "1", semi, real) == (
        "alias champion moved here: data differs from version 1's (feature shape [16, 2, 2] -> [2048, 1, 1]; "
        "class side ab12ab12ab12 -> cd34cd34cd34; semi-synthetic -> real features); versions of other data no longer compete")
    assert line("3", "1", semi, "2", real, semi).startswith(
        "alias champion moved to version 1, the best version on this data: data differs from version 2's (feature shape "
        "[2048, 1, 1] -> [16, 2, 2]")
    assert line("2", "2", real, "1", None, real).startswith(
        "alias champion moved here: version 1 records no data identity (registered before versions recorded their data)")
    # a concurrent registration on other data took the alias meanwhile
    assert line("3", "4", semi, "1", semi, real).startswith("alias champion is on version 4, registered meanwhile on other data")
    # the same data: the lines as before
    assert line("3", "1", semi, "1", semi, semi) == ("alias champion stays on version 1 (its validation H 0.5 is not "
                                                     "beaten; a tie keeps the earlier version)")
    assert line("3", "3", semi, "1", semi, semi) == "alias champion moved here"
    assert RegisteredVersion("m", "1", "models:/m/1", True, None, "1", semi).champion_line() == "alias champion set"
