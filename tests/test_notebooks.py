"""The notebooks run top to bottom in a fresh Jupyter kernel and show what their text says.

Each notebook of ``notebooks/`` is executed by ``notebooks/run.py``'s ``execute`` (nbclient +
ipykernel, a new ``python3`` kernel importing this checkout's ``proxfunc``, cells in order, any
error fails), in memory: the committed file is not rewritten. Its last cell defines ``claims``, a
dict of the values its text states, read back from the kernel and checked here.

The committed notebooks carry their outputs (plots visible in the repository): each is checked to
be executed top to bottom in one run, with a picture, without errors or warnings, under 1 MB, and
with the same kinds of output per cell as a fresh run gives. Regenerate them with
``python notebooks/run.py``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("notebooks_run", ROOT / "notebooks" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------- the claims, per notebook
def check_operators(c: dict) -> None:
    # 1-D proxes: never worse than the best of the grid, within the grid spacing (0.002) of its argmin
    assert c["prox_1d_excess_max"] <= 1e-12
    assert c["prox_1d_argmin_err_max"] <= 0.002 + 1e-12
    # the envelope of |x| is Huber(1/mu, delta=mu); its gradient is (x - prox(x, mu)) / mu
    assert c["envelope_huber_err"] <= 1e-12 and c["envelope_grad_err"] <= 1e-12
    # projections: feasible, idempotent, the projection inequality
    assert c["projections_feasible"] is True
    assert c["projections_idempotent_err"] <= 1e-12
    assert c["projection_inequality_max"] <= 1e-12
    # l21 kills whole neurons, l1 at the same share of zeros almost none
    assert c["l21_zero_fraction"] > 0.2
    assert c["l21_dead_neurons"] >= 4 and c["l1_dead_neurons"] <= 2
    # calculus rules
    assert c["scale_err"] <= 1e-12 and c["moreau_identity_err"] <= 1e-12
    assert c["conjugate_l1_err"] <= 1e-12 and c["conjugate_l2_err"] <= 1e-12
    assert c["precompose_err"] <= 0.002 + 1e-12


def check_autosize(c: dict) -> None:
    alive, total = c["report_alive"], c["report_total"]
    assert len(alive) == 2 and all(a < t for a, t in zip(alive, total))  # neurons were removed
    assert c["alive_per_epoch"][-1] == alive
    assert c["accuracy"] > 0.9  # the regularised model still classifies the digits
    # the shrunk model: the live widths, the same function, fewer parameters
    assert c["small_widths"] == alive
    assert c["shrink_max_abs_diff"] <= 1e-4 and c["same_predictions"] is True
    assert c["params_after"] < c["params_before"]
    # the sweep: fewer neurons as reg grows; accuracy falls slowly at first (about half the neurons for
    # two or three points), then quickly
    sweep = c["sweep"]
    sizes = [sum(s["alive"]) for s in sweep]
    assert sweep[0]["reg"] == 0 and sizes[0] == 256
    assert all(b <= a for a, b in zip(sizes, sizes[1:])) and sizes[-1] < sizes[0] / 4
    acc0 = sweep[0]["accuracy"]
    assert any(size <= 0.65 * 256 and s["accuracy"] >= acc0 - 0.04 for size, s in zip(sizes, sweep))
    assert sweep[-1]["accuracy"] < acc0 - 0.1
    # ProxOptimizer + CosineAnnealingLR repeats the torch.func loop
    assert all(a < t for a, t in zip(c["optim_alive"], c["optim_total"]))
    assert c["optim_same_neurons"] is True and c["optim_alive"] == alive


def check_autosize_transformer(c: dict) -> None:
    assert c["groups"] == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]  # the FFN blocks
    assert c["widths_before"] == [256, 256]
    assert all(0 < a < b for a, b in zip(c["widths_after"], c["widths_before"]))
    assert c["alive_per_epoch"][-1] == c["widths_after"]
    assert c["params_after"] < c["params_before"]
    assert c["shrink_max_abs_diff"] <= 1e-5  # the shrunk model's outputs equal the trained one's
    # accuracy kept (397 test images: 0.0025 per image)
    assert c["acc_dense"] > 0.9
    assert c["acc_sized"] >= c["acc_dense"] - 0.03
    assert c["acc_small_finetuned"] >= c["acc_dense"] - 0.02
    lat = c["latency_ms"]  # measured and shown, not compared (timings are not asserted)
    assert set(lat) == {"dense", "small"} and all(v > 0 for row in lat.values() for v in row.values())


def check_torch_func(c: dict) -> None:
    assert c["loop_test_accuracy"] > 0.9 and c["loop_neurons_left"] < 64
    assert c["path_shape"] == [60, 20]
    assert c["path_vmap_vs_loop"] <= 1e-10  # one batched call = the loop
    assert c["path_vs_sklearn"] <= 1e-6  # = scikit-learn's Lasso
    assert c["grad_rel_err_max"] <= 1e-6  # grad through the prox = finite differences
    assert len(c["grad_rows"]) == 6
    assert c["compile_distinct_lrs"] == c["compile_steps"] == 20
    assert c["compile_graphs"] == 1  # fullgraph, compiled once: no recompilation
    assert c["compiled_vs_eager"] <= 1e-5


def check_solvers(c: dict) -> None:
    assert c["lasso_converged"] is True
    assert c["lasso_rel_objective_diff"] <= 1e-10 and c["lasso_coef_diff"] <= 1e-6
    assert c["group_rel_objective_diff"] <= 1e-10 and c["group_coef_diff"] <= 1e-6
    assert c["group_features_pf"] == c["group_features_sklearn"] == list(range(6))
    it = c["iterations_to_1e-8"]
    assert None not in it.values()
    assert it["FISTA + restart"] < it["FISTA"] < it["ISTA"]
    gap = c["final_gap"]
    assert gap["ISTA"] < gap["FISTA"] and gap["FISTA + restart"] <= 1e-14  # ISTA passes plain FISTA
    # pf.argmin's implicit derivative = finite differences = the closed form on the lasso's support
    assert c["hypergradient_rel_err"] <= 1e-6
    assert c["hypergradient_closed_form_rel_err"] <= 1e-10
    # unrolling: "about 1% off after 25 iterations and 1e-4 after 50, equal to rounding from 100 on"
    un = c["unrolled_rel_err"]
    assert 1e-3 < un["25"] < 0.05 and 1e-5 < un["50"] < 1e-3
    assert un["100"] <= 1e-8 and un["200"] <= 1e-8
    assert c["V_gradient_descent"] <= c["V_grid"] * (1 + 1e-3)  # as good as the grid search
    # one weight per feature: lower validation loss, and a lower loss on the unused test rows
    assert c["V_weights"] < 0.9 * c["V_gradient_descent"]
    assert c["test_weights"] < 0.9 * c["test_one_reg"]
    assert c["features_weights"] < c["features_one_reg"]


def check_migrating(c: dict) -> None:
    assert c["neurons_initial"] == 100
    assert 10 <= c["neurons_left_compat"] <= 20  # "around 15 of the 100 neurons"
    assert c["neurons_left_functional"] == c["neurons_left_compat"] and c["same_neurons_left"] is True
    assert c["max_param_diff"] <= 1e-4  # the same iterates up to rounding
    for pred in (c["pred_compat"], c["pred_functional"]):
        assert all(abs(p - t) < 0.1 for p, t in zip(pred, c["targets"]))  # xor is learned
    assert c["pair_call_equals_functional"] is True


CHECKS: dict[str, Callable[[dict], None]] = {
    "operators.ipynb": check_operators,
    "autosize.ipynb": check_autosize,
    "autosize_transformer.ipynb": check_autosize_transformer,
    "torch_func.ipynb": check_torch_func,
    "solvers.ipynb": check_solvers,
    "migrating.ipynb": check_migrating,
}


# ------------------------------------------------------------------------------ the outputs
def output_kinds(cell) -> set[str]:
    kinds = set()
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            kinds.add(f"stream:{o.name}")
        elif o.output_type == "error":
            kinds.add(f"error:{o.ename}")
        else:
            kinds.update(f"{o.output_type}:{mime}" for mime in o.get("data", {}))
    return kinds


def check_committed(nb, path: Path) -> None:
    nbformat.validate(nb)
    assert path.stat().st_size < run.MAX_BYTES, f"{path.name} is over 1 MB"
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not executed top to bottom in one run: {counts}"
    kinds = set().union(*(output_kinds(c) for c in code))
    assert "display_data:image/png" in kinds, f"{path.name}: committed without its pictures"
    assert not any(k.startswith("error") or k == "stream:stderr" for k in kinds), f"{path.name}: errors or warnings"
    assert code[-1].source.lstrip().startswith("claims = {"), f"{path.name}: the last cell must define claims"


def test_every_notebook_is_checked():
    assert sorted(p.name for p in run.notebook_paths()) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook(name: str):
    path = run.NOTEBOOKS / name
    before = path.read_bytes()
    committed = nbformat.reads(before.decode(), as_version=4)
    check_committed(committed, path)

    executed, claims = run.execute(path, timeout=600)

    assert path.read_bytes() == before  # executing does not rewrite the committed notebook
    fresh = [c for c in executed.cells if c.cell_type == "code"]
    old = [c for c in committed.cells if c.cell_type == "code"]
    for i, (new_cell, old_cell) in enumerate(zip(fresh, old)):
        assert "stream:stderr" not in output_kinds(new_cell), f"{name}: cell {i} writes to stderr (a warning?)"
        assert output_kinds(new_cell) == output_kinds(old_cell), (
            f"{name}: code cell {i} outputs {sorted(output_kinds(new_cell))} now but was committed with "
            f"{sorted(output_kinds(old_cell))}: rerun python notebooks/run.py {name}"
        )
    CHECKS[name](claims)
