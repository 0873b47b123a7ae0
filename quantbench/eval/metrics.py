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


# Positions scored at a time: one call of the compiled kernel and one mapping of the reference
# file per chunk (25 MB of reference rows at 49,152 wide). The kernel reads each row once, so a
# chunk need not fit in cache, and each call and mapping has a fixed cost: scoring a bf16 variant
# of the embedded model added 16% to its forward at 24 rows, 12.6% at 64, 11.5% at 128 (Xeon).
ROWS = 128
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
    return _by_blocks(reduce, x)[0]


def _by_blocks(reduce: Callable[..., torch.Tensor], *xs: torch.Tensor, f: Callable | None = None) -> list[torch.Tensor]:
    """Block reductions of (N, V) arrays, (N, ceil(V / BLOCK)) each: `reduce(f(*blocks), -1)` where
    `f` (default: each array itself, one result per array) maps blocks of BLOCK columns of every
    array (the last may be short) to a list of arrays of their shape. Every reduction goes over the
    same (N, V // BLOCK, BLOCK) view, so a compiler fuses them into one loop nest."""
    n, v = xs[0].shape
    full = v // BLOCK * BLOCK
    f = f or (lambda *b: list(b))
    blocks = [reduce(y, -1) for y in f(*(x[:, :full].reshape(n, -1, BLOCK) for x in xs))]
    if full < v:
        tails = [reduce(y, -1, keepdim=True) for y in f(*(x[:, full:] for x in xs))]
        blocks = [torch.cat([b, t], -1) for b, t in zip(blocks, tails)]
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
    """A chunk of (N, V) float32 reference and variant logits, with the reference's row max
    `m_ref` (N,), reduced to: the sums of exp(ref - m_ref) * (logits - ref), of exp(logits -
    m_ref) and of (logits - ref)^2, the variant's block maxima, and both logits at the targets
    `t` (N, 1). Compiled (`fused`), the two sums of exps and the maxima are one loop nest over the
    rows' blocks; inductor gives the squared differences a second loop (it merges that one's row
    and block loops, which keeps it from fusing). No (N, V) intermediate is stored.
    The reference's own sum of exps is not here: it is the reference's figure, this kernel's
    second sum with the reference as the variant (`reference_stats`), stored with the reference's
    logits. Summed here as well, it would be an exp used twice, which inductor stores to memory
    and reads back rather than fuse (a third more time per chunk, measured)."""

    def terms(r, lg):
        m = m_ref.view(-1, *([1] * (r.dim() - 1)))
        d = lg - r
        return [torch.exp(r - m) * d, torch.exp(lg - m), d * d]

    cross, z, sq = (b.double().sum(-1) for b in _by_blocks(torch.sum, ref, logits, f=terms))
    return cross, z, sq, _block_max(logits), ref.gather(1, t).squeeze(1), logits.gather(1, t).squeeze(1)


# Graphs: kinds of input (inference tensors or not, for each array) x vocabulary size classes
# (below 128, a multiple of it, neither) x thread counts; past dynamo's default limit of 8 the
# scoring would turn eager in mid-process, changing figures by rounding.
_sums = fused(_chunk_sums, graphs=64)


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
    ref_stats: RefStats | None = None,
) -> TokenScores:
    """Scores for (N, V) variant logits and (N,) targets, against reference rows a:b that
    `ref_rows(a, b)` returns ((b - a, V), e.g. mapped from a file a chunk at a time). `ref_stats`
    is the reference's (max, argmax, sum of exps) per row, (N,) each, when they were stored with
    it (`reference_stats`, written by `reference_logits`); otherwise they are found here, one
    more pass over the reference.

    This runs once per evaluated token over the whole vocabulary (49,152 wide for the embedded
    model), so it reads the logits as few times as it can. With the reference's max m_ref and
    its sum of exps known, `_chunk_sums` reduces both arrays to a few numbers per row in one
    pass, from which

        ln Z_ref = m_ref + ln sum exp(ref - m_ref),   ln Z = m_ref + ln sum exp(logits - m_ref)
        KL(p_ref || p) = sum p_ref (ln p_ref - ln p) = (ln Z - ln Z_ref) - E_ref[logits - ref]

    follow in float64. The variant's exps are shifted by the reference's max, not its own: no
    pass over its logits has to come first. That is exact in float32 while the two maxima lie
    within SHIFT_RANGE of each other (no exp overflows, the largest is a normal float); rows
    beyond it, a broken variant's, are summed again with their own max. The reference's sum of
    exps is the same kernel's variant sum, taken with the reference in the variant's place, so
    identical logits give a KL of exactly 0.

    It goes ROWS positions at a time, mapping only those rows of the reference. Measured on 2
    cores (Xeon, AVX-512) for a window of 511 positions of 49,152, inside `evaluate_quality`, the
    reference mapped from the page cache and its statistics stored: about 25 ms (43-47 ms when the
    kernel also summed the reference's exps in chunks of 24 rows, 80 ms reading each chunk into a
    buffer and scoring it with eager torch, one pass per operation).
    Sums go by blocks (`_sum`), so the KL is closer to a float64 computation than float32
    log-softmaxes give it: on 64 rows of N(0, 9) logits 49,152 wide, the largest relative error
    is 1e-5 at KL 5e-3 and 1.3e-3 at KL 5e-5 (log-softmaxes: 2.3e-4 and 2.1e-2). Every score is
    per row, and each row is summed by one thread, so neither the chunking nor the thread count
    changes a figure.
    """
    assert logits.shape[0] == targets.shape[0], (logits.shape, targets.shape)
    logits = logits.float()
    targets = targets.to(logits.device).long()
    parts = []
    for a, b in row_chunks(targets.shape[0]):
        ref = ref_rows(a, b)
        assert ref.shape == logits[a:b].shape, (a, b, ref.shape, logits.shape)
        ref = ref.to(logits.device).float()
        stats = _chunk_stats(ref) if ref_stats is None else tuple(x[a:b].to(logits.device) for x in ref_stats)
        parts.append((*stats, *_run_sums(ref, logits[a:b], stats[0], targets[a:b])))
        del ref  # a mapped chunk is unmapped here, before the next is mapped
    return _finish(logits, targets, [torch.cat(x) for x in zip(*parts)])


RefStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per row: max, argmax, sum of exp(ref - max)


@torch.no_grad()
def reference_stats(ref: torch.Tensor) -> RefStats:
    """(N, V) reference logits -> each row's max, argmax and sum of exp(ref - max) (float64), the
    reference's own figures that every variant is scored against (`score_chunks`)."""
    parts = [_chunk_stats(ref[a:b].float()) for a, b in row_chunks(ref.shape[0])]
    return tuple(torch.cat(x) for x in zip(*parts))  # type: ignore[return-value]


def _chunk_stats(ref: torch.Tensor) -> RefStats:
    """`reference_stats` of one chunk. The sum of exps is `_chunk_sums`' sum over the variant's
    exps with a copy of the reference as the variant: the same code on the same values, so a
    variant whose logits equal the reference's sums them to the same bits."""
    m, top = _max_argmax(ref)
    z = _run_sums(ref, ref.clone(), m, torch.zeros(ref.shape[0], dtype=torch.long, device=ref.device))[1]
    return m, top, z


def _run_sums(ref: torch.Tensor, logits: torch.Tensor, m_ref: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`_chunk_sums` of one chunk of rows."""
    # Eagerly, torch splits a lone row's sums between threads, so its figures would depend on the
    # thread count; two or more rows are shared out by row. A lone row is summed twice over.
    n = ref.shape[0]
    if n == 1:
        ref, logits, m_ref, targets = ref.expand(2, -1), logits.expand(2, -1), m_ref.expand(2), targets.expand(2)
    # detach(): a view's guards would name its base tensor's sizes (a mapped chunk's, a window's),
    # and every new kind of base would compile the kernel again.
    ref, logits, m_ref, t = (x.contiguous().detach() for x in (ref, logits, m_ref.float(), targets[:, None]))
    return tuple(x[:n] for x in _sums(ref, logits, m_ref, t))


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
