"""Every operator on DTensors gives the answer of the full tensor (2 gloo ranks, one launch).

``tests/dist_ops.py`` runs on both ranks once per module (a launch costs seconds of start-up)
and reports each check; the tests here read the reports and name what failed:

* every operator of ``tests/cases.py`` on ``Shard(0)``, ``Shard(1)``, ``Replicate``, an uneven
  ``Shard(0)`` (7, 5 or 3 rows on 2 ranks) and a 2-d mesh equals the operator on the full
  tensors, keeps each leaf's placements, and its ``value()`` is a Replicate DTensor equal to the
  full tensors' value and the same number on both ranks;
* no host read at all during those calls (a ``TorchDispatchMode`` fails on ``.item()``,
  ``nonzero``, boolean masks: ``dist_ops.NoHostReads``), and that detector catches such reads;
* plain and DTensor leaves in one call raise ``TypeError`` naming the leaves;
* the water-filling operators on 9000 entries (above the eager path's 4096) are exact;
* a 0-d tensor step, 0-d tensor hyperparameters after float ones (torch 2.13's DTensor cache
  bug, ``proxfunc._dist.call``), and ``torch.compile(fullgraph=True)`` of a prox step (the
  ``aot_eager`` backend: dynamo and AOT tracing of DTensor; inductor took 56 s) match eager.
"""

from __future__ import annotations

import collections

import pytest

from tests.cases import CASES
from tests.conftest import _COMPILE_SKIP
from tests.dist_ops import PLACEMENTS
from tests.distributed import results, run_ranks


@pytest.fixture(scope="module")
def records():
    """Every rank's records, by kind: ``{kind: [(rank, record), ...]}``."""
    compile_backend = None if _COMPILE_SKIP else "aot_eager"
    outs = run_ranks("tests.dist_ops:worker", nprocs=2, timeout=240, compile=compile_backend)
    by_kind = collections.defaultdict(list)
    for rank, recs in enumerate(results(outs)):
        for r in recs:
            by_kind[r["kind"]].append((rank, r))
    return by_kind


def _failures(recs) -> list[str]:
    return [
        f"rank {rank} {r.get('placement', '')} {r.get('dtype', '')}: {p}" for rank, r in recs for p in r["problems"]
    ]


def _assert_passed(records, kind):
    """The worker reported checks of ``kind`` and none of them failed."""
    assert records[kind], f"the worker reported no {kind!r} checks"
    assert not _failures(records[kind]), "\n".join(_failures(records[kind]))


def test_host_read_detector_catches_reads(records):
    _assert_passed(records, "selftest")


def test_mixed_plain_and_dtensor_leaves_raise_type_error(records):
    _assert_passed(records, "mixed")


def test_every_operator_and_placement_was_checked(records):
    seen = {(r["name"], r["placement"]) for _, r in records["case"]}
    missing = [(c.name, p) for c in CASES for p in PLACEMENTS if (c.name, p) not in seen]
    assert not missing, f"not reported: {missing}"


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_operator_on_dtensors_matches_full_tensor(records, case):
    recs = [(rank, r) for rank, r in records["case"] if r["name"] == case.name]
    assert recs, f"{case.name}: no reports"
    failures = _failures(recs)
    assert not failures, f"{case.name} on DTensors:\n" + "\n".join(failures)
    values = collections.defaultdict(set)
    for _, r in recs:
        values[(r["placement"], r["dtype"])].add(r["value"])
    differ = {k: v for k, v in values.items() if len(v) > 1}
    assert not differ, f"{case.name}: value() differs between ranks: {differ}"


def test_tensor_step(records):
    _assert_passed(records, "tensor_step")


@pytest.mark.skipif(_COMPILE_SKIP is not None, reason=_COMPILE_SKIP or "")
def test_compile_fullgraph_matches_eager(records):
    _assert_passed(records, "compile")


def test_water_filling_above_the_eager_size(records):
    """linf, linf1, l1_ball, simplex, max_entry on 9000 entries: exact, same on every rank."""
    _assert_passed(records, "large")


def test_tensor_hyperparameters_after_float_ones(records):
    _assert_passed(records, "tensor_hyper")
