"""The oneDNN path of ``Linear``: forward and every gradient against a float64 reference, on the layouts the
towers hand it (sequences, a pooled column slice, a transpose), and the backend switch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probloss.models.linear import Linear, _OneDNNLinear, cpu_matmul, linear, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear op")

LAYOUTS = {
    "sequence": lambda x: x,  # (B, T, in) contiguous
    "rows": lambda x: x.reshape(-1, x.shape[-1]),  # (B*T, in)
    "column slice": lambda x: x[:, 0],  # (B, in), row stride T*in: a ViT's [CLS] token
    "transposed": lambda x: x.reshape(-1, x.shape[-1]).t().contiguous().t(),  # column-major (B*T, in)
}


def _inputs(n_in, n_out, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, n_in, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in**0.5
    b = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None
    return x, w, b


@needs_onednn
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_in,n_out", [(24, 40), (40, 24)])  # both orders of the weight-gradient product
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_a_float64_reference_forward_and_backward(layout, n_in, n_out, bias):
    x64, w64, b64 = _inputs(n_in, n_out, bias)
    ref_in = [t.clone().requires_grad_() for t in (x64, w64) + ((b64,) if bias else ())]
    ref = F.linear(LAYOUTS[layout](ref_in[0]), ref_in[1], ref_in[2] if bias else None)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(upstream)

    ins = [t.float().requires_grad_() for t in (x64, w64) + ((b64,) if bias else ())]
    out = _OneDNNLinear.apply(LAYOUTS[layout](ins[0]), ins[1], ins[2] if bias else None)
    out.backward(upstream.float())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ins, ref_in):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_only_the_gradients_asked_for_are_computed():
    x64, w64, b64 = _inputs(16, 32, True)
    x, w, b = x64.float().requires_grad_(), w64.float(), b64.float()  # a locked layer: weights without grad
    out = _OneDNNLinear.apply(x, w, b)
    out.sum().backward()
    assert w.grad is None and b.grad is None
    torch.testing.assert_close(x.grad.double(), torch.ones(8, 5, 32, dtype=torch.float64) @ w64, rtol=1e-5,
                               atol=1e-5)


def test_blas_is_bit_identical_to_nn_linear_and_other_dtypes_never_take_onednn():
    torch.manual_seed(0)
    mine, plain = Linear(24, 40), nn.Linear(24, 40)
    plain.load_state_dict(mine.state_dict())
    assert list(mine.state_dict()) == ["weight", "bias"]
    x = torch.randn(8, 5, 24)
    with cpu_matmul("blas") as used:
        assert used == "blas" and torch.equal(mine(x), plain(x))
    with cpu_matmul("auto"):
        x64 = x.double()
        assert torch.equal(linear(x64, plain.weight.double(), plain.bias.double()),
                           F.linear(x64, plain.weight.double(), plain.bias.double()))


@needs_onednn
def test_the_backend_switch_takes_effect_and_is_restored():
    torch.manual_seed(0)
    layer, x = Linear(64, 256), torch.randn(128, 17, 64)
    with cpu_matmul("blas"):
        with cpu_matmul("onednn") as used:
            assert used == "onednn"
            assert layer(x).grad_fn.name().startswith("_OneDNNLinear")
        assert not layer(x).grad_fn.name().startswith("_OneDNNLinear")  # blas again after the block
    with pytest.raises(ValueError, match="auto\\|onednn\\|blas"):
        with cpu_matmul("mkl"):
            pass


@needs_onednn
def test_bench_linear_script_smoke(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_linear.py"
    spec = importlib.util.spec_from_file_location("bench_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.SHAPES = [(64, 8, 16)]
    bench.main(["--out", str(tmp_path / "b.json")])
    (row,) = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["rows"] == 64 and all(row[k] > 0 for k in ("blas_fwd_gflops", "onednn_fwd_gflops", "speedup_fwd_bwd"))
