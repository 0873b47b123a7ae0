"""GPTQ: the algorithm against RTN, its options, and the method end to end on tiny models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantbench.formats import quantize_tensor
from quantbench.formats.integer import IntConfig
from quantbench.layers import QLinear
from quantbench.methods import parse_method
from quantbench.methods.gptq import (
    GPTQOptions,
    gptq_quantize,
    gptq_quantize_shared,
    inverse_cholesky,
    lapack_lower_inverse,
    torch_lower_inverse,
)
from quantbench.spec import SpecError

from .conftest import make_calib, mean_kl

CONFIGS = [
    IntConfig(bits=4, sym=False, group=32),
    IntConfig(bits=3, sym=True, group=0),
    IntConfig(bits=2, sym=False, group=64),
    IntConfig(bits=8, sym=True, group=-1),
]


def correlated_inputs(seed: int, tokens: int, n: int, rank: int = 8) -> torch.Tensor:
    """Inputs (tokens, n) that mostly live in a low-rank subspace, with a few loud channels,
    as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, n, generator=g)
    X += 0.1 * torch.randn(tokens, n, generator=g)
    return X * (1 + 4 * torch.rand(n, generator=g))


def output_error(q, W: torch.Tensor, X: torch.Tensor) -> float:
    return ((q.dequantize() - W) @ X.T).pow(2).sum().item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.spec())
def test_identity_hessian_equals_rtn(cfg):
    W = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    q = gptq_quantize(W, torch.eye(128), cfg)
    assert q.equal(quantize_tensor(W, cfg))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_identity_hessian_with_act_order_equals_rtn(static):
    cfg = IntConfig(bits=4, sym=False, group=32)
    W = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    q = gptq_quantize(W, torch.eye(128), cfg, GPTQOptions(act_order=True, static_groups=static))
    assert torch.equal(q.dequantize(), quantize_tensor(W, cfg).dequantize())


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 3, 4]),
    group=st.sampled_from([0, 32]),
    act_order=st.booleans(),
)
def test_gptq_output_error_never_above_rtn(seed, bits, group, act_order):
    n, out = 64, 16
    X = correlated_inputs(seed, 256, n)
    W = torch.randn(out, n, generator=torch.Generator().manual_seed(seed + 1))
    cfg = IntConfig(bits=bits, sym=False, group=group)
    q = gptq_quantize(W, X.T @ X / len(X), cfg, GPTQOptions(act_order=act_order))
    assert output_error(q, W, X) <= output_error(quantize_tensor(W, cfg), W, X)


def test_act_order_gives_a_valid_g_idx():
    n, gs = 128, 32
    X = correlated_inputs(0, 512, n)
    H = X.T @ X / len(X)
    W = torch.randn(16, n)
    cfg = IntConfig(bits=4, sym=False, group=gs)
    q = gptq_quantize(W, H, cfg, GPTQOptions(act_order=True))
    assert q.g_idx is not None and q.g_idx.dtype == torch.int32 and q.g_idx.shape == (n,)
    assert torch.equal(torch.bincount(q.g_idx.long(), minlength=n // gs), torch.full((n // gs,), gs))
    # group 0 holds the columns GPTQ visits first: the largest diagonal entries of H
    first = torch.argsort(H.diagonal(), descending=True)[:gs]
    assert set(first.tolist()) == set(torch.nonzero(q.g_idx == 0).flatten().tolist())
    # each column dequantizes with its own group's scale: the stored codes are on that grid
    assert q.scale.shape == (16, n // gs)
    assert output_error(q, W, X) < output_error(quantize_tensor(W, cfg), W, X)


def test_static_groups_keep_contiguous_groups():
    X = correlated_inputs(1, 512, 128)
    W = torch.randn(16, 128)
    cfg = IntConfig(bits=4, sym=False, group=32)
    q = gptq_quantize(W, X.T @ X / len(X), cfg, GPTQOptions(act_order=True, static_groups=True))
    assert q.g_idx is None
    rtn = quantize_tensor(W, cfg)  # static groups take their parameters from the unquantized W
    assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero, rtn.zero)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: c.spec())
def test_weights_sharing_an_input_quantize_together_as_alone(cfg):
    """q, k and v read one input: one loop over their stacked rows gives each its own result."""
    X = correlated_inputs(3, 256, 64)
    H = X.T @ X / len(X)
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(o, 64, generator=g) for o in (16, 8, 24)]
    opts = GPTQOptions(act_order=True)
    together = gptq_quantize_shared(ws, H, cfg, opts)
    assert all(a.equal(gptq_quantize(w, H, cfg, opts)) for a, w in zip(together, ws))
    ptrs = [t.data_ptr() for q in together for t in q.tensors().values()]
    assert len(set(ptrs)) == len(ptrs)  # nothing shared: each layer's bytes are its own


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**16), damp=st.sampled_from([0.01, 0.1, 1.0]))
def test_inverse_cholesky_is_the_references_factor(n, seed, damp):
    """One reversed factorization and a triangular inverse give the factor the reference gets from
    cholesky, cholesky_inverse and cholesky again (computed here in float64)."""
    X = correlated_inputs(seed, 2 * n + 8, n, rank=max(1, n // 4))
    H = X.T @ X / len(X)
    U = inverse_cholesky(H, damp)
    Hd = H.double()
    Hd.diagonal().add_(damp * Hd.diagonal().mean())
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    assert U.dtype == torch.float32 and torch.equal(U, U.triu())
    # float32 against float64: the error grows with the conditioning, which damp bounds
    assert (U.double() - ref).abs().max() <= 1e-3 * ref.abs().max() / damp**0.5


@pytest.mark.parametrize("n", [1, 7, 130])
def test_lapack_and_torch_triangular_inverses_agree(n):
    X = correlated_inputs(n, 3 * n, n)
    A = X.T @ X / len(X) + torch.eye(n)
    exact = torch.linalg.inv(torch.linalg.cholesky(A.double()))
    bound = 1e-7 * torch.linalg.cond(A.double()).item() * exact.abs().max().item()  # float32 rounding
    for Linv in (lapack_lower_inverse(A.clone()), torch_lower_inverse(A)):
        assert Linv.dtype == torch.float32 and torch.equal(Linv, Linv.tril())
        assert (Linv.double() - exact).abs().max() <= bound
    assert lapack_lower_inverse(-A.clone()) is None and torch_lower_inverse(-A) is None


def test_lapack_inverse_runs_scipys_blas_on_one_thread(monkeypatch):
    """Idle OpenBLAS threads spin on the cores torch needs next (packing after an inverse took 15x
    longer); the factorization must run with every BLAS library scipy loaded held to one thread,
    and give the threads back afterwards."""
    from quantbench.methods import gptq

    seen = []
    spotrf = gptq.lapack.spotrf

    def watched(*args, **kwargs):
        seen.extend(lib["num_threads"] for lib in gptq._blas().info() if lib["user_api"] == "blas")
        return spotrf(*args, **kwargs)

    monkeypatch.setattr(gptq.lapack, "spotrf", watched)
    before = [lib["num_threads"] for lib in gptq._blas().info()]
    X = correlated_inputs(4, 64, 32)
    assert lapack_lower_inverse(X.T @ X / 64 + torch.eye(32)) is not None
    assert seen and set(seen) == {1}
    assert [lib["num_threads"] for lib in gptq._blas().info()] == before


def test_dead_inputs_get_zero_weight():
    X = correlated_inputs(2, 256, 64)
    X[:, [3, 40]] = 0
    W = torch.randn(8, 64)
    q = gptq_quantize(W, X.T @ X / len(X), IntConfig(bits=4, sym=False, group=32))
    assert torch.all(q.dequantize()[:, [3, 40]] == 0)


def test_bad_arguments():
    W, H = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(SpecError, match="static_groups"):
        gptq_quantize(W, H, IntConfig(bits=4, group=0), GPTQOptions(static_groups=True))
    with pytest.raises(ValueError, match="expected \\(64, 64\\)"):
        gptq_quantize(W, torch.eye(32), IntConfig(bits=4, group=32))
    with pytest.raises(TypeError, match="float32"):
        gptq_quantize(W.half(), H, IntConfig(bits=4, group=32))
    with pytest.raises(SpecError, match="does not divide"):
        gptq_quantize(W, H, IntConfig(bits=4, group=48))
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(W, -torch.eye(64), IntConfig(bits=4, group=32))
    for bad in ("gptq:damp=0", "gptq:block=0", "gptq:bits=9", "gptq:group=0,static_groups=true"):
        with pytest.raises(SpecError):
            parse_method(bad)


def test_gptq_model_beats_rtn_and_is_deterministic(tiny_ref):
    calib, ids = make_calib(8, 32), make_calib(4, 32, seed=9).input_ids
    a = parse_method("gptq:bits=3,group=32,act_order=true").build(tiny_ref, calib)
    b = parse_method("gptq:bits=3,group=32,act_order=true").build(tiny_ref, calib)
    rtn = parse_method("int:bits=3,group=32,sym=false").build(tiny_ref, None)
    assert a.layer_specs == rtn.layer_specs  # same layers, same stored format
    qa = {n: m.qtensor for n, m in a.model.named_modules() if isinstance(m, QLinear)}
    qb = {n: m.qtensor for n, m in b.model.named_modules() if isinstance(m, QLinear)}
    assert qa.keys() == set(a.layer_specs) and all(qa[n].equal(qb[n]) for n in qa)
    assert mean_kl(tiny_ref.model, a.model, ids) < mean_kl(tiny_ref.model, rtn.model, ids)
    # the reference is untouched
    assert not any(isinstance(m, QLinear) for m in tiny_ref.model.modules())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_scale_dtype_is_what_the_layers_store(tiny_ref, method):
    """scale_dtype=float32 (llm-compressor's choice on a float32 model) reaches the stored
    QTensors; the default stays float16, the GPTQ checkpoint layout's."""
    calib = make_calib(4, 32)
    for dtype in ("float16", "float32"):
        v = parse_method(f"{method}:bits=4,group=32,scale_dtype={dtype}").build(tiny_ref, calib)
        qs = [m.qtensor for m in v.model.modules() if isinstance(m, QLinear)]
        assert qs and all(q.scale.dtype == getattr(torch, dtype) for q in qs)
        assert all(s.endswith(f"scale_dtype={dtype}") == (dtype == "float32") for s in v.layer_specs.values())
    with pytest.raises(SpecError, match="float16, float32"):
        parse_method(f"{method}:scale_dtype=bfloat16")
