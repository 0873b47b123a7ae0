"""The evaluation statistics against hand computations on small known logits."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantbench.eval.metrics import TokenScores, mean_stderr, score_tokens, summarize
from quantbench.eval.protocols import Protocol


def test_identical_distributions_have_zero_kl_and_full_agreement():
    logits = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 32, (50,))
    q = summarize(score_tokens(logits, logits.clone(), targets))
    assert q.kld_mean == 0.0 and q.kld_max == 0.0
    assert q.top1_agreement == 1.0
    assert q.ln_ppl_ratio == 0.0 and q.dp_rms == 0.0 and q.logits_mse == 0.0
    assert q.ppl == pytest.approx(q.ref_ppl)


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    v = 37
    q = summarize(score_tokens(torch.zeros(20, v), torch.zeros(20, v), torch.randint(0, v, (20,))))
    assert q.ppl == pytest.approx(v, rel=1e-6)  # log_softmax runs in float32
    assert q.ppl_stderr == pytest.approx(0.0, abs=1e-9)


def test_kl_matches_hand_computation_on_two_tokens():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.3, 0.2], [0.25, 0.5, 0.25]], dtype=torch.float64)
    s = score_tokens(p.log(), q.log(), torch.tensor([0, 2]))
    by_hand = (p * (p / q).log()).sum(-1)
    assert torch.allclose(s.kld, by_hand, atol=1e-7)
    assert s.nll.tolist() == pytest.approx([-math.log(0.5), -math.log(0.25)], abs=1e-6)
    assert s.same_top1.tolist() == [1.0, 0.0]  # argmax of q's second row is 1, of p's is 2
    assert s.correct_top1.tolist() == [1.0, 0.0]
    dp = torch.tensor([0.5 - 0.7, 0.25 - 0.5])
    qq = summarize(s)
    assert qq.dp_mean == pytest.approx(dp.mean().item(), abs=1e-6)
    assert qq.dp_rms == pytest.approx(dp.pow(2).mean().sqrt().item(), abs=1e-6)
    assert qq.ln_ppl_ratio == pytest.approx((s.nll - s.nll_ref).mean().item(), abs=1e-12)
    # the logits MSE is taken on raw logits: log-probs here
    assert qq.logits_mse == pytest.approx((q.log() - p.log()).pow(2).mean().item(), rel=1e-5)


def test_standard_error_formula_uses_n_minus_one():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    m, se = mean_stderr(x)
    assert m == 2.5
    assert se == pytest.approx(math.sqrt(1.25 / 3))  # population variance 1.25, over n - 1


def test_perplexity_error_is_delta_method():
    s = TokenScores(
        nll_ref=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        nll=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        kld=torch.zeros(3, dtype=torch.float64),
        same_top1=torch.ones(3, dtype=torch.float64),
        correct_top1=torch.zeros(3, dtype=torch.float64),
        sq_err=torch.zeros(3, dtype=torch.float64),
    )
    q = summarize(s)
    assert q.ppl == pytest.approx(math.exp(2.0))
    assert q.ppl_stderr == pytest.approx(math.exp(2.0) * math.sqrt((14 / 3 - 4) / 2))


def test_kl_percentiles():
    kld = torch.arange(101, dtype=torch.float64)
    z = torch.zeros(101, dtype=torch.float64)
    q = summarize(TokenScores(z, z, kld, z, z, z))
    assert (q.kld_median, q.kld_p90, q.kld_p99, q.kld_max) == (50.0, 90.0, 99.0, 100.0)


def test_disjoint_protocol_scores_every_predicted_token():
    p = Protocol("disjoint", 8, None)
    w = torch.arange(16).view(2, 8)
    assert p.scored_per_window == 7
    assert p.targets(w).tolist() == [[1, 2, 3, 4, 5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]
    logits = torch.arange(8).view(1, 8, 1).float()
    assert p.select(logits).flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_llamacpp_protocol_scores_second_half_only():
    p = Protocol("llama.cpp", 8, None)
    w = torch.arange(8).view(1, 8)
    assert p.first == 4 and p.scored_per_window == 3
    assert p.targets(w).tolist() == [[5, 6, 7]]
    assert p.select(torch.arange(8).view(1, 8, 1).float()).flatten().tolist() == [4, 5, 6]


def test_bos_replaces_first_token_and_is_not_a_target():
    p = Protocol("disjoint", 4, 99)
    w = torch.tensor([[5, 6, 7, 8]])
    assert p.prepare(w).tolist() == [[99, 6, 7, 8]]
    assert p.targets(w).tolist() == [[6, 7, 8]]
    assert w.tolist() == [[5, 6, 7, 8]]  # the caller's windows are not changed


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="disjoint, llama.cpp"):
        Protocol("sliding", 8, None)


def test_scoring_in_row_chunks_changes_no_figure(monkeypatch):
    from quantbench.eval import metrics

    g = torch.Generator().manual_seed(0)
    ref, var = torch.randn(150, 40, generator=g), torch.randn(150, 40, generator=g)
    targets = torch.randint(0, 40, (150,), generator=g)
    chunked = score_tokens(ref, var, targets)
    assert 150 > metrics.ROWS
    monkeypatch.setattr(metrics, "ROWS", 1000)
    whole = score_tokens(ref, var, targets)
    for k in TokenScores.__dataclass_fields__:
        assert torch.equal(getattr(whole, k), getattr(chunked, k)), k


def _float64_scores(ref, var, targets):
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(var.double(), -1)
    t = targets[:, None]
    return (p.exp() * (p - q)).sum(-1), -p.gather(1, t).squeeze(1), -q.gather(1, t).squeeze(1)


@pytest.mark.parametrize("offset", [-300.0, -70.0, -60.0, 0.0, 60.0, 70.0, 300.0])
def test_a_variant_whose_max_is_far_from_the_reference_is_scored_with_its_own(offset):
    """The variant's exps are shifted by the reference's max; beyond SHIFT_RANGE (64) they would
    overflow or vanish, and those rows are summed again with their own max. A constant added to
    every logit leaves the distribution as it is, so the KL stays that of the noise alone. (The KL
    is a difference of two sums near `offset`, so its float32 error grows with the offset.)"""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(30, 2000, generator=g) * 3
    var = ref + torch.randn(30, 2000, generator=g) * 0.3 + offset
    targets = torch.randint(0, 2000, (30,), generator=g)
    kld, nll_ref, nll = _float64_scores(ref, var, targets)
    s = score_tokens(ref, var, targets)
    assert torch.allclose(s.kld, kld, rtol=1e-3, atol=5e-7 * (1 + abs(offset))), (s.kld - kld).abs().max()
    assert torch.allclose(s.nll, nll, atol=1e-4) and torch.allclose(s.nll_ref, nll_ref, atol=1e-5)
    assert s.kld.isfinite().all() and s.nll.isfinite().all()


def test_compiled_and_eager_scoring_agree_to_rounding():
    """The scoring kernel's sums are reductions, whose order the compiler chooses: the two paths
    agree to float32 rounding, not bit for bit (each is deterministic on its own)."""
    from quantbench.formats import fused

    g = torch.Generator().manual_seed(2)
    ref = torch.randn(60, 3000, generator=g) * 3
    var = ref + torch.randn(60, 3000, generator=g) * 0.1
    targets = torch.randint(0, 3000, (60,), generator=g)
    compiled = score_tokens(ref, var, targets)
    with fused.eager():
        eager = score_tokens(ref, var, targets)
    for k in TokenScores.__dataclass_fields__:
        assert torch.allclose(getattr(compiled, k), getattr(eager, k), rtol=1e-4, atol=1e-9), k
    assert torch.equal(compiled.same_top1, eager.same_top1) and torch.equal(compiled.correct_top1, eager.correct_top1)


@pytest.mark.parametrize("n", [1, 2, 65])
def test_scores_do_not_depend_on_the_thread_count(n):
    """xdist workers and a single process may run different thread counts: a row's sums must not be
    split between threads (torch would split a lone row's, so it is scored as two)."""
    g = torch.Generator().manual_seed(n)
    ref, var = torch.randn(n, 50_000, generator=g) * 3, torch.randn(n, 50_000, generator=g)
    targets = torch.randint(0, 50_000, (n,), generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = score_tokens(ref, var, targets)
        torch.set_num_threads(1)
        one = score_tokens(ref, var, targets)
    finally:
        torch.set_num_threads(threads)
    for k in TokenScores.__dataclass_fields__:
        assert torch.equal(getattr(one, k), getattr(two, k)), k


def test_scoring_stays_compiled_past_dynamos_default_recompile_limit(recwarn):
    """Each kind of input (inference tensors or not), vocabulary size class and thread count is a
    graph of its own, and past dynamo's default limit of 8 graphs the kernel would turn eager in
    mid-process: a session's figures would then mix two roundings (found when an xdist worker
    and a long-lived process disagreed in the ninth digit of a perplexity)."""
    from quantbench.eval.metrics import scoring_path

    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(3)
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for v in (40, 256, 300):
                ref = torch.randn(3, v, generator=g)
                for inference in (False, True):
                    with torch.inference_mode(inference):
                        var = ref + 0.1
                    score_tokens(ref, var, torch.zeros(3, dtype=torch.long))
    finally:
        torch.set_num_threads(threads)
    assert scoring_path("cpu") == "compiled"
    assert not [w for w in recwarn if str(w.message).startswith("quantbench: torch.compile")]


def test_kl_agrees_with_a_float64_computation():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(70, 1000, generator=g) * 3
    var = ref + torch.randn(70, 1000, generator=g) * 0.5
    targets = torch.zeros(70, dtype=torch.long)
    kld, nll_ref, nll = _float64_scores(ref, var, targets)
    s = score_tokens(ref, var, targets)
    assert torch.allclose(s.kld, kld, rtol=1e-4)
    assert torch.allclose(s.nll, nll, atol=1e-5) and torch.allclose(s.nll_ref, nll_ref, atol=1e-5)


@pytest.mark.parametrize("noise, rtol", [(0.1, 1e-4), (0.01, 5e-3)])
def test_kl_keeps_its_precision_over_a_real_vocabulary(noise, rtol):
    """The embedded model's vocabulary is 49,152 wide: summed in one float32 accumulator per SIMD
    lane a row loses this precision (measured 3e-4 and 2e-2, as float32 log-softmaxes do); summed
    in blocks it keeps it (1e-5 at KL 5e-3, 1.3e-3 at KL 5e-5)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 49_152, generator=g) * 3
    var = ref + torch.randn(64, 49_152, generator=g) * noise
    targets = torch.zeros(64, dtype=torch.long)
    kld, _, _ = _float64_scores(ref, var, targets)
    s = score_tokens(ref, var, targets)
    assert ((s.kld - kld).abs() / kld).max() < rtol


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(1, 400), st.integers(0, 2**31 - 1), st.sampled_from([3, 1000]))
def test_max_argmax_is_torch_max_with_the_first_index(n, v, seed, levels):
    """Few distinct values (levels=3) make ties, whose first occurrence argmax must find; widths
    below, at and past a multiple of the 128-column blocks cover the short last block."""
    from quantbench.eval.metrics import _max_argmax

    x = torch.randint(0, levels, (n, v), generator=torch.Generator().manual_seed(seed)).float()
    m, i = _max_argmax(x)
    assert torch.equal(m, x.amax(-1))
    assert torch.equal(i, x.argmax(-1))  # torch documents argmax as the first maximal index


def test_max_argmax_propagates_nan_like_torch_max():
    from quantbench.eval.metrics import _max_argmax

    x = torch.randn(3, 300)
    x[1, 200] = float("nan")
    m, i = _max_argmax(x)
    assert m[1].isnan() and i[1] == 200 and torch.equal(m[[0, 2]], x[[0, 2]].amax(-1))


def test_reference_rows_read_in_chunks_score_as_the_whole(tmp_path):
    from functools import partial

    from quantbench.eval.metrics import reference_stats, score_chunks
    from quantbench.eval.quality import RefLogits

    g = torch.Generator().manual_seed(0)
    ref, var = torch.randn(2, 77, 300, generator=g) * 3, torch.randn(77, 300, generator=g)
    targets = torch.randint(0, 300, (77,), generator=g)
    ref.numpy().tofile(tmp_path / "ref.bin")
    stored = RefLogits(tmp_path / "ref.bin", 2, 77, 300)
    assert torch.equal(stored.rows(1, 5, 9), ref[1, 5:9]) and torch.equal(stored.window(0), ref[0])
    assert stored.stats(1) is None  # no stored statistics: the scoring finds them
    chunked = score_chunks(partial(stored.rows, 1), var, targets)
    whole = score_tokens(ref[1], var, targets)
    given = score_chunks(partial(stored.rows, 1), var, targets, reference_stats(ref[1]))
    for k in TokenScores.__dataclass_fields__:
        assert torch.equal(getattr(chunked, k), getattr(whole, k)), k
        assert torch.equal(getattr(given, k), getattr(whole, k)), k
    with pytest.raises(IndexError, match="holds 2 windows of 77 rows"):
        stored.rows(2, 0, 1)
    with pytest.raises(IndexError, match="rows 70:78"):
        stored.rows(0, 70, 78)
    from quantbench.eval.quality import stats_path

    np.savez(stats_path(tmp_path / "ref.bin"), max=np.zeros((2, 77)), argmax=np.zeros((2, 77)))  # an older layout
    with pytest.raises(ValueError, match=r"holds \['argmax', 'max'\], not \['max', 'argmax', 'expsum'\]; delete it"):
        RefLogits(tmp_path / "ref.bin", 2, 77, 300).stats(0)
    (tmp_path / "short.bin").write_bytes((tmp_path / "ref.bin").read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated: window 1 is incomplete"):
        RefLogits(tmp_path / "short.bin", 2, 77, 300).rows(1, 70, 77)
