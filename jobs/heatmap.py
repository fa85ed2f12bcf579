"""Attention heat maps of cExp and fExp for chosen images and attributes (Figure 4 of the paper).

    python jobs/heatmap.py --model models:/dedn-cub@champion --data DIR --split test_unseen \\
        --samples 0,5 --attributes has_belly_color::grey,has_leg_color::white
    python jobs/heatmap.py --checkpoint ~/.dedn/ray_results/<run>/final-epoch0020 --data DIR \\
        --samples 3 --attributes 0,17,200 --image-root /data/CUB --image-files image_labels.npz

One PNG per image (row 1 cExp, row 2 fExp, one column per attribute, colour bar in attention
weight) in --out. The maps are drawn over the image when its file is known (--image-root, with the
image list from --image-files), on the H x W feature grid otherwise. The PNGs are
logged to an MLflow run when one is given (--run-id, or $MLFLOW_RUN_ID).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from dedn import tracking
from dedn.cli import HelpFormatter
from dedn.errors import ConfigError, DednError
from dedn.home import dedn_home

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default="", help="registered model URI, e.g. models:/dedn-cub@champion")
    src.add_argument("--checkpoint", default="", help="state.pt, a Ray Train checkpoint folder, or a model-files folder")
    p.add_argument("--data", required=True, help="dataset directory (dataset.json) the images come from")
    p.add_argument("--split", default="test_unseen", help="split to take the images from (default test_unseen)")
    p.add_argument("--samples", default="0", help="comma-separated row positions in the split (default 0)")
    p.add_argument("--attributes", required=True, help="comma-separated attribute names (or unique parts) or ids")
    p.add_argument("--image-root", default="", help="folder the image list's relative paths start from")
    p.add_argument("--image-files", default="", help="npz with image_files (e.g. xlsa17 image_labels.npz) or a text list")
    p.add_argument("--out", default="", help="output folder (default: $DEDN_HOME/heatmaps/<model or checkpoint>)")
    p.add_argument("--run-id", default="", help="MLflow run to log the PNGs to (default: $MLFLOW_RUN_ID)")
    return p.parse_args(argv)


def default_out(source: str) -> Path:
    """`$DEDN_HOME/heatmaps/<source>`: one folder per model or checkpoint, so two models' maps never mix."""
    p = Path(source)
    tail = source.removeprefix("models:/") if source.startswith("models:/") else (
        f"{p.parent.name}-{p.name}" if p.name in ("state.pt",) or p.name.startswith("checkpoint") else p.name)
    return dedn_home() / "heatmaps" / (re.sub(r"[^A-Za-z0-9@._-]+", "-", tail).strip("-") or "model")


def _active_run_id(explicit: str) -> str:
    if explicit:
        return explicit
    return os.environ.get("MLFLOW_RUN_ID", "")  # a fresh process has no active MLflow run


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from dedn.analysis import heatmap  # heavy: after the arguments (see the imports above)
    from dedn.data import FeatureDataset
    from dedn.families import family_of

    try:
        ds = FeatureDataset.open(args.data)
        if args.model:
            from dedn.tracking.registry import load_predictor  # heavy: after the arguments (see the imports above)

            tracking.init_store()
            pred = load_predictor(args.model)
            model, cfg, source = pred.model, pred.cfg, args.model
            if tuple(pred.feature_shape) != tuple(ds.feature_shape):
                raise ConfigError("--data", f"features of shape {pred.feature_shape} (the model's)", ds.feature_shape,
                                  "command line")
        else:
            model, cfg = heatmap.load_model_from_checkpoint(args.checkpoint, ds)
            source = args.checkpoint
        names = ds.class_side.attribute_names
        attr_ids = heatmap.resolve_attributes(args.attributes.split(","), names)
        rows = heatmap.read_samples(ds, args.split, heatmap.parse_indices(args.samples))
        maps = heatmap.attention_maps(model, rows.features, attr_ids, family_of(cfg))  # DEDN: {"cExp"|"fExp": (N, A, H, W)}
        files = heatmap.image_files(args.image_files or None)
        if args.image_root and files is None:
            print("note: --image-root needs --image-files (the image list): drawing on the feature grid",
                  file=sys.stderr)
        out_dir = Path(args.out).expanduser().resolve() if args.out else default_out(source)
        written = []
        for i, pos in enumerate(rows.positions):
            sid, label = int(rows.sample_ids[i]), int(rows.labels[i])
            img_path = heatmap.image_path(files, sid, args.image_root or None)
            image = heatmap.load_image(img_path) if img_path else None
            title = (f"{ds.name} {args.split} row {pos} (sample {sid}, class {ds.class_side.class_names[label]})"
                     + ("" if image is not None else ", H x W feature grid"))
            fig = heatmap.heatmap_figure({k: v[i] for k, v in maps.items()}, [names[a] for a in attr_ids], image=image,
                                         title=title, semi_synthetic=ds.semi_synthetic)
            written.append(heatmap.save_figure(fig, out_dir / f"heatmap_{args.split}_{pos}_sample{sid}.png"))
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    run_id = _active_run_id(args.run_id)
    if run_id:
        tracking.init_store()
        for p in written:
            tracking.log_artifact(run_id, p, "heatmaps")
        print(f"logged {len(written)} PNG(s) to MLflow run {run_id} (artifacts/heatmaps)")
    print(f"model {source}; experts {', '.join(maps)}; attributes {', '.join(names[a] for a in attr_ids)}")
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
