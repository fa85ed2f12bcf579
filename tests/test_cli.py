"""Every entry point's --help shows each option's default (dedn.cli.HelpFormatter) and keeps its examples."""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import pytest

from dedn.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(p.relative_to(ROOT).as_posix()
                      for p in [*ROOT.glob("jobs/*.py"), *ROOT.glob("bench/*.py"), ROOT / "tuning" / "tune.py"])


def test_formatter_shows_defaults_where_there_are_some():
    p = argparse.ArgumentParser(prog="x", description="first line\n    python x.py --a 3   # an example",
                                formatter_class=HelpFormatter)
    p.add_argument("--a", type=int, default=3, help="with help")
    p.add_argument("--b", type=int, default=7)  # no help: the default alone
    p.add_argument("--c", default=None, help="computed when absent")
    p.add_argument("--d", action="store_true", help="a flag")
    p.add_argument("--e", default=5, help="names it already (default: five)")
    text = " ".join(p.format_help().split())
    assert "with help (default: 3)" in text and "--b B (default: 7)" in text
    assert "computed when absent --d" in text and "a flag --e" in text  # nothing appended
    assert "(default: five)" in text and "(default: 5)" not in text
    assert "    python x.py --a 3   # an example" in p.format_help()  # examples keep their layout


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_every_entry_point_uses_it(path, monkeypatch, capsys):
    made: list[argparse.ArgumentParser] = []
    init = argparse.ArgumentParser.__init__

    def record(self, *a, **kw):  # a spy on every parser the job builds
        init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", record)
    main = runpy.run_path(str(ROOT / path), run_name="dedn_help_test")["main"]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage:")
    ours = [p for p in made if p.prog.split()[0] != "pytest"]
    assert ours and all(issubclass(p.formatter_class, HelpFormatter) for p in ours)
    # every option and argument says what it is for, and the entry point shows an example
    missing = [(p.prog, a.option_strings or a.dest) for p in ours for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, f"options without help text: {missing}"
    assert "python " in (ours[0].description or ""), "no example in --help"


def test_printed_commands_work_when_pasted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The hints the jobs print name this environment's programs and the checkout's scripts, quoted."""
    import os
    import sys

    from dedn.cli import command, program

    here = Path(os.path.abspath(sys.executable)).parent
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", f"{here}{os.pathsep}{os.environ.get('PATH', '')}")  # an activated environment
    assert program("python") == "python" and program("mlflow") == "mlflow"
    assert command("jobs/predict.py", "--data", "/a b") == "python jobs/predict.py --data '/a b'"
    # not activated: the environment's own python, by a path that works from here
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(here)))
    assert os.path.abspath(program("python")) == os.path.abspath(sys.executable)
    assert os.path.abspath(program("mlflow")) == str(here / "mlflow")
    monkeypatch.chdir(tmp_path)  # elsewhere: the script by its absolute path
    assert command("jobs/predict.py").split()[1] == str(ROOT / "jobs" / "predict.py")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # in a Ray job: as in the checkout that was submitted
    assert command("jobs/predict.py").split()[1] == "jobs/predict.py"


def test_a_job_gets_the_submitting_checkouts_commit_and_store(monkeypatch: pytest.MonkeyPatch):
    """jobs/runtime_env.py: what a job needs from the submitting shell; git_commit() reads it back in the job."""
    import subprocess

    from dedn.tracking import git_commit
    from dedn.training.ray_cluster import job_runtime_env

    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "DEDN_HOME", "DEDN_GIT_COMMIT",
              "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "DEDN_FAMILY_MODULES", "DEDN_TRAIN_PLUGINS",
              "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
              "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        monkeypatch.delenv(k, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # a loaded node's slow worker start is waited for, not a traceback and a second start (issue 27)
    assert job_runtime_env(ROOT) == {"env_vars": {"DEDN_GIT_COMMIT": head, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("DEDN_HOME", "~/somewhere")
    env = job_runtime_env(ROOT)["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://tracking:5000"
    assert env["DEDN_HOME"] == str(Path.home() / "somewhere")  # the shell's ~, not the node's working directory
    # the workers load the user's own families and plugins as the driver does (tests/test_toy_family.py runs so)
    monkeypatch.setenv("DEDN_FAMILY_MODULES", "my_family")
    monkeypatch.setenv("DEDN_TRAIN_PLUGINS", "my_plugin")
    env = job_runtime_env(ROOT)["env_vars"]
    assert env["DEDN_FAMILY_MODULES"] == "my_family" and env["DEDN_TRAIN_PLUGINS"] == "my_plugin"
    # MLflow's system-metrics switches reach the workers that sample (docs/team.md)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    env = job_runtime_env(ROOT)["env_vars"]
    assert (env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"], env["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"]) == ("1", "false")
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("DEDN_GIT_COMMIT", sha)  # inside the job, whose upload has no .git
    assert git_commit() == sha
    assert git_commit(ROOT) == head  # an explicit checkout is asked itself
    monkeypatch.setenv("DEDN_GIT_COMMIT", "not-a-commit")
    assert git_commit() == git_commit(Path(__file__).resolve().parents[1] / "dedn")  # ignored: git itself


def _parser_of(path: str, name: str):
    return runpy.run_path(str(ROOT / path), run_name="dedn_parse_test")[name]


# issue 27 item 8: key=value overrides anywhere on the command line, between and after options
@pytest.mark.parametrize("path,name,required", [("jobs/train.py", "parse", []),
                                                 ("tuning/tune.py", "parse_args", ["--data", "D"])])
def test_overrides_are_accepted_between_and_after_options(path, name, required):
    parse = _parser_of(path, name)
    args = parse(["--data", "D", "epochs=2", "--max-failures", "1", "model=msdn", "--name", "n", "loss.beta=0.01"])
    assert args.overrides == ["epochs=2", "model=msdn", "loss.beta=0.01"]
    assert (args.data, args.max_failures, args.name) == ("D", 1, "n")
    assert parse([*required, "optim.lr=1e-3"]).overrides == ["optim.lr=1e-3"]  # before any option ...
    assert parse(required).overrides == []  # ... or none at all
    assert parse(["beta=-1", *required]).overrides == ["beta=-1"]  # a negative value is a value, not an option


@pytest.mark.parametrize("path,name,required", [("jobs/train.py", "parse", []),
                                                 ("tuning/tune.py", "parse_args", ["--data", "D"])])
@pytest.mark.parametrize("extra,message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--bogus", "3", "epochs=2"], "unrecognized arguments: --bogus 3\n"),  # not the override after it
    (["epochs=2", "stray"], "argument key=value: expected key=value (a config override such as epochs=3), found 'stray'"),
    (["=3"], "argument key=value: expected key=value (a config override such as epochs=3), found '=3'"),
])
def test_anything_else_on_the_command_line_is_still_an_error(path, name, required, extra, message, capsys):
    parse = _parser_of(path, name)
    with pytest.raises(SystemExit) as e:
        parse([*required, *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
