"""Docs that cannot rot: every command line in the fenced shell blocks of README.md and
docs/*.md is checked against the code.

- an `allmrec ...` line parses with the real CLI parser (its subcommand and flags exist);
- its `--config` files load and each `--set key=value` names a real config field whose value
  validates (`allmrec.config.load_config`, as the command itself would);
- every repository path a command line names (configs/, benchmarks/, jobs/, ...) exists; run
  outputs (runs/..., a run's files) are what the docs describe, not checked.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from allmrec.cli import build_parser
from allmrec.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "cluster" / "README.md"]
SHELL = {"bash", "sh", "shell", "console"}  # blocks of commands; ```text holds the rest
# top-level folders of the repository: a path under one of them must exist
REPOSITORY = ("configs/", "benchmarks/", "jobs/", "tune/", "serve_app/", "cluster/", "docs/")
REPOSITORY += ("tests/", "allmrec/", ".ci/")
_FENCE = re.compile(r"^```(\w*)\s*$")


def shell_commands(markdown: str) -> list[tuple[int, str]]:
    """(line number, shell line) of every line of the page's shell blocks (```bash and the
    like; ```text holds output and trees), continuation lines joined, `$ ` dropped."""
    lines, block, language, start = [], None, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = _FENCE.match(line.strip())
        if fence and block is None:
            block, language, start = [], fence.group(1), number
            continue
        if line.strip().startswith("```") and block is not None:
            if language in SHELL:
                lines += _joined(block, start)
            block = None
            continue
        if block is not None:
            block.append(line)
    return lines


def _joined(lines: list[str], start: int) -> list[tuple[int, str]]:
    out, pending, first = [], "", 0
    for offset, line in enumerate(lines, 1):
        text = line.rstrip()
        if not pending:
            first = start + offset
            text = text.lstrip()
            text = text[2:] if text.startswith("$ ") else text
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        whole = (pending + text).strip()
        pending = ""
        if whole and not whole.startswith("#"):
            out.append((first, whole))
    return out


def _commands_of(line: str) -> list[list[str]]:
    """The words of each command of a shell line (split at `&&`, `||`, `;`, `|`), comments
    dropped; a shell variable stands for a path the reader chooses."""
    text = re.sub(r"\$\{?\w+\}?", "/tmp/var", line)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [c for c in [*commands, words] if c]


def check_command(command: str, where: str) -> list[str]:
    """The problems of one shell line (an empty list when it is right)."""
    try:
        commands = _commands_of(command)
    except ValueError as exc:  # an unclosed quote
        return [f"{where}: {command!r}: {exc}"]
    return [p for words in commands for p in _check_words(words, command, where)]


def _check_words(words: list[str], command: str, where: str) -> list[str]:
    while words and re.match(r"^\w+=", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words or Path(words[0]).name != "allmrec":
        return [
            f"{where}: {command!r}: no file {path}"
            for path in (word.split("=", 1)[-1] for word in words)
            if path.startswith(REPOSITORY) and not (ROOT / path.split(":")[0]).exists()
        ]
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        return [f"{where}: {command!r}: the CLI does not take these arguments"]
    # a config under runs/ is a run's output the docs describe (tune/best.yaml)
    configs = [c for c in getattr(args, "config", None) or [] if not c.startswith("runs/")]
    overrides = getattr(args, "overrides", None) or []
    missing = [c for c in configs if not (ROOT / c).exists()]
    if missing:
        return [f"{where}: {command!r}: no config file {', '.join(missing)}"]
    try:
        load_config([ROOT / c for c in configs], overrides)
    except ConfigError as exc:
        return [f"{where}: {command!r}: {exc}"]
    return []


def check_page(markdown: str, name: str) -> list[str]:
    problems = []
    for number, command in shell_commands(markdown):
        problems += check_command(command, f"{name}:{number}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_runs_against_the_code(page):
    problems = check_page(page.read_text(), str(page.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_the_docs_show_commands_at_all():
    """The checker finds what it should: the README's two commands and dozens in docs/."""
    found = {str(p.relative_to(ROOT)): shell_commands(p.read_text()) for p in PAGES}
    assert any("make demo" in c for _, c in found["README.md"])
    assert sum(len(c) for c in found.values()) > 30
    allmrec_lines = [c for cs in found.values() for _, c in cs if c.startswith("allmrec ")]
    assert len(allmrec_lines) > 10


BROKEN = """
Some text.

```text
allmrec a tree or an output is not checked --no-such-flag
```

```bash
allmrec train cf --config configs/ml-100k-cpu.yaml \\
    --set cf.no_such_key=3
allmrec demo --no-serve --set cf.lr=fast
allmrec trian cf
allmrec train cf --config configs/no-such.yaml
python benchmarks/no_such_benchmark.py
allmrec evaluate --config configs/ml-100k-cpu.yaml --set evaluate.max_users=5   # fine
```
"""


def test_a_bad_key_a_bad_value_a_typo_and_a_missing_file_are_each_caught():
    problems = check_page(BROKEN, "broken.md")
    assert len(problems) == 5, "\n".join(problems)
    assert "broken.md:9" in problems[0] and "unknown key 'cf.no_such_key'" in problems[0]
    assert "'cf.lr'" in problems[1]
    assert "does not take these arguments" in problems[2]
    assert "no config file configs/no-such.yaml" in problems[3]
    assert "no file benchmarks/no_such_benchmark.py" in problems[4]
