"""The README and docs/ stay true: every command they show with its output is run and compared.

In the Markdown files:
- a fenced block whose first line starts with `$ offloadkit` is a session: each `$ ` line is a command,
  the lines after it (up to the next `$ `) its expected output. In expected output `...` alone on a
  line matches any number of lines, and `...` inside a line matches any text (for times and figures
  that vary from machine to machine);
- `<!-- file: NAME -->` on the line before a fenced block writes the block to NAME in the folder the
  commands run in (the repository's `examples/`, `hardware/` and `policies/` are there too);
- `<!-- test: python -->` before a ```python block runs it there, then every `test_*` it defines;
- `<!-- no-test: why -->` before a block leaves it out (commands that need a GPU).
Commands run in-process (`offloadkit.cli.main`), in a fresh folder per document.

After a change of what a command prints, `OFFLOADKIT_UPDATE_DOCS=1 pytest tests/test_docs.py` writes
the printed output into the documents, for blocks without `...` (read the diff before committing).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_MARK = re.compile(r"^<!--\s*(file|test|no-test):\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int  # the line of its closing fence
    info: str
    text: str
    mark: tuple[str, str] | None = None
    indent: str = ""


@dataclass
class Document:
    path: Path
    blocks: list = field(default_factory=list)


def parse(path: Path) -> Document:
    document = Document(path)
    lines = path.read_text().split("\n")
    mark, i = None, 0
    while i < len(lines):
        line = lines[i]
        found = _MARK.match(line.strip())
        if found:
            mark = (found.group(1), found.group(2))
            i += 1
            continue
        fence = re.match(r"^(\s*)(```+)(.*)$", line)
        if fence:
            indent, ticks, info = fence.groups()
            body, i = [], i + 1
            while i < len(lines) and not lines[i].strip().startswith(ticks):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            document.blocks.append(Block(i, info.strip(), "\n".join(body), mark, indent))
            mark = None
        elif line.strip():
            mark = None if not line.strip().startswith("<!--") else mark
        i += 1
    return document


def sessions(block: Block) -> list[tuple[str, list[str]]]:
    """[(command, expected output lines)] of a session block."""
    found = []
    for line in block.text.split("\n"):
        if line.startswith("$ "):
            found.append((line[2:], []))
        elif found:
            found[-1][1].append(line)
    return [(command, _trim(expected)) for command, expected in found]


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _line_matches(expected: str, actual: str) -> bool:
    if "..." not in expected:
        return expected.rstrip() == actual.rstrip()
    pattern = ".*".join(re.escape(part) for part in expected.rstrip().split("..."))
    return re.fullmatch(pattern, actual.rstrip()) is not None


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Whether `actual` lines match `expected`, where a `...` line matches any number of lines."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head.strip() == "...":
        return any(output_matches(rest, actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and _line_matches(head, actual[0]) and output_matches(rest, actual[1:])


def run_command(command: str) -> list[str]:
    from offloadkit.cli import main

    words = shlex.split(command)
    assert words[0] == "offloadkit", f"only offloadkit commands run here, not {command!r}"
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        try:
            main(words[1:])
        except SystemExit:  # argparse's --help and usage errors
            pass
    return _trim(stream.getvalue().rstrip("\n").split("\n"))


def _sandbox(folder: Path) -> None:
    for name in ("examples", "hardware", "policies", "schemas"):
        (folder / name).symlink_to(ROOT / name)


def _is_session(block: Block) -> bool:
    return block.text.lstrip().startswith("$ offloadkit")


def _cases():
    for document in map(parse, DOCUMENTS):
        if any(_is_session(b) or (b.mark and b.mark[0] == "test") for b in document.blocks):
            yield pytest.param(document, id=str(document.path.relative_to(ROOT)))


@pytest.mark.parametrize("document", list(_cases()))
def test_every_command_shown_gives_what_it_shows(document, tmp_path, monkeypatch):
    _sandbox(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OFFLOADKIT_PROGRESS", "0")
    failures, updates = [], []
    for block in document.blocks:
        mark = block.mark or ("", "")
        if mark[0] == "no-test":
            continue
        where = f"{document.path.name}:{block.line}"
        if mark[0] == "file":
            (tmp_path / mark[1]).write_text(block.text + "\n")
        elif mark[0] == "test" and mark[1] == "python":
            namespace: dict = {"__name__": "docs_example"}
            exec(compile(block.text, where, "exec"), namespace)
            for name, function in list(namespace.items()):
                if name.startswith("test_") and callable(function):
                    function()
        elif _is_session(block):
            for command, expected in sessions(block):
                actual = run_command(command)
                if not output_matches(expected, actual):
                    failures.append(f"{where}: $ {command}\n--- shown:\n" + "\n".join(expected)
                                    + "\n--- printed:\n" + "\n".join(actual))
                    if not any("..." in line for line in expected):
                        updates.append((block, command, expected, actual))
    if updates and os.environ.get("OFFLOADKIT_UPDATE_DOCS"):
        _update(document.path, updates)
    assert not failures, "\n\n".join(failures)


def _update(path: Path, updates) -> None:
    """Write the printed output in place of the shown one (blocks without `...`)."""
    lines = path.read_text().split("\n")
    for block, command, expected, actual in sorted(updates, key=lambda u: -u[0].line):
        end = block.line  # the closing fence
        start = next(i for i in range(end - 1, -1, -1) if lines[i].strip() == f"$ {command}".strip())
        lines[start + 1:start + 1 + len(expected)] = [block.indent + line if line else line for line in actual]
    path.write_text("\n".join(lines))


def test_the_matcher_matches_what_it_should_and_nothing_else():
    assert output_matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert output_matches(["a", "...", "d"], ["a", "d"])
    assert not output_matches(["a", "...", "d"], ["a", "b"])
    assert output_matches(["took ... s"], ["took 1.25 s"])
    assert not output_matches(["took ... s"], ["took 1.25 ms!"])
    assert not output_matches(["a"], ["a", "b"])


def test_every_document_is_parsed_and_commands_are_found():
    readme = parse(ROOT / "README.md")
    assert any(_is_session(b) for b in readme.blocks), "the README shows no command"
    for document in map(parse, DOCUMENTS):
        for block in document.blocks:
            if block.mark and block.mark[0] == "file":
                assert not os.path.isabs(block.mark[1]) and ".." not in block.mark[1]
