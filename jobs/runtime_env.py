"""The runtime environment for `ray job submit --working-dir .`, as JSON for `--runtime-env-json`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json "$(python jobs/runtime_env.py)" -- python jobs/train.py --num-workers 2

A job's driver does not run in the submitting shell: it gets that shell's tracking store
(MLFLOW_TRACKING_URI and credentials, DEDN_HOME, when set) and the checkout's commit
(DEDN_GIT_COMMIT, the run's `git_commit` tag; Ray does not upload `.git`) from this JSON.
The environment variables are visible to whoever can read the cluster's dashboard.
"""
from __future__ import annotations

import argparse
import json
import sys

from dedn.cli import HelpFormatter
from dedn.training.ray_cluster import job_runtime_env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkout", default=".", help="the git checkout whose commit the job records")
    args = p.parse_args(argv)

    env = job_runtime_env(args.checkout)
    if "DEDN_GIT_COMMIT" not in env.get("env_vars", {}):
        print(f"runtime_env.py: {args.checkout} is not a git checkout: the job's run gets no git_commit tag",
              file=sys.stderr)
    print(json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
