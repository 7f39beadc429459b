"""Auto-size a small Transformer's feed-forward blocks while training it sharded with FSDP2.

    torchrun --nproc_per_node 2 examples/fsdp_autosize.py      # CPUs (gloo) or GPUs (NCCL)
    torchrun --nproc_per_node 2 examples/fsdp_autosize.py --small --steps 40 --reg 0.4   # seconds

Every rank holds a shard of each block (``fully_shard``). :func:`proxfunc.autosize.neuron_prox`
finds the neurons of every feed-forward block (``linear1 -> activation -> linear2`` of each
``nn.TransformerEncoderLayer``), :class:`proxfunc.compat.ProxOptimizer` applies the group
prox after each optimizer step (into the shards, in place), :func:`proxfunc.autosize.report`
counts the live neurons of the whole layers, and the model is shrunk: gather the whole state
into a plain copy, shrink it (exactly: same outputs), shard it again and check its outputs
against the trained model's. No downloads: a synthetic per-token regression task.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import proxfunc as pf
from proxfunc import autosize
from proxfunc.compat import ProxOptimizer


class TinyTransformer(nn.Module):
    def __init__(self, d_in: int, d_model: int, heads: int, ffn: int, layers: int, d_out: int):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True) for _ in range(layers)
        )
        self.head = nn.Linear(d_model, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, seq, d_in)`` -> one output row per token, ``(batch * seq, d_out)``."""
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.flatten(0, 1))


def target(x: torch.Tensor) -> torch.Tensor:
    """What each token should map to: nonlinear, so the feed-forward blocks are needed."""
    return torch.stack([x[..., 0] * x[..., 1], torch.sin(2 * x[..., 2])], -1).flatten(0, 1)


def shard(model: TinyTransformer, mesh) -> TinyTransformer:
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--op", choices=["l21", "linf1"], default="l21")
    ap.add_argument("--reg", type=float, default=None, help="default: 0.08 (l21), 0.02 (linf1)")
    ap.add_argument("--small", action="store_true", help="tiny sizes (the test)")
    args = ap.parse_args()

    # NCCL when every local rank has a GPU of its own (NCCL refuses two ranks on one GPU).
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= local_world
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = init_device_mesh(device.type, (world,))

    d_in, d_model, heads, ffn, layers, d_out, seq, batch = (4, 16, 2, 32, 2, 2, 6, 16)
    if not args.small:
        d_model, ffn, layers, batch = 32, 128, 3, 32
    sizes = dict(d_in=d_in, d_model=d_model, heads=heads, ffn=ffn, layers=layers, d_out=d_out)

    # The same initial model and data on every rank (seeded); each rank trains on its slice.
    torch.manual_seed(0)
    model = shard(TinyTransformer(**sizes).to(device), mesh)

    op = pf.l21(args.reg or 0.08) if args.op == "l21" else pf.linf1(args.reg or 0.02)
    # The groups of the plain model (full widths), found without communicating.
    neurons = autosize.neuron_prox(model, op, outgoing=args.op == "l21")
    opt = ProxOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), neurons.prox, params=model)
    if rank == 0:
        print(neurons.plan)

    gen = torch.Generator(device=device).manual_seed(1)
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    for step in range(args.steps):
        x = torch.randn(batch, seq, d_in, device=device, generator=gen)
        loss = nn.functional.mse_loss(model(x[rows]), target(x[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step + 1) % max(1, args.steps // 5) == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.4f}")

    rep = autosize.report(model)  # every rank: gathers each sharded weight
    if rank == 0:
        print(rep)

    # Shrink: the whole state into a plain copy (on the meta device: no memory spent twice),
    # shrink it (checked exact on x), shard the result again.
    x = torch.randn(batch, seq, d_in, device=device, generator=gen)
    with torch.device("meta"):
        plain = TinyTransformer(**sizes)
    small = autosize.shrink(autosize.gather(model, plain), x)
    widths = [b.linear1.out_features for b in small.blocks]
    small = shard(small, mesh)
    model.eval()
    small.eval()
    with torch.no_grad():
        y_big, y_small = model(x), small(x)
    err = float((y_big - y_small).abs().max())
    n_big = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    if not err <= 1e-5 * max(1.0, float(y_big.abs().max())):
        raise SystemExit(f"rank {rank}: the shrunk model's outputs differ by {err}")
    if rank == 0:
        print(f"feed-forward widths {[ffn] * layers} -> {widths}; parameters {n_big} -> {n_small} (whole model)")
        print(f"outputs equal: max difference {err:.2e} on {world} ranks ({'NCCL' if cuda else 'gloo'})")
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
