"""What every entry point shares: help text as written (each option with its default), and the
commands it prints for the user to run next, written so that they work when pasted."""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shlex
import shutil
import sys
from pathlib import Path

__all__ = ["HelpFormatter", "add_address", "add_overrides", "add_trial_resources", "command", "is_override", "parse_command_line", "program", "require_environment", "use_address"]

CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding jobs/ and tuning/


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written (examples keep their layout); every option that has a
    default shows it. Flags (default off) and options without a value by default (None or "":
    computed, or required) are left as their help says; so is a help that names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or "default" in text  # the help names its default already
                or action.default in (None, "", argparse.SUPPRESS) or isinstance(action.default, bool)):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._get_help_string(action) != action.help:  # an option without help: its default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


# ---- key=value overrides ---------------------------------------------------------------------
OVERRIDES_METAVAR = "key=value"


def is_override(text: str) -> bool:
    """The form of one `key=value` config override (the keys and values are checked by dedn.config)."""
    key, eq, _ = text.partition("=")
    return bool(eq) and bool(key.strip()) and not text.startswith("-")


def add_overrides(parser: argparse.ArgumentParser, help: str) -> argparse.Action:
    """The positional `key=value ...` config overrides; parse with `parse_command_line`, so that they may
    stand anywhere on the command line, before, between and after the options."""
    return parser.add_argument("overrides", nargs="*", metavar=OVERRIDES_METAVAR, help=help)


def add_address(parser: argparse.ArgumentParser) -> argparse.Action:
    """`--address`: the Ray cluster to join. Without it a run joins only what Ray itself would name
    (RAY_ADDRESS, a cluster `ray start` made on this machine) and otherwise starts a private Ray."""
    return parser.add_argument(
        "--address", default="",
        help="Ray cluster to join (host:port of its GCS, or ray://...); default: $RAY_ADDRESS, else a cluster "
             "`ray start` made on this machine, else a private embedded Ray that no other run joins")


def add_trial_resources(parser: argparse.ArgumentParser, concurrent_default: int) -> None:
    """What each Ray Tune trial of a job gets (tuning/tune.py, jobs/reproduce.py): its Ray Train workers,
    CPUs and GPUs, and how many trials run at once."""
    parser.add_argument("--max-concurrent-trials", type=int, default=concurrent_default,
                        help="trials running at once" + (" (0: all of them)" if concurrent_default == 0 else ""))
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (split among its workers)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0,
                        help="GPUs per trial, split among its workers; a fraction packs trials onto one GPU "
                             "(0.25: four at a time); 0 (default): CPUs only")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) of each trial")


def use_address(args: argparse.Namespace) -> None:
    """Hand `--address` to Ray the way Ray reads it (RAY_ADDRESS), for this process and what it starts."""
    if getattr(args, "address", ""):
        os.environ["RAY_ADDRESS"] = args.address


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser's arguments, the positionals (the overrides) intermixed with the options:
    `--data D epochs=2 --num-workers 1 model=msdn`.

    Anything else is still a usage error (exit 2): an unknown option ("unrecognized arguments:
    --bogus", with any word it swallowed as an override), or a word that is not key=value.
    """
    args, unknown = parser.parse_known_intermixed_args(argv)
    overrides = list(getattr(args, "overrides", None) or [])
    bad = [o for o in overrides if not is_override(o)]
    if unknown:
        words = sys.argv[1:] if argv is None else list(argv)
        odd = set(unknown) | set(bad)
        parser.error("unrecognized arguments: " + " ".join(w for w in words if w in odd))
    if bad:
        parser.error(f"argument {OVERRIDES_METAVAR}: expected key=value (a config override such as epochs=3), "
                     f"found {bad[0]!r}")
    return args


def _in_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def _short_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def program(name: str) -> str:
    """How to call one of this environment's programs (`python`, `mlflow`) from the user's shell.

    Its bare name when the shell's PATH finds this environment's copy first (an activated
    virtualenv, or a cluster started from one), else its path: `.venv/bin/mlflow` from the
    checkout, absolute from elsewhere. Never a different environment's program of the same name.
    """
    here = Path(os.path.abspath(sys.executable)).parent
    mine = Path(os.path.abspath(sys.executable)) if name == "python" else here / name
    found = shutil.which(name)
    if found and os.path.abspath(found) == str(mine):  # not resolved: a venv's python links to the system one
        return name
    return shlex.quote(_short_path(mine))


def command(script: str, *args: object) -> str:
    """A pasteable command running one of our scripts (`jobs/predict.py`) with `args`, shell-quoted.

    Under `ray job submit` the script is named as in the submitted working directory, i.e. the
    checkout the user submitted from (the job itself runs in a temporary copy of it).
    """
    path = script if _in_ray_job() else _short_path(CHECKOUT / script)
    return " ".join([program("python"), shlex.quote(path), *(shlex.quote(str(a)) for a in args)])


def require_environment(*modules: str) -> None:
    """Stop with one clear message when this Python is not the environment dedn was installed into.

    The usual cause is a Ray cluster started without the virtualenv activated: a job's `python` is
    then the system one (README "On a cluster").
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: {sys.executable} has no module {', '.join(missing)}: this Python is not the environment "
                 "dedn is installed in. Use that environment's python (`source .venv/bin/activate`); on a Ray "
                 "cluster, activate it before `ray start`, so that jobs run its python (README \"On a cluster\").")
