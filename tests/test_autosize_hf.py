"""Auto-sizing Hugging Face Transformers built from tiny configs (nothing downloaded): BERT
(feed-forward block split across two modules), GPT-2 (``Conv1D``, a Linear with a transposed
weight, and an output layer tied to the embedding), Llama (a gated MLP)."""

from __future__ import annotations

import warnings

import pytest
import torch

import proxfunc as pf
from proxfunc import autosize
from proxfunc.compat import ProxOptimizer, apply_

transformers = pytest.importorskip("transformers")

VOCAB = 50


def bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg)


def gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def mlps(name, model):
    """(producers, consumer) of every feed-forward block, and how a neuron's row is written."""
    if name == "bert":
        return [((f"{p}.intermediate.dense",), f"{p}.output.dense") for p in _layers(model, "encoder.layer")]
    if name == "gpt2":
        return [((f"{p}.mlp.c_fc",), f"{p}.mlp.c_proj") for p in _layers(model, "transformer.h")]
    return [((f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj") for p in _layers(model, "model.layers")]


def _layers(model, path):
    return [f"{path}.{i}" for i in range(len(model.get_submodule(path)))]


BUILD = {"bert": bert, "gpt2": gpt2, "llama": llama}


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def plant(name, model, dead_rows, dead_cols):
    """Zero the rows of ``dead_rows`` neurons in every producer of every MLP (a dead neuron)
    and the consumer columns of ``dead_cols`` (an unused neuron)."""
    with torch.no_grad():
        for producers, consumer in mlps(name, model):
            for p in producers:
                m = model.get_submodule(p)
                if name == "gpt2":  # Conv1D: weight (in, out)
                    m.weight[:, dead_rows] = 0
                else:
                    m.weight[dead_rows] = 0
                if getattr(m, "bias", None) is not None:
                    m.bias[dead_rows] = 0
            c = model.get_submodule(consumer)
            if name == "gpt2":
                c.weight[dead_cols, :] = 0
            else:
                c.weight[:, dead_cols] = 0


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hf_mlp_groups_found_and_shrunk_exactly(name):
    torch.manual_seed(0)
    model = BUILD[name]().eval()
    plan = autosize.find_neurons(model)
    want = mlps(name, model)
    assert [(g.producers, g.consumers) for g in plan.groups] == [(p, (c,)) for p, c in want]
    assert {g.kind for g in plan.groups} == ({"gated"} if name == "llama" else {"linear"})
    hidden = plan.groups[0].neurons
    # nothing silent: every module holding parameters is in a group or skipped with a reason
    covered = {m for g in plan.groups for m in (*g.producers, *g.norms)}
    holders = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert holders <= covered | set(plan.skipped)
    assert all(plan.skipped.values())
    assert plan.untraced  # the attention blocks cannot be traced by torch.fx: kept whole, named

    plant(name, model, dead_rows=[0, 3, 5], dead_cols=[7, 8])
    ids = torch.randint(0, VOCAB, (2, 7))
    before = sum(p.numel() for p in model.parameters())
    small = autosize.shrink(model, ids)
    for producers, consumer in mlps(name, small):
        for p in producers:
            m = small.get_submodule(p)
            width = m.weight.shape[1] if name == "gpt2" else m.weight.shape[0]
            assert width == hidden - 5
        c = small.get_submodule(consumer)
        assert (c.weight.shape[0] if name == "gpt2" else c.weight.shape[1]) == hidden - 5
    assert sum(p.numel() for p in small.parameters()) < before
    other = torch.randint(0, VOCAB, (3, 9))
    torch.testing.assert_close(_out(small, other), _out(model, other), rtol=1e-5, atol=1e-5)
    if name == "gpt2":  # the output layer stays tied to the embedding
        assert small.lm_head.weight is small.transformer.wte.weight


def test_bert_constant_neuron_folded():
    """GELU(b) != 0: a neuron with zero incoming weights and a nonzero bias is a constant,
    folded into output.dense's bias."""
    torch.manual_seed(1)
    model = bert().eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight[[2, 4]] = 0
            layer.intermediate.dense.bias[[2, 4]] = torch.tensor([0.7, -1.3])
    small = autosize.shrink(model, torch.randint(0, VOCAB, (2, 5)))
    assert [lay.intermediate.dense.out_features for lay in small.encoder.layer] == [30, 30]
    assert [lay.output.dense.in_features for lay in small.encoder.layer] == [30, 30]
    ids = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(_out(small, ids), _out(model, ids), rtol=1e-5, atol=1e-5)


def test_gpt2_strict_shrink_refuses_what_it_cannot_remove():
    torch.manual_seed(2)
    model = gpt2().eval()
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight[:, 3] = 0  # a dead output channel of the attention
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(NotImplementedError, match="transformer.h.0.attn.c_proj has 1 neurons"):
        autosize.shrink(model, ids)
    with pytest.warns(UserWarning, match="cannot be shrunk"):
        kept = autosize.shrink(model, ids, strict=False)
    assert kept.transformer.h[0].attn.c_proj.weight.shape == (16, 16)


def test_neuron_prox_on_hf_model_trains_and_warns_about_tracing():
    torch.manual_seed(3)
    model = llama()
    with pytest.warns(UserWarning, match="could not trace"):
        prox, skipped = autosize.neuron_prox(model, pf.l21(10.0), outgoing=True)
    assert "lm_head" in skipped
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = prox(params, 1.0)  # a huge step: every group dies
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        assert bool((out[f"{p}.gate_proj.weight"] == 0).all()) and bool((out[f"{p}.down_proj.weight"] == 0).all())
    assert torch.equal(out["model.embed_tokens.weight"], params["model.embed_tokens.weight"])
    # in place on the module and through the optimizer: the names match named_parameters()
    apply_(prox, model, 1.0)
    assert bool((model.model.layers[0].mlp.up_proj.weight == 0).all())


def test_gpt2_tied_embedding_prox_and_shrink():
    """GPT-2's lm_head shares its weight with wte: neither is in a group, the prox's rules name
    only parameters of ``named_parameters()``, and shrink keeps them tied."""
    torch.manual_seed(4)
    model = gpt2()
    prox, skipped = _quiet(autosize.neuron_prox, model, pf.linf1(0.01), outgoing=True)
    assert "tied" in skipped["lm_head"]
    names = {k for k, _ in model.named_parameters()}
    assert all(n in names for g in prox.rules for n in (g[0] if isinstance(g[0], tuple) else (g[0],)))
    apply_(prox, model, 0.02)
    opt = ProxOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), prox, params=model)
    ids = torch.randint(0, VOCAB, (2, 5))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    small = autosize.shrink(model.eval(), torch.randint(0, VOCAB, (2, 5)))
    assert small.lm_head.weight is small.transformer.wte.weight
    assert sum(p.numel() for p in small.parameters()) <= sum(p.numel() for p in model.parameters())


def test_report_on_meta_hf_model():
    """A model on the meta device (no values): groups and sizes, no counts."""
    with torch.device("meta"):
        model = gpt2()
    plan = autosize.find_neurons(model)
    assert [g.producers for g in plan.groups] == [("transformer.h.0.mlp.c_fc",), ("transformer.h.1.mlp.c_fc",)]
    rep = autosize.report(model)
    assert [(r.total, r.alive) for r in rep.rows] == [(64, None), (64, None)]
    assert "?/128" in str(rep)


def test_example_hf_autosize_runs(capsys):
    """``examples/hf_autosize.py`` end to end, briefly: train, report, shrink, compare."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "hf_autosize.py"
    spec = importlib.util.spec_from_file_location("hf_autosize", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--arch", "llama", "--steps", "12", "--reg", "30", "--d", "32", "--hidden", "64"])
    assert out["groups"] == 2 and out["total"] == 128
    assert out["alive"] < out["total"] and out["params"][1] < out["params"][0]
    assert out["max_diff"] < 1e-4
    printed = capsys.readouterr().out
    assert "gated" in printed and "latency" in printed and "parameters" in printed
