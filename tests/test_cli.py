"""Every entry point's --help shows each option's default (dedn.cli.HelpFormatter) and keeps its examples."""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import pytest

from dedn.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("jobs/*.py"), ROOT / "tuning" / "tune.py"])


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

    def record(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003 - a spy on every parser the job builds
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
