"""GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023, arXiv:2210.17323). Reference: IST-DASLab/gptq
(`gptq.py`, `fasterquant`); names follow the paper and that code (H, Hinv, W1, Err1).

For a linear layer with weight W (out, in) and inputs X (T, in), GPTQ minimises ||W X^T - Q X^T||^2
one input column at a time: quantize column i, then spread its error over the columns not yet
quantized, weighted by the inverse Hessian H^-1 = (2 X^T X)^-1 (Optimal Brain Quantization with a
fixed column order; any positive multiple of H gives the same result, and X^T X / T is used here). The inverse is taken once, through its upper Cholesky factor, which holds for
every column the rows of H^-1 that OBQ would recompute (the paper's "Cholesky reformulation").
Columns go in blocks of 128 whose error is applied to the later columns in one matrix product
(the "lazy batch" updates). Options from the reference: dampening (a fraction of the mean
diagonal added to H), dead inputs (zero diagonal: weight zeroed, H diagonal set to 1), activation
order (`desc_act`: columns by decreasing H diagonal), and static groups (group parameters fixed
from the unquantized weights, so act_order keeps contiguous groups).

The algorithm only chooses codes; choosing scales and zeros, rounding and bit packing are the
integer format's (`quantbench.formats.integer`: choose_qparams, quantize_centered (its codes
minus zero, the form the column loop needs), pack), so a GPTQ weight stores exactly like an RTN
one, rounded the same way (torch.round: halves to even). One deliberate difference from the
reference: the parameters of a group are chosen from the group's columns as they are when the
group starts, all error feedback applied; the reference reads the block-start copy (the two agree
when the group size equals the block size).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from scipy.linalg import lapack
from threadpoolctl import ThreadpoolController

from ..formats.integer import IntConfig, IntQTensor, QParams, centered_bounds, choose_qparams, group_view, pack, quantize_centered
from ..layers import LayerRule, get_weight, set_weight
from ..sources import Calibration
from ..spec import SpecError
from .calibrate import Block, PerInput, gram, pre_hooks, register_calibrated, run_sequential, swap_in


# Columns per inner sub-block: the paper's lazy batch applied once more inside each block of 128,
# so the per-column rank-1 update touches 16 rows instead of up to 128 (a matrix product does the rest).
SUB_BLOCK = 16


@dataclass(frozen=True)
class GPTQOptions:
    block: int = 128  # columns per lazy-batch block
    damp: float = 0.01  # fraction of the mean of diag(H) added to its diagonal
    act_order: bool = False  # columns in decreasing order of diag(H) ("desc_act")
    static_groups: bool = False  # group parameters from the unquantized weights


def inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: row i holds what column i's
    update needs (the paper's Hinv).

    The reference takes it as cholesky(H), cholesky_inverse, then cholesky again. One factorization
    and one triangular inverse give the same factor with a quarter of the flops: with J the
    reversal of the order, J H J = L L^T (Cholesky, L lower), so H = R R^T with R = J L J upper,
    H^-1 = R^-T R^-1, and R^-1 = J L^-1 J is upper with a positive diagonal: the factor."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    A = H.flip(0, 1)  # J H J, a contiguous copy
    Linv = lapack_lower_inverse(A) if A.device.type == "cpu" else torch_lower_inverse(A)
    if Linv is None:
        raise ValueError(f"GPTQ: the Hessian is not positive definite with damp={damp}; raise damp (e.g. 0.1)")
    return Linv.flip(0, 1)


def lapack_lower_inverse(A: torch.Tensor) -> torch.Tensor | None:
    """L^-1 for the Cholesky factor L of A (float32, symmetric, contiguous, on the CPU; overwritten),
    or None when A is not positive definite: LAPACK's potrf and trtri (torch has no triangular
    inverse, and a triangular solve against I takes three times its flops)."""
    # A C-ordered array read in Fortran order is its transpose: A itself, A being symmetric.
    with _blas().limit(limits=1, user_api="blas"):
        U, info = lapack.spotrf(A.numpy().T, lower=0, overwrite_a=1)  # A = U^T U, so U = L^T
        if not info:
            U, info = lapack.strtri(U, lower=0, overwrite_c=1)  # U^-1 = (L^-1)^T
    return None if info else torch.from_numpy(U.T)  # U.T: L^-1, C-ordered


@functools.cache
def _blas() -> ThreadpoolController:
    """scipy's BLAS libraries, to run its LAPACK on one thread. With more, OpenBLAS's threads
    spin for a while after each call on the cores torch's next ops need: on 2 cores, packing a
    layer's codes right after an inverse took 24-30 ms instead of 1.8 (Xeon), about 3 s of a
    GPTQ build of the embedded model. One thread inverts a 576^2 Hessian as fast (4.1-4.7 ms
    against 4.4)."""
    return ThreadpoolController()


def torch_lower_inverse(A: torch.Tensor) -> torch.Tensor | None:
    """What `lapack_lower_inverse` gives, on any device."""
    L, info = torch.linalg.cholesky_ex(A)
    return None if info else torch.linalg.solve_triangular(L, torch.eye(len(A), device=A.device), upper=False)


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run GPTQ's column loop on one CPU thread. Each of its ops touches one row of a few thousand
    floats, and splitting that across threads costs more in synchronisation than the op itself:
    on two busy cores the loop ran 10x slower, and torch's LAPACK inverse 16x (the factor now
    comes from scipy's LAPACK, whose OpenBLAS threads this does not set: one call per Hessian)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_codes(
    W: torch.Tensor, H: torch.Tensor, cfg: IntConfig, opts: GPTQOptions = GPTQOptions()
) -> tuple[torch.Tensor, QParams, torch.Tensor | None]:
    """GPTQ codes of W (out, in) for the Hessian H (in, in): (codes (out, in) float32 integers,
    parameters (out or 1, n_groups), g_idx (in,) or None when groups are contiguous)."""
    if W.dtype != torch.float32 or H.dtype != torch.float32:
        raise TypeError(f"GPTQ works in float32; got W {W.dtype}, H {H.dtype}")
    cfg.check_shape(tuple(W.shape))
    out, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"GPTQ: H has shape {tuple(H.shape)}, expected ({n}, {n}) for W of shape {tuple(W.shape)}")
    if opts.static_groups and cfg.group <= 0:
        raise SpecError("GPTQ: static_groups needs groups (group > 0)")
    W, H = W.clone(), H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = cfg.group_size(n)
    dynamic = cfg.group > 0 and not opts.static_groups  # parameters chosen as each group starts
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if opts.act_order else torch.arange(n, device=W.device)
    invperm = torch.argsort(perm)

    if dynamic:
        scale = torch.empty(out, n // gs, device=W.device)  # (out, G), G in column-visit order
        zero = torch.empty_like(scale)
    else:  # per tensor, per channel or static groups: fixed before any column moves
        qp = choose_qparams(group_view(W, cfg), cfg)  # (R, G, 1)
        scale, zero = qp.scale.squeeze(-1), qp.zero.squeeze(-1)  # (R, G)
        col_group = perm // gs if cfg.group > 0 else torch.zeros_like(perm)  # visit order -> group
        col_scale = scale[:, col_group].t().contiguous()  # (in, R)
        col_zero = zero[:, col_group].t().contiguous()
        col_low, col_high = (b.contiguous() for b in centered_bounds(QParams(col_scale, col_zero), cfg))
    if opts.act_order:
        W, H = W[:, perm], H[perm][:, perm]

    with one_thread(W.device):
        Hinv = inverse_cholesky(H, opts.damp)  # (in, in) upper, visit order
        # Row i of Hinv over its diagonal: what column i's error (w - q) does to the later columns,
        # so err1 = (w - q) / Hinv[i, i] is never divided out.
        Hn = Hinv / Hinv.diagonal().unsqueeze(1)
        Wt = W.t().contiguous()  # (in, out), visit order: column i of W is row i, contiguous
        Ct = torch.empty_like(Wt)  # codes, visit order
        # Rows unbound once: indexing a row per column costs as much as the arithmetic on it.
        rows, codes_, hrows = Wt.unbind(0), Ct.unbind(0), Hn.unbind(0)
        sub = math.gcd(SUB_BLOCK, gs) if dynamic else SUB_BLOCK  # a group starts on a sub-block
        for i1 in range(0, n, opts.block):
            i2 = min(i1 + opts.block, n)
            Err1 = torch.empty(i2 - i1, out, device=W.device)  # (w - q) per column: Err1 * diag(Hinv)
            errs = Err1.unbind(0)
            for s1 in range(i1, i2, sub):
                s2 = min(s1 + sub, i2)
                for j in range(s1, s2):
                    if not dynamic:
                        col_s, bounds = col_scale[j], (col_low[j], col_high[j])
                    elif j % gs == 0:  # a new group: parameters from its columns as they are now
                        g = choose_qparams(Wt[j : j + gs].t(), cfg)  # (out, 1)
                        scale[:, j // gs], zero[:, j // gs] = g.scale[:, 0], g.zero[:, 0]
                        col_s, bounds = g.scale[:, 0], centered_bounds(QParams(g.scale[:, 0], g.zero[:, 0]), cfg)
                    q = quantize_centered(rows[j], col_s, bounds, out=codes_[j])  # codes - zero
                    err1 = torch.addcmul(rows[j], q, col_s, value=-1, out=errs[j - i1])  # w - q * scale
                    Wt[j + 1 : s2].addr_(hrows[j][j + 1 : s2], err1, alpha=-1)  # within the sub-block
                Wt[s2:i2].addmm_(Hn[s1:s2, s2:i2].t(), Err1[s1 - i1 : s2 - i1], alpha=-1)  # rest of the block
            Wt[i2:].addmm_(Hn[i1:i2, i2:].t(), Err1, alpha=-1)  # lazy batch update of later columns

    # The loop kept codes minus zero (`quantize_centered`); the zeros go back in one pass.
    Ct.add_(zero[:, torch.arange(n, device=W.device) // gs].t() if dynamic else col_zero)
    codes = Ct.t()[:, invperm] if opts.act_order else Ct.t()  # (out, in), original column order
    g_idx = None
    if dynamic and opts.act_order:
        g_idx = (torch.arange(n, device=W.device) // gs)[invperm].to(torch.int32)
    return codes, QParams(scale, zero), g_idx


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, cfg: IntConfig, opts: GPTQOptions = GPTQOptions(), dtype: torch.dtype | None = None
) -> IntQTensor:
    """Quantize W (out, in) float32 with GPTQ for the Hessian H (in, in); stored as the int format
    (with g_idx when act_order is used without static groups)."""
    codes, qp, g_idx = gptq_codes(W, H, cfg, opts)
    return pack(codes, qp, cfg, dtype or W.dtype, g_idx)


def gptq_quantize_shared(
    weights: list[torch.Tensor], H: torch.Tensor, cfg: IntConfig, opts: GPTQOptions = GPTQOptions()
) -> list[IntQTensor]:
    """GPTQ for several weights (out_k, in) that read the same input, so share H (q, k and v; gate
    and up): one column loop over their stacked rows, one QTensor each. GPTQ never mixes rows, so
    this equals quantizing each alone, with a third of the loop's per-column overhead."""
    if len(weights) == 1 or cfg.group == -1:  # a per-tensor scale must not span the stack
        return [gptq_quantize(w.float(), H, cfg, opts, dtype=w.dtype) for w in weights]
    codes, qp, g_idx = gptq_codes(torch.cat([w.float() for w in weights]), H, cfg, opts)
    out, a = [], 0
    for w in weights:
        b = a + w.shape[0]
        gi = None if g_idx is None else g_idx.clone()  # each layer stores its own
        out.append(pack(codes[a:b], QParams(qp.scale[a:b], qp.zero[a:b]), cfg, w.dtype, gi))
        a = b
    return out


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group: int = 128  # input columns per scale; 0 per output channel, -1 per tensor
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block: int = 128
    scale_dtype: Literal["float16", "float32"] = "float16"  # of the stored scales; the codes are chosen on that grid

    def __post_init__(self) -> None:
        self.int_config()  # bits and group ranges
        if not 0 < self.damp <= 1:
            raise SpecError(f"gptq: damp={self.damp} is not valid; use a fraction in (0, 1], e.g. 0.01")
        if self.block < 1:
            raise SpecError(f"gptq: block={self.block} is not valid; use a positive number of columns, e.g. 128")
        if self.static_groups and self.group <= 0:
            raise SpecError("gptq: static_groups=true needs group > 0")

    def int_config(self) -> IntConfig:
        return IntConfig(bits=self.bits, sym=self.sym, group=self.group, scale_dtype=self.scale_dtype)

    def options(self) -> GPTQOptions:
        return GPTQOptions(block=self.block, damp=self.damp, act_order=self.act_order, static_groups=self.static_groups)


def check_shapes(model: torch.nn.Module, names: list[str], cfg: IntConfig) -> None:
    """Fail before any calibration work if a layer's shape does not suit the format."""
    for name in names:
        cfg.check_shape(tuple(get_weight(model.get_submodule(name)).shape))


def gptq_model(model: torch.nn.Module, calib: Calibration, cfg: GPTQConfig, rule: LayerRule = LayerRule()) -> dict[str, str]:
    """Quantize the selected linear layers of `model` in place with GPTQ; returns name -> spec.

    Each block runs once: a pre-hook quantizes a layer on its first call, from the inputs it is
    being called with, and lets the call go on with the quantized weights; so each layer's inputs
    come from the already-quantized layers before it (the reference's `--true-sequential`).
    Layers seen reading one input in the previous block (q, k, v) are quantized together when the
    first of them is called; a later one whose input turns out different is redone alone."""
    names = rule.select(model)
    icfg, opts = cfg.int_config(), cfg.options()
    check_shapes(model, names, icfg)
    specs: dict[str, str] = {}
    shared: dict[str, tuple[str, ...]] = {}  # layer -> the layers that read its input, last block

    def process(block: Block) -> torch.Tensor:
        hessian = PerInput(gram)
        done: dict[str, IntQTensor] = {}
        fed: dict[str, torch.Tensor] = {}  # the input each layer was quantized for
        seen: list[tuple[str, torch.Tensor]] = []

        def quantize(rel: str, _m: torch.nn.Module, x: torch.Tensor) -> None:
            seen.append((rel, x))
            if rel in done and fed[rel] is x:
                return
            together = [r for r in shared.get(rel, ()) if r != rel and r in block.linears and r not in done]
            members = [rel] + (together if rel not in done else [])
            qs = gptq_quantize_shared([get_weight(block.linear(r)) for r in members], hessian(x), icfg, opts)
            for r, q in zip(members, qs):
                done[r], fed[r] = q, x
                set_weight(block.linear(r), q.dequantize())

        with pre_hooks(block, quantize):
            out = block.forward()
        by_input: dict[int, list[str]] = {}
        for rel, x in seen:  # every x is still referenced by `seen`, so ids are unique
            by_input.setdefault(id(x), []).append(rel)
        shared.clear()
        shared.update({rel: tuple(group) for group in by_input.values() for rel in group})
        called = {rel for rel, _ in seen}
        for rel in block.linears:
            if rel not in called:
                raise SpecError(f"{block.full_name(rel)} was never called by its block; it cannot be calibrated")
            swap_in(block, rel, done[rel])
            specs[block.full_name(rel)] = icfg.spec()
        return out

    run_sequential(model, calib, names, process)
    return specs


GPTQ = register_calibrated(
    "gptq", GPTQConfig, "GPTQ (Frantar et al. 2022): Hessian-aware error feedback into the int format", gptq_model
)
