"""Our results in the layout of the paper's Table 1 (T, U, S, H per dataset), from the MLflow store.

    python jobs/results_table.py                                  # champions of CUB, SUN, AWA2
    python jobs/results_table.py --datasets CUB AWA2 --source runs --out results/table1.md
    python jobs/results_table.py --source runs --variant reference --no-paper-row
    python jobs/results_table.py --source seeds                   # jobs/reproduce.py: mean ± std over seeds

--source registry: the `champion` version of each `dedn-<dataset>` registered model (its tags
hold the validation and test metrics). --source runs: the finished training run of experiment
`dedn-<dataset>` with the best validation H. --source seeds: the newest multi-seed reproduction
(`jobs/reproduce.py`), each cell its mean ± standard deviation over the seeds. Datasets whose
data was semi-synthetic are marked.
The store is $MLFLOW_TRACKING_URI, default sqlite:///$DEDN_HOME/mlflow.db (DEDN_HOME: ~/.dedn).
"""
from __future__ import annotations

import argparse
import sys

from dedn import atomic, tracking
from dedn.cli import HelpFormatter
from dedn.errors import DednError

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["CUB", "SUN", "AWA2"], help="datasets (column groups), in order")
    p.add_argument("--source", choices=["registry", "runs", "seeds"], default="registry",
                   help="registry: each champion version; runs: the best finished training run (by validation H); "
                        "seeds: the newest multi-seed reproduction (jobs/reproduce.py), mean ± std")
    p.add_argument("--variant", default="", help="runs source only: only runs of this variant (paper|reference)")
    p.add_argument("--out", default="", help="also write the Markdown to this file")
    p.add_argument("--no-paper-row", action="store_true", help="leave out the paper's DEDN row")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from dedn.tracking import results  # heavy: after the arguments (see the imports above)

    try:
        entries = results.collect(args.datasets, args.source, variant=args.variant or None)
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = results.format_table1(entries, include_paper=not args.no_paper_row)
    print(text, end="")
    if args.out:
        print(f"\nwritten to {atomic.write_text(args.out, text)}")
    missing = [d for d, e in entries.items() if e is None]
    if missing:
        print(f"note: nothing found for {', '.join(missing)} in {tracking.tracking_uri()} (source {args.source})",
              file=sys.stderr)
    return 0 if len(missing) < len(entries) else 1


if __name__ == "__main__":
    sys.exit(main())
