"""``python -m proxfunc.demo`` run quickly through ``main(argv)``."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from proxfunc import demo
from tests.conftest import requires_compile


def _widths(text: str) -> dict[str, tuple[int, int]]:
    return {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^(\S+) \(\w+\)\s+(\d+) -> (\d+)", text, re.M)}


def test_digits_demo_table_accuracy_and_plot(tmp_path, capsys):
    png = tmp_path / "live.png"
    out = demo.main(["--epochs", "4", "--reg", "0.03", "--seed", "1", "--no-progress", "--plot", str(png)])
    printed = capsys.readouterr().out
    assert printed.strip() == out["text"].strip()
    text = out["text"]
    for needle in ("neurons before -> after", "params before -> after", "regularised (before shrink)", "shrunk"):
        assert needle in text
    assert "unregularised, same architecture" in text and "inference latency" in text
    # the regularised and the shrunk models agree: same predictions, same accuracy
    assert out["same_predictions"] and "same predictions: yes" in text
    assert out["acc_regularised"] == out["acc_shrunk"]
    assert 0.0 <= out["acc_unregularised"] <= 1.0
    # per-layer widths in the table are the real module widths, and neurons were removed
    widths = _widths(text)
    small = out["shrunk"]
    assert widths["0"] == (128, small[0].out_features) and widths["2"] == (128, small[2].out_features)
    assert widths["4"] == (10, 10)
    assert out["hidden_after"] < out["hidden_before"] == 256
    assert out["params_after"] == sum(p.numel() for p in small.parameters()) < out["params_before"]
    assert f"{out['params_before']} -> {out['params_after']}" in text
    # the live-neuron history ends at the shrunk widths (every hidden layer is an MLP layer)
    assert len(out["history"]) == 5 and out["history"][0] == [128, 128]
    assert out["history"][-1] == [small[0].out_features, small[2].out_features]
    # a real PNG was written
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # the shrunk model computes the same function as the regularised one
    x = torch.rand(50, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), out["model"](x), rtol=1e-4, atol=1e-5)


def test_xor_demo_reproduces_the_seed_setup():
    out = demo.main(["--task", "xor", "--epochs", "150", "--no-progress"])
    text = out["text"]
    assert "network 2-100-1" in text and "linf1(reg=0.005)" in text and "step 0.1" in text
    assert out["acc_regularised"] == out["acc_shrunk"] and out["same_predictions"]
    assert isinstance(out["model"].linear1, nn.Linear)
    assert out["shrunk"].linear1.out_features == out["hidden_after"] == _widths(text)["linear1"][1]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--task",
        "--prox",
        "--reg",
        "--epochs",
        "--seed",
        "--lr",
        "--hidden",
        "--compile",
        "--plot",
        "--outgoing",
    ):
        assert flag in text


@pytest.mark.parametrize(
    "bad", [["--hidden", "a,b"], ["--lr", "0"], ["--task", "xor", "--hidden", "4,4"], ["--prox", "l1"]]
)
def test_bad_arguments_exit_with_usage(bad, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(bad)
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err


@requires_compile
def test_compiled_step_matches_the_eager_step():
    args = ["--epochs", "1", "--hidden", "16", "--reg", "0.01", "--no-progress"]
    eager = demo.main(args)
    compiled = demo.main([*args, "--compile"])
    assert "(compiled step)" in compiled["text"]
    sd_e, sd_c = eager["model"].state_dict(), compiled["model"].state_dict()
    for k in sd_e:
        torch.testing.assert_close(sd_c[k], sd_e[k], rtol=1e-4, atol=1e-5)
