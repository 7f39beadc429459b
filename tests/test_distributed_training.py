"""Training with proxes under FSDP2 (``fully_shard``) and DDP on 2 gloo ranks equals one process.

Issue 15, part B. One launch of :func:`tests.dist_training.worker` (2 CPU processes) runs
every case; the tests below read its records. Each training case trains 5 SGD steps + prox
on each rank's half of every batch and compares the whole parameters with one process
trained on the whole batches (same seed; float32, 1e-5), and requires them to differ from
plain SGD's (a prox that does nothing fails). The example ``examples/fsdp_autosize.py`` runs
under ``torch.distributed.run`` in its own test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.distributed import ROOT, results, run_ranks, skip_unless_gloo

TOL = 1e-5


def _fsdp_available() -> bool:
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _fsdp_available(), reason="needs torch.distributed with FSDP2 (torch >= 2.6)")


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    """``{case: [rank 0's record, rank 1's record]}`` from one launch."""
    outs = run_ranks("tests.dist_training:worker", nprocs=2, timeout=150)
    by_rank = results(outs)
    cases: dict[str, list[dict]] = {}
    for recs in by_rank:
        for r in recs:
            cases.setdefault(r["case"], []).append(r)
    return cases


def _ok(records: dict, case: str) -> list[dict]:
    recs = records.get(case)
    assert recs and len(recs) == 2, f"{case}: no record from each rank ({recs})"
    for r in recs:
        assert "error" not in r, f"{case}: {r['error']}\n{r.get('trace', '')}"
    return recs


TRAINING = [
    "fsdp-l1-optimizer",
    "fsdp-l1-group",
    "fsdp-l1-state_dict",
    "fsdp-l21-neurons-optimizer",
    "fsdp-l21-neurons-apply",
    "fsdp-l21-seed",
    "fsdp-linf1-neurons-optimizer",
    "fsdp-blocks-l21-neurons-optimizer",
    "ddp-l1-optimizer",
    "ddp-l21-neurons-optimizer",
    "ddp-l21-seed",
]


@pytest.mark.parametrize("case", TRAINING)
def test_training_equals_one_process(records, case):
    for r in _ok(records, case):
        assert r["same_groups"], f"{case}: neuron groups differ from the plain model's"
        assert r["err"] <= TOL, f"{case}: distributed training differs from one process by {r['err']}"
        assert r["moved"] > 100 * TOL, f"{case}: the prox changed nothing ({r['moved']})"


@pytest.mark.parametrize("wrapper", ["fsdp", "ddp"])
def test_autosize_groups_report_shrink(records, wrapper):
    for r in _ok(records, f"autosize-{wrapper}"):
        assert r["same_groups"], "neuron_prox found other groups than on the plain model"
        assert r["same_report"], f"report differs from the plain model's:\n{r['report']}"
        assert r["total"] == [9, 7], r["report"]  # whole layers, not a rank's shard
        assert 0 < sum(r["alive"]) < 16, f"the test should kill some neurons, not all:\n{r['report']}"
        assert r["sizes"] == r["alive"], (r["sizes"], r["report"])
        assert r["shrink_err"] <= 1e-5 and r["reshard_err"] <= 1e-5, r
        if wrapper == "fsdp":
            assert "gather" in r["refused"], "shrink of a sharded model should point to gather"
        else:
            assert r["direct_sizes"] == r["sizes"], "shrink(ddp_model) should shrink its module"


def test_apply_on_dtensors_is_all_or_nothing(records):
    for r in _ok(records, "atomic-fsdp"):
        assert r["failing_op"] == "unchanged", r
        assert r["plain_value"] == "unchanged", r
        assert r["replicated_value"] == "halved", r  # redistributed to the shard's placement


def test_apply_on_dtensors_and_plain_tensors(records):
    for r in _ok(records, "mixed-fsdp"):
        assert r["err"] <= TOL, r
        assert r["distinct"], "distinct shards and tensors taken for overlapping"
        assert not r["alias"], "two DTensors sharing a shard not seen as overlapping"


def test_example_under_torchrun():
    """``examples/fsdp_autosize.py`` under ``torch.distributed.run`` (torchrun) on 2 CPU ranks."""
    skip_unless_gloo()
    if not _fsdp_available():
        pytest.skip("needs FSDP2")
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["examples/fsdp_autosize.py", "--steps", "40", "--small", "--reg", "0.4"]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the example timed out:\n{(e.stdout or '')[-3000:]}{(e.stderr or '')[-3000:]}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "outputs equal" in p.stdout, p.stdout[-3000:]
    widths = re.search(r"feed-forward widths \[32, 32\] -> \[(\d+), (\d+)\]", p.stdout)
    assert widths and all(0 < int(w) < 32 for w in widths.groups()), p.stdout[-3000:]  # shrunk, not emptied
