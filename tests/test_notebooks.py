"""The notebooks run top to bottom and show what their text says.

Each notebook's code cells are executed in order in one namespace (what "Run all" does, without
a Jupyter kernel), then the results the text claims are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str) -> dict:
    nb = json.loads((NOTEBOOKS / name).read_text())
    assert nb["nbformat"] == 4
    ns: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell["outputs"], f"{name}: cell {i} is committed with outputs"
            exec(compile("".join(cell["source"]), f"{name}[{i}]", "exec"), ns)
    return ns


def test_autosize_notebook():
    ns = run_notebook("autosize.ipynb")
    assert ns["acc"] > 0.85  # the regularised model still classifies the digits (0.93 here)
    rows = ns["report"].rows
    assert len(rows) == 2 and all(r.alive < r.total for r in rows)  # neurons were removed
    small, model, X, test = ns["small"], ns["model"], ns["X"], ns["test"]
    assert ns["same"] and ns["n_after"] < ns["n_before"]
    assert [m.out_features for m in small if isinstance(m, torch.nn.Linear)][:2] == [r.alive for r in rows]
    torch.testing.assert_close(small(X[test]), model(X[test]), rtol=1e-4, atol=1e-5)
    assert all(r.alive < r.total for r in ns["autosize"].report(ns["model2"]).rows)  # the torch.optim loop too
