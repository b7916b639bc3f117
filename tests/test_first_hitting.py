"""samplers/first_hitting.py: schedules, NFE accounting, caching, prompts, determinism, the scheduler's
own errors and add_noise, and the CLI / API faces (docs/first_hitting.md). The generic diffusers
scheduler contract of MaskedDiffusionScheduler is tests/test_scheduler_contract.py."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample import api
from gensample.cli import main
from gensample.models.markov import TOY_CHAIN, MarkovChain, MarkovDenoiser, toy_chain
from gensample.samplers.first_hitting import (
    MaskedDiffusionConfig,
    expected_ancestral_nfe,
    initial_tokens,
    mask_alpha,
    mask_alpha_inv,
    sample_ancestral,
    sample_first_hitting,
)
from gensample.schedulers.first_hitting import MaskedDiffusionScheduler

MASK = 3



class CountingNet:
    """Uniform logits over K real tokens; records every input batch (a call-counting dummy)."""

    def __init__(self, K: int = 3):
        self.K, self.inputs, self.times = K, [], []

    def __call__(self, input_ids, time=None):
        self.inputs.append(input_ids.clone())
        self.times.append(time)
        return torch.zeros(*input_ids.shape, self.K)


# -- schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_schedules_decrease_from_one_and_invert(schedule):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a = mask_alpha(t, schedule)
    assert a[0] == 1.0 and (a[1:] < a[:-1]).all() and a[-1] < 1e-2
    torch.testing.assert_close(mask_alpha_inv(a, schedule), t, rtol=0, atol=1e-9)


def test_schedule_and_config_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        mask_alpha(0.5, "sigmoid")
    for kw, match in [({"schedule": "x"}, "schedule"), ({"final_step": "greedy"}, "final_step"),
                      ({"precision": "bf16"}, "precision"), ({"tokens_per_step": 0}, "tokens_per_step"),
                      ({"t_min": 1.0}, "t_min"), ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(ValueError, match=match):
            MaskedDiffusionConfig(mask_token_id=3, **kw)


# -- NFE (docs/first_hitting.md, oracles) ----------------------------------------------------------------------------
@pytest.mark.parametrize("k,length,prompt", [(1, 10, 0), (1, 10, 3), (3, 10, 3), (4, 12, 0), (20, 6, 1)])
def test_fhs_makes_exactly_ceil_n_over_k_calls(k, length, prompt):
    net = CountingNet()
    x = initial_tokens(5, length, MASK, [1] * prompt)
    cfg = MaskedDiffusionConfig(mask_token_id=MASK, tokens_per_step=k)
    out, st = sample_first_hitting(net, x, cfg, torch.Generator().manual_seed(0))
    n = length - prompt
    assert st["nfe"] == len(net.inputs) == math.ceil(n / k)
    assert (out != MASK).all() and (out[:, :prompt] == 1).all()
    # every call sees exactly min(k, n) fewer masks than the previous one
    masks = [int((inp == MASK).sum(1)[0]) for inp in net.inputs]
    assert masks == [n - j * k for j in range(math.ceil(n / k))]


def test_ancestral_mean_nfe_matches_formula():
    """Spec: E[NFE] = 1 + (N-1)(1 - (1-1/N)^L) (linear, grid to 0); our sampler skips rows without
    masks, which subtracts (1-1/N)^L. Within 3 standard errors over 20 batches."""
    N, L, B, reps = 8, 8, 200, 20
    cfg = MaskedDiffusionConfig(mask_token_id=MASK, num_inference_steps=N, t_min=0.0)
    g = torch.Generator().manual_seed(1)
    per_row = []
    for _ in range(reps):
        _, st = sample_ancestral(CountingNet(), initial_tokens(B, L, MASK), cfg, g)
        per_row.append(st["model_rows"] / B)  # rows are re-evaluated only when they changed
    mean, se = np.mean(per_row), np.std(per_row, ddof=1) / math.sqrt(reps)
    ref = expected_ancestral_nfe(N, L)
    assert abs(mean - ref) < 3 * se, f"mean NFE {mean:.3f} +- {se:.3f}, formula {ref:.3f}"
    # power: the uncached count (N evaluations per row) and the spec's count (a call after the last
    # reveal too, 5.595 here) are both far outside
    assert abs(N - mean) > 10 * se
    assert abs(expected_ancestral_nfe(N, L, skip_finished=False) - mean) > 10 * se


def test_no_model_call_after_an_unchanged_step():
    net = CountingNet()
    cfg = MaskedDiffusionConfig(mask_token_id=MASK, num_inference_steps=64, t_min=0.0)
    out, st = sample_ancestral(net, initial_tokens(1, 6, MASK), cfg, torch.Generator().manual_seed(2))
    assert st["nfe"] < 64 and (out != MASK).all()
    for prev, cur in zip(net.inputs[:-1], net.inputs[1:]):
        assert not torch.equal(prev, cur), "the model was called again on an unchanged sequence"
    # without the cache: one call per step while masks remain
    net2 = CountingNet()
    cfg2 = MaskedDiffusionConfig(mask_token_id=MASK, num_inference_steps=64, t_min=0.0, cache=False)
    sample_ancestral(net2, initial_tokens(1, 6, MASK), cfg2, torch.Generator().manual_seed(2))
    assert len(net2.inputs) > len(net.inputs)


def test_time_conditioned_network_gets_sigma_of_the_new_time():
    net = CountingNet()
    cfg = MaskedDiffusionConfig(mask_token_id=MASK, time_conditioning=True)
    sample_first_hitting(net, initial_tokens(2, 5, MASK), cfg, torch.Generator().manual_seed(3))
    sig = torch.stack(net.times)  # (5, 2) sigma(tau) = -log(1 - tau), increasing alpha -> decreasing sigma
    assert (sig[1:] < sig[:-1]).all() and (sig > 0).all()


# -- invariants and determinism (docs/first_hitting.md, oracles) -----------------------------------------------------------
@pytest.mark.parametrize("sampler,extra", [("fhs", {}), ("fhs", {"tokens_per_step": 2}),
                                           ("mdm-ancestral", {"steps": 5}), ("mdm-ancestral", {"final_step": "argmax", "steps": 3})])
def test_api_prompt_fixed_no_mask_deterministic(sampler, extra):
    kw = dict(model="markov-toy", num_samples=12, prompt="2 2", progress=False, **extra)
    a = api.run(sampler, seed=5, batch_size=5, **kw)
    b = api.run(sampler, seed=5, batch_size=12, **kw)
    c = api.run(sampler, seed=6, batch_size=12, **kw)
    tokens = a.samples["tokens"]
    assert tokens.shape == (12, 4) and tokens.dtype == np.int64
    assert (tokens[:, :2] == 2).all() and (tokens != MASK).all() and (tokens < 3).all()
    assert np.array_equal(tokens, b.samples["tokens"])  # same seed, any batch size
    assert not np.array_equal(tokens, c.samples["tokens"])
    assert a.record["stats"]["nfe"] > 0 and "categorical_time_s" in a.record["stats"]


def test_scheduler_loop_equals_function_loop():
    chain = toy_chain()
    net = MarkovDenoiser(chain)
    x0 = initial_tokens(6, 4, MASK)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]  # noqa: E731
    ref, _ = sample_first_hitting(net, x0, MaskedDiffusionConfig(mask_token_id=MASK), gens())
    sched = MaskedDiffusionScheduler(mask_token_id=MASK)
    sched.set_timesteps(num_masked=4)
    x, g = x0, gens()
    for ts in sched.timesteps:
        x = sched.step(net(x), ts, x, generator=g).prev_sample
    assert torch.equal(x, ref)
    anc_ref, _ = sample_ancestral(net, x0, MaskedDiffusionConfig(mask_token_id=MASK, num_inference_steps=5), gens())
    sched = MaskedDiffusionScheduler(mask_token_id=MASK, sampler="ancestral")
    sched.set_timesteps(5)
    x, g = x0, gens()
    for ts in sched.timesteps:
        x = sched.step(net(x), ts, x, generator=g).prev_sample
    assert torch.equal(x, anc_ref)


# -- scheduler: errors and add_noise (the generic diffusers contract, over both samplers and their
# config variants, is tests/test_scheduler_contract.py) -------------------------------------------------
def test_scheduler_errors_and_add_noise():
    with pytest.raises(ValueError, match="sampler must be one of"):
        MaskedDiffusionScheduler(sampler="maskgit")
    with pytest.raises(ValueError, match="num_inference_steps"):
        MaskedDiffusionScheduler(sampler="ancestral").set_timesteps()
    sched = MaskedDiffusionScheduler(mask_token_id=7)
    with pytest.raises(TypeError, match="LongTensor"):
        sched.set_timesteps(num_masked=2)
        sched.step(torch.zeros(1, 2, 7), 0, torch.zeros(1, 2))
    x0 = torch.zeros(4000, 50, dtype=torch.long)
    noisy = sched.add_noise(x0, 0.3, generator=torch.Generator().manual_seed(0))
    frac = (noisy == 7).double().mean().item()
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / x0.numel())
    with pytest.raises(ValueError, match="timesteps"):
        sched.add_noise(x0, 1.5)


# -- models ------------------------------------------------------------------------------------------
def test_markov_chain_validation_and_file_prefix(tmp_path):
    with pytest.raises(ValueError, match="sum to 1"):
        MarkovChain([0.5, 0.4], [[1, 0], [0, 1]], 3)
    with pytest.raises(ValueError, match="shape"):
        MarkovChain([0.5, 0.5], [[1, 0, 0]], 3)
    f = tmp_path / "chain.json"
    f.write_text(json.dumps({**TOY_CHAIN, "length": 6}))
    res = api.run("fhs", model=f"markov:{f}", num_samples=4, progress=False)
    assert res.samples["tokens"].shape == (4, 6)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"initial": [1.0]}))
    with pytest.raises(ValueError, match="lacks keys"):
        api.run("fhs", model=f"markov:{bad}", num_samples=1, progress=False)


def test_mdm_text_demo_model_loads_and_samples():
    res = api.run("fhs", num_samples=2, length=24, prompt="The ", progress=False)
    assert res.record["model"] == "mdm-text" and res.record["nfe"] == 20
    tokens = res.samples["tokens"]
    assert tokens.shape == (2, 24) and (tokens < 95).all()


def test_hf_masked_lm_adapter(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefgh")
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    res = api.run("fhs", model=f"mlm:{tmp_path}", num_samples=3, length=10, prompt="a b", progress=False)
    tokens = res.samples["tokens"]
    assert tokens.shape == (3, 10) and (tokens >= 5).all()  # never a special or mask id
    assert (tokens[:, :2] == [5, 6]).all() and res.record["nfe"] == 8


# -- CLI ---------------------------------------------------------------------------------------------
def test_cli_writes_tokens_text_and_stats(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--sampler", "mdm-ancestral", "--model", "markov-toy", "-n", "6",
                                  "--steps", "3", "--precision", "float32", "--temperature", "0.5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    with np.load(out / "samples.npz") as z:
        assert z["tokens"].shape == (6, 4)
    lines = (out / "samples.txt").read_text().splitlines()
    assert len(lines) == 6 and all(len(line.split()) == 4 for line in lines)
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["precision"] == "float32" and rec["stats"]["categorical_time_s"] > 0 and rec["nfe"] >= 1


@pytest.mark.parametrize("args,match", [
    (["--sampler", "fhs", "--steps", "10"], "--steps does not apply"),
    (["--sampler", "fhs", "--prompt", "0 1 2 0"], "shorter than --length"),
    (["--sampler", "fhs", "--prompt", "0 7"], "prompt token ids"),
    (["--sampler", "fhs", "--tokens-per-step", "0"], "--tokens-per-step must be >= 1"),
    (["--sampler", "mdm-ancestral", "--model", "gmm2d"], "needs a model of kind"),
    (["--sampler", "ddim", "--model", "markov-toy"], "needs a model of kind"),
    (["--sampler", "fhs", "--model", "mlm:/nonexistent/folder"], "not a local folder"),
    (["--sampler", "fhs", "--model", "markov:/nonexistent.json"], "cannot read Markov chain file"),
])
def test_cli_user_errors_exit_2(tmp_path, args, match):
    if "--model" not in args:
        args = args + ["--model", "markov-toy"]
    r = CliRunner().invoke(main, ["run", *args, "-n", "2", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output


def test_cli_precision_choice_rejected():
    r = CliRunner().invoke(main, ["run", "--sampler", "fhs", "--model", "markov-toy", "--precision", "bf16"])
    assert r.exit_code == 2 and "float64" in r.output


# -- memory / randomness layout (issue: float64 only on the rows that are sampled) ------------------
def test_fhs_upcasts_only_the_sampled_rows_and_ancestral_only_masked_rows(monkeypatch):
    import gensample.core.categorical as cat

    seen_softmax, seen_uniform = [], []
    real_lsm, real_uniform = cat.masked_log_softmax, cat.uniform
    monkeypatch.setattr(cat, "masked_log_softmax", lambda lg, *a, **k: seen_softmax.append(lg.shape) or real_lsm(lg, *a, **k))
    monkeypatch.setattr(cat, "uniform", lambda shape, *a, **k: seen_uniform.append(tuple(shape)) or real_uniform(shape, *a, **k))
    B, L, K = 3, 9, 40
    net = CountingNet(K)
    x = initial_tokens(B, L, K, [1, 2])  # mask id K; two prompt tokens never masked
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    sample_first_hitting(net, x, MaskedDiffusionConfig(mask_token_id=K, exclude_ids=(0,)), gens)
    assert seen_softmax and max(s[0] for s in seen_softmax) <= 1 and all(len(s) == 2 for s in seen_softmax)
    seen_softmax.clear(), seen_uniform.clear()
    cfg = MaskedDiffusionConfig(mask_token_id=K, num_inference_steps=1, t_min=0.0)
    sample_ancestral(net, x, cfg, gens)  # one step from all-mask (prompt excepted) to t = 0
    masked_per_row = L - 2
    # the step to t = 0 reveals every masked position: one move uniform and one K-wide token row each,
    # never anything for the prompt
    assert sum(s[0] for s in seen_softmax) == B * masked_per_row
    token_draws = [s for s in seen_uniform if len(s) == 2 and s[1] == K]
    assert sum(s[0] for s in token_draws) == B * masked_per_row
    assert not [s for s in seen_uniform if len(s) == 2 and s[1] == K + 1]


def test_ancestral_draws_token_rows_only_where_a_token_changes(monkeypatch):
    """Item: the cached ancestral sampler draws a V-wide float64 row only for a position that is revealed
    in that step (each position exactly once over the run), not for every masked position at every grid
    step; the per-step move decision costs one uniform per masked position."""
    import gensample.core.categorical as cat

    seen_uniform, seen_softmax = [], []
    real_uniform, real_lsm = cat.uniform, cat.masked_log_softmax
    monkeypatch.setattr(cat, "uniform", lambda shape, *a, **k: seen_uniform.append(tuple(shape)) or real_uniform(shape, *a, **k))
    monkeypatch.setattr(cat, "masked_log_softmax", lambda lg, *a, **k: seen_softmax.append(lg.shape) or real_lsm(lg, *a, **k))
    B, L, K, N = 2, 12, 30, 64
    for gens in (torch.Generator().manual_seed(0), [torch.Generator().manual_seed(i) for i in range(B)]):
        seen_uniform.clear(), seen_softmax.clear()
        cfg = MaskedDiffusionConfig(mask_token_id=K, num_inference_steps=N, t_min=0.0)
        out, _ = sample_ancestral(CountingNet(K), initial_tokens(B, L, K), cfg, gens)
        assert (out != K).all()
        assert sum(s[0] for s in seen_uniform if len(s) == 2 and s[1] == K) == B * L  # one token row per position
        assert sum(s[0] for s in seen_softmax) == B * L  # float64 rows: the revealed positions only
        assert not [s for s in seen_uniform if len(s) == 2 and s[1] == K + 1]


def test_ancestral_step_law_two_stage_matches_posterior():
    """One step t -> s from all-mask: P(stay) = (1 - a_s) / (1 - a_t), P(v) = (a_s - a_t) / (1 - a_t) mu_v
    (MDLM reverse posterior). Chi-square over 4 cells on 60,000 positions, fixed seed; the float32
    emulation path (one Gumbel-max over K + 1) is held to the same law. alpha = 1e-3 (3.3 sigma)."""
    from scipy import stats

    from gensample.samplers.first_hitting import ancestral_step

    K, n = 3, 60_000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))[None, None].expand(1, n, K).contiguous()
    x = torch.full((1, n), K)
    t, s = 0.8, 0.5
    a_t, a_s = 1 - t, 1 - s
    p = np.array([(a_s - a_t) / (1 - a_t) * m for m in (0.5, 0.3, 0.2)] + [(1 - a_s) / (1 - a_t)])
    for prec in ("float64", "float32"):
        cfg = MaskedDiffusionConfig(mask_token_id=K, precision=prec)
        out = ancestral_step(x, logits, t, s, cfg, torch.Generator().manual_seed(7))
        counts = np.bincount(out[0].numpy(), minlength=K + 1)
        assert stats.chisquare(counts, n * p).pvalue > 1e-3, (prec, counts, n * p)


def test_ancestral_chunks_keep_the_law_and_are_batch_independent():
    from gensample.core.categorical import sample_rows

    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    owner = torch.arange(50) // 10
    a = sample_rows(logits, owner, [torch.Generator().manual_seed(i) for i in range(5)], chunk_entries=16)
    b = sample_rows(logits[10:20], torch.zeros(10, dtype=torch.long), [torch.Generator().manual_seed(1)], chunk_entries=16)
    assert torch.equal(a[10:20], b)  # row 1's draws depend only on its own generator


def test_scheduler_step_honours_the_timestep_it_is_given():
    net = CountingNet(3)
    x0 = initial_tokens(4, 6, MASK)
    sched = MaskedDiffusionScheduler(mask_token_id=MASK, sampler="ancestral")
    sched.set_timesteps(4)  # grid 1, 0.75, 0.5, 0.25, 1e-5 (+ 0)
    # skipping to the grid time 0.5 steps 0.5 -> 0.25, whatever the internal counter says
    out = sched.step(net(x0), sched.timesteps[2], x0, generator=torch.Generator().manual_seed(0))
    assert out.t[0].item() == pytest.approx(sched.timesteps[3].item())
    # the last grid point steps to 0 and fills every mask
    sched.set_timesteps(4)
    last = sched.step(net(x0), sched.timesteps[-1], x0, generator=torch.Generator().manual_seed(0))
    assert last.t[0].item() == 0.0 and (last.prev_sample != MASK).all()
    with pytest.raises(ValueError, match="timestep"):
        sched.step(net(x0), 1.5, x0)
    fhs = MaskedDiffusionScheduler(mask_token_id=MASK)
    fhs.set_timesteps(num_masked=6)
    with pytest.raises(ValueError, match="first-hitting counters"):
        fhs.step(net(x0), 17, x0)
