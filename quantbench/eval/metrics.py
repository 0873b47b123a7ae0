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

import torch


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


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, V) . (N, V) -> (N,): one fused BLAS dot per row, without an (N, V) product in memory."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


ROWS = 64  # positions scored at a time: (64, 49152) float32 buffers are 12.6 MB, cache-sized


def _row_sums(ref: torch.Tensor, logits: torch.Tensor):
    """Per row of (N, V) float32 reference and variant logits: each one's max and argmax (one pass
    each), sum of exp(x - max), the sum of exp(ref - max) * (logits - ref) and the sum of squared
    differences. Two (N, V) buffers: the difference, and the exponentials (written twice); no
    log-softmax is materialized."""
    m_ref, top_ref = ref.max(-1)
    m, top = logits.max(-1)
    d = logits - ref
    sq = _row_dot(d, d)
    e = torch.sub(ref, m_ref[:, None]).exp_()
    z_ref, cross = e.sum(-1), _row_dot(e, d)
    z = torch.sub(logits, m[:, None], out=e).exp_().sum(-1)
    return m_ref, z_ref, m, z, cross, sq, top_ref, top


@torch.no_grad()
def score_tokens(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> TokenScores:
    """Scores for positions whose logits are given: (N, V) reference, (N, V) variant, (N,) targets.

    This runs once per evaluated token over the whole vocabulary (49,152 wide for the embedded
    model), so it reads the logits as few times as it can: `_row_sums` reduces both arrays to a
    few numbers per row, from which the log-normalizers ln Z = max + ln(sum exp(x - max)) and

        KL(p_ref || p) = sum p_ref (ln p_ref - ln p) = (ln Z - ln Z_ref) - E_ref[logits - ref]

    follow in float64. It goes ROWS positions at a time, whose rows stay in the CPU's cache between
    passes. Measured on 2 cores for 511 positions of 49,152: 182 ms, against 234 ms for the two
    log-softmaxes and row dots it replaces, and closer to a float64 computation: relative errors
    of the KL 3e-4 at KL 5e-3 and 1.5e-2 at 5e-5 (the log-softmaxes' 8e-4 and 9e-2; float32
    logits of magnitude ~10 carry ~1e-6 each). Every score is per row, so the chunking changes
    no figure.
    """
    assert ref_logits.shape == logits.shape and ref_logits.shape[0] == targets.shape[0], (
        ref_logits.shape,
        logits.shape,
        targets.shape,
    )
    cuts = list(range(0, targets.shape[0], ROWS)) + [targets.shape[0]]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
        del cuts[-2]  # no lone last row (see _score_rows): the chunk before it takes it
    return TokenScores.cat([_score_rows(ref_logits[a:b], logits[a:b], targets[a:b]) for a, b in zip(cuts, cuts[1:])])


def _score_rows(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> TokenScores:
    ref_logits, logits = ref_logits.float(), logits.float()
    t = targets.long().unsqueeze(-1)
    # torch splits a lone row's sums between threads, so its figures would depend on the thread
    # count; two or more rows are shared out by row. A lone row is scored twice over.
    lone = ref_logits.shape[0] == 1
    both = (ref_logits.expand(2, -1), logits.expand(2, -1)) if lone else (ref_logits, logits)
    sums = _row_sums(*(x.contiguous() for x in both))
    m_ref, z_ref, m, z, cross, sq, top_ref, top = (x[:1].cpu() if lone else x.cpu() for x in sums)
    ln_z_ref = m_ref.double() + z_ref.double().log()
    ln_z = m.double() + z.double().log()
    kld = (ln_z - ln_z_ref - cross.double() / z_ref.double()).clamp_min(0.0)  # rounding can give -1e-9
    targets = targets.cpu()
    return TokenScores(
        nll_ref=ln_z_ref - ref_logits.gather(-1, t).squeeze(-1).double().cpu(),
        nll=ln_z - logits.gather(-1, t).squeeze(-1).double().cpu(),
        kld=kld,
        same_top1=(top == top_ref).double(),
        correct_top1=(top == targets).double(),
        sq_err=sq.double() / logits.shape[-1],
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
