"""schedulers/first_hitting_block.py: FirstHittingBlockScheduler inside diffusers' LLaDA2Pipeline and
DiffusionGemmaPipeline (docs/masked_lms.md): token-for-token identity with the stock BlockRefinementScheduler at
temperature 0, every remasking runs in both pipelines, exact float64 first-hitting draws through ``step`` on a 50k
vocabulary, the face and ``sample_blocks`` share one step function, config round trips and errors."""

import pytest
import torch
from scipy import stats

from diffusers import BlockRefinementScheduler, DiscreteDDIMScheduler, LLaDA2Pipeline
from gensample.samplers import block_unmasking
from gensample.samplers.block_unmasking import REMASKING, BlockConfig, sample_blocks
from gensample.schedulers import FirstHittingBlockScheduler
from gensample.schedulers import first_hitting_block

V, MASK = 32, 31


# -- tiny models -------------------------------------------------------------------------------------------------------
class _Out:
    def __init__(self, logits):
        self.logits = logits


class TinyBidirectionalLM(torch.nn.Module):
    """A tiny random bidirectional LM with the LLaDA2Pipeline interface (``model(x, attention_mask=,
    position_ids=).logits``); every position sees a mean over the whole sequence. It never predicts the mask
    (logit -inf), as trained masked LMs do not: the stock scheduler does not exclude the mask id, ours does."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(V, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, V)

    dtype = property(lambda self: torch.float32)
    device = property(lambda self: self.head.weight.device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.mix(h)).mean(1, keepdim=True) + 0.3 * torch.sin(position_ids[..., None].float())
        logits = 3.0 * self.head(h)
        logits[..., MASK] = float("-inf")
        return _Out(logits)


def llada_pipe(scheduler):
    pipe = LLaDA2Pipeline(model=TinyBidirectionalLM(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StubProcessor:
    """Offline stand-in for a chat processor: a fixed 4-token template per prompt; decode joins the ids."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_tensors="pt",
                            return_dict=True):
        if isinstance(messages[0], dict):
            messages = [messages]
        ids = torch.tensor([[2, 5 + sum(map(ord, m[0]["content"])) % 40, 7, 9] for m in messages])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(map(str, s.tolist())) for s in seqs]


@pytest.fixture(scope="module")
def gemma_model():
    """A tiny random DiffusionGemmaForBlockDiffusion from a transformers config (offline, ~10k parameters)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, global_head_dim=8, sliding_window=8, max_position_embeddings=128,
                num_experts=2, top_k_experts=1, moe_intermediate_size=16,
                layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=None,
                                                                 canvas_length=6)).eval()
    # diffusers 0.42.1's pipeline passes `past_key_values=` to the decoder's mask builder, which transformers 5.25
    # names `cache=`: bridge the keyword on this instance (no other change).
    dec = model.model.decoder
    build = type(dec).create_diffusion_decoder_attention_mask
    dec.create_diffusion_decoder_attention_mask = lambda *, past_key_values=None, **kw: build(cache=past_key_values, **kw)
    return model


def gemma_pipe(model, scheduler):
    from diffusers import DiffusionGemmaPipeline

    pipe = DiffusionGemmaPipeline(model=model, scheduler=scheduler, processor=StubProcessor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


LLADA_ARGS = dict(input_ids=torch.tensor([[5, 6, 7], [1, 2, 3]]), use_chat_template=False, gen_length=20,
                  block_length=8, mask_token_id=MASK, output_type="seq")


# -- identity with the stock scheduler at temperature 0 ----------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=4, threshold=0.7, editing_threshold=0.5, eos_token_id=4),  # the pipeline defaults
    dict(num_inference_steps=8, threshold=2.0, editing_threshold=None, eos_token_id=None),  # plain top-k commits
    dict(num_inference_steps=3, threshold=0.3, editing_threshold=0.2, eos_token_id=None, max_post_steps=3),
])
def test_low_confidence_at_temperature_zero_reproduces_the_stock_llada2(kw):
    stock = llada_pipe(BlockRefinementScheduler())(temperature=0.0, **LLADA_ARGS, **kw).sequences
    ours_sched = FirstHittingBlockScheduler.from_config(BlockRefinementScheduler().config, remasking="low-confidence")
    ours = llada_pipe(ours_sched)(temperature=0.0, **LLADA_ARGS, **kw).sequences
    assert torch.equal(stock, ours)
    # power: another strategy on the same model gives other tokens
    margin = FirstHittingBlockScheduler.from_config(BlockRefinementScheduler().config, remasking="entropy")
    assert not torch.equal(stock, llada_pipe(margin)(temperature=0.0, **LLADA_ARGS, **kw).sequences)


@pytest.mark.parametrize("threshold", [0.95, 0.02])
def test_low_confidence_at_temperature_zero_reproduces_the_stock_diffusion_gemma(gemma_model, threshold):
    kw = dict(prompt=["hi", "there"], gen_length=12, num_inference_steps=4, temperature=0.0, eos_early_stop=False,
              output_type="seq", confidence_threshold=None)
    stock = gemma_pipe(gemma_model, BlockRefinementScheduler(threshold=threshold))(
        generator=torch.Generator().manual_seed(0), **kw).sequences
    ours_sched = FirstHittingBlockScheduler.from_config(BlockRefinementScheduler(threshold=threshold).config,
                                                        remasking="low-confidence")
    ours = gemma_pipe(gemma_model, ours_sched)(generator=torch.Generator().manual_seed(0), **kw).sequences
    assert torch.equal(stock, ours)
    other = FirstHittingBlockScheduler.from_config(ours_sched.config, remasking="margin")
    assert not torch.equal(stock, gemma_pipe(gemma_model, other)(generator=torch.Generator().manual_seed(0), **kw).sequences)


# -- every strategy runs in both pipelines -----------------------------------------------------------------------------
@pytest.mark.parametrize("remasking", REMASKING)
def test_every_remasking_runs_in_llada2(remasking):
    sched = FirstHittingBlockScheduler.from_config(BlockRefinementScheduler().config, remasking=remasking, top_k=8)
    pipe = llada_pipe(sched)
    out = pipe(temperature=1.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0), **LLADA_ARGS)
    again = pipe(temperature=1.0, num_inference_steps=4, generator=torch.Generator().manual_seed(0), **LLADA_ARGS)
    assert out.sequences.shape == (2, 20) and not (out.sequences == MASK).any()
    assert torch.equal(out.sequences, again.sequences)  # the same seed, the same tokens


@pytest.mark.parametrize("remasking", REMASKING)
def test_every_remasking_runs_in_diffusion_gemma_and_the_corrector_key_is_dropped(gemma_model, remasking):
    # from a DiscreteDDIM config with a corrector: its corrector keys must not survive into our config
    sched = FirstHittingBlockScheduler.from_config(DiscreteDDIMScheduler(corrector_steps=2).config, remasking=remasking)
    assert getattr(sched.config, "corrector_steps", 0) == 0
    out = gemma_pipe(gemma_model, sched)(prompt="hi", gen_length=12, num_inference_steps=4, temperature=1.0,
                                         eos_early_stop=False, output_type="text",
                                         generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (1, 12) and len(out.texts) == 1


# -- exact first hitting through step ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mask", "uniform"])
def test_fhs_step_draws_one_open_position_from_the_softmax_on_a_50k_vocabulary(mode):
    """One open position per row (mask mode: one mask; uniform mode: one uncommitted position), temperature 1:
    the committed token is a float64 draw from softmax(logits). n = 1200 rows in one step; chi-square over 11
    bins (head + 10 tail bins of ~5000 tokens with p ~ 3e-6 to 3e-5 each, ~60 expected per bin), p > 1e-3;
    power: the law at temperature 1.5 is rejected."""
    from test_block_unmasking import binned_counts, chi2_p, tiny_prob_logits  # tests/ is on sys.path (rootdir mode)

    logits = tiny_prob_logits()
    Vb = logits.numel()
    n = 1200
    sched = FirstHittingBlockScheduler(remasking="fhs", temperature=1.0)
    sched.set_timesteps(1, block_length=1)
    model_output = logits.view(1, 1, Vb).expand(n, 1, Vb)
    g = torch.Generator().manual_seed(5)
    if mode == "mask":
        sample = torch.full((n, 1), Vb, dtype=torch.long)  # mask id Vb (outside the logits: nothing to exclude)
        out = sched.step(model_output, 0, sample, mask_token_id=Vb, generator=g)
    else:
        sample = torch.zeros((n, 1), dtype=torch.long)
        out = sched.step(model_output, 0, sample, mask_token_id=None, generator=g)
    assert out.transfer_index.all()
    p = torch.softmax(logits.double(), 0)
    cnt, pb = binned_counts(out.prev_sample[:, 0], p, bins=10)
    assert chi2_p(cnt, pb) > 1e-3
    _, pb_hot = binned_counts(out.prev_sample[:, 0], torch.softmax(logits.double() / 1.5, 0), bins=10)
    assert chi2_p(cnt, pb_hot) < 1e-6


def test_fhs_block_time_law_through_the_face():
    """Reveal times of a block through ``step`` (one commit per step, 5 masks, linear): the pooled times are
    U(0, 1) (5 iid masking times), KS p > 1e-3 over 2000 rows; power: they are not U(0, 1)^2."""
    B, W = 2000, 5
    sched = FirstHittingBlockScheduler(remasking="fhs", temperature=1.0)
    sched.set_timesteps(W, block_length=W)
    logits = torch.zeros(B, W, 7)
    x = torch.full((B, W), 7, dtype=torch.long)
    g = torch.Generator().manual_seed(6)
    times = []
    for i in range(W):
        out = sched.step(logits, i, x, mask_token_id=7, generator=g)
        x = out.prev_sample
        times.append(out.t)
    assert (x != 7).all()
    pooled = torch.cat(times).numpy()
    assert stats.kstest(pooled, "uniform").pvalue > 1e-3
    assert stats.kstest(pooled**0.5, "uniform").pvalue < 1e-6


# -- one step function for both faces ----------------------------------------------------------------------------------
@pytest.mark.parametrize("remasking", REMASKING)
def test_face_and_sample_blocks_share_the_step_and_agree_token_for_token(remasking):
    """A loop of ``step`` over one all-mask block gives exactly ``sample_blocks``' tokens for the same seed:
    both call ``block_unmasking.unmask_step`` and draw in the same order."""
    assert first_hitting_block.unmask_step is block_unmasking.unmask_step
    B, P, W, K, steps = 3, 2, 6, 9, 3
    net_logits = torch.randn(P + W, K, generator=torch.Generator().manual_seed(0))
    net = lambda x: net_logits.expand(x.shape[0], -1, -1)  # noqa: E731
    x = torch.full((B, P + W), K, dtype=torch.long)
    x[:, :P] = 1
    cfg = BlockConfig(gen_length=W, block_length=W, steps=steps, remasking=remasking, mask_token_id=K,
                      temperature=0.8, top_p=0.9)
    ref, st = sample_blocks(net, x, cfg, torch.Generator().manual_seed(1))
    sched = FirstHittingBlockScheduler(remasking=remasking, temperature=0.8, top_p=0.9, threshold=None)
    sched.set_timesteps(steps, block_length=W)
    g = torch.Generator().manual_seed(1)
    y = x.clone()
    for i in range(steps):
        out = sched.step(net(y)[:, P:], i, y[:, P:], mask_token_id=K, generator=g)
        y[:, P:] = out.prev_sample
    assert torch.equal(y, ref) and st["nfe"] == steps


# -- protocol details --------------------------------------------------------------------------------------------------
def test_check_eos_finished_and_should_continue_match_the_stock():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        cur_x = torch.randint(0, 4, (3, 7), generator=g)  # 2 = eos, 3 = mask
        sampled = torch.randint(0, 4, (3, 4), generator=g)
        transfer = torch.rand(3, 4, generator=g) < 0.5
        fin = torch.rand(3, generator=g) < 0.2
        pl = int(torch.randint(0, 4, (1,), generator=g))
        a = BlockRefinementScheduler.check_eos_finished(cur_x, sampled, transfer, fin.clone(), 2, 3, pl)
        b = FirstHittingBlockScheduler.check_eos_finished(cur_x, sampled, transfer, fin.clone(), 2, 3, pl)
        assert torch.equal(a, b)
    stock, ours = BlockRefinementScheduler(), FirstHittingBlockScheduler()
    stock.set_timesteps(4), ours.set_timesteps(4)
    for step in (2, 4):
        for masks in (True, False):
            for edit_on in (True, False):
                for edited in (True, False):
                    for post in (1, 5):
                        for fin in (torch.tensor([False, True]), torch.tensor([True, True])):
                            args = (step, masks, edit_on, torch.tensor([edited]), post, 3, fin)
                            assert stock.check_block_should_continue(*args) == ours.check_block_should_continue(*args)


def test_fhs_never_edits_and_ignores_the_pipeline_threshold():
    sched = FirstHittingBlockScheduler(remasking="fhs")
    sched.set_timesteps(4, block_length=4)  # one commit per step
    sample = torch.tensor([[10, 20, MASK, MASK]])
    logits = torch.zeros(1, 4, V)
    logits[..., 15] = 20.0  # confident everywhere: the stock rule would edit and commit both masks by threshold
    out = sched.step(logits, 0, sample, mask_token_id=MASK, threshold=0.5, editing_threshold=0.1,
                     generator=torch.Generator().manual_seed(0))
    assert not out.editing_transfer_index.any() and int(out.transfer_index.sum()) == 1
    assert out.prev_sample[0, :2].tolist() == [10, 20]


def test_config_round_trip_errors_and_call_before_set_timesteps(tmp_path):
    sched = FirstHittingBlockScheduler(remasking="margin", temperature=0.5, top_k=5, exclude_ids=[0, 1])
    sched.save_config(tmp_path)
    again = FirstHittingBlockScheduler.from_pretrained(tmp_path)
    assert again.config.remasking == "margin" and list(again.config.exclude_ids) == [0, 1]
    with pytest.raises(ValueError, match="remasking"):
        FirstHittingBlockScheduler(remasking="greedy")
    with pytest.raises(ValueError, match="top_p"):
        FirstHittingBlockScheduler(top_p=2.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        FirstHittingBlockScheduler().step(torch.zeros(1, 2, 4), 0, torch.zeros(1, 2, dtype=torch.long))
    s = FirstHittingBlockScheduler()
    s.set_timesteps(2, block_length=2)
    with pytest.raises(ValueError, match="sampling_method"):
        s.step(torch.zeros(1, 2, 4), 0, torch.zeros(1, 2, dtype=torch.long), mask_token_id=3, sampling_method="beam")
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)


def test_exclude_ids_and_mask_are_never_drawn():
    sched = FirstHittingBlockScheduler(remasking="random", temperature=1.0, exclude_ids=[0])
    sched.set_timesteps(1, block_length=8)
    logits = torch.zeros(50, 8, 4)
    logits[..., 0] = 5.0
    logits[..., 3] = 5.0  # the mask id: likely, yet never drawn
    out = sched.step(logits, 0, torch.full((50, 8), 3, dtype=torch.long), mask_token_id=3,
                     generator=torch.Generator().manual_seed(0))
    assert out.transfer_index.all() and set(out.prev_sample.unique().tolist()) <= {1, 2}


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (7, 0.8), (1, None), (None, 0.05)])
def test_top_k_top_p_keep_the_stock_supports_and_draws_follow_the_filtered_law(top_k, top_p):
    """The float64 filters keep exactly the tokens the stock float32 filters keep (random logits, 40 rows), and
    the face's draws at temperature 0.7 follow the renormalised filtered law: chi-square over the kept tokens,
    n = 6000 draws of one row, p > 1e-3; power: the unfiltered law is rejected (it puts mass outside)."""
    from gensample.core.categorical import sampling_log_probs

    logits = torch.randn(40, 30, generator=torch.Generator().manual_seed(0)) * 2
    scaled = logits / 0.7
    stock = BlockRefinementScheduler._top_p_filtering(BlockRefinementScheduler._top_k_filtering(scaled, top_k), top_p)
    stock_kept = stock > torch.finfo(stock.dtype).min
    ours = sampling_log_probs(logits, temperature=0.7, top_k=top_k, top_p=top_p)
    assert torch.equal(ours > float("-inf"), stock_kept)
    n = 6000
    sched = FirstHittingBlockScheduler(remasking="random", temperature=0.7, top_k=top_k, top_p=top_p)
    sched.set_timesteps(1, block_length=1)
    out = sched.step(logits[:1].view(1, 1, 30).expand(n, 1, 30), 0, torch.full((n, 1), 30, dtype=torch.long),
                     mask_token_id=30, generator=torch.Generator().manual_seed(2))
    draws = out.prev_sample[:, 0]
    p = ours[0].exp()
    counts = torch.bincount(draws, minlength=30).double()
    assert counts[p == 0].sum() == 0
    keep = p > 0
    if int(keep.sum()) > 1:
        assert stats.chisquare(counts[keep].numpy(), (p[keep] * n).numpy()).pvalue > 1e-3
    p_raw = torch.softmax(logits[0].double() / 0.7, 0)
    assert stats.chisquare(counts.numpy(), (p_raw * n).numpy()).pvalue < 1e-6
