"""The scale searches of ggml's k-quants (Kawrakow, llama.cpp PR #1684, ggml-quants.c), vectorised.

Each function here is one of ggml's per-sub-block searches, run on all sub-blocks at once. They
take the sub-blocks element-major, `x` of shape (n, S): n weights (16 or 32) of S sub-blocks, so
that the loops ggml runs over the n weights of a sub-block (running sums, the coordinate descent
of make_q3_quants) become n steps on contiguous (S,) slices. Sums are accumulated in float32 in
ggml's order (`seq_sum`), never by a tree reduction: ggml's sums are sequential and the chosen
scale depends on their last bit. The candidate scales are tried in ggml's order too, because
each one is compared with (and, in make_qkx2_quants, rounded against) the best before it.

Rounding: `torch.round` (halves to even) where ggml calls `nearest_int` on a value bounded by
construction (|iscale * x| <= nmax + 1); ggml's exact `nearest_int` where it is not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .fused import fused, seq_sum
from .ggml_codec import fdiv, nearest_int

GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a sub-block whose largest |x| is below this is all zero


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL), used by Q6_K.

    Symmetric grid l in [-nmax, nmax - 1], weights w = x**2. Start from the scale that maps the
    largest |x| to -nmax, then try 18 nearby inverse scales -(nmax + 0.1 * is) / max, is = -9..9,
    keeping a candidate when it raises sum(w x l)**2 / sum(w l**2) (the least-squares gain) over
    the best so far. ggml compares each candidate with the best before it (a rounded,
    not quite transitive comparison), so the candidates run in order, each on all sub-blocks,
    and the winner's codes are rebuilt at the end.
    x (n, S) -> codes L + nmax (n, S) float32, scale (S,).
    """
    # is = 0 is ggml's first try; the other 18 follow in ggml's order
    steps = _f32([0] + [i for i in range(-9, 10) if i != 0])
    factors = torch.from_numpy(-(_f32(nmax) + _f32(0.1) * steps)).to(x.device)  # (C,)
    mx, zero, scale, best, choice = _qx_first(x, factors[0], nmax)
    c = [torch.tensor(i, device=x.device) for i in range(len(steps))]
    for i in range(1, len(steps), 2):  # two candidates per call: one pass over x for both
        scale, best, choice = _qx_next(x, mx, factors[i], factors[i + 1], c[i], c[i + 1], scale, best, choice, nmax)
    return _qx_final(x, mx, factors, choice, zero, scale, nmax)


@fused
def _qx_final(x: torch.Tensor, mx: torch.Tensor, factors: torch.Tensor, choice: torch.Tensor, zero: torch.Tensor,
              scale: torch.Tensor, nmax: int):
    """The winners' codes, offset to >= 0; a sub-block of zeros gets code 0 and scale 0."""
    L = _qx_codes(x, fdiv(factors[choice], mx), nmax) + nmax
    return torch.where(zero, torch.zeros_like(L), L), torch.where(zero, torch.zeros_like(scale), scale)


def _qx_codes(x: torch.Tensor, iscale: torch.Tensor, nmax: int) -> torch.Tensor:
    return torch.round(x * iscale).clamp(-nmax, nmax - 1)  # (n, S)


def _qx_sums(x: torch.Tensor, mx: torch.Tensor, factor: torch.Tensor, nmax: int):
    """sum(w x l) and sum(w l**2) of one candidate (S,), ggml's order: (w * x) * l, (w * l) * l."""
    iscale = fdiv(factor.expand_as(mx), mx)
    rows = range(x.shape[0])
    L = [_qx_codes(x[i], iscale, nmax) for i in rows]
    w = [x[i] * x[i] for i in rows]
    return seq_sum([w[i] * x[i] * L[i] for i in rows]), seq_sum([w[i] * L[i] * L[i] for i in rows])


@fused
def _qx_first(x: torch.Tensor, factor: torch.Tensor, nmax: int):
    """The signed largest |x| per sub-block (1 for a sub-block of zeros, flagged), and the first
    candidate's scale, gain and index 0."""
    amax, mx = scan_absmax([x[i] for i in range(x.shape[0])])
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    sumlx, suml2 = _qx_sums(x, mx, factor, nmax)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    return mx, zero, scale, scale * sumlx, torch.zeros_like(mx, dtype=torch.long)


@fused
def _qx_next(x, mx, factor_a, factor_b, c_a, c_b, scale, best, choice, nmax: int):
    """Candidates c_a then c_b: each taken when it beats the best so far (compared as ggml does,
    cross-multiplied)."""
    for factor, c in ((factor_a, c_a), (factor_b, c_b)):
        sumlx, suml2 = _qx_sums(x, mx, factor, nmax)
        ratio = sumlx / suml2
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale, best, choice = torch.where(take, ratio, scale), torch.where(take, ratio * sumlx, best), torch.where(take, c, choice)
    return scale, best, choice


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """ggml's make_q3_quants(n, nmax, x, L, do_rmse=true), used by Q3_K.

    Round with the scale that maps the largest |x| to -nmax, then up to 5 sweeps of coordinate
    descent: each weight in turn moves to the level that is optimal given the others, if that
    raises sum(w x l)**2 / sum(w l**2) with w = x**2. The sweeps are sequential within a
    sub-block (each move changes the sums the next one sees) and parallel across sub-blocks.
    ggml stops a sub-block after a sweep that changed nothing. Here the first sweep runs on all
    sub-blocks; those it changed (about 20% on Gaussian weights) are gathered once into a compact
    set, where sweep 2 runs on all of them and sweeps 3-5 on those the sweep before changed
    (about 5%, 1%, 0.1% of all). Running a sweep on a sub-block that would have stopped changes
    nothing, so the narrowing only saves work.
    x (n, S) -> scale (S,) and `codes(idx)`: the final codes + nmax of the sub-blocks idx,
    (len(idx), n) float32. The codes are only needed where a quantized scale is 0 (few sub-blocks),
    so they are not scattered back from the compact set for all of them.
    """
    L, sumlx, suml2, zero = _q3_start(x, nmax)
    L, sumlx, suml2, changed = _q3_sweep(x, L, sumlx, suml2, nmax)
    scale = _q3_scale(sumlx, suml2, zero)
    cols = _two_or_more(changed.nonzero()[:, 0])
    if len(cols) == 0:
        return scale, lambda idx: _q3_codes(L[:, idx], zero[idx], nmax)
    part = [x.index_select(-1, cols), L.index_select(-1, cols), sumlx[cols], suml2[cols]]
    L_a, sumlx_a, suml2_a, changed = _q3_sweep(*part, nmax)  # sweep 2, on all of the compact set
    part[1:] = [L_a, sumlx_a, suml2_a]
    active = _two_or_more(changed.nonzero()[:, 0])
    for _ in range(3):  # sweeps 3-5, on those the sweep before changed
        if len(active) == 0:
            break
        L_a, sumlx_a, suml2_a, changed = _q3_sweep(*[t.index_select(-1, active) for t in part], nmax)
        for t, v in zip(part[1:], (L_a, sumlx_a, suml2_a)):
            t.index_copy_(-1, active, v)
        active = _two_or_more(active[changed])
    scale.index_copy_(0, cols, _q3_scale(part[2], part[3], zero[cols]))
    slot = torch.full_like(zero, -1, dtype=torch.long)  # a sub-block's column in the compact set
    slot[cols] = torch.arange(len(cols), device=x.device)

    def codes(idx: torch.Tensor) -> torch.Tensor:
        at = slot[idx]
        moved = at >= 0
        latest = L[:, idx]
        latest[:, moved] = part[1][:, at[moved]]
        return _q3_codes(latest, zero[idx], nmax)

    return scale, codes


def _two_or_more(idx: torch.Tensor) -> torch.Tensor:
    """A single index repeated: a fused kernel called on a size of 1 would be compiled again for it
    (repeating a sub-block repeats the same computation and the same write)."""
    return idx.repeat(2) if len(idx) == 1 else idx


def _q3_codes(L: torch.Tensor, zero: torch.Tensor, nmax: int) -> torch.Tensor:
    """Codes (n, k) of k sub-blocks -> (k, n) offset to >= 0; a sub-block of zeros gets code 0."""
    return torch.where(zero, torch.zeros_like(L), L + nmax).T


def scan_absmax(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(|x| max, the signed x there) over a sequence of equal-shaped tensors, the first on ties:
    ggml's `if (ax > amax) { amax = ax; max = x; }` scan from 0, elementwise, so that a fused kernel
    runs it."""
    amax = rows[0].abs()
    mx = torch.where(amax > 0, rows[0], torch.zeros_like(amax))
    for i in range(1, len(rows)):
        ax = rows[i].abs()
        take = ax > amax
        amax = torch.where(take, ax, amax)
        mx = torch.where(take, rows[i], mx)
    return amax, mx


@fused
def _q3_start(x: torch.Tensor, nmax: int):
    """Round with the scale that maps the largest |x| to -nmax: codes (n, S), their sums, and the
    sub-blocks of zeros (S,). (Running the first sweep in the same kernel was no faster and took
    minutes to compile.)"""
    rows = range(x.shape[0])
    amax, mx = scan_absmax([x[i] for i in rows])
    zero = amax < GROUP_MAX_EPS
    iscale = fdiv(float(-nmax), torch.where(zero, torch.ones_like(mx), mx))
    L = [torch.round(iscale * x[i]).clamp(-nmax, nmax - 1) for i in rows]
    w = [x[i] * x[i] for i in rows]
    sumlx = seq_sum([w[i] * x[i] * L[i] for i in rows])
    suml2 = seq_sum([w[i] * L[i] * L[i] for i in rows])
    return torch.stack(L), sumlx, suml2, zero


@fused
def _q3_scale(sumlx: torch.Tensor, suml2: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The least-squares scale sum(w x l) / sum(w l**2); 0 for a sub-block of zeros."""
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    return torch.where(zero, torch.zeros_like(scale), scale)


@fused
def _q3_sweep(x: torch.Tensor, L: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor, nmax: int):
    """One sweep over the n weights of every sub-block: L (n, S), the sums (S,)."""
    rows = [L[i] for i in range(x.shape[0])]
    changed = torch.zeros_like(sumlx, dtype=torch.bool)
    for i, l in enumerate(rows):
        w = x[i] * x[i]
        wx = w * x[i]
        slx = sumlx - wx * l
        sl2 = suml2 - w * l * l
        new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1).float()
        new_slx = slx + wx * new_l
        new_sl2 = sl2 + w * new_l * new_l
        take = (slx > 0) & (new_l != l) & (new_sl2 > 0) & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2)
        rows[i] = torch.where(take, new_l, l)
        sumlx = torch.where(take, new_slx, sumlx)
        suml2 = torch.where(take, new_sl2, suml2)
        changed = changed | take
    return torch.stack(rows), sumlx, suml2, changed


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants, used by Q2_K, Q4_K and Q5_K: an asymmetric grid x ~ scale * l + min.

    Start from [min(x, 0), max(x)] spread over nmax steps; then for is = 0..nstep round with the
    inverse scale (rmin + rdelta * is + nmax) / (max - min), fit scale and min by weighted least
    squares (min clamped to <= 0), and keep the fit when its weighted error (absolute with
    `use_mad`, squared otherwise) beats the best so far. The candidates are sequential: ggml
    rounds each one against the min of the best fit so far, so they run one after another,
    each vectorised over all sub-blocks.
    x, w (n, S) -> codes (n, S) float32, scale (S,), the_min (S,) (ggml returns -min).
    """
    mx, mn, sum_w, sum_x, used_iscale, scale, best = _qkx2_start(x, w, float(nmax), nmax, use_mad)
    flat = mx == mn
    used_mn = mn
    for f in _f32(rmin) + _f32(rdelta) * np.arange(nstep + 1, dtype=np.float32) + _f32(nmax):
        factor = torch.tensor(f, dtype=torch.float32, device=x.device)
        mn, best, scale, used_iscale, used_mn = _qkx2_next(
            x, w, sum_w, sum_x, mx, factor, mn, best, scale, used_iscale, used_mn, nmax, use_mad
        )
    return _qkx2_final(x, used_iscale, used_mn, flat, scale, mn, nmax)


@fused
def _qkx2_final(x, iscale, mn_used, flat, scale, mn, nmax: int):
    """The best fit's codes; a flat sub-block (max == min) gets codes 0 and scale 0."""
    L = _qkx2_codes(x, iscale, mn_used, nmax)
    return torch.where(flat, torch.zeros_like(L), L), torch.where(flat, torch.zeros_like(scale), scale), -mn


def _qkx2_inverse_scale(factor, mx: torch.Tensor, mn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """factor / (max - min), and the same with inf (max - min tiny) replaced by 0: ggml's
    nearest_int of inf * x (or NaN) is 0 after the clamp, as rounding 0 * x is."""
    f = factor.expand_as(mx) if isinstance(factor, torch.Tensor) else factor
    iscale = fdiv(f, mx - mn)  # (S,)
    return torch.where(torch.isinf(iscale), torch.zeros_like(iscale), iscale), iscale


def _qkx2_codes(x: torch.Tensor, iscale: torch.Tensor, mn: torch.Tensor, nmax: int) -> torch.Tensor:
    return torch.round((x - mn) * iscale).clamp(0, nmax)


def _qkx2_error(x, w, scale, mn, L, use_mad: bool) -> torch.Tensor:
    """sum(w * |scale * l + min - x|) or with the square, in ggml's order, over rows."""
    diff = [scale * L[i] + mn - x[i] for i in range(x.shape[0])]
    return seq_sum([w[i] * (d.abs() if use_mad else d * d) for i, d in enumerate(diff)])


@fused
def _qkx2_start(x: torch.Tensor, w: torch.Tensor, top: float, nmax: int, use_mad: bool):
    """The range, the weighted sums, and the error of the plain min-max grid (ggml's first best)."""
    rows = range(x.shape[0])
    mx = x.amax(dim=0)
    mn = x.amin(dim=0)  # max and min do not depend on order
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    sum_w = seq_sum(w)
    sum_x = seq_sum([w[i] * x[i] for i in rows])
    iscale, raw = _qkx2_inverse_scale(top, mx, mn)
    scale = fdiv(1.0, raw)
    L = [_qkx2_codes(x[i], iscale, mn, nmax) for i in rows]
    return mx, mn, sum_w, sum_x, iscale, scale, _qkx2_error(x, w, scale, mn, L, use_mad)


@fused
def _qkx2_next(x, w, sum_w, sum_x, mx, factor, mn, best, scale, used_iscale, used_mn, nmax: int, use_mad: bool):
    """One candidate inverse scale: round, fit scale and min by least squares, keep if better."""
    rows = range(x.shape[0])
    iscale, _ = _qkx2_inverse_scale(factor, mx, mn)
    L = [_qkx2_codes(x[i], iscale, mn, nmax) for i in rows]
    wl = [w[i] * L[i] for i in rows]
    sum_l = seq_sum(wl)
    sum_l2 = seq_sum([wl[i] * L[i] for i in rows])
    sum_xl = seq_sum([wl[i] * x[i] for i in rows])
    D = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    clamp = this_min > 0
    this_scale = torch.where(clamp, sum_xl / sum_l2, this_scale)
    this_min = torch.where(clamp, torch.zeros_like(this_min), this_min)
    cur = _qkx2_error(x, w, this_scale, this_min, L, use_mad)
    take = (D > 0) & (cur < best)
    return (
        torch.where(take, this_min, mn),
        torch.where(take, cur, best),
        torch.where(take, this_scale, scale),
        torch.where(take, iscale, used_iscale),
        torch.where(take, mn, used_mn),
    )
