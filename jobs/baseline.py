"""Ridge-regression zero-shot baseline on a dataset directory (a floor for DEDN; a sanity check of data).

    python jobs/baseline.py data/cub-synth [--phase final|select] [--alpha 0.01]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dedn.cli import HelpFormatter
from dedn.errors import DednError

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("dataset", type=Path, help="dataset directory (dataset.json)")
    p.add_argument("--phase", choices=["final", "select"], default="final",
                   help="final: fit on trainval, score the test splits; select: fit on train, score validation")
    p.add_argument("--alpha", type=float, default=0.01, help="ridge penalty per sample on standardised features")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    from dedn.analysis.baseline import run_baseline  # heavy: after the arguments (see the imports above)
    from dedn.data import FeatureDataset

    try:
        result = run_baseline(FeatureDataset.open(args.dataset), args.phase, args.alpha)
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict()) if args.json else f"{args.dataset} ({args.phase}): {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
