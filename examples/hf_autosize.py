"""Auto-size the MLPs of a small Hugging Face language model, end to end.

    PYTHONPATH=. python examples/hf_autosize.py                  # GPT-2 (Conv1D MLPs), about a minute on 2 cores
    PYTHONPATH=. python examples/hf_autosize.py --arch llama     # Llama (gated MLPs: gate, up, down)
    PYTHONPATH=. python examples/hf_autosize.py --steps 30       # seconds

The model is built from a small config with random weights (nothing is downloaded) and
trained on a synthetic language: each sequence counts up from a random start with a random
stride, modulo the vocabulary, so the next token is predictable from the previous two.
:func:`proxfunc.autosize.neuron_prox` finds the neurons of every MLP (GPT-2: row ``i`` of
``c_fc``, a ``Conv1D`` with a transposed weight, and column ``i`` of ``c_proj``; Llama:
rows ``i`` of ``gate_proj`` and ``up_proj`` and column ``i`` of ``down_proj``), and
:class:`proxfunc.compat.ProxOptimizer` applies the group-lasso prox after every AdamW step.
Then :func:`proxfunc.autosize.report` counts the live neurons, :func:`proxfunc.autosize.shrink`
removes the dead ones, and the shrunk model's outputs and latency are compared with the
trained model's. Attention, embeddings and the residual stream (normalised by ``LayerNorm``/
``RMSNorm``) are not auto-sized; the report lists why.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import proxfunc as pf
from proxfunc import autosize
from proxfunc.compat import ProxOptimizer


def build(arch: str, vocab: int, d: int, hidden: int, layers: int) -> torch.nn.Module:
    import transformers

    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=d,
            n_inner=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def batch(n: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences ``start, start + stride, start + 2 stride, ...`` modulo ``vocab``."""
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    stride = torch.randint(1, 6, (n, 1), generator=gen)
    return (start + stride * torch.arange(length)) % vocab


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def latency(models: list[torch.nn.Module], ids: torch.Tensor, repeats: int = 30) -> list[float]:
    """The fastest of ``repeats`` forward passes of each model, in seconds (the models take
    turns, so a busy machine slows them alike)."""
    best = [float("inf")] * len(models)
    with torch.no_grad():
        for m in models:
            m(ids)
        for _ in range(repeats):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(ids)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reg", type=float, default=1.0, help="group-lasso weight (prox step = the learning rate)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d", type=int, default=64, help="model width")
    ap.add_argument("--hidden", type=int, default=256, help="MLP width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    vocab, length = 64, 24
    model = build(args.arch, vocab, args.d, args.hidden, args.layers)
    with warnings.catch_warnings():  # attention blocks cannot be traced by torch.fx: kept whole
        warnings.filterwarnings("ignore", message="autosize: torch.fx could not trace")
        neurons = autosize.neuron_prox(model, pf.l21(args.reg), outgoing=True)
    prox, skipped, plan = neurons.prox, neurons.skipped, neurons.plan
    print(f"{args.arch}: {len(plan.groups)} MLP neuron groups, {len(skipped)} modules not auto-sized")
    for g in plan.groups:
        print(f"  {g.name} ({g.kind}, {g.neurons} neurons): {', '.join(g.producers)} -> {g.chain} -> {g.consumer}")

    opt = ProxOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0), prox, params=model)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = batch(16, length, vocab, gen)
        out = model(ids).logits[:, 1:-1]  # predict token t+1 from tokens ..t (two are needed)
        loss = F.cross_entropy(out.reshape(-1, vocab), ids[:, 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            rep = autosize.report(model)
            print(f"step {step:4d}  loss {loss.item():.3f}  live MLP neurons {rep.alive}/{rep.total}")
    train_s = time.perf_counter() - t0

    model.eval()
    rep = autosize.report(model)
    print(rep)
    test = batch(64, length, vocab, torch.Generator().manual_seed(args.seed + 1))
    small = autosize.shrink(model, test[:8])
    before, after = logits(model, test), logits(small, test)
    diff = float((before - after).abs().max())
    acc = float((after[:, 1:-1].argmax(-1) == test[:, 2:]).float().mean())
    p_before = sum(p.numel() for p in model.parameters())
    p_after = sum(p.numel() for p in small.parameters())
    t_before, t_after = latency([model, small], test)
    print(f"parameters {p_before} -> {p_after}; MLP neurons {rep.total} -> {rep.alive}")
    print(f"outputs: max |difference| {diff:.2e}; next-token accuracy {acc:.3f}")
    print(f"latency (batch {test.shape[0]}x{length}): {1e3 * t_before:.2f} ms -> {1e3 * t_after:.2f} ms")
    print(f"training {train_s:.1f} s")
    return {
        "groups": len(plan.groups),
        "alive": rep.alive,
        "total": rep.total,
        "params": (p_before, p_after),
        "max_diff": diff,
        "accuracy": acc,
        "latency": (t_before, t_after),
        "loss": loss.item(),
    }


if __name__ == "__main__":
    main()
