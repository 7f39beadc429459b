"""Every Python block of README.md and of the documentation (docs/**/*.md) runs as written.

The blocks of one page run in order in one namespace, as the cells of a notebook do. Two
conventions, both invisible on the rendered page:

* an HTML comment that starts with ``<!-- test`` holds Python code that runs at that point of
  the page: set-up a block needs but does not show (a model, data), or checks of what the text
  claims. ``_stdout`` is what the last Python block printed;
* a ```` ```text ```` block that directly follows a Python block is that block's output: the
  printed text must equal it (trailing spaces aside). Output that depends on the versions is
  checked by a ``<!-- test`` comment instead, placed between the two blocks.

``torch.compile`` runs with the ``eager`` backend here: dynamo still traces every compiled
function (``fullgraph=True`` still fails on a graph break), and the suite does not spend
minutes in inductor (``tests/test_compile.py`` covers inductor).
"""

from __future__ import annotations

import contextlib
import functools
import io
import pathlib
import re

import pytest
import torch

from tests.conftest import _COMPILE_SKIP

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]

# a fenced block (```lang ... ```) or a hidden test comment (<!-- test ... -->)
_PART = re.compile(
    r"^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```[ \t]*$|^<!-- test\n(?P<hidden>.*?)^-->[ \t]*$", re.S | re.M
)


def parts(text: str) -> list[tuple[str, str, int]]:
    """``(kind, code, line)`` of every fenced block and hidden test comment, in page order;
    kind is the block's language, ``"hidden"`` for a test comment, and ``"output"`` for a
    ``text`` block that directly follows a ``python`` block."""
    out: list[tuple[str, str, int]] = []
    prev_end, prev_kind = -1, ""
    for m in _PART.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group("hidden") is not None:
            kind, code = "hidden", m.group("hidden")
        else:
            kind, code = m.group("lang"), m.group("code")
            if kind == "text" and prev_kind == "python" and not text[prev_end : m.start()].strip():
                kind = "output"
        out.append((kind, code, line))
        prev_end, prev_kind = m.end(), kind
    return out


_COMPILE = torch.compile


def _eager_compile(fn=None, **kwargs):
    kwargs["backend"] = "eager"
    return _COMPILE(fn, **kwargs) if fn is not None else functools.partial(_COMPILE, **kwargs)


def run_page(path: pathlib.Path) -> dict:
    text = path.read_text()
    name = str(path.relative_to(ROOT))
    ns: dict = {"__name__": "__doc_page__", "_stdout": ""}
    torch.compile = _eager_compile
    try:
        with torch.random.fork_rng():
            for kind, code, line in parts(text):
                where = f"{name}:{line}"
                if kind == "python":
                    out = io.StringIO()
                    with contextlib.redirect_stdout(out):
                        exec(compile("\n" * line + code, name, "exec"), ns)
                    ns["_stdout"] = out.getvalue()
                elif kind == "hidden":
                    exec(compile("\n" * line + code, name, "exec"), ns)
                elif kind == "output":
                    got = [s.rstrip() for s in ns["_stdout"].strip("\n").splitlines()]
                    want = [s.rstrip() for s in code.strip("\n").splitlines()]
                    assert got == want, f"{where}: the block above printed\n{ns['_stdout']}"
    finally:
        torch.compile = _COMPILE
    return ns


def _page_id(p: pathlib.Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_code_runs(page):
    text = page.read_text()
    if _COMPILE_SKIP is not None and "torch.compile" in text:
        pytest.skip(_COMPILE_SKIP)
    assert "DESIGN.md" not in text
    run_page(page)


def test_every_page_has_its_python_checked():
    """No block hides from the runner: a block marked as another language that holds Python
    imports of proxfunc would not run."""
    for page in PAGES:
        for kind, code, line in parts(page.read_text()):
            if kind not in ("python", "hidden", "output"):
                assert "import proxfunc" not in code, f"{_page_id(page)}:{line}: a {kind!r} block holds Python"


def test_parts_convention():
    page = "a\n```python\nprint(1)\n```\n\n```text\n1\n```\n<!-- test\nx = 1\n-->\n```text\nfree\n```\n"
    assert [k for k, _, _ in parts(page)] == ["python", "output", "hidden", "text"]


def test_readme_set_up_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "\npytest -n auto\n" in ci and "ruff check ." in ci
    assert 'pip install -e ".[dev]"\npytest -n auto\n' in README.read_text()


def test_demo_flags_named_in_the_readme_exist(capsys):
    from proxfunc import demo

    with pytest.raises(SystemExit):
        demo.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in set(re.findall(r"`(?:python -m proxfunc\.demo )?(--[a-z-]+)", README.read_text())):
        assert flag in help_text, flag


def test_demo_sample_output_names_its_versions():
    """The demo's sample output is labelled with the versions it came from, and its header is
    what the demo prints for its defaults."""
    text = README.read_text()
    sample = text[text.index("```text\nproxfunc auto-sizing demo") :]
    label = text[: text.index("```text\nproxfunc auto-sizing demo")].rstrip().rsplit("\n\n", 1)[-1]
    import proxfunc

    assert "torch 2.13.0" in label and f"proxfunc {proxfunc.__version__}" in label
    from proxfunc import demo

    args = demo.parse_args([])  # the defaults the header names are the demo's
    header = sample.splitlines()[1]
    for part in (f"{args.prox}(reg={args.reg:g})", f"{args.epochs} epochs", f"lr {args.lr:g}", f"seed {args.seed}"):
        assert part in header, part
