"""The documentation site builds in strict mode, and the docstring examples of the public API run.

``mkdocs build --strict`` fails on any warning: a broken link or anchor between pages, a page
missing from the navigation, a ``::: module`` reference that does not resolve. The API pages
are generated from the docstrings (mkdocstrings), one page per module, so every public
operator of a module appears there.
"""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import pathlib
import subprocess
import sys

import pytest
import torch

import proxfunc as pf

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[docs]')"
)
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocstrings_handlers") is None, reason="mkdocstrings[python] is not installed"
)
def test_mkdocs_build_strict(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    api = (tmp_path / "site" / "api" / "norms" / "index.html").read_text()
    assert 'id="proxfunc.norms.l1"' in api  # the reference is generated from the docstrings


def test_every_api_module_has_a_page():
    """Each public module's page exists and is in the navigation, so a new operator in it
    appears on the site."""
    nav = (ROOT / "mkdocs.yml").read_text()
    modules = {getattr(pf, n).__module__ for n in pf.__all__ if inspect.isclass(getattr(pf, n))}
    modules |= {"proxfunc.autosize", "proxfunc.compat", "proxfunc.dispatch"}
    pages = {
        p.read_text().split("::: ", 1)[1].split()[0]
        for p in (ROOT / "docs" / "api").glob("*.md")
        if "::: " in p.read_text()
    }
    for mod in sorted(modules):
        assert any(page == mod or page.startswith(mod + ".") for page in pages), f"no API page for {mod}"
    for p in (ROOT / "docs" / "api").glob("*.md"):
        assert f"api/{p.name}" in nav, p.name


def _public_objects():
    seen = set()
    for name in pf.__all__:
        obj = getattr(pf, name)
        if inspect.ismodule(obj) or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield f"proxfunc.{name}", obj
    yield "proxfunc.Prox.__call__", pf.Prox.__call__


_EXAMPLES = [(n, o) for n, o in _public_objects() if ">>>" in (inspect.getdoc(o) or "")]


def test_the_docstring_examples_are_found():
    assert len(_EXAMPLES) >= 2  # the test below runs something


@pytest.mark.parametrize("name,obj", _EXAMPLES, ids=[n for n, _ in _EXAMPLES])
def test_docstring_example_runs(name, obj):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for test in finder.find(obj, name, globs={}):
            runner.run(test)
    assert runner.failures == 0, f"{name}: {runner.failures} failing docstring example(s) (see the output above)"
