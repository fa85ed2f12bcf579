"""Every command the README and docs/*.md show names a script that exists and only flags it accepts.

Commands are taken from fenced shell blocks (```bash, ```sh, ```console and plain ```) and from
inline code spans. In each, every `jobs/`, `tuning/`, `bench/` or `tools/` script must exist, and
every `--flag` after it (up to the end of that shell command) must appear in the script's
`--help` (after a subcommand such as `jobs/server.py start`, in that subcommand's or the script's;
a script with subcommands named without one, in any of them).
Each script's `--help` runs once, in a subprocess, as a user runs it (tests/scripthelp.py).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from scripthelp import script_help

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT_DIRS = ("jobs", "tuning", "bench", "tools")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}

SCRIPT = re.compile(r"(?<![\w./-])(?:\.{1,2}/|/\S*/)?((?:%s)/[A-Za-z0-9_]+\.py)\b" % "|".join(SCRIPT_DIRS))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
COMMENT = re.compile(r"(^|\s)#.*$", re.M)
END_OF_COMMAND = re.compile(r"[;|&)<>]")  # the script's arguments stop at the next operator or `)`
FLAG = re.compile(r"^--[A-Za-z][\w-]*")


def _commands(text: str) -> list[str]:
    """Shell command texts: fenced shell blocks (comments dropped, continuations joined), inline spans."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang.lower() in SHELL_LANGS:
            body = COMMENT.sub(r"\1", body)
            out += [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    prose = FENCE.sub("", text)
    out += [" ".join(span.split()) for _, span in INLINE.findall(prose)]
    return out


def _uses(command: str) -> list[tuple[str, str | None, list[str]]]:
    """(script, first positional word after it, flags after it) for each script the command runs."""
    found = list(SCRIPT.finditer(command))
    uses = []
    for i, m in enumerate(found):
        rest = command[m.end():found[i + 1].start() if i + 1 < len(found) else len(command)]
        rest = END_OF_COMMAND.split(rest, maxsplit=1)[0]
        words = [w.strip("[]\"'") for w in rest.split()]
        flags = [FLAG.match(w).group(0) for w in words if FLAG.match(w)]
        first = words[0] if words and re.fullmatch(r"[a-z][a-z0-9-]*", words[0]) else None
        uses.append((m.group(1), first, flags))
    return uses


def _all_uses() -> list[tuple[str, str, str | None, list[str]]]:
    """(where, script, first word, flags) for every command in the README and docs."""
    out = []
    for doc in DOCS:
        for command in _commands(doc.read_text(encoding="utf-8")):
            for script, first, flags in _uses(command):
                out.append((f"{doc.relative_to(ROOT)}: {command[:120]}", script, first, flags))
    return out


USES = _all_uses()


def _help(script: str, *sub: str) -> str:
    r = script_help(script, *sub)  # once per script and session (tests/scripthelp.py)
    assert r.returncode == 0, f"{script} {' '.join(sub)} --help failed:\n{r.stderr[-2000:]}"
    return r.stdout


def _subcommands(help_text: str) -> set[str]:
    """The choices of a subcommand positional: a `{a,b,c}` line of its own (an option's choices follow the option)."""
    return {c for group in re.findall(r"^\s+\{([\w,-]+)\}", help_text, re.M) for c in group.split(",")}


def _accepts(help_text: str, flag: str) -> bool:
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), help_text) is not None


def test_the_docs_show_commands():
    scripts = {s for _, s, _, _ in USES}
    assert {"jobs/train.py", "tuning/tune.py", "jobs/predict.py", "jobs/runtime_env.py"} <= scripts, scripts
    assert any(s.startswith("bench/") for s in scripts) and any(s.startswith("tools/") for s in scripts)


def test_every_command_names_a_script_that_exists():
    missing = sorted({f"{where}  ->  {script}" for where, script, _, _ in USES if not (ROOT / script).is_file()})
    assert not missing, "commands name scripts that do not exist:\n" + "\n".join(missing)


def test_every_flag_is_accepted_by_its_script():
    scripts = sorted({s for _, s, _, _ in USES if (ROOT / s).is_file()})
    with ThreadPoolExecutor(max_workers=4) as pool:  # warm the cache: one --help per script
        list(pool.map(_help, scripts))
    bad = []
    for where, script, first, flags in USES:
        if not (ROOT / script).is_file() or not flags:
            continue
        text = _help(script)
        subs = _subcommands(text)
        for sub in [first] if first in subs else sorted(subs):  # the one named, else any of them
            text += _help(script, sub)
        bad += [f"{where}  ->  {script}{' ' + first if first else ''} has no {f}" for f in flags
                if not _accepts(text, f)]
    assert not bad, "flags the script does not accept:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("command,expected", [
    ('ray job submit --address http://x:8265 --working-dir . --runtime-env-json "$(python jobs/runtime_env.py)" '
     "-- python jobs/train.py --num-workers 2",
     [("jobs/runtime_env.py", None, []), ("jobs/train.py", None, ["--num-workers"])]),
    ('eval "$(.venv/bin/python jobs/server.py env)"', [("jobs/server.py", "env", [])]),
    ("python bench/benchmark.py --r 49 --dtype fp32 [--compile] epochs=2 --out=x",
     [("bench/benchmark.py", None, ["--r", "--dtype", "--compile", "--out"])]),
    ("python /abs/checkout/jobs/predict.py --model m | head", [("jobs/predict.py", None, ["--model"])]),
    ("see dedn/jobs/x.py and tests/toy_family.py --x", []),
])
def test_commands_are_read_as_a_shell_reads_them(command, expected):
    assert _uses(command) == expected


def test_fenced_blocks_and_inline_spans():
    text = ("```bash\npython jobs/a.py --x 1 \\\n    --y 2   # python jobs/b.py --z\n```\n"
            "```python\nrun('jobs/c.py --w')\n```\n"
            "Run `jobs/d.py --v` or ``tools/e.py --u `x` ``.\n")
    uses = [u for c in _commands(text) for u in _uses(c)]
    assert uses == [("jobs/a.py", None, ["--x", "--y"]), ("jobs/d.py", None, ["--v"]), ("tools/e.py", None, ["--u"])]


def test_the_readme_stays_short():
    """A README, not a manual (issue 24, item 6): depth goes into docs/ pages. It had crept to 253 lines."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to a docs/ page (at most 250)"
