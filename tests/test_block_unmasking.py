"""samplers/block_unmasking.py: the block-sampler math (docs/masked_lms.md): commit schedule, exactness of
first hitting inside semi-AR blocks (Markov-chain oracle, a 50k vocabulary with tiny probabilities, reveal times
against their law), float64 only on the drawn rows, infilling, EOS, threshold commits, caches, errors."""

import math

import pytest
import torch
from scipy import stats

from gensample.core.categorical import filter_top_k_top_p, masked_log_softmax
from gensample.models.markov import MarkovDenoiser, toy_chain
from gensample.samplers.block_unmasking import (
    REMASKING,
    BlockConfig,
    commit_counts,
    confidence_scores,
    reveal_fraction,
    sample_blocks,
)

MASK = 3


class CountingNet:
    """Fixed random logits per (position, token); records the masks it sees (a call-counting dummy)."""

    def __init__(self, L: int, K: int, seed: int = 0):
        self.logits = torch.randn(L, K, generator=torch.Generator().manual_seed(seed))
        self.inputs, self.blocks = [], []

    def __call__(self, x):
        self.inputs.append(x.clone())
        return self.logits.expand(x.shape[0], -1, -1).clone()


class CachedNet(CountingNet):
    """Accepts ``block=`` and returns only the block's logits (as a prefix-cached model may)."""

    def __call__(self, x, block=None):
        self.inputs.append(x.clone())
        self.blocks.append(block)
        s, e = block
        return self.logits[s:e].expand(x.shape[0], -1, -1).clone()


def chi2_p(counts: torch.Tensor, p: torch.Tensor) -> float:
    keep = p > 0
    assert counts[~keep].sum() == 0, "a zero-probability category was drawn"
    return float(stats.chisquare(counts[keep].numpy(), (p[keep] * counts.sum()).numpy()).pvalue)


# -- commit schedule ---------------------------------------------------------------------------------------------------
def test_commit_counts_split_evenly_remainder_first():
    assert commit_counts(10, 3).tolist() == [4, 3, 3]
    assert commit_counts(3, 5).tolist() == [1, 1, 1, 0, 0]
    assert commit_counts(torch.tensor([8, 2]), 4).tolist() == [[2, 2, 2, 2], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="steps"):
        commit_counts(4, 0)


# -- exactness: Markov-chain oracle -------------------------------------------------------------------------------------
@pytest.mark.parametrize("remasking,block_length,steps", [("fhs", 2, 2), ("fhs", 4, 4), ("random", 1, 1)])
def test_one_commit_per_call_is_exact_in_any_block_layout(remasking, block_length, steps):
    """With one reveal per call, the reveal order does not depend on the tokens, so with the exact denoiser
    mu* of the toy chain the joint law of the 4 tokens is exactly p (chain rule), whatever the blocks. Chi-square
    over the 81 sequences, n = 20k, false-failure rate 1e-3. Power: committing a whole block of 4 in one call
    (tokens drawn independently given nothing) must be rejected on the same n."""
    chain = toy_chain()
    net = MarkovDenoiser(chain)
    n = 20_000
    x = torch.full((n, 4), MASK, dtype=torch.long)
    cfg = BlockConfig(gen_length=4, block_length=block_length, steps=steps, remasking=remasking, mask_token_id=MASK)
    out, st = sample_blocks(net, x, cfg, torch.Generator().manual_seed(1))
    _, p = chain.enumerate()
    counts = torch.bincount(chain.index_of(out), minlength=81).double()
    assert chi2_p(counts, p) > 1e-3
    assert st["nfe"] == 4 and st["tokens_per_call"] == 1.0 and st["committed"] == 4 * n
    parallel = BlockConfig(gen_length=4, block_length=4, steps=1, remasking=remasking, mask_token_id=MASK)
    bad, st_bad = sample_blocks(net, x, parallel, torch.Generator().manual_seed(1))
    assert st_bad["nfe"] == 1
    assert chi2_p(torch.bincount(chain.index_of(bad), minlength=81).double(), p) < 1e-6


# -- exactness: a 50k vocabulary with tiny probabilities ---------------------------------------------------------------
def tiny_prob_logits(V: int = 50_257) -> torch.Tensor:
    """float32 logits: one head token with p ~ 0.5, the other 50,256 tokens with p between ~3e-6 and ~3e-5."""
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(V, generator=g) * 2.3  # tail spread: a factor e^2.3 ~ 10
    logits[7] = math.log(float(torch.exp(logits.double()).sum()))  # head ~ half the mass
    return logits


def binned_counts(draws: torch.Tensor, p: torch.Tensor, bins: int = 25):
    """Group the tail tokens into ``bins`` bins of equal size; the head (token 7) is its own bin."""
    V = p.numel()
    tail = torch.tensor([i for i in range(V) if i != 7])
    bin_of = torch.empty(V, dtype=torch.long)
    bin_of[7] = bins
    bin_of[tail] = torch.arange(tail.numel()) * bins // tail.numel()
    cnt = torch.bincount(bin_of[draws], minlength=bins + 1).double()
    pb = torch.zeros(bins + 1, dtype=torch.float64).index_add_(0, bin_of, p)
    return cnt, pb


def test_fhs_single_masked_position_draws_the_softmax_on_a_50k_vocabulary():
    """One masked position after a prompt: fhs draws it from softmax(logits) (float64 inverse CDF). n = 1200 draws
    in one batched call; chi-square over 11 bins (head + 10 tail bins of ~5000 tokens, each ~5% mass, ~60
    expected counts), p-value > 1e-3. Power: the same draws reject the law at temperature 1.5."""
    logits = tiny_prob_logits()
    p = torch.softmax(logits.double(), 0)
    assert p[torch.arange(p.numel()) != 7].max() < 4e-5
    n = 1200

    rows = torch.stack([torch.zeros_like(logits), logits])  # (2, V)

    def net(x):
        return rows.expand(x.shape[0], -1, -1)  # a view: no (n, 2, V) copy

    x = torch.tensor([[11, MASK]]).repeat(n, 1)
    cfg = BlockConfig(gen_length=1, block_length=4, steps=4, remasking="fhs", mask_token_id=MASK)
    out, st = sample_blocks(net, x, cfg, torch.Generator().manual_seed(3))
    assert st["nfe"] == 1 and (out[:, 0] == 11).all()
    cnt, pb = binned_counts(out[:, 1], p, bins=10)
    assert chi2_p(cnt, pb) > 1e-3
    _, pb_hot = binned_counts(out[:, 1], torch.softmax(logits.double() / 1.5, 0), bins=10)
    assert chi2_p(cnt, pb_hot) < 1e-6


# -- reveal times ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_masks,steps", [(6, 6), (6, 3)])
def test_fhs_reveal_times_inside_blocks_follow_their_law(n_masks, steps):
    """Linear schedule, a block of n masks revealed k = n / steps at a time from t = 1: the ratio tau / t after a
    step that reveals k of m masks is Beta(m - k + 1, k) (k-th largest of m uniforms; paper sec. 4.1), and for k = 1
    the pooled reveal times of a block are m iid U(0, 1) order statistics, so they pool to U(0, 1). KS tests with
    p > 1e-3 on 3000 rows; power: the ratio must reject Beta(m - k + 2, k) (one mask too many)."""
    B = 3000
    x = torch.full((B, 2 + 2 * n_masks), MASK, dtype=torch.long)
    x[:, :2] = 1
    ratios, times, prev = {}, [], {}

    def on_step(info):
        t = info["t"]
        start = info["start"]
        t_old = prev.get(start, torch.ones(B, dtype=torch.float64))
        m = n_masks - info["step"] * (n_masks // steps)  # masks before this step
        ratios.setdefault((m, n_masks // steps), []).append(t / t_old)
        times.append(t)
        prev[start] = t.clone()

    net = CountingNet(x.shape[1], 5)
    cfg = BlockConfig(gen_length=2 * n_masks, block_length=n_masks, steps=steps, remasking="fhs", mask_token_id=MASK)
    sample_blocks(net, x, cfg, torch.Generator().manual_seed(4), on_step=on_step)
    for (m, k), rs in ratios.items():
        r = torch.cat(rs).numpy()
        assert stats.kstest(r, stats.beta(m - k + 1, k).cdf).pvalue > 1e-3, (m, k)
        assert stats.kstest(r, stats.beta(m - k + 2, k).cdf).pvalue < 1e-6, (m, k)
    if steps == n_masks:
        pooled = torch.cat(times).numpy()
        assert stats.kstest(pooled, "uniform").pvalue > 1e-3


def test_reveal_fraction_with_per_row_generators_and_zero_commits():
    n, k = torch.tensor([5, 3, 0]), torch.tensor([2, 0, 0])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    r = reveal_fraction(n, k, gens)
    assert 0 < r[0] < 1 and r[1] == 1 and r[2] == 1


# -- the loop ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("remasking", REMASKING)
def test_blocks_left_to_right_prompt_kept_nfe_and_no_mask_left(remasking):
    B, P, G, bl, steps = 3, 3, 10, 4, 2
    x = torch.full((B, P + G), MASK, dtype=torch.long)
    x[:, :P] = torch.tensor([0, 1, 2])
    net = CountingNet(P + G, 6)
    seen = []
    cfg = BlockConfig(gen_length=G, block_length=bl, steps=steps, remasking=remasking, mask_token_id=MASK,
                      temperature=0.7, top_k=4)
    out, st = sample_blocks(net, x, cfg, torch.Generator().manual_seed(0), on_step=seen.append)
    assert (out[:, :P] == x[:, :P]).all() and not (out == MASK).any()
    # blocks [3, 7), [7, 11), [11, 13): 4, 4, 2 masks over 2 steps each -> 6 calls
    assert st["nfe"] == len(net.inputs) == 6 and st["blocks"] == 3
    for info, inp in zip(seen, net.inputs):
        s, e = info["start"], info["end"]
        assert (inp[:, e:] == MASK).all(), "a later block was touched before this one was done"
        assert not info["commit"].all() or e - s <= 2
    # a step commits within its block only; committed tokens stay
    assert all((a[:, :P] == b[:, :P]).all() for a, b in zip(net.inputs, net.inputs[1:]))


def test_infilling_keeps_fixed_tokens_and_fills_only_editable():
    L = 12
    x = torch.tensor([[4, 0, 1, MASK, MASK, 2, 2, MASK, 1, MASK, MASK, 0]])
    editable = (x == MASK)
    editable[0, 11] = True  # a fixed-looking token may be regenerated: it starts as the mask
    net = CountingNet(L, 5)
    cfg = BlockConfig(gen_length=9, block_length=3, steps=3, remasking="low-confidence", mask_token_id=MASK)
    out, st = sample_blocks(net, x, cfg, torch.Generator().manual_seed(0), editable=editable)
    assert (out[~editable] == x[~editable]).all() and not (out == MASK).any()
    assert (net.inputs[0][0, 11] == MASK)
    with pytest.raises(ValueError, match="window"):
        sample_blocks(net, x, BlockConfig(gen_length=2, block_length=3, steps=3, mask_token_id=MASK),
                      torch.Generator(), editable=editable)


def test_stop_at_eos_freezes_rows_and_fills_eos():
    """A network that always proposes EOS (id 2) at the first generated position with high confidence: with
    stop_at_eos the run stops after the first block's EOS and fills the rest with EOS."""
    L, K = 12, 5
    logits = torch.zeros(L, K)
    logits[:, 1] = 3.0
    logits[2, 2] = 30.0  # position 2 = first generated one: EOS, by far the most confident
    net = lambda x: logits.expand(x.shape[0], -1, -1).clone()  # noqa: E731
    x = torch.full((2, L), MASK, dtype=torch.long)
    x[:, :2] = 0
    cfg = BlockConfig(gen_length=10, block_length=2, steps=2, remasking="low-confidence", mask_token_id=MASK,
                      temperature=0.0, eos_token_id=2, stop_at_eos=True)
    calls = []
    out, st = sample_blocks(lambda z: calls.append(1) or net(z), x, cfg, torch.Generator())
    # the first call commits the EOS at position 2 (top-1 of block [2, 4)); the row is then done
    assert (out[:, 2:] == 2).all() and st["nfe"] == 1
    cfg2 = BlockConfig(gen_length=10, block_length=2, steps=2, remasking="low-confidence", mask_token_id=MASK,
                       temperature=0.0)
    _, st2 = sample_blocks(net, x, cfg2, torch.Generator())
    assert st2["nfe"] == 10


def test_threshold_commits_more_per_call():
    """Fast-dLLM: every candidate with p(x0) > threshold is committed when at least k are; a peaked network lets
    a whole block go in one call, where the plain schedule needs ``steps`` calls."""
    L, K = 9, 6
    logits = torch.zeros(L, K)
    logits[:, 4] = 12.0  # p(token 4) ~ 0.9999 everywhere
    net = lambda x: logits.expand(x.shape[0], -1, -1).clone()  # noqa: E731
    x = torch.full((2, L), MASK, dtype=torch.long)
    x[:, 0] = 0
    base = dict(gen_length=8, block_length=4, steps=4, remasking="low-confidence", mask_token_id=MASK, temperature=0.0)
    _, st_plain = sample_blocks(net, x, BlockConfig(**base), torch.Generator())
    out, st_thr = sample_blocks(net, x, BlockConfig(**base, threshold=0.9), torch.Generator())
    assert st_plain["nfe"] == 8 and st_thr["nfe"] == 2 and (out[:, 1:] == 4).all()
    assert st_thr["tokens_per_call"] == 4.0


def test_cached_network_gets_the_block_and_may_return_block_logits():
    L = 10
    x = torch.full((2, L), MASK, dtype=torch.long)
    x[:, :2] = 1
    plain, cached = CountingNet(L, 5, seed=2), CachedNet(L, 5, seed=2)
    cfg = BlockConfig(gen_length=8, block_length=4, steps=2, remasking="fhs", mask_token_id=MASK)
    a, _ = sample_blocks(plain, x, cfg, torch.Generator().manual_seed(0))
    b, _ = sample_blocks(cached, x, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and cached.blocks == [(2, 6), (2, 6), (6, 10), (6, 10)]


def test_float64_only_on_the_drawn_rows(monkeypatch):
    """fhs upcasts only the k chosen rows of each call; a confidence strategy only the block's open candidates;
    neither ever a (B, L, K) tensor."""
    import gensample.core.categorical as cat

    seen = []
    real = cat.masked_log_softmax
    monkeypatch.setattr(cat, "masked_log_softmax", lambda lg, *a, **k: seen.append(tuple(lg.shape)) or real(lg, *a, **k))
    B, P, G, K = 3, 2, 8, 40
    x = torch.full((B, P + G), MASK, dtype=torch.long)
    x[:, :P] = 1
    net = CountingNet(P + G, K)
    sample_blocks(net, x, BlockConfig(gen_length=G, block_length=4, steps=2, remasking="fhs", mask_token_id=MASK),
                  torch.Generator().manual_seed(0))
    assert len(seen) == 4 and all(s == (B * 2, K) for s in seen)  # 2 commits per call, 3 rows
    seen.clear()
    sample_blocks(net, x, BlockConfig(gen_length=G, block_length=4, steps=2, remasking="margin", mask_token_id=MASK),
                  torch.Generator().manual_seed(0))
    assert [s[0] for s in seen] == [B * 4, B * 2, B * 4, B * 2]  # open candidates of the block at each call


def test_confidence_scores_definitions():
    log_p = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]], dtype=torch.float64))
    x0 = torch.tensor([1, 0])
    torch.testing.assert_close(confidence_scores(log_p, x0, "low-confidence"), torch.tensor([0.3, 0.9], dtype=torch.float64))
    torch.testing.assert_close(confidence_scores(log_p, x0, "margin"), torch.tensor([0.2, 0.85], dtype=torch.float64))
    ent = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(confidence_scores(log_p, x0, "entropy"), -ent)
    with pytest.raises(ValueError, match="kind"):
        confidence_scores(log_p, x0, "max")


def test_top_k_top_p_filter_matches_the_nucleus_rule():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0, -1.0]])
    lp = masked_log_softmax(logits)
    k2 = filter_top_k_top_p(lp, top_k=2).exp()[0]
    assert (k2[[0, 2, 4]] == 0).all() and abs(float(k2.sum()) - 1) < 1e-12
    p = lp.exp()[0]  # sorted: 4 (0.64), 3 (0.24), 2 (0.09), ...
    nuc = filter_top_k_top_p(lp, top_p=0.7).exp()[0]
    assert (nuc > 0).tolist() == [False, True, False, True, False]  # 0.64 <= 0.7 before token 3: kept
    torch.testing.assert_close(nuc[[1, 3]], p[[1, 3]] / p[[1, 3]].sum())


@pytest.mark.parametrize("kw,match", [({"remasking": "greedy"}, "remasking"), ({"steps": 0}, "steps"),
                                      ({"temperature": -1.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                                      ({"threshold": 0.9}, "threshold"), ({"mask_token_id": None}, "mask_token_id"),
                                      ({"stop_at_eos": True}, "eos_token_id"), ({"top_k": 0}, "top_k")])
def test_config_errors_name_the_argument(kw, match):
    args = dict(gen_length=4, block_length=2, steps=2, remasking="fhs", mask_token_id=MASK)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        BlockConfig(**args)


def test_sample_blocks_input_errors():
    cfg = BlockConfig(gen_length=4, block_length=2, steps=2, mask_token_id=MASK)
    with pytest.raises(ValueError, match="int64"):
        sample_blocks(CountingNet(4, 3), torch.zeros(2, 4), cfg, torch.Generator())
    with pytest.raises(ValueError, match="gen_length"):
        sample_blocks(CountingNet(4, 3), torch.zeros(2, 3, dtype=torch.long), cfg, torch.Generator())
    with pytest.raises(TypeError, match="BlockConfig"):
        sample_blocks(CountingNet(4, 3), torch.zeros(2, 4, dtype=torch.long), {}, torch.Generator())
    nan_net = lambda x: torch.full((x.shape[0], 4, 3), float("nan"))  # noqa: E731
    with pytest.raises(ValueError, match="NaN"):
        sample_blocks(nan_net, torch.full((1, 4), MASK, dtype=torch.long), cfg, torch.Generator())


@pytest.mark.parametrize("remasking", ["fhs", "margin"])
def test_per_row_generators_make_rows_batch_independent(remasking):
    """With one generator per row, a row's tokens depend only on its own seed, not on the rest of the batch."""
    L, K = 9, 7
    net = CountingNet(L, K)
    x = torch.full((3, L), MASK + 10, dtype=torch.long)
    x[:, 0] = 1
    cfg = BlockConfig(gen_length=8, block_length=4, steps=2, remasking=remasking, mask_token_id=MASK + 10,
                      temperature=1.0)
    full, _ = sample_blocks(net, x, cfg, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone, _ = sample_blocks(net, x[1:2], cfg, [torch.Generator().manual_seed(6)])
    assert torch.equal(full[1:2], alone)
    other, _ = sample_blocks(net, x[1:2], cfg, [torch.Generator().manual_seed(8)])
    assert not torch.equal(other, alone)


# -- speed (no behaviour change): the row check and the entropy score ----------------------------------------------------
def test_row_check_is_one_reduction_unless_a_row_is_suspect(monkeypatch):
    """propose_tokens checks the drawn rows with one max-reduction; the entry-wise scan (isfinite / isnan over the
    (C, K) rows) runs only for a row whose max is not finite, and it still rejects NaN and all -inf rows."""
    from gensample.samplers.block_unmasking import propose_tokens

    seen = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.shape) or real(t))
    logits = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(0))
    where = torch.ones(2, 5, dtype=torch.bool)
    propose_tokens(logits, where, torch.Generator().manual_seed(1), kind="entropy")
    assert seen and all(len(s) == 1 for s in seen)  # only the (C,) maxima, never the (C, K) rows
    bad_nan, bad_inf, ok_plus_inf = logits.clone(), logits.clone(), logits.clone()
    bad_nan[1, 2, 7] = float("nan")
    bad_inf[0, 3] = float("-inf")
    ok_plus_inf[0, 1, 3] = float("inf")  # a finite entry remains: accepted, as before
    for bad in (bad_nan, bad_inf):
        with pytest.raises(ValueError, match="NaN or no finite entry"):
            propose_tokens(bad, where, torch.Generator().manual_seed(1), temperature=0)
    seen.clear()
    propose_tokens(ok_plus_inf, where, torch.Generator().manual_seed(1), temperature=0)
    assert any(len(s) == 2 for s in seen)  # the suspect row triggered the entry-wise scan


def test_entropy_score_equals_the_masked_sum_bitwise():
    """sum_v p_v log p_v with 0 log 0 = 0, on rows with excluded (-inf) and underflowing entries: identical bits to
    the where(p > 0, p log p, 0) form it replaces."""
    g = torch.Generator().manual_seed(3)
    lw = torch.randn(20, 300, generator=g, dtype=torch.float64) * 400  # log p down to ~ -1000: exp underflows
    lw[:, :30] = float("-inf")
    log_p = torch.log_softmax(lw, -1)
    p = log_p.exp()
    assert (p == 0).any() and torch.isfinite(log_p[p == 0]).any()  # both kinds of zero occur
    ref = torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    x0 = log_p.argmax(-1)
    assert torch.equal(confidence_scores(log_p, x0, "entropy"), ref)
