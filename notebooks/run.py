"""Execute the notebooks in fresh Jupyter kernels and write their outputs back.

Run from anywhere (the kernel imports the ``proxfunc`` of this checkout)::

    python notebooks/run.py                  # every notebook
    python notebooks/run.py solvers.ipynb    # some of them

Each notebook runs top to bottom in a new ``python3`` kernel (nbclient + ipykernel) whose working
directory is ``notebooks/``, whose ``PYTHONPATH`` starts with the repository root and whose
``OMP_NUM_THREADS`` is 1 unless set; any error stops it. The notebook's last cell defines
``claims``, a JSON-serialisable dict of the values its text states; they are read back from the
kernel and printed (``tests/test_notebooks.py`` checks them). Cell timing metadata is not
recorded, so a rerun only changes what the code prints and draws.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
ROOT = NOTEBOOKS.parent
MAX_BYTES = 1_000_000  # each committed notebook, outputs included
_PROBE = "import json as _json\nprint(_json.dumps(claims))"


def notebook_paths() -> list[Path]:
    """Every notebook of ``notebooks/``, sorted by name."""
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def kernel_env() -> dict[str, str]:
    """The environment of the kernel: this one, with the repository root first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the figures into the notebook
    # The notebooks' models are small: one thread is faster for them than several (which spend
    # their time synchronising, badly so on a shared machine) and makes their numbers independent
    # of the core count. An OMP_NUM_THREADS set by the caller is kept.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def execute(path: Path, *, timeout: int = 600) -> tuple[nbformat.NotebookNode, dict[str, Any]]:
    """Run the notebook at ``path`` in a fresh kernel; return the executed notebook and its ``claims``.

    The file is not written. A cell that raises stops the run with ``nbclient``'s
    ``CellExecutionError``. ``claims`` is read by one more cell, run after the last one in the same
    kernel and left out of the returned notebook.
    """
    nb = nbformat.read(path, as_version=4)
    run = copy.deepcopy(nb)
    run.cells.append(nbformat.v4.new_code_cell(_PROBE))
    client = NotebookClient(
        run,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=kernel_env())
    probe = run.cells.pop()
    text = "".join(o.get("text", "") for o in probe.outputs if o.output_type == "stream" and o.name == "stdout")
    claims = json.loads(text)
    for cell, new in zip(nb.cells, run.cells):
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = new.outputs, new.execution_count
            cell.metadata.pop("execution", None)
    return nb, claims


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Execute notebooks in fresh kernels and write the outputs back.")
    ap.add_argument("names", nargs="*", help="notebook file names in notebooks/ (default: all)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = ap.parse_args(argv)
    paths = [NOTEBOOKS / n for n in args.names] if args.names else notebook_paths()
    for p in paths:
        if not p.is_file():
            ap.error(f"no notebook {p}")
    too_big = []
    for p in paths:
        t0 = time.perf_counter()
        nb, claims = execute(p, timeout=args.timeout)
        nbformat.write(nb, p)
        size = p.stat().st_size
        print(f"{p.name}: {time.perf_counter() - t0:.1f} s, {size / 1e3:.0f} kB, claims {json.dumps(claims)}")
        if size > MAX_BYTES:
            too_big.append(p.name)
    if too_big:
        print(f"over {MAX_BYTES} bytes: {', '.join(too_big)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
