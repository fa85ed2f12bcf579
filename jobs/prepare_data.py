"""Prepare a dataset directory (docs/design.md#dataset-directory-schema_version-1).

    python jobs/prepare_data.py synthetic --name CUB --out data/cub-synth [--channels 2048 --height 7 --width 7]
    python jobs/prepare_data.py from-hdf5 --features CUB.h5 --att-splits att_splits.mat \\
        --word-vectors CUB_attribute.pkl --name CUB --out data/cub
    python jobs/prepare_data.py from-xlsa17 --res101 res101.mat --att-splits att_splits.mat \\
        --word-vectors CUB_attribute.pkl --name CUB --out data/cub-pooled
    python jobs/prepare_data.py from-images --images CUB_ROOT --res101 res101.mat --att-splits att_splits.mat \\
        --word-vectors CUB_attribute.pkl --name CUB --out data/cub [--weights resnet101-63fe2227.pth]
    python jobs/prepare_data.py image-labels --res101 res101.mat --att-splits att_splits.mat \\
        --out ../shared/data/CUB/image_labels.npz

Datasets without published attribute word vectors (APY, AWA1) need `--word-vectors FILE`:
a D x G array (.npy, .txt or .pkl), one row per attribute in att_splits.mat order.

`synthetic --source-dir DIR` reads DIR/image_labels.npz: `labels`, the 0-based class of every
image in res101.mat order (also trainval_loc / test_seen_loc / test_unseen_loc, 0-based image
indices, seenclasses / unseenclasses, 0-based class ids, and image_files). `image-labels` writes
it from xlsa17's res101.mat (its labels and image paths only) and att_splits.mat.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dedn.cli import HelpFormatter
from dedn.errors import DednError
from dedn.storage import is_uri

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="dataset name, e.g. CUB, SUN, AWA2")
    p.add_argument("--out", required=True, help="dataset directory to create, or an object-store location "
                   "(s3://bucket/prefix: built under $DEDN_HOME/staging, then uploaded, its manifest last)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype of features")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val_seen split (and of the generator)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _files(p: argparse.ArgumentParser) -> None:
    p.add_argument("--att-splits", required=True, type=Path, help="xlsa17 att_splits.mat")
    p.add_argument("--word-vectors", required=True, type=Path, help="D x G attribute word vectors (.pkl/.npy/.txt)")
    p.add_argument("--attribute-dir", type=Path, default=None,
                   help="folder with attributes.txt / predicates.txt / attributes.mat (default: beside att_splits)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthetic", formatter_class=HelpFormatter, help="semi-synthetic feature maps on a real class side")
    _common(s)
    s.add_argument("--source-dir", type=Path, default=None,
                   help="folder with att_splits.mat, <NAME>_attribute.pkl, image_labels.npz (default: packaged asset)")
    s.add_argument("--word-vectors", type=Path, default=None,
                   help="D x G attribute word vectors when --source-dir has no <NAME>_attribute.pkl/.npy/.txt")
    s.add_argument("--channels", type=int, default=2048, help="C of the generated maps (ResNet-101: 2048)")
    s.add_argument("--height", type=int, default=7, help="H of the generated maps")
    s.add_argument("--width", type=int, default=7, help="W of the generated maps")
    s.add_argument("--images-per-class", type=int, default=None, help="cap per class and split (default: all)")
    h = sub.add_parser("from-hdf5", formatter_class=HelpFormatter, help="HDF5 feature maps (feature_map, labels, *_loc)")
    _common(h)
    _files(h)
    h.add_argument("--features", required=True, type=Path, help="the HDF5 file of feature maps")
    x = sub.add_parser("from-xlsa17", formatter_class=HelpFormatter, help="xlsa17 res101.mat pooled features (1 x 1 maps)")
    _common(x)
    _files(x)
    x.add_argument("--res101", required=True, type=Path, help="xlsa17's res101.mat")
    m = sub.add_parser("from-images", formatter_class=HelpFormatter,
                       help="images -> backbone feature maps (the authors' preprocessing) on Ray Data")
    _common(m)
    _files(m)
    m.add_argument("--images", required=True, type=Path, help="the image root (res101.mat's image_files, their "
                   "machine-specific prefix stripped, are found under it)")
    m.add_argument("--res101", required=True, type=Path, help="xlsa17's res101.mat (image_files and labels are read)")
    m.add_argument("--strip-prefix", default=None, help="the prefix of image_files to remove (default: found from "
                   "--images: the shortest one after which the first images exist there)")
    m.add_argument("--size", type=int, default=None, help="crop side w (default: the authors' per dataset: "
                   "448 for CUB and SUN, 224 for AWA2)")
    m.add_argument("--backbone", default=None, help="module:callable returning a torch.nn.Module mapping (B, 3, w, w) "
                   "to (B, C, H, W) (default: ResNet-101 without pool and classifier, dedn.nn.resnet:resnet101_trunk)")
    m.add_argument("--weights", default=None, help="the backbone's weights file (default: torchvision's IMAGENET1K_V1 "
                   "file, resnet101-63fe2227.pth, from torch's hub cache)")
    m.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="backbone arithmetic (the authors: fp32)")
    m.add_argument("--batch-size", type=int, default=32, help="images per backbone call")
    m.add_argument("--actors", type=int, default=1, help="backbone actors (one GPU each on a GPU cluster)")
    m.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 when the cluster has GPUs, else 0")
    m.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each backbone actor holds")
    m.add_argument("--block-images", type=int, default=None, help="images per block, the unit a re-run resumes "
                   "from (default: 64 MiB of stored features)")
    m.add_argument("--skip-bad", action="store_true", help="leave out missing or undecodable images (listed in "
                   "OUT.skipped.tsv) instead of stopping at the first")
    m.add_argument("--address", default=None, help="the Ray cluster to join (default: RAY_ADDRESS, a `ray start` "
                   "cluster here, else an embedded Ray)")
    i = sub.add_parser("image-labels", formatter_class=HelpFormatter,
                       help="image_labels.npz (0-based labels, splits, image paths) from res101.mat and att_splits.mat")
    i.add_argument("--res101", required=True, type=Path, help="xlsa17's res101.mat (only labels and image_files are read)")
    i.add_argument("--att-splits", required=True, type=Path, help="xlsa17 att_splits.mat")
    i.add_argument("--out", required=True, type=Path, help="the .npz to write, e.g. DIR/image_labels.npz")
    i.add_argument("--strip-prefix", default="", help="removed from the start of every image path that has it "
                   "(xlsa17's image_files are the authors' absolute paths)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.command == "image-labels":
            from dedn.data.sources import write_image_labels  # heavy: after the arguments (see the imports above)

            print(write_image_labels(args.res101, args.att_splits, args.out, args.strip_prefix))
            return 0
        target = str(args.out)
        staging = _staging(target, args.overwrite) if is_uri(target) else None
        args.out = staging / Path(target.rstrip("/")).name if staging else Path(target)
        out = _write(args)
        if staging is not None:
            from dedn.data.remote import upload  # heavy: after the arguments (see the imports above)

            upload(out, target)
            skipped = out.parent / f"{out.name}.skipped.tsv"  # from-images --skip-bad: the list goes beside it too
            if skipped.is_file():
                from dedn.storage import write_text

                write_text(f"{target.rstrip('/')}.skipped.tsv", skipped.read_text())
            shutil.rmtree(staging, ignore_errors=True)
            print(f"uploaded to {target} (dataset.json last)")
            out = target
        from dedn.data import FeatureDataset  # heavy: after the arguments (see the imports above)

        print(FeatureDataset.open(out))
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _staging(uri: str, overwrite: bool) -> Path:
    """The local folder a dataset for `uri` is built in (stable, so that from-images resumes there), after
    checking that the store can be written and holds no dataset there yet (unless --overwrite)."""
    import hashlib

    from dedn.errors import DatasetError
    from dedn.home import dedn_home
    from dedn.storage import check_writable, join, read_text

    check_writable(uri, "--out")
    if not overwrite and read_text(join(uri, "dataset.json")) is not None:
        raise DatasetError(uri, "root", "a location without a dataset yet (or --overwrite)", "a dataset.json there")
    return dedn_home() / "staging" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def _write(args: argparse.Namespace) -> Path:
    """Build the dataset directory args.out with the subcommand's converter; returns it."""
    common = dict(storage_dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    if args.command == "from-images":
        return _from_images(args, common)
    if args.command == "synthetic":
        from dedn.data.synthetic import write_synthetic  # heavy: after the arguments (see the imports above)

        return write_synthetic(args.out, args.name, args.source_dir, word_vectors=args.word_vectors,
                               channels=args.channels, height=args.height, width=args.width,
                               images_per_class=args.images_per_class, seed=args.seed, **common)
    from dedn.data.convert import convert_hdf5, convert_xlsa17  # heavy: after the arguments (see the imports above)

    files = dict(att_splits=args.att_splits, word_vectors=args.word_vectors, name=args.name, out=args.out,
                 attribute_dir=args.attribute_dir or args.att_splits.parent, seed=args.seed, **common)
    if args.command == "from-hdf5":
        return convert_hdf5(args.features, **files)
    return convert_xlsa17(args.res101, **files)


def _from_images(args: argparse.Namespace, common: dict) -> Path:
    # heavy: after the arguments (see the imports above)
    from dedn.extraction import DEFAULT_BACKBONE, ExtractSettings, extract_images

    settings = ExtractSettings(size=args.size, backbone=args.backbone or DEFAULT_BACKBONE, weights=args.weights,
                               precision=args.precision, batch_size=args.batch_size, actors=args.actors,
                               gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                               strip_prefix=args.strip_prefix, skip_bad=args.skip_bad)
    report = extract_images(args.images, args.res101, args.att_splits, args.word_vectors, args.name, args.out,
                            settings, attribute_dir=args.attribute_dir or args.att_splits.parent, seed=args.seed,
                            block_images=args.block_images, address=args.address, **common)
    print(report.summary())
    return report.out


if __name__ == "__main__":
    sys.exit(main())
