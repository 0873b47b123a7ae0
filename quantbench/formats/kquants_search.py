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

import numpy as np
import torch

from .ggml_codec import fdiv, nearest_int, signed_absmax

GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a sub-block whose largest |x| is below this is all zero


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in index order, in float32: `for (i...) s += t[i]` as ggml writes it."""
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|x| max, the signed x there) over dim 0, the first on ties, as ggml's `if (ax > amax)` scan."""
    amax, mx = signed_absmax(x, 0)
    return amax[0], mx[0]


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
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x
    # is = 0 is ggml's first try; the other 18 follow in ggml's order
    steps = _f32([0] + [i for i in range(-9, 10) if i != 0])
    factors = torch.from_numpy(-(_f32(nmax) + _f32(0.1) * steps)).to(x.device)  # (C,)

    def codes(iscale: torch.Tensor) -> torch.Tensor:
        return torch.round(x * iscale).clamp_(-nmax, nmax - 1)  # (n, S)

    sums = torch.empty((x.shape[0], 2) + x.shape[1:], dtype=x.dtype, device=x.device)  # (n, 2, S)
    choice = torch.zeros_like(mx, dtype=torch.long)
    for c in range(len(steps)):
        L = codes(fdiv(factors[c].expand_as(mx), mx))
        torch.mul(wx, L, out=sums[:, 0])
        torch.mul(w, L, out=sums[:, 1]).mul_(L)
        sumlx, suml2 = seq_sum(sums)
        ratio = sumlx / suml2
        if c == 0:
            scale = torch.where(suml2 != 0, ratio, torch.zeros_like(ratio))
            best = scale * sumlx
            continue
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(take, ratio, scale)
        best = torch.where(take, ratio * sumlx, best)
        choice = torch.where(take, c, choice)
    L = codes(fdiv(factors[choice], mx)) + nmax
    return torch.where(zero, torch.zeros_like(L), L), torch.where(zero, torch.zeros_like(scale), scale)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants(n, nmax, x, L, do_rmse=true), used by Q3_K.

    Round with the scale that maps the largest |x| to -nmax, then up to 5 sweeps of coordinate
    descent: each weight in turn moves to the level that is optimal given the others, if that
    raises sum(w x l)**2 / sum(w l**2) with w = x**2. The sweeps are sequential within a
    sub-block (each move changes the sums the next one sees) and parallel across sub-blocks.
    x (n, S) -> codes l + nmax (n, S) float32, scale (S,).
    """
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    L = torch.round(fdiv(float(-nmax), mx) * x).clamp_(-nmax, nmax - 1)  # (n, S)
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * L)
    suml2 = seq_sum(w * L * L)
    active = torch.arange(x.shape[1], device=x.device)  # sub-blocks still changing
    for _ in range(5):
        # a sub-block whose sweep changed nothing would repeat itself: ggml stops it, so do we
        xa, wa, wxa, La = x[:, active], w[:, active], wx[:, active], L[:, active]
        sx, s2 = sumlx[active], suml2[active]
        changed = torch.zeros_like(sx, dtype=torch.bool)
        for i in range(x.shape[0]):
            slx = sx - wxa[i] * La[i]
            sl2 = s2 - wa[i] * La[i] * La[i]
            new_l = nearest_int(xa[i] * sl2 / slx).clamp_(-nmax, nmax - 1).float()
            new_slx = slx + wxa[i] * new_l
            new_sl2 = sl2 + wa[i] * new_l * new_l
            take = (slx > 0) & (new_l != La[i]) & (new_sl2 > 0) & (new_slx * new_slx * s2 > sx * sx * new_sl2)
            La[i] = torch.where(take, new_l, La[i])
            sx = torch.where(take, new_slx, sx)
            s2 = torch.where(take, new_sl2, s2)
            changed |= take
        L[:, active], sumlx[active], suml2[active] = La, sx, s2
        active = active[changed]
        if active.numel() == 0:
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    return torch.where(zero, torch.zeros_like(L), L + nmax), torch.where(zero, torch.zeros_like(scale), scale)


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
    mn = x.amin(dim=0)
    mx = x.amax(dim=0)
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn

    def inverse_scale(factor: float, mn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        iscale = fdiv(factor, mx - mn)  # (S,), inf where max - min is tiny
        # ggml's nearest_int of inf * x (or NaN) is 0 after the clamp, as rounding 0 * x is
        return torch.where(torch.isinf(iscale), torch.zeros_like(iscale), iscale), iscale

    def round_codes(iscale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        return torch.round((x - mn).mul_(iscale)).clamp_(0, nmax)

    def error(scale: torch.Tensor, mn: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = (scale * L).add_(mn).sub_(x)
        return seq_sum(w * (diff.abs_() if use_mad else diff.mul_(diff)))

    # the codes of the best candidate are rebuilt at the end from its inverse scale and min
    used_iscale, raw = inverse_scale(float(nmax), mn)
    used_mn = mn
    scale = fdiv(1.0, raw)
    best = error(scale, mn, round_codes(used_iscale, mn))
    stacked = torch.empty((x.shape[0], 3) + x.shape[1:], dtype=x.dtype, device=x.device)  # (n, 3, S)
    for f in _f32(rmin) + _f32(rdelta) * np.arange(nstep + 1, dtype=np.float32) + _f32(nmax):
        iscale, _ = inverse_scale(float(f), mn)
        Lc = round_codes(iscale, mn)
        wl = torch.mul(w, Lc, out=stacked[:, 0])
        torch.mul(wl, Lc, out=stacked[:, 1])
        torch.mul(wl, x, out=stacked[:, 2])
        sum_l, sum_l2, sum_xl = seq_sum(stacked)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0
        this_scale = torch.where(clamp, sum_xl / sum_l2, this_scale)
        this_min = torch.where(clamp, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, Lc)
        take = (D > 0) & (cur < best)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        used_iscale = torch.where(take, iscale, used_iscale)
        used_mn = torch.where(take, mn, used_mn)
        mn = torch.where(take, this_min, mn)
    L = round_codes(used_iscale, used_mn)
    zeros = torch.zeros_like(scale)
    return torch.where(flat, torch.zeros_like(L), L), torch.where(flat, zeros, scale), -mn
