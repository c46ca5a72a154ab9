"""Every ```python block in README.md and docs/*.md runs as written, and shows true outputs.

The blocks of one file run in order in one namespace, as a reader would run them, inside a
temporary directory (so drawn files land there). Within a block:

- ``>>>`` examples run as doctests: what they show is compared exactly with what they print;
- a top-level line ending in ``# -> text`` must print ``text`` (a ``print(...)`` line) or
  evaluate to a value whose ``repr`` is ``text`` (an expression line); a bare ``# ->`` takes
  the expected output from the comment lines right after it (multi-line listings).

Fences without a language that hold ``>>>`` examples (printed listings) run as doctests too.
A block right after ``<!-- not run: why -->`` is skipped; keep that for what cannot run here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import doctest
import io
import pathlib
import re
from typing import Any, NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run\b")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\w*)\s*$")
EXPECT = re.compile(r"^(?P<stmt>\S.*?)\s*#\s*->\s?(?P<expected>.*)$")


class Block(NamedTuple):
    path: pathlib.Path
    lineno: int  # of the block's first code line, 1-based
    code: str
    lang: str
    run: bool

    @property
    def where(self) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{name}:{self.lineno}"

    @property
    def is_doctest(self) -> bool:
        return any(line.startswith(">>>") for line in self.code.splitlines())


def fenced_blocks(path: pathlib.Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, dedented to their fence."""
    lines = path.read_text().splitlines()
    blocks, i, previous = [], 0, ""
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            previous = lines[i].strip() or previous
            i += 1
            continue
        indent, end = len(m["indent"]), i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        blocks.append(Block(path, i + 2, body, m["lang"], not NOT_RUN.match(previous)))
        previous, i = "", end + 1
    return blocks


def runnable_blocks(path: pathlib.Path) -> list[Block]:
    return [b for b in fenced_blocks(path)
            if b.run and (b.lang == "python" or (b.lang == "" and b.is_doctest))]


# ----------------------------------------------------------------------------- running

def run_doctest(block: Block, namespace: dict[str, Any]) -> None:
    test = doctest.DocTestParser().get_doctest(block.code, namespace, block.where, str(block.path), block.lineno - 1)
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=report.write, clear_globs=False)
    if runner.failures:
        pytest.fail(f"{block.where}: the doctest output differs from what the doc shows\n{report.getvalue()}",
                    pytrace=False)


def _exec(code: str, block: Block, first_line: int, namespace: dict[str, Any]) -> None:
    """Run ``code`` with tracebacks pointing at the Markdown file's own line numbers."""
    padded = "\n" * (block.lineno - 1 + first_line) + code
    exec(compile(padded, str(block.path), "exec"), namespace)


def run_script(block: Block, namespace: dict[str, Any]) -> None:
    """Run the block; check each ``# ->`` line's output against the text the doc shows."""
    lines = block.code.splitlines()
    start, i = 0, 0
    while i < len(lines):
        m = EXPECT.match(lines[i])
        if not m:
            i += 1
            continue
        expected, stmt, marker = m["expected"], m["stmt"], i
        if not expected:  # the listing is in the comment lines that follow
            shown = []
            while i + 1 < len(lines) and lines[i + 1].startswith("#"):
                i += 1
                shown.append(re.sub(r"^# ?", "", lines[i]))
            expected = "\n".join(shown)
        _exec("\n".join(lines[start:marker]), block, start, namespace)
        got = _output_of(stmt, block, marker, namespace)
        assert got.rstrip() == expected.rstrip(), (
            f"{block.where}+{marker}: `{stmt}` gives\n{got}\nbut the doc shows\n{expected}")
        start = i = i + 1
    _exec("\n".join(lines[start:]), block, start, namespace)


def _output_of(stmt: str, block: Block, line: int, namespace: dict[str, Any]) -> str:
    """What a ``# ->`` line shows: its printed output, or the repr of its value."""
    if stmt.startswith("print("):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            _exec(stmt, block, line, namespace)
        return printed.getvalue()
    padded = "\n" * (block.lineno - 1 + line) + stmt
    return repr(eval(compile(padded, str(block.path), "eval"), namespace))


# ----------------------------------------------------------------------------- the tests

# Docs whose snippets do not run yet; strict, so the mark must go once the doc is fixed.
NEEDS_A_DOC_FIX: dict[str, str] = {}


@pytest.fixture
def restored_rule_tables():
    """Snippets that show how to add a rule really register it; put every table back afterwards."""
    import reftrace.backends.jax  # noqa: F401 - these register their rows on import: snapshot the full tables
    import reftrace.backends.torch  # noqa: F401
    import reftrace.torch_bridge.capture  # noqa: F401
    from reftrace import primitives
    from reftrace.backends.jax_rules import jax_rules
    from reftrace.backends.torch_rules import torch_rules
    from reftrace.torch_bridge.aten._common import aten_rules
    from reftrace.transforms.vjp_rules import vjp_rules
    tables = [primitives.registry, primitives.shape_rules, vjp_rules, jax_rules, torch_rules, aten_rules]
    saved = [dict(t) for t in tables]
    yield
    for table, copy in zip(tables, saved):
        table.clear()
        table.update(copy)


def _doc_param(path: pathlib.Path) -> Any:
    name = str(path.relative_to(ROOT))
    marks = [pytest.mark.xfail(strict=True, reason=NEEDS_A_DOC_FIX[name])] if name in NEEDS_A_DOC_FIX else []
    return pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize("path", [_doc_param(p) for p in DOCS])
def test_doc_snippets_run_and_show_true_outputs(path, tmp_path, monkeypatch, restored_rule_tables):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": f"doc:{path.name}"}
    for block in runnable_blocks(path):
        if block.is_doctest:
            run_doctest(block, namespace)
        else:
            run_script(block, namespace)


def test_the_readme_and_the_partition_doc_have_checked_outputs():
    """The extractor really finds the blocks and output checks (an empty match would pass silently)."""
    readme = runnable_blocks(ROOT / "README.md")
    assert readme and any(EXPECT.match(line) for b in readme for line in b.code.splitlines())
    assert any(b.is_doctest for b in runnable_blocks(ROOT / "docs" / "partition.md"))


def test_a_wrong_output_fails(tmp_path):
    """The checker itself: a ``# ->`` that does not match, and a doctest that does not match, fail."""
    doc = tmp_path / "doc.md"
    doc.write_text("```python\nprint(1 + 1)  # -> 3\n```\n")
    with pytest.raises(AssertionError, match="gives"):
        run_script(runnable_blocks(doc)[0], {})
    doc.write_text("```python\n>>> print('a')\nb\n```\n")
    with pytest.raises(pytest.fail.Exception, match="differs"):
        run_doctest(runnable_blocks(doc)[0], {})
    doc.write_text("<!-- not run: needs a GPU -->\n```python\nraise SystemExit\n```\n")
    assert runnable_blocks(doc) == []


def test_multi_line_outputs_are_read_from_the_comments_below(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```python\nx = 2\nprint(x)\nprint(x + 1)  # ->\n# 3\nx  # -> 2\n```\n")
    run_script(runnable_blocks(doc)[0], {})  # passes
    doc.write_text("```python\nprint('a\\nb')  # ->\n# a\n# c\n```\n")
    with pytest.raises(AssertionError):
        run_script(runnable_blocks(doc)[0], {})


def test_the_ir_summary_names_the_real_fields():
    """docs/ir.md opens with a schematic of the IR dataclasses (not run); its fields are the real ones."""
    import reftrace as rt

    (schematic,) = [b for b in fenced_blocks(ROOT / "docs" / "ir.md") if not b.run]
    shown = {m[1]: [f.split(":")[0].strip() for f in m[2].split("#")[0].split(";")]
             for m in re.finditer(r"class (\w+):\s+(.*)", schematic.code)}
    assert set(shown) == {"Aval", "Var", "Literal", "Eqn", "Graph"}
    for name, fields in shown.items():
        real = [f.name for f in dataclasses.fields(getattr(rt, name)) if f.init]
        assert fields == real, name
