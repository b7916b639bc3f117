"""sample_mar with fixed orders and noise (``orders=``, ``noise_fn=``), the hooks the golden test of
the reference MAR loop uses (tests/test_mar_release.py): they reproduce the default per-image
generator draws exactly, and wrong inputs are refused with the argument named."""

import pytest
import torch

from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.mar import MAR_SCHEDULER_CONFIG
from gensample.models.mar_backbone import MARConfig, MARModel
from gensample.samplers.disa import DiSAConfig, HeadDDPM, StepBudgetSchedule, sample_mar

N, C, B = 16, 16, 2


@pytest.fixture(scope="module")
def tiny():
    cfg = MARConfig(seq_len=N, token_dim=C, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=10, buffer_size=4,
                    diffloss_d=1, diffloss_w=32)
    return MARModel(cfg).init_random(torch.Generator().manual_seed(0)).eval()


def _run(model, seeds, guidance=2.0, **kw):
    ddpm = HeadDDPM(alphas_cumprod_from_config(MAR_SCHEDULER_CONFIG), variance_type="learned_range")
    cfg = DiSAConfig(ar_steps=4, schedule=StepBudgetSchedule("linear", 6, 2), temperature=0.8, guidance_scale=guidance)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return sample_mar(model.backbone, model.diffloss.net, ddpm, cfg, gens, num_tokens=N, token_dim=C,
                          class_labels=torch.tensor([3, 5]), null_class=10, **kw)[0]


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_fixed_orders_and_noise_reproduce_the_generator_draws(tiny, guidance):
    """The hooks follow the default convention: orders = randperm(N) per image, then at iteration k,
    for x_T and every head step, (n_k, C) per image from its generator, stacked image-major."""
    seeds = [11, 12]
    want = _run(tiny, seeds, guidance)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    orders = torch.stack([torch.randperm(N, generator=g) for g in gens])
    calls = []

    def noise_fn(k, shape):
        calls.append((k, shape))
        n_k = shape[0] // B
        return torch.cat([torch.randn((n_k, C), generator=g) for g in gens])

    got = _run(tiny, [0, 0], guidance, orders=orders, noise_fn=noise_fn)  # the generators are not used
    assert torch.equal(got, want)
    assert [k for k, _ in calls] == sorted(k for k, _ in calls) and {s[1] for _, s in calls} == {C}
    # another order gives another sample (the orders are used)
    assert not torch.equal(_run(tiny, [0, 0], guidance, orders=orders.flip(1), noise_fn=lambda k, s: torch.zeros(s)),
                           _run(tiny, [0, 0], guidance, orders=orders, noise_fn=lambda k, s: torch.zeros(s)))


@pytest.mark.parametrize("orders, message", [
    (torch.arange(N).repeat(B + 1, 1), r"shape \(2, 16\)"),
    (torch.arange(N).repeat(B, 1).float(), "integer tensor"),
    (torch.zeros(B, N, dtype=torch.long), "permutation of 0..15"),
    ([list(range(N))] * B, "must be a torch.Tensor"),
])
def test_bad_orders_refused(tiny, orders, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _run(tiny, [0, 1], orders=orders)


def test_bad_noise_shape_refused(tiny):
    with pytest.raises(ValueError, match=r"noise_fn\(0, \(\d+, 16\)\) must return a tensor of shape"):
        _run(tiny, [0, 1], noise_fn=lambda k, shape: torch.zeros(shape[0], shape[1] + 1))


def test_iterations_with_no_token_are_skipped(tiny):
    """docs/disa.md: with K > N, MAR's mask rule leaves one token masked for several iterations
    (the reference's head fails on the empty batch); they run the backbone, draw no noise, and the
    last iteration draws the remaining token."""
    ddpm = HeadDDPM(alphas_cumprod_from_config(MAR_SCHEDULER_CONFIG), variance_type="learned_range")
    cfg = DiSAConfig(ar_steps=20, schedule=StepBudgetSchedule("constant", 3, 3))
    calls = []

    def noise_fn(k, shape):
        calls.append(k)
        return torch.randn(shape, generator=torch.Generator().manual_seed(len(calls)))

    with torch.no_grad():
        tokens, stats = sample_mar(tiny.backbone, tiny.diffloss.net, ddpm, cfg, [torch.Generator()] * B, num_tokens=N,
                                   token_dim=C, class_labels=torch.tensor([3, 5]), null_class=10, noise_fn=noise_fn)
    assert stats["head_steps"] == [3] * 15 + [0] * 4 + [3] and stats["backbone_calls"] == 20
    assert sorted(set(calls)) == [*range(15), 19] and len(calls) == 16 * 4  # x_T + 3 steps per drawing iteration
    assert (tokens != 0).all(dim=-1).all()  # every slot drawn
