"""The seed's auto-sizing claim: xor with linf1 keeps few of its 100 hidden neurons.

* examples/seed_xor.py is the seed README's final code with only the import line changed
  (``import proxfunc.compat as pg``); it must run unchanged and prune most neurons
  (the seed says "around 15 of the 100"; ten seeds give 10..27 under torch 2.13 and 2..4
  under torch 2.14.1, see the README);
* examples/xor.py is the functional version (functional_call + torch.func.grad + a
  partition binding linear1.weight and linear1.bias); run here with fewer epochs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def _predictions(out: str) -> list[tuple[float, float]]:
    pairs = re.findall(r"Target: tensor\(\[\[([-\d.e]+)\]\]\) Predicted: tensor\(\[\[([-\d.e]+)\]\]", out)
    return [(float(t), float(p)) for t, p in pairs]


@pytest.mark.slow
def test_seed_readme_xor_runs_unchanged_and_prunes():
    out = _run(["examples/seed_xor.py", "0"])
    initial = int(re.search(r"H initially .*?: (\d+)", out).group(1))
    remaining = int(re.search(r"H remaining .*?: (\d+)", out).group(1))
    assert initial == 100
    # Most neurons pruned. Two is the fewest ReLU units that represent xor (one cannot: its
    # output is monotone along one direction), and the prediction check below fails with
    # fewer. The count follows float rounding through 20000 prox steps: seeds 0-9 leave 10-27
    # under torch 2.13 (CPU wheel) and 2-4 under torch 2.14.1, all fitting xor (README).
    assert 2 <= remaining <= 40, out
    preds = _predictions(out)
    assert len(preds) == 4, out
    for target, pred in preds:
        assert abs(pred - target) < 0.25, out


def test_seed_xor_keeps_the_seed_readme_code():
    text = (ROOT / "examples" / "seed_xor.py").read_text()
    assert "import proxfunc.compat as pg\n" in text
    assert not any(line.startswith("import proximalGradient") for line in text.splitlines())
    for line in (
        "from torch.autograd import Variable",
        "pg.linf1(model.linear1.weight, model.linear1.bias, reg=0.005)",
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.01)",
        "criterion = torch.nn.MSELoss(reduction='sum')",
        "for t in range(5000):",
        "D_in, H, D_out = 2, 100, 1",
    ):
        assert line in text


def test_functional_xor_example_prunes_and_fits():
    spec = importlib.util.spec_from_file_location("xor_example", ROOT / "examples" / "xor.py")
    xor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(xor)
    r = xor.main(["--epochs", "1500", "--reg", "0.1", "--seed", "0"])
    assert r["initial"] == 100
    assert 3 <= r["remaining"] <= 40
    assert (r["pred"] - r["targets"]).abs().max() < 0.25
