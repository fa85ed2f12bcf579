"""Score feature maps with a registered DEDN model; write predictions to Parquet.

    python jobs/predict.py --model models:/dedn-awa2@champion --data DIR --split test_unseen --out preds.parquet
    python jobs/predict.py --model models:/dedn-cub/3 --features my_features.parquet --out preds.parquet
    python jobs/predict.py --model ... --data DIR --split test_unseen --extra-classes new_classes.csv --out ...

--features: a Parquet file with the shard columns (sample_id int64, features list<float>[C*H*W];
label optional). --extra-classes: CSV or Parquet with column `name` then the D attribute values
of classes that did not exist at training time; they are row-normalised, appended to the class
attribute matrix A and compete in the argmax as `new` classes — no retraining.

Output columns: sample_id, class_id, class_name, kind (seen | unseen | new), score (the winning
class's score after calibrated stacking), and label when the input has labels.

--data: the model must have been trained on that dataset's data (the same dataset name, feature
shape, class side and semi-synthetic or not, as recorded at registration); otherwise one `error:`
line names the model, the dataset and both identities, before any feature is read. A model logged
before models recorded their data is checked on its feature shape only (a note says so).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dedn.atomic import atomic_path
from dedn.cli import HelpFormatter
from dedn.errors import ConfigError, DatasetError, DednError

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="", help="model URI (default: models:/<family>-<dataset>@champion of --data's dataset)")
    p.add_argument("--family", default="dedn", help="model family for the default URI (dedn, msdn, d3gzsl, or one of yours)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", default="", help="dataset directory to score one split of")
    src.add_argument("--features", default="", help="Parquet file of feature rows (shard columns)")
    p.add_argument("--split", default="test_unseen", help="split of --data to score")
    p.add_argument("--extra-classes", default="", help="CSV/Parquet: name, then D attribute values per new class")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--batch-size", type=int, default=256, help="images scored at once")
    return p.parse_args(argv)


def _feature_batches(args: argparse.Namespace, feature_shape: tuple[int, int, int]):
    """Yields (sample_ids (B,), labels (B,) or None, features (B, C, H, W) float32, where each row is from)."""
    import numpy as np  # heavy: after the arguments (see the imports above)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq


    if args.data:
        from dedn.data import FeatureDataset  # heavy: after the arguments (see the imports above)
        from dedn.data.reader import ShardReader

        ds = FeatureDataset.open(args.data)
        if tuple(ds.feature_shape) != tuple(feature_shape):
            raise DatasetError(Path(args.data) / "dataset.json", "feature_shape", f"{list(feature_shape)} (the model's)",
                               list(ds.feature_shape))
        for b in ShardReader(ds, args.split, batch_size=args.batch_size, shuffle=False):
            ids = b.sample_ids.numpy()
            yield ids, b.labels.numpy(), b.features.numpy(), [f"sample_id {i} of split {args.split}" for i in ids]
        return
    path = Path(args.features)
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise DatasetError(path, "file", "a Parquet file", f"{type(e).__name__}: {e}") from None
    schema = pf.schema_arrow
    names = schema.names
    for col in ("sample_id", "features"):
        if col not in names:
            raise DatasetError(path, "columns", "sample_id, features (label optional)", names)
    _check_column_types(path, schema)
    size = int(np.prod(feature_shape))
    cols = ["sample_id", "features"] + (["label"] if "label" in names else [])
    first = 0
    for rb in pf.iter_batches(batch_size=args.batch_size, columns=cols):
        feats = rb.column("features")
        n = rb.num_rows
        lengths = pc.list_value_length(feats).to_numpy(zero_copy_only=False)  # per row: a shifted row is caught
        bad = np.flatnonzero(lengths != size)
        if bad.size:
            raise DatasetError(path, "features", f"{size} values per row (C*H*W of {list(feature_shape)})",
                               f"{lengths[bad[0]]} in row {first + int(bad[0])}")
        x = feats.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, *feature_shape)  # (B, C, H, W)
        ids = rb.column("sample_id").to_numpy().astype(np.int64)
        rows = np.flatnonzero(~np.isfinite(x).reshape(n, -1).all(1))
        if rows.size:
            raise DatasetError(path, "features", "finite values",
                               f"NaN or inf in row {first + int(rows[0])} (sample_id {ids[rows[0]]})")
        labels = rb.column("label").to_numpy().astype(np.int64) if "label" in cols else None
        yield ids, labels, x, [f"row {first + i} (sample_id {ids[i]})" for i in range(n)]
        first += n


def _check_column_types(path: Path, schema) -> None:
    """sample_id and label integers, features a list of numbers: otherwise a message naming the column."""
    import pyarrow as pa  # heavy: after the arguments (see the imports above)


    for col in ("sample_id", "label"):
        if col in schema.names and not pa.types.is_integer(schema.field(col).type):
            raise DatasetError(path, col, "an integer column", str(schema.field(col).type))
    t = schema.field("features").type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not (
            pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise DatasetError(path, "features", "a list of numbers per row (C*H*W values)", str(t))


def _check_same_data(uri: str, predictor, ds, data: str) -> None:
    """The model's data identity against the dataset's, from the manifest and class side alone (no shard read)."""
    from dedn.data import MANIFEST_FILE  # heavy: after the arguments (see the imports above)
    from dedn.tracking.registry import DataIdentity, resolve_version, versions_on_data

    want, have = predictor.data_identity, DataIdentity.of_dataset(ds)
    if want is None:
        print(f"note: model {uri} records no data identity (logged before models recorded their data); only its "
              f"feature shape is checked against {data}", file=sys.stderr)
        return
    if want == have:
        return
    resolved = resolve_version(uri)
    model = uri if resolved is None or uri.endswith(f"/{resolved[1]}") else f"{uri} (version {resolved[1]})"
    hint = ""
    if resolved is not None:
        same = versions_on_data(resolved[0], have)
        hint = (f"; versions trained on this data: {', '.join(f'models:/{resolved[0]}/{v}' for v in same)}" if same
                else f"; no version of {resolved[0]} was trained on this data")
    raise DatasetError(Path(data) / MANIFEST_FILE, "data identity", f"the data of model {model}: {want}",
                       f"{have} (differs: {'; '.join(want.differences(have))}){hint}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import numpy as np  # heavy: after the arguments (see the imports above)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedn.tracking.registry import load_predictor, read_extra_classes, registered_name

    try:
        uri = args.model
        ds = None
        if args.data:
            from dedn.data import FeatureDataset  # heavy: after the arguments (see the imports above)

            ds = FeatureDataset.open(args.data, verify="none")  # manifest and class side: the data's identity
        if not uri:
            if ds is None:
                raise ConfigError("--model", "a model URI when --features is given", "none", "command line")
            uri = f"models:/{registered_name(ds.name, args.family)}@champion"
        out_path = Path(args.out)
        if out_path.is_dir():
            raise ConfigError("--out", "a Parquet file path", f"{out_path} (a directory)", "command line")
        predictor = load_predictor(uri)
        if ds is not None:
            _check_same_data(uri, predictor, ds, args.data)
        names = list(predictor.class_names)
        extra = None
        if args.extra_classes:
            new_names, extra = read_extra_classes(args.extra_classes, predictor.num_attributes, names)
            names += new_names
        source = Path(args.features or args.data)
        out_cols: dict[str, list[np.ndarray]] = {"sample_id": [], "class_id": [], "score": [], "label": []}
        has_labels = True
        for ids, labels, x, where in _feature_batches(args, predictor.feature_shape):
            flat = x.reshape(x.shape[0], -1)
            zero = np.flatnonzero(~flat.any(1))
            if zero.size:  # nothing to attend to: every class would score 0 and class 0 would "win"
                raise DatasetError(source, "features", "a feature map with non-zero values", f"all zeros at {where[zero[0]]}")
            scores = predictor.scores(x, extra)  # (B, K + E)
            # non-finite scores, or one score for every class (1e30-sized features overflow the
            # normalisation to zero): no class is preferred, and the argmax would name class 0
            broken = np.flatnonzero(~np.isfinite(scores).all(1) | (scores.max(1) == scores.min(1)))
            if broken.size:
                raise DatasetError(source, "features", "values the model can score (finite scores that differ "
                                   "between classes)", f"degenerate scores at {where[broken[0]]} (feature "
                                   f"magnitude up to {float(np.abs(flat[broken[0]]).max()):.3g})")
            pred, score = predictor.decide(scores)  # (B,), (B,)
            out_cols["sample_id"].append(ids)
            out_cols["class_id"].append(pred)
            out_cols["score"].append(score)
            has_labels = has_labels and labels is not None
            if labels is not None:
                out_cols["label"].append(labels.astype(np.int64))
        class_id = np.concatenate(out_cols["class_id"]) if out_cols["class_id"] else np.zeros(0, np.int64)
        table = {
            "sample_id": np.concatenate(out_cols["sample_id"]) if out_cols["sample_id"] else np.zeros(0, np.int64),
            "class_id": class_id,
            "class_name": np.asarray([names[i] for i in class_id], dtype=object),
            "kind": predictor.kind(class_id),
            "score": np.concatenate(out_cols["score"]) if out_cols["score"] else np.zeros(0, np.float32),
        }
        if has_labels and out_cols["label"]:
            table["label"] = np.concatenate(out_cols["label"])

        out = Path(args.out)
        with atomic_path(out) as tmp:
            pq.write_table(pa.table(table), tmp)
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kinds = {k: int((table["kind"] == k).sum()) for k in ("seen", "unseen", "new")}
    msg = f"{len(class_id)} predictions -> {out}  (predicted kinds: {kinds}; model {uri})"
    if "label" in table and len(class_id):
        msg += f"; top-1 accuracy {100 * float((table['label'] == class_id).mean()):.1f} %"
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
