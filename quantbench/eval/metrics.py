"""Per-token scores of a variant against its reference, and their summary statistics.

The statistics are those llama.cpp's `llama-perplexity --kl-divergence` prints (Gerganov et al.,
tools/perplexity/perplexity.cpp): perplexity with the delta-method error, ln(PPL(Q)/PPL(base))
with its paired error, mean KL divergence with its standard error, KLD percentiles, the share of
positions where both models pick the same top token, and the change in the probability of the
correct token (mean and RMS).

Standard errors use the sample variance with n - 1, as llama.cpp does:
    stderr(x) = sqrt( (mean(x^2) - mean(x)^2) / (n - 1) )
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..formats.fused import fused


@dataclass
class TokenScores:
    """Per scored position, float64 on the CPU; one row per predicted token."""

    nll_ref: torch.Tensor  # -log p_ref(correct)
    nll: torch.Tensor  # -log p_variant(correct)
    kld: torch.Tensor  # KL(p_ref || p_variant)
    same_top1: torch.Tensor  # argmax agrees (0/1)
    correct_top1: torch.Tensor  # variant's argmax is the actual next token (0/1)
    sq_err: torch.Tensor  # mean over the vocabulary of (logit_variant - logit_ref)^2

    @staticmethod
    def cat(parts: list[TokenScores]) -> TokenScores:
        return TokenScores(**{k: torch.cat([getattr(p, k) for p in parts]) for k in TokenScores.__dataclass_fields__})

    def __len__(self) -> int:
        return self.nll.numel()


ROWS = 24  # positions scored at a time: a chunk's reference and variant rows, 4.7 MB each, stay in cache
BLOCK = 128  # argmax in two steps: block maxima, then the winning block (see _max_argmax)
SHIFT_RANGE = 64.0  # |max(variant) - max(reference)| up to which the reference's max shifts the variant's exps


def row_chunks(n: int) -> list[tuple[int, int]]:
    """Row ranges of ROWS positions; a lone last row joins the chunk before it (see _chunk_scores)."""
    cuts = list(range(0, n, ROWS)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
        del cuts[-2]
    return list(zip(cuts, cuts[1:]))


def _blocks(x: torch.Tensor, reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
    """(N, V) -> (N, ceil(V / BLOCK)): `reduce(blocks, -1)` over blocks of BLOCK columns (the last
    may be short)."""
    n, v = x.shape
    full = v // BLOCK * BLOCK
    blocks = reduce(x[:, :full].reshape(n, -1, BLOCK), -1)  # (n, v // BLOCK)
    if full < v:
        blocks = torch.cat([blocks, reduce(x[:, full:], -1, keepdim=True)], -1)
    return blocks


def _block_max(x: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N, ceil(V / BLOCK)) maxima of blocks of BLOCK columns."""
    return _blocks(x, torch.amax)


def _sum(x: torch.Tensor) -> torch.Tensor:
    """(N, V) float32 -> (N,) float64 row sums in two steps: blocks of BLOCK columns in float32,
    then their sums in float64. A row of 49,152 summed in one float32 accumulator per SIMD lane
    (what inductor makes of x.sum(-1) below 65,536 columns) loses up to 20x more precision."""
    return _blocks(x, torch.sum).double().sum(-1)


def _argmax_from_blocks(x: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max and the index of its first occurrence, from its block maxima: by argmax's
    first-occurrence rule the first block that holds the max holds the index, found inside it."""
    v = x.shape[1]
    start = blocks.argmax(-1) * BLOCK  # (n,)
    # Past the last column the gather repeats it: after the first occurrence, so no index changes.
    cols = (start[:, None] + torch.arange(BLOCK, device=x.device)).clamp_max_(v - 1)  # (n, BLOCK)
    return blocks.amax(-1), start + x.gather(1, cols).argmax(-1)


def _max_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max and the index of its first occurrence, as x.max(-1) gives them, about six
    times faster (2 ms against 13 for a 511 x 49,152 window in cache): torch's (value, index)
    reduction does not vectorize, amax does."""
    return _argmax_from_blocks(x, _block_max(x))


def _chunk_sums(ref: torch.Tensor, logits: torch.Tensor, m_ref: torch.Tensor, t: torch.Tensor):
    """One pass over a chunk of (N, V) float32 reference and variant logits, both shifted by the
    reference's row max `m_ref` (N,): the sums of exp(ref - m_ref), of exp(ref - m_ref) * (logits -
    ref) and of exp(logits - m_ref), the sum of squared differences, the variant's block maxima,
    and both logits at the targets `t` (N, 1). Compiled (`fused`), it is one loop per row that
    reads each array once from memory; no (N, V) intermediate is materialized."""
    d = logits - ref
    w = torch.exp(ref - m_ref[:, None])
    z = torch.exp(logits - m_ref[:, None])
    return (
        _sum(w), _sum(w * d), _sum(z), _sum(d * d), _block_max(logits),
        ref.gather(1, t).squeeze(1), logits.gather(1, t).squeeze(1),
    )


_sums = fused(_chunk_sums)


def scoring_path(device: torch.device | str) -> str:
    """"compiled" or "eager": how `_chunk_sums` runs for logits on `device` in this process. The
    two agree to rounding, not bit for bit, so cached figures record which one made them."""
    return "compiled" if _sums.compiles_for(torch.empty(0, device=device)) else "eager"


@torch.no_grad()
def score_tokens(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> TokenScores:
    """Scores for positions whose logits are given: (N, V) reference, (N, V) variant, (N,) targets."""
    assert ref_logits.shape == logits.shape, (ref_logits.shape, logits.shape)
    return score_chunks(lambda a, b: ref_logits[a:b], logits, targets)


@torch.no_grad()
def score_chunks(
    ref_rows: Callable[[int, int], torch.Tensor],
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref_top: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TokenScores:
    """Scores for (N, V) variant logits and (N,) targets, against reference rows a:b that
    `ref_rows(a, b)` returns ((b - a, V), e.g. mapped from a file a chunk at a time). `ref_top`
    is the reference's (max, argmax) per row, (N,) each, when they were stored with it
    (`reference_logits`); otherwise they are found here.

    This runs once per evaluated token over the whole vocabulary (49,152 wide for the embedded
    model), so it reads the logits as few times as it can. With the reference's max m_ref known,
    `_chunk_sums` reduces both arrays to a few numbers per row in one pass, from which

        ln Z_ref = m_ref + ln sum exp(ref - m_ref),   ln Z = m_ref + ln sum exp(logits - m_ref)
        KL(p_ref || p) = sum p_ref (ln p_ref - ln p) = (ln Z - ln Z_ref) - E_ref[logits - ref]

    follow in float64. The variant's exps are shifted by the reference's max, not its own: no
    pass over its logits has to come first. That is exact in float32 while the two maxima lie
    within SHIFT_RANGE of each other (no exp overflows, the largest is a normal float); rows
    beyond it, a broken variant's, are summed again with their own max. The reference and the
    variant sum their exps in the same code, so identical logits give a KL of exactly 0.

    It goes ROWS positions at a time: a chunk's reference rows and variant rows stay in the CPU's
    cache while they are read. Measured on 2 cores (Xeon, AVX-512) for a window of 511 positions
    of 49,152 inside `evaluate_quality`, the reference mapped from the page cache: 43-47 ms in
    all, against 80 ms for reading each chunk into a buffer and scoring it with eager torch, one
    pass per operation. Sums go by blocks (`_sum`), so the KL is closer to a float64 computation
    than float32 log-softmaxes give it: on 64 rows of N(0, 9) logits 49,152 wide, the largest
    relative error is 1e-5 at KL 5e-3 and 1.3e-3 at KL 5e-5 (log-softmaxes: 2.3e-4 and 2.1e-2).
    Every score is per row, and each row is summed by one thread, so neither the chunking
    nor the thread count changes a figure.
    """
    assert logits.shape[0] == targets.shape[0], (logits.shape, targets.shape)
    logits = logits.float()
    targets = targets.to(logits.device).long()
    parts = []
    for a, b in row_chunks(targets.shape[0]):
        ref = ref_rows(a, b)
        assert ref.shape == logits[a:b].shape, (a, b, ref.shape, logits.shape)
        top = None if ref_top is None else (ref_top[0][a:b], ref_top[1][a:b])
        parts.append(_chunk_scores(ref.to(logits.device), logits[a:b], targets[a:b], top))
        del ref  # a mapped chunk is unmapped here, before the next is mapped
    return _finish(logits, targets, [torch.cat(x) for x in zip(*parts)])


def _chunk_scores(ref: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, top):
    """The per-row figures of one chunk that need its reference rows."""
    ref = ref.float().contiguous()
    m_ref, top_ref = _max_argmax(ref) if top is None else (x.to(logits.device) for x in top)
    # Eagerly, torch splits a lone row's sums between threads, so its figures would depend on the
    # thread count; two or more rows are shared out by row. A lone row is summed twice over.
    n = ref.shape[0]
    lone = n == 1
    if lone:
        ref, logits, m_ref, targets = ref.expand(2, -1), logits.expand(2, -1), m_ref.expand(2), targets.expand(2)
    # detach(): a view's guards would name its base tensor's sizes (a mapped chunk's, a window's),
    # and every new kind of base would compile the kernel again.
    ref, logits, m_ref, t = (x.contiguous().detach() for x in (ref, logits, m_ref.float(), targets[:, None]))
    sums = _sums(ref, logits, m_ref, t)
    return (m_ref[:n], top_ref[:n], *(x[:n] for x in sums))


def warm_up(vocab: int, device: torch.device | str = "cpu") -> None:
    """Compile the scoring kernel for rows of `vocab` logits before any variant is timed: the first
    call of a process compiles it (about 5 s on 2 cores; inductor's disk cache makes later
    processes' first calls about 1 s), a cost of the session, not of the first variant scored.
    Dynamo keeps a graph per kind of input: torch variants' logits are inference tensors (made
    under torch.inference_mode), other variants' (llama.cpp's) plain ones; both are compiled."""
    targets = torch.zeros(2, dtype=torch.long, device=device)
    with torch.inference_mode():
        inference = torch.zeros(2, vocab, device=device)
    for logits in (inference, torch.zeros(2, vocab, device=device)):
        score_tokens(torch.zeros(2, vocab, device=device), logits, targets)


def _finish(logits: torch.Tensor, targets: torch.Tensor, sums: list[torch.Tensor]) -> TokenScores:
    m_ref, top_ref, z_ref, cross, z, sq, blocks, r_t, l_t = sums
    m, top = _argmax_from_blocks(logits, blocks)
    ln_z_ref = m_ref.double() + z_ref.double().log()
    ln_z = m_ref.double() + z.double().log()
    far = ((m - m_ref).abs() > SHIFT_RANGE).nonzero().squeeze(1)
    if far.numel():  # shifted by the reference's max, these rows' exps would overflow or vanish
        ln_z[far] = m[far].double() + _sum(torch.exp(logits[far] - m[far, None])).log()
    kld = (ln_z - ln_z_ref - cross.double() / z_ref.double()).clamp_min(0.0)  # rounding can give -1e-9
    return TokenScores(
        nll_ref=(ln_z_ref - r_t.double()).cpu(),
        nll=(ln_z - l_t.double()).cpu(),
        kld=kld.cpu(),
        same_top1=(top == top_ref).double().cpu(),
        correct_top1=(top == targets).double().cpu(),
        sq_err=(sq.double() / logits.shape[-1]).cpu(),
    )


def mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    m = x.mean().item()
    if n < 2:
        return m, float("nan")
    var = (x.pow(2).mean() - x.mean() ** 2).item()
    return m, math.sqrt(max(var, 0.0) / (n - 1))


def percentile(x: torch.Tensor, q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    return torch.quantile(x.double(), q).item() if x.numel() else float("nan")


@dataclass(frozen=True)
class Quality:
    n_tokens: int
    ppl: float
    ppl_stderr: float
    ref_ppl: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    top1_agreement_stderr: float
    dp_mean: float  # mean of p_variant(correct) - p_ref(correct)
    dp_stderr: float
    dp_rms: float
    logits_mse: float
    next_token_accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(s: TokenScores) -> Quality:
    n = len(s)
    if n == 0:
        raise ValueError("no scored tokens: nothing to summarize")
    nll, ppl_err = mean_stderr(s.nll)
    ref_nll, _ = mean_stderr(s.nll_ref)
    ppl = math.exp(nll)
    ln_ratio, ln_ratio_err = mean_stderr(s.nll_ref - s.nll)  # = ln PPL(Q) - ln PPL(ref), sign below
    kld, kld_err = mean_stderr(s.kld)
    top1, top1_err = mean_stderr(s.same_top1)
    dp = torch.exp(-s.nll) - torch.exp(-s.nll_ref)
    dp_mean, dp_err = mean_stderr(dp)
    return Quality(
        n_tokens=n,
        ppl=ppl,
        ppl_stderr=ppl * ppl_err,  # delta method: d exp(x) = exp(x) dx
        ref_ppl=math.exp(ref_nll),
        ln_ppl_ratio=-ln_ratio,
        ln_ppl_ratio_stderr=ln_ratio_err,
        kld_mean=kld,
        kld_stderr=kld_err,
        kld_median=percentile(s.kld, 0.5),
        kld_p90=percentile(s.kld, 0.9),
        kld_p99=percentile(s.kld, 0.99),
        kld_max=s.kld.max().item(),
        top1_agreement=top1,
        top1_agreement_stderr=top1_err,
        dp_mean=dp_mean,
        dp_stderr=dp_err,
        dp_rms=math.sqrt(dp.pow(2).mean().item()),
        logits_mse=s.sq_err.mean().item(),
        next_token_accuracy=s.correct_top1.mean().item(),
    )
