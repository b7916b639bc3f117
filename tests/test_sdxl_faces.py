"""The Python faces on SDXL (docs/python_api.md "SDXL"): enable_time_shift, FKCPipeline, OMSPipeline,
STSLPipeline and SMCPosteriorPipeline on a tiny random StableDiffusionXLPipeline built offline
(tests/sdxl_models.py: diffusers' SDXL fast-test layout, two offline CLIP tokenizers, text encoders of
different widths so that a wrong concatenation or pooled vector fails)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline

from gensample.pipelines.fkc import FKCPipeline, check_denoiser
from gensample.pipelines.oms import OMSPipeline
from gensample.pipelines.smc_posterior import SMCPosteriorPipeline
from gensample.pipelines.stsl import STSLPipeline
from gensample.pipelines.time_shift import disable_time_shift, enable_time_shift
from gensample.samplers.operators import make_operator
from gensample.schedulers.fkc import FKCScheduler
from gensample.schedulers.time_shift import TimeShiftScheduler
from sdxl_models import LATENT, PIXELS, build_sdxl_pipeline, build_unet

torch.set_num_threads(1)

PROMPT, NEGATIVE = "a red cat", "a dog"


@pytest.fixture()
def sdxl(tmp_path):
    return build_sdxl_pipeline(tmp_path)


def _ddim(pipe, **kw):
    """DDIM on the SDXL pipeline's own schedule; clip_sample=False (latents are not in [-1, 1], and
    neither FKC nor Time-Shift clips x0)."""
    return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, **kw)


def _latents(n, seed=0):
    return torch.randn(n, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


class _UNetSpy:
    """Records the keywords of every UNet call (forward pre-hook)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({k: v for k, v in kwargs.items()})

    def remove(self):
        self.handle.remove()


# -- item 1: enable_time_shift on SDXL -------------------------------------------------------------
# (window 0 is plain DDIM: the data_var warning of latent pipelines does not apply there)
@pytest.mark.filterwarnings("ignore:enable_time_shift on a latent pipeline")
def test_time_shift_window_0_is_stock_sdxl_ddim_bit_for_bit_and_a_window_changes_it(sdxl):
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=6, output_type="np")
    euler = sdxl.scheduler
    sdxl.scheduler = _ddim(sdxl)
    stock = sdxl(generator=torch.Generator().manual_seed(0), **kw).images
    sdxl.scheduler = euler  # enable_time_shift builds its DDIM-family scheduler from SDXL's own config
    enable_time_shift(sdxl, window_size=0)
    assert isinstance(sdxl.scheduler, TimeShiftScheduler)
    same = sdxl(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(stock, same)
    disable_time_shift(sdxl)
    enable_time_shift(sdxl, window_size=4, cutoff=0)
    shifted = sdxl(generator=torch.Generator().manual_seed(0), **kw).images
    assert shifted.shape == stock.shape and np.isfinite(shifted).all()
    assert np.abs(shifted - stock).max() > 1e-4  # the shift changed the sample


@pytest.mark.filterwarnings("ignore:enable_time_shift on a latent pipeline")
def test_time_shift_img2img_from_pipe_copy_sharing_the_unet_stays_stock(sdxl):
    """q = StableDiffusionXLImg2ImgPipeline.from_pipe(p) shares p's UNet (and the hook). With its own
    stock scheduler it runs exactly as if Time-Shift was never enabled; enabling it on q too, with
    window 0, is DDIM bit for bit again."""
    image = torch.rand(1, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt=PROMPT, image=image, strength=0.8, guidance_scale=3.0, num_inference_steps=5, output_type="np")
    q = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    q.scheduler = _ddim(sdxl)
    never = q(generator=torch.Generator().manual_seed(1), **kw).images
    enable_time_shift(sdxl, window_size=4, cutoff=0)
    assert q.unet is sdxl.unet
    while_p_enabled = q(generator=torch.Generator().manual_seed(1), **kw).images
    assert np.array_equal(never, while_p_enabled)
    enable_time_shift(q, window_size=0)
    assert np.array_equal(never, q(generator=torch.Generator().manual_seed(1), **kw).images)
    # a copy that keeps p's TimeShiftScheduler object without enabling is refused, naming the fix
    shared = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    assert shared.scheduler is sdxl.scheduler
    with pytest.raises(ValueError, match="enable_time_shift"):
        shared(generator=torch.Generator().manual_seed(1), **kw)


# -- item 2: FKCPipeline on SDXL --------------------------------------------------------------------
# Tolerance of the identities below: FKC moves the particles in float64 from float32 UNet outputs,
# the stock DDIM scheduler in float32; per step that differs by a few float32 ulps of |x| (2^-23
# relative), so 4 steps stay below 2e-6 * max|x| (16 ulps, a bound with room; the measured gap is
# ~1e-6 relative). Anything structural (a wrong conditioning row, time id, noise draw or
# coefficient) moves the latents by O(1e-2) or more.
def _close(a, b):
    scale = float(a.abs().max())
    torch.testing.assert_close(b, a, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["ddim", "ddpm"])
def test_fkc_from_pipe_with_beta_1_is_the_stock_sdxl_sampler(sdxl, eta):
    """No reweighting (anneal beta = 1; cfg with w = 1: exponents (1, 0)) = stock SDXL without CFG,
    DDIM (eta 0) or DDPM-like (eta 1; the same noise draws from the same generator)."""
    sdxl.scheduler = _ddim(sdxl)
    fkc = FKCPipeline.from_pipe(sdxl)
    fkc.set_progress_bar_config(disable=True)
    assert isinstance(fkc.scheduler, FKCScheduler) and fkc.text_encoder_2 is sdxl.text_encoder_2
    assert fkc.config.force_zeros_for_empty_prompt is True
    x_T = _latents(1)
    common = dict(num_inference_steps=4, eta=eta, output_type="latent")
    stock = sdxl(prompt=PROMPT, guidance_scale=1.0, latents=x_T.clone(), generator=torch.Generator().manual_seed(3),
                 **common).images
    for target in ("anneal", "cfg"):
        out = fkc(prompt=PROMPT, target=target, beta=1.0, guidance_scale=1.0, num_particles=1, latents=x_T.clone(),
                  final="weighted", resample="never", generator=torch.Generator().manual_seed(3), **common)
        _close(stock, out.images)
        assert np.allclose(out.weights, 1.0)


def _fkc_from_components(sdxl):
    fkc = FKCPipeline(**{k: getattr(sdxl, k) for k in ("unet", "scheduler", "vae", "text_encoder", "tokenizer",
                                                        "text_encoder_2", "tokenizer_2")})
    fkc.set_progress_bar_config(disable=True)
    return fkc


MICRO = dict(original_size=(40, 24), crops_coords_top_left=(4, 2), target_size=(32, 32))


@pytest.mark.parametrize("negative", [NEGATIVE, None], ids=["negative-prompt", "zeros-for-empty"])
def test_fkc_cfg_experts_move_as_stock_sdxl_cfg_with_micro_conditioning(sdxl, negative):
    """target='cfg': experts are the prompt and the negative prompt (SDXL's zero embeddings when none is
    given, force_zeros_for_empty_prompt). Without resampling each particle moves exactly as the stock
    CFG sampler from the same latents (eps_eff = w eps_c + (1 - w) eps_neg, rho_T = N(0, I / (w + 1 - w))),
    DDPM-like noise included; the size/crop micro-conditioning reaches the UNet as in the stock pipeline.
    The FK weights are not uniform (the CFG target is not the sampled law)."""
    sdxl.scheduler = _ddim(sdxl)
    fkc = _fkc_from_components(sdxl)
    x_T = _latents(3)
    common = dict(negative_prompt=negative, guidance_scale=5.0, num_inference_steps=4, eta=1.0, output_type="latent")
    stock = sdxl(prompt=[PROMPT] * 3, latents=x_T.clone(), generator=torch.Generator().manual_seed(2), **common,
                 **MICRO).images
    out = fkc(prompt=PROMPT, num_particles=3, latents=x_T.clone(), resample="never", final="weighted",
              generator=torch.Generator().manual_seed(2), **common, **MICRO)
    _close(stock, out.images)
    assert out.weights.shape == (3,) and not np.allclose(out.weights, 1 / 3)
    # the micro-conditioning matters: without it the particles move elsewhere
    other = fkc(prompt=PROMPT, num_particles=3, latents=x_T.clone(), resample="never", final="weighted",
                generator=torch.Generator().manual_seed(2), **common)
    assert (other.images - stock).abs().max() > 1e-3


def test_fkc_negative_time_ids_pair_with_the_negative_expert(sdxl):
    """negative_original_size / negative_target_size condition the negative expert only, row by row.
    Against stock SDXL one image at a time (DDIM, deterministic): a batched stock call repeats the
    (negative, positive) pair of time ids over the doubled batch (``cat([neg, pos]).repeat(B, 1)``), so
    for B > 1 its rows do not line up with [uncond x B; cond x B]; with B = 1 they do."""
    sdxl.scheduler = _ddim(sdxl)
    fkc = _fkc_from_components(sdxl)
    x_T = _latents(3, seed=4)
    common = dict(negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=4, eta=0.0, output_type="latent",
                  negative_original_size=(8, 8), negative_target_size=(12, 16), **MICRO)
    out = fkc(prompt=PROMPT, num_particles=3, latents=x_T.clone(), resample="never", final="weighted", **common)
    for i in range(3):
        one = sdxl(prompt=PROMPT, latents=x_T[i:i + 1].clone(), **common).images
        _close(one, out.images[i:i + 1])
    batched = sdxl(prompt=[PROMPT] * 3, latents=x_T.clone(), **common).images
    assert (batched[1] - out.images[1]).abs().max() > 1e-3  # diffusers' batched pairing differs on row 1


def test_fkc_sdxl_product_and_annealing_run_to_pixel_images(sdxl):
    fkc = FKCPipeline.from_pipe(sdxl)
    fkc.set_progress_bar_config(disable=True)
    spy = _UNetSpy(fkc.unet)
    prod = fkc(target="product", experts=[PROMPT, NEGATIVE], num_particles=3, num_inference_steps=3,
               generator=torch.Generator().manual_seed(0), output_type="np", final="weighted", resample="never")
    spy.remove()
    assert prod.images.shape == (3, PIXELS, PIXELS, 3) and np.isfinite(prod.images).all()
    assert prod.ess.shape == (1, 3) and not np.allclose(prod.weights, 1 / 3)
    # one batched call, expert-major: rows 0-2 the first prompt, rows 3-5 the second, as SDXL encodes each
    first = spy.calls[0]
    pe, _, pooled, _ = sdxl.encode_prompt([PROMPT, NEGATIVE], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(first["encoder_hidden_states"], pe.repeat_interleave(3, 0))
    torch.testing.assert_close(first["added_cond_kwargs"]["text_embeds"], pooled.repeat_interleave(3, 0))
    ids = torch.tensor([[PIXELS, PIXELS, 0, 0, PIXELS, PIXELS]], dtype=pe.dtype)
    torch.testing.assert_close(first["added_cond_kwargs"]["time_ids"], ids.expand(6, 6))
    ann = fkc(prompt=[PROMPT, NEGATIVE], target="anneal", beta=2.0, num_particles=2, num_inference_steps=3,
              generator=torch.Generator().manual_seed(0), output_type="pt", final="one_per_group")
    assert ann.images.shape == (2, 3, PIXELS, PIXELS) and ann.ess.shape == (2, 3)
    with pytest.raises(ValueError, match="product.*pooled_prompt_embeds"):
        fkc(target="product", experts=[PROMPT, NEGATIVE], pooled_prompt_embeds=pooled, num_inference_steps=2)


@pytest.mark.parametrize("face", ["FKCPipeline", "STSLPipeline", "SMCPosteriorPipeline"])
def test_sdxl_faces_without_the_second_text_encoder_pair_name_it(sdxl, face):
    """Prompts on an SDXL UNet need text_encoder_2 and tokenizer_2: every face refuses through one check in
    ``_sdxl.encode`` naming both (before: FKCPipeline checked the encoder only, and without tokenizer_2 failed
    inside diffusers' encode_prompt with an AttributeError)."""
    pipe = {"FKCPipeline": FKCPipeline, "STSLPipeline": STSLPipeline, "SMCPosteriorPipeline": SMCPosteriorPipeline}[face]
    pipe = pipe.from_pipe(sdxl)
    pipe.tokenizer_2 = None
    op = make_operator("inpaint-box", (3, PIXELS, PIXELS))
    y = op(torch.zeros(1, 3, PIXELS, PIXELS))
    with pytest.raises(ValueError, match=f"needs text_encoder_2 and tokenizer_2 to encode prompt \\({face}.from_pipe"):
        if face == "FKCPipeline":
            pipe(prompt=PROMPT, target="anneal", beta=2.0, num_particles=2, num_inference_steps=2)
        elif face == "STSLPipeline":
            pipe(y, op, method="dps", num_inference_steps=2, batch_size=1, prompt=PROMPT)
        else:
            pipe(y, op, noise_std=0.1, num_particles=2, num_inference_steps=2, batch_size=1, prompt=PROMPT)


def test_fkc_decodes_an_fp16_force_upcast_vae_in_float32(sdxl):
    """SDXL's VAE config asks for force_upcast (it overflows in fp16): FKCPipeline decodes a float16 VAE
    in float32, as the stock pipeline does, and gives it back in float16."""
    import copy

    vae32 = copy.deepcopy(sdxl.vae)
    sdxl.vae.to(torch.float16)
    fkc = _fkc_from_components(sdxl)  # (from_pipe casts to its dtype argument, float32 by default)
    kw = dict(prompt=PROMPT, num_particles=2, num_inference_steps=2, final="weighted", resample="never")
    lat = fkc(output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images
    img = fkc(output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images
    assert sdxl.vae.dtype == torch.float16
    vae32.load_state_dict({k: v.float() for k, v in sdxl.vae.state_dict().items()})  # the fp16 weights, upcast
    with torch.no_grad():
        ref = (vae32.decode(lat / sdxl.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(img, ref, rtol=0, atol=1e-6)


def test_fkc_sdxl_arguments_are_refused_on_other_unets(tmp_path):
    from sd_models import build_sd_pipeline

    fkc = FKCPipeline.from_pipe(build_sd_pipeline(tmp_path))
    with pytest.raises(ValueError, match="SDXL arguments.*not an SDXL UNet"):
        fkc(prompt="a cat", original_size=(8, 8), num_inference_steps=2)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'prompt_3'"):
        fkc(prompt="a cat", prompt_3="x", num_inference_steps=2)


def _sdxl_inpaint_unet():
    return build_unet(in_channels=9)


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                                 pooled_projection_dim=8, out_channels=4)


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4))


def test_check_denoiser_accepts_sdxl_unets_and_still_refuses_transformers_and_inpainting(sdxl):
    check_denoiser(sdxl.unet, sdxl.text_encoder, sdxl.vae, sdxl.text_encoder_2)  # SDXL: text_time is fine now
    check_denoiser(sdxl.unet)
    for make, match in ((_sd3, "SD3Transformer2DModel, a flow-matching transformer"),
                        (_flux, "FluxTransformer2DModel, a flow-matching transformer"),
                        (_sdxl_inpaint_unet, "in_channels=9, out_channels=4.*inpainting")):
        with pytest.raises(ValueError, match=match):
            FKCPipeline(unet=make(), scheduler=DDIMScheduler())
    other_added = build_unet(addition_embed_type="text", encoder_hid_dim=64)
    with pytest.raises(ValueError, match="addition_embed_type='text'"):
        check_denoiser(other_added)
    # encoders that do not fit the SDXL UNet: swapped widths still sum right, a wrong pair does not
    with pytest.raises(ValueError, match="hidden sizes 40 \\+ 40 = 80 do not match.*cross_attention_dim 64"):
        check_denoiser(sdxl.unet, sdxl.text_encoder_2, None, sdxl.text_encoder_2)
    wide = build_unet(addition_time_embed_dim=4, projection_class_embeddings_input_dim=24 + 16 + 8)
    with pytest.raises(ValueError, match="projection_dim 16 .* 6 time ids x addition_time_embed_dim 4"):
        FKCPipeline(unet=wide, scheduler=sdxl.scheduler, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2)


# -- item 3: OMS, STSL and smc-post on SDXL ---------------------------------------------------------
def _oms_parts(tmp_path):
    from oms_fixtures import tiny_text_oms
    from sd_models import build_text_encoder, build_tokenizer

    tok = build_tokenizer(tmp_path / "oms_tok")
    return tiny_text_oms(), build_text_encoder(len(tok), seed=3), tok


def test_oms_on_sdxl_hands_the_oms_latents_to_the_stock_pipeline(sdxl, tmp_path):
    """OMSPipeline around an SDXL base with the module's own text encoder: the SDXL pipeline runs
    from the OMS step's x_T (recomputed here from the same generator stream: x_T' then z), bit for bit;
    oms_flag=False is the bare SDXL call."""
    from diffusers.utils.torch_utils import randn_tensor

    from gensample.samplers.oms import OMSConfig, first_alpha_bar, oms_initial_latents

    module, enc, tok = _oms_parts(tmp_path)
    oms = OMSPipeline(oms_module=module, base_pipeline=sdxl, oms_text_encoder=enc, oms_tokenizer=tok)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=4, output_type="latent")
    out = oms(oms_guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **kw).images
    gen = torch.Generator().manual_seed(0)
    x_Tp = randn_tensor((1, 4, LATENT, LATENT), generator=gen, dtype=torch.float32)

    def embed(text):
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return enc(ids.input_ids)[0]

    sdxl.scheduler.set_timesteps(4)
    with torch.no_grad():
        x_T = oms_initial_latents(module, x_Tp, {"encoder_hidden_states": embed(PROMPT)},
                                  {"encoder_hidden_states": embed("")}, first_alpha_bar(sdxl.scheduler),
                                  OMSConfig(guidance_scale=2.0), gen)
    ref = sdxl(latents=x_T, generator=gen, **kw).images
    assert torch.equal(out, ref)
    bare = sdxl(generator=torch.Generator().manual_seed(0), **kw).images
    off = oms(oms_flag=False, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(off, bare) and (out - bare).abs().max() > 1e-3


def test_oms_on_sdxl_without_its_own_encoder_names_the_width_mismatch(sdxl, tmp_path):
    """The fallback to the base pipeline's text_encoder (SDXL's first CLIP, width 24 here) does not fit
    a module of cross_attention_dim 32: a ValueError with both numbers, not an error deep in psi."""
    module, _, _ = _oms_parts(tmp_path)
    oms = OMSPipeline(oms_module=module, base_pipeline=sdxl)
    with pytest.raises(ValueError, match="width 24 .*CLIPTextModel.* cross_attention_dim 32"):
        oms(prompt=PROMPT, num_inference_steps=2, output_type="latent")


def test_oms_release_layout_for_sdxl_through_from_release(sdxl, tmp_path):
    """The released folder layout (h1t/oms_b_openclip_xl: oms_module/ fp16 weights, text pointers to an
    SD 2.x folder) around an SDXL base: from_release loads the module and its own encoder, and the SDXL
    pipeline runs from its x_T at the pipeline's pixel size."""
    from sd_models import save_sd_pipeline
    from sdxl_models import write_oms_xl_release

    text = save_sd_pipeline(tmp_path / "sd2", version=2)
    write_oms_xl_release(tmp_path / "oms_xl", text)
    oms = OMSPipeline.from_release(str(tmp_path / "oms_xl"), base_pipeline=sdxl, variant="fp16")
    assert oms.oms_text_encoder is not None
    kw = dict(prompt=PROMPT, guidance_scale=5.0, num_inference_steps=3, output_type="np")
    out = oms(oms_guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **kw).images
    bare = sdxl(generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == bare.shape == (1, PIXELS, PIXELS, 3) and np.abs(out - bare).max() > 1e-4


def _stock_unet_call(sdxl, prompt):
    spy = _UNetSpy(sdxl.unet)
    sdxl(prompt=prompt, guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    spy.remove()
    return spy.calls[0]


def _assert_same_conditioning(seen, stock):
    """Every row the UNet saw carries the stock pipeline's conditioning of the prompt (one row)."""
    rows = seen["encoder_hidden_states"].shape[0]
    torch.testing.assert_close(seen["encoder_hidden_states"], stock["encoder_hidden_states"].expand(rows, -1, -1))
    for key in ("text_embeds", "time_ids"):
        torch.testing.assert_close(seen["added_cond_kwargs"][key], stock["added_cond_kwargs"][key].expand(rows, -1))


@pytest.mark.parametrize("method, kw", [("dps", {}), ("stsl", dict(inner_steps=1))])
def test_stsl_pipeline_on_sdxl_latents(sdxl, method, kw):
    """STSLPipeline.from_pipe(sdxl): latent posterior sampling through SDXL's VAE, conditioned on the
    prompt exactly as the stock SDXL pipeline conditions its UNet; the measurement matters."""
    pipe = STSLPipeline.from_pipe(sdxl)
    pipe.set_progress_bar_config(disable=True)
    op = make_operator("sr-avgpool", (3, PIXELS, PIXELS), sr_factor=2)
    x = torch.rand(1, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(7)) * 2 - 1
    y = op(x)
    spy = _UNetSpy(sdxl.unet)
    out = pipe(y, op, method=method, num_inference_steps=3, batch_size=2, prompt=PROMPT, output_type="pt",
               generator=torch.Generator().manual_seed(0), **kw).images
    spy.remove()
    assert out.shape == (2, 3, PIXELS, PIXELS) and torch.isfinite(out).all()
    stock = _stock_unet_call(sdxl, PROMPT)
    assert len(spy.calls) > 3
    for seen in spy.calls:  # the prior-variance probes and every step
        _assert_same_conditioning(seen, stock)
    other = pipe(-y, op, method=method, num_inference_steps=3, batch_size=2, prompt=PROMPT, output_type="pt",
                 generator=torch.Generator().manual_seed(0), **kw).images
    assert (other - out).abs().max() > 1e-4


def test_smc_posterior_pipeline_on_sdxl_latents(sdxl):
    """SMCPosteriorPipeline.from_pipe(sdxl): particles in SDXL latent space, twist through the VAE decoder,
    decoded images out; the prompt conditions the UNet as in the stock pipeline; weighted final output
    has normalised weights per system."""
    pipe = SMCPosteriorPipeline.from_pipe(sdxl)
    pipe.set_progress_bar_config(disable=True)
    op = make_operator("inpaint-box", (3, PIXELS, PIXELS))
    x = torch.rand(1, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(7)) * 2 - 1
    y = op(x)
    spy = _UNetSpy(sdxl.unet)
    out = pipe(y, op, noise_std=0.1, num_particles=3, num_inference_steps=3, batch_size=1, prompt=PROMPT,
               final="weighted", output_type="pt", generator=torch.Generator().manual_seed(0)).images
    spy.remove()
    assert out.shape == (3, 3, PIXELS, PIXELS) and torch.isfinite(out).all()
    res = pipe.last_result
    assert res.weights.dtype == torch.float64 and abs(float(res.weights.sum()) - 1) < 1e-9
    stock = _stock_unet_call(sdxl, PROMPT)
    assert len(spy.calls) > 3
    for seen in spy.calls:
        _assert_same_conditioning(seen, stock)
