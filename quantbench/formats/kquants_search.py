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
    raises sum(w x l)**2 / sum(w l**2) with w = x**2. ggml stops a sub-block after a sweep that
    changed nothing.

    A sweep is sequential within a sub-block (a move changes the sums the next weights see), and
    its chain of dependent float ops bounds its speed on the CPU. But moves are rare, and until
    the first one every weight sees the sums the sweep started with. So a sub-block in which no
    weight's level would change against those sums is one the sweep leaves alone;
    `_q3_may_move` finds those without ggml's division and without the chain (it errs on the
    safe side: the few sub-blocks with a weight near a rounding boundary are flagged too, and a
    sweep leaves them as they are). Only flagged sub-blocks are swept: about 21% in sweep 1
    (flagged in the kernel that rounds, so the others keep nothing but their scale), 5% in
    sweep 2, 1% in sweep 3. Sweeps 4 and 5 run on sweep 3's set without a new check: a sweep
    does not change a settled sub-block, and there a check would cost more than it saves.
    x (n, S) -> scale (S,) and `codes(idx)`: the final codes + nmax of the sub-blocks idx,
    (len(idx), n) float32, needed only where a quantized scale is 0 (few sub-blocks).
    """
    scale, zero, maybe = _q3_first(x, nmax)
    levels = []  # per sweep: the sub-blocks it ran on (sorted), and their codes after it
    at = _two_or_more(maybe.nonzero()[:, 0])
    if len(at):
        xs = _gather(x, at)
        now = [xs, *_q3_start(xs, nmax)[:3]]  # x (n, k), codes (n, k), sums (k,) of the sub-blocks at
        for sweep in range(5):
            if sweep in (1, 2):  # sweep 1 runs on all of them; 4 and 5 where 3 did (see above)
                keep = _two_or_more(_q3_may_move(*now, nmax).nonzero()[:, 0])
                if len(keep) == 0:
                    break
                at = at[keep]
                now = [_gather(t, keep) for t in now]
            *now[1:], sub_scale = _q3_sweep(*now, nmax)
            scale.index_copy_(0, at, sub_scale)
            levels.append((at, now[1]))

    def codes(idx: torch.Tensor) -> torch.Tensor:
        L = _q3_start(x[:, _two_or_more(idx)], nmax)[0][:, : len(idx)]  # as rounded
        for at, L_swept in levels:  # then as each sweep left them
            i = torch.searchsorted(at, idx).clamp(max=len(at) - 1)
            hit = at[i] == idx
            L[:, hit] = L_swept[:, i[hit]]
        return _q3_codes(L, zero[idx], nmax)

    return scale, codes


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The columns idx of t (..., S): torch.gather, which on the CPU takes 70% of index_select's
    time for (16, S)."""
    return t.index_select(-1, idx) if t.dim() == 1 else torch.gather(t, -1, idx.expand(*t.shape[:-1], -1))


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


def _q3_round(x, nmax: int):
    """Round with the scale that maps the largest |x| to -nmax: code rows, their sums, and the
    sub-blocks of zeros (S,)."""
    rows = range(len(x))
    amax, mx = scan_absmax([x[i] for i in rows])
    zero = amax < GROUP_MAX_EPS
    iscale = fdiv(float(-nmax), torch.where(zero, torch.ones_like(mx), mx))
    L = [torch.round(iscale * x[i]).clamp(-nmax, nmax - 1) for i in rows]
    w = [x[i] * x[i] for i in rows]
    sumlx = seq_sum([w[i] * x[i] * L[i] for i in rows])
    suml2 = seq_sum([w[i] * L[i] * L[i] for i in rows])
    return L, sumlx, suml2, zero


@fused
def _q3_start(x: torch.Tensor, nmax: int):
    """The rounded codes (n, S), their sums and the sub-blocks of zeros."""
    L, sumlx, suml2, zero = _q3_round(x, nmax)
    return torch.stack(L), sumlx, suml2, zero


@fused
def _q3_first(x: torch.Tensor, nmax: int):
    """Round, and flag the sub-blocks sweep 1 may move, in one pass over x: the scale the rounding
    gives (S,), the sub-blocks of zeros and the flags. Nothing per weight is stored: a flagged
    sub-block is rounded again where it is swept."""
    L, sumlx, suml2, zero = _q3_round(x, nmax)
    # ggml returns before the sweeps for a sub-block of zeros, tiny weights and all
    return _q3_scale.eager(sumlx, suml2, zero), zero, _q3_may_move.eager(x, L, sumlx, suml2, nmax) & ~zero


@fused
def _q3_scale(sumlx: torch.Tensor, suml2: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The least-squares scale sum(w x l) / sum(w l**2); 0 for a sub-block of zeros."""
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    return torch.where(zero, torch.zeros_like(scale), scale)


def _q3_without(x: torch.Tensor, l: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor):
    """The weight w = x**2, w * x, and the sums without the weight x (code l), in ggml's order."""
    w = x * x
    wx = w * x
    return w, wx, sumlx - wx * l, suml2 - w * l * l


def _q3_step(x: torch.Tensor, l: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor, nmax: int):
    """ggml's move of one weight x with code l, given the sums (S,): its best level given the
    others, the sums with it, and whether the move is taken (it raises the gain)."""
    w, wx, slx, sl2 = _q3_without(x, l, sumlx, suml2)
    new_l = nearest_int(x * sl2 / slx).clamp(-nmax, nmax - 1).float()
    new_slx = slx + wx * new_l
    new_sl2 = sl2 + w * new_l * new_l
    take = (slx > 0) & (new_l != l) & (new_sl2 > 0) & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2)
    return new_l, new_slx, new_sl2, take


# _q3_may_move's bounds, in units of the sums' slx: a weight keeps its level l when the level ggml
# rounds to, q = x * sl2 / slx, lies strictly within 0.4999 of l (0.5 is a tie), or, at the ends
# of the grid, anywhere beyond it short of 4e6 (ggml's nearest_int is exact below 2**22 = 4194304).
# Computed as d = x * sl2 - l * slx, the test is off by under 1e-6 * slx, far inside the margin.
_MARGIN, _FAR = 0.4999, 4e6
_TINY = 1e-30  # below this slx the products lose their relative precision (subnormals): no verdict


@fused
def _q3_may_move(x, L, sumlx: torch.Tensor, suml2: torch.Tensor, nmax: int) -> torch.Tensor:
    """Whether a sweep may move a weight, decided without ggml's division: (S,) bool, True for
    every sub-block the sweep moves (and for the few whose q lies within 1e-4 of a rounding
    boundary, where only the division can tell; sweeping those changes nothing).

    Until the first move every weight sees the sums the sweep started with, and a weight moves
    only if its level changes. So a sub-block where no weight's level would change against
    those sums is one the sequential sweep leaves alone."""
    maybe = torch.zeros_like(sumlx, dtype=torch.bool)
    for i in range(len(x)):
        l = L[i]
        _, _, slx, sl2 = _q3_without(x[i], l, sumlx, suml2)
        d = x[i] * sl2 - l * slx  # slx * (q - l), q the level ggml rounds to
        lo = torch.where(l == -nmax, torch.full_like(l, -_FAR), torch.full_like(l, -_MARGIN)) * slx
        hi = torch.where(l == nmax - 1, torch.full_like(l, _FAR), torch.full_like(l, _MARGIN)) * slx
        stays = (slx <= 0) | ((slx >= _TINY) & (d > lo) & (d < hi))
        maybe = maybe | ~stays
    return maybe


@fused
def _q3_sweep(x: torch.Tensor, L: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor, nmax: int):
    """One sweep over the n weights of every sub-block, in order: L (n, S), the sums and the
    scale they give (S,). (No sub-block of zeros is swept.)"""
    rows = [L[i] for i in range(x.shape[0])]
    for i, l in enumerate(rows):
        new_l, new_slx, new_sl2, take = _q3_step(x[i], l, sumlx, suml2, nmax)
        rows[i] = torch.where(take, new_l, l)
        sumlx = torch.where(take, new_slx, sumlx)
        suml2 = torch.where(take, new_sl2, suml2)
    return torch.stack(rows), sumlx, suml2, _q3_scale.eager(sumlx, suml2, torch.zeros_like(take))


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
