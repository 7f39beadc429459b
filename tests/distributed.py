"""Run a worker function on several gloo ranks, each in its own subprocess, with a timeout.

``run_ranks("tests.dist_ops:check_matrix", nprocs=2)`` starts ``nprocs`` Python processes on
127.0.0.1; each joins one gloo process group, calls the named function with its ``rank`` and
``world`` (and ``kwargs``, which must be JSON), and leaves the group. A rank that fails, or a
run that takes longer than ``timeout`` seconds (a collective mismatch that would hang), kills
every rank and fails the calling test with each rank's output. Returns each rank's stdout.

A worker reports its results as lines of text; :func:`report` prints one JSON line that the
caller reads back with :func:`results`, so one launch (about two seconds of start-up) can
check many cases and name the ones that failed.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

_MARK = "@@proxfunc-dist@@"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_unless_gloo() -> None:
    """Skip the calling test (with the reason) where torch.distributed or gloo is missing."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")


def run_ranks(target: str, nprocs: int = 2, timeout: float = 240, **kwargs: Any) -> list[str]:
    """Run ``target`` (``"module:function"``) on ``nprocs`` gloo ranks; see the module docstring."""
    skip_unless_gloo()
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks share two cores
    # Each rank writes into a file, not a pipe: read one pipe at a time, a rank that filled its
    # pipe (64 KiB) blocked on the write while the rank being read waited for it in a collective.
    files = [tempfile.TemporaryFile(mode="w+") for _ in range(nprocs)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed", target, str(rank), str(nprocs), str(port), json.dumps(kwargs)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank, f in enumerate(files)
    ]

    def read_all() -> list[str]:
        outs = []
        for f in files:
            f.seek(0)
            outs.append(f.read())
            f.close()
        return outs

    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        tails = [out[-3000:] for out in read_all()]
        pytest.fail(f"{target}: timed out after {timeout} s (a collective mismatch?)\n" + "\n----\n".join(tails))
    outs = read_all()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        detail = "\n----\n".join(f"rank {r} (exit {rc}):\n{outs[r][-4000:]}" for r, rc in failed)
        pytest.fail(f"{target}: ranks failed\n{detail}")
    return outs


def report(**fields: Any) -> None:
    """Print one result record (JSON) for :func:`results` to read back."""
    print(_MARK + json.dumps(fields, default=str), flush=True)


def results(outs: list[str]) -> list[list[dict]]:
    """The records each rank printed with :func:`report`, rank by rank."""
    return [[json.loads(line[len(_MARK) :]) for line in out.splitlines() if line.startswith(_MARK)] for out in outs]


def _main(argv: list[str]) -> None:
    target, rank, world, port, kwargs = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), json.loads(argv[4])
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        module, name = target.split(":")
        getattr(importlib.import_module(module), name)(rank=rank, world=world, **kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: with the group destroyed and every record
    # flushed, the work is over, and finalisation (objects still holding the group, torch's
    # static threads) can abort a rank with SIGABRT ("terminate called without an active
    # exception") that says nothing about the checks. A worker that raised does not get here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1:])
