"""SDXL end to end (docs/text_to_image.md "SDXL"): loading (folder, in-memory pipeline), the text
conditioning and micro-conditioning against diffusers' own StableDiffusionXLPipeline, identity of
our baseline samplers with that pipeline, every image method from the CLI, the OMS-XL release
layout, refusals of refiner / image-to-image folders, and one step of the real-size UNet (slow).

The models are tiny random SDXL pipelines built offline (tests/sdxl_models.py). The oracle for
the sampling math is diffusers' StableDiffusionXLPipeline run on the same weights, scheduler
config and initial latents.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import gensample  # noqa: E402
from gensample.models.loading import load_model  # noqa: E402
from gensample.samplers.registry import sample_seed  # noqa: E402

from cli_helpers import clean, invoke  # noqa: E402
from sdxl_models import (  # noqa: E402
    HIDDEN_1, HIDDEN_2, LATENT, PIXELS, PROJECTION, build_sdxl_pipeline, save_sdxl_pipeline, write_oms_xl_release,
)


@pytest.fixture(scope="module")
def xl_dirs(tmp_path_factory):
    """{"epsilon": folder, "v_prediction": folder, "v_zero_snr": folder}: the tiny SDXL base, a
    v-prediction fine-tune and a zero-terminal-SNR v fine-tune of the same shape (save_pretrained)."""
    root = tmp_path_factory.mktemp("sdxl")
    return {p: save_sdxl_pipeline(root / p, p) for p in ("epsilon", "v_prediction", "v_zero_snr")}


def _pipeline(folder, scheduler: str | None = None):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler,
               "euler": EulerDiscreteScheduler}[scheduler]
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


# -- loading and text conditioning -------------------------------------------------------------
def test_folder_loads_whole_and_encodes_as_diffusers(xl_dirs):
    """The folder becomes a text-to-image latent model; the conditioning rows equal diffusers'
    encode_prompt (penultimate states of both encoders concatenated, pooled from the second) and
    _get_add_time_ids (original = target = the pixel size, crop (0, 0))."""
    m = load_model(str(xl_dirs["epsilon"]))
    assert m.text_conditional and m.is_latent and m.event_shape == (4, LATENT, LATENT)
    assert m.extras["pixel_shape"] == (3, PIXELS, PIXELS) and m.prediction_type == "epsilon"
    assert type(m.extras["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    pipe = _pipeline(xl_dirs["epsilon"])
    ref, neg, pooled, neg_pooled = pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt="red")
    rows = m.encode_prompt(["a cat"], "cpu")
    assert rows["encoder_hidden_states"].shape == (1, 16, HIDDEN_1 + HIDDEN_2)
    torch.testing.assert_close(rows["encoder_hidden_states"], ref, rtol=0, atol=0)
    torch.testing.assert_close(rows["text_embeds"], pooled, rtol=0, atol=0)
    ids = pipe._get_add_time_ids((PIXELS, PIXELS), (0, 0), (PIXELS, PIXELS), torch.float32, PROJECTION)
    torch.testing.assert_close(rows["time_ids"], ids, rtol=0, atol=0)
    m.configure_run({"negative_prompt": "red"})
    nrow = m.negative_cond("cpu")
    torch.testing.assert_close(nrow["encoder_hidden_states"], neg, rtol=0, atol=0)
    torch.testing.assert_close(nrow["text_embeds"], neg_pooled, rtol=0, atol=0)


def test_empty_negative_prompt_is_zeros_unless_given_and_micro_conditioning(xl_dirs):
    """No negative prompt: zeros (force_zeros_for_empty_prompt); negative "" is encoded. The size
    numbers follow --height/--width, and the caller's micro-conditioning as _get_add_time_ids."""
    m = load_model(str(xl_dirs["epsilon"]))
    m.configure_run({"prompt": "a cat"})
    z = m.negative_cond("cpu")
    assert not z["encoder_hidden_states"].any() and not z["text_embeds"].any()
    m.configure_run({"prompt": "a cat", "negative_prompt": ""})
    assert m.negative_cond("cpu")["encoder_hidden_states"].abs().sum() > 0
    m.configure_run({"prompt": "a cat", "height": 12, "width": 20})
    assert m.encode_prompt(["a cat"], "cpu")["time_ids"].tolist() == [[12, 20, 0, 0, 12, 20]]
    pe = m.prompt_encoder()
    pe.original_size, pe.crops_coords_top_left = (40, 30), (2, 4)
    pe.negative_original_size, pe.negative_target_size = (8, 8), (10, 10)
    assert m.encode_prompt(["a cat"], "cpu")["time_ids"].tolist() == [[40, 30, 2, 4, 12, 20]]
    assert m.negative_cond("cpu")["time_ids"].tolist() == [[8, 8, 0, 0, 10, 10]]
    rec = m.text_record()["sdxl"]
    assert rec["original_size"] == [40, 30] and rec["negative_target_size"] == [10, 10]
    with pytest.raises(ValueError, match="original_size must be a pair"):
        pe.original_size = (1, 2, 3)
        m.encode_prompt(["a dog"], "cpu")


def test_v_prediction_zero_snr_config_is_read(xl_dirs):
    m = load_model(str(xl_dirs["v_zero_snr"]))
    assert m.prediction_type == "v_prediction" and m.scheduler_config["rescale_betas_zero_snr"]
    assert float(m.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR (Lin et al. 2024, alg. 1)


def test_hub_id_from_the_offline_cache_and_fp16_variant(xl_dirs, monkeypatch, tmp_path):
    """A hub id resolves through the local Hugging Face cache (offline) to the same SDXL model; an
    fp16-variant folder loads with --weights-variant fp16 (upcast at load) and samples."""
    import shutil

    import huggingface_hub

    repo = tmp_path / "cache" / "models--someone--tiny-sdxl"
    shutil.copytree(xl_dirs["epsilon"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    common = dict(prompt="a cat", guidance_scale=5.0, steps=2, num_samples=1, progress=False)
    hub = gensample.run("ddim", "someone/tiny-sdxl", **common).samples["x"]
    np.testing.assert_array_equal(hub, gensample.run("ddim", str(xl_dirs["epsilon"]), **common).samples["x"])
    half = save_sdxl_pipeline(tmp_path / "xl16", variant="fp16")
    assert (half / "text_encoder_2" / "model.fp16.safetensors").exists()
    m = load_model(str(half), variant="fp16")
    assert next(m.unet.parameters()).dtype == torch.float32
    res = invoke("run", "--sampler", "ddim", "--model", half, "--weights-variant", "fp16", "--prompt", "a cat",
                 "--steps", 2, "-n", 1, "-o", tmp_path / "o", "--no-progress")
    clean(res, 0)
    assert (tmp_path / "o" / "images" / "000000.png").exists()


def test_fp16_vae_with_force_upcast_decodes_in_float32(xl_dirs):
    """SDXL's VAE overflows in fp16: with force_upcast (the folder's config) a half VAE decodes in
    float32, exactly as the float32 decode of the same (fp16-rounded) weights."""
    m = load_model(str(xl_dirs["epsilon"]))
    vae = m.extras["vae"]
    assert vae.config.force_upcast and vae.config.scaling_factor == 0.13025
    z = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    vae.to(torch.float16)
    with torch.no_grad():
        half = m.decode(z)
        ref = vae.to(torch.float32).decode(z / 0.13025).sample.clamp(-1, 1)
    assert half.dtype == torch.float32 and next(vae.parameters()).dtype == torch.float32
    torch.testing.assert_close(half, ref, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_sdxl_on_cuda(xl_dirs, tmp_path, dtype):
    """--dtype fp16 / bf16: the UNet and text encoders in half precision, the VAE decode in float32
    (force_upcast), images finite and close to the fp32 run on this tiny random net."""
    folder = str(xl_dirs["epsilon"])
    common = dict(prompt="a cat", negative_prompt="red", guidance_scale=5.0, steps=4, num_samples=2, progress=False)
    ref = gensample.run("ddim", folder, device="cuda", **common).samples
    half = gensample.run("ddim", folder, device="cuda", dtype=dtype, output=str(tmp_path / "o"), **common).samples
    assert np.isfinite(half["images"]).all() and half["images"].dtype == np.float32
    assert (tmp_path / "o" / "images" / "000001.png").exists()
    assert np.abs(half["x"] - ref["x"]).max() < (0.05 if dtype == "fp16" else 0.3) * max(1.0, np.abs(ref["x"]).max())


# -- identity with StableDiffusionXLPipeline ----------------------------------------------------
def _x_T(n=2):
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(n)]
    return torch.stack([torch.randn((4, LATENT, LATENT), generator=g) for g in gens]), gens


IDENTITY = [("ddim", "epsilon", "red"), ("ddim", "epsilon", None), ("ddpm", "epsilon", "red"),
            ("euler", "epsilon", None), ("dpm", "epsilon", "red"), ("ddim", "v_prediction", "red"),
            ("euler", "v_prediction", None), ("ddim", "v_zero_snr", "red")]


@pytest.mark.parametrize("sampler,pred,neg", IDENTITY)
def test_baselines_reproduce_stable_diffusion_xl_pipeline(xl_dirs, sampler, pred, neg):
    """fp32, same scheduler config, same x_T and (ddpm) the same per-sample generators; guidance 5
    with a negative prompt, and without one (force_zeros path). One prompt, two images: diffusers
    then encodes exactly the rows we encode, so latents agree to 1e-5 and pixels to 1e-4."""
    folder = xl_dirs[pred]
    res = gensample.run(sampler, str(folder), prompt="a cat", negative_prompt=neg, guidance_scale=5.0, steps=4,
                        num_samples=2, progress=False, device="cpu")
    pipe = _pipeline(folder, sampler)
    x_T, gens = _x_T()
    kwargs = {"eta": 0.0} if sampler == "ddim" else {}
    out = pipe(prompt="a cat", negative_prompt=neg, num_images_per_prompt=2, latents=x_T, generator=gens,
               num_inference_steps=4, guidance_scale=5.0, output_type="latent", **kwargs).images
    np.testing.assert_allclose(res.samples["x"], out.numpy(), rtol=0, atol=1e-5)
    with torch.no_grad():
        pix = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    np.testing.assert_allclose(res.samples["images"], pix.numpy(), rtol=0, atol=1e-4)


def test_two_prompts_match_diffusers_batched_encoding(xl_dirs):
    """Two prompts: diffusers encodes them as one batch, we one prompt at a time (a sample's rows
    never depend on the other prompts); the batched float32 matmuls differ in the last bits of
    the pooled vector (~1e-7), so the latents agree to 1e-5 relative to their scale."""
    folder = xl_dirs["epsilon"]
    res = gensample.run("ddim", str(folder), prompt=["a cat", "a dog"], negative_prompt="red", guidance_scale=5.0,
                        steps=4, num_samples=2, progress=False, device="cpu")
    x_T, _ = _x_T()
    out = _pipeline(folder, "ddim")(prompt=["a cat", "a dog"], negative_prompt=["red"] * 2, latents=x_T, eta=0.0,
                                    num_inference_steps=4, guidance_scale=5.0, output_type="latent").images.numpy()
    np.testing.assert_allclose(res.samples["x"], out, rtol=0, atol=1e-5 * np.abs(out).max())


def test_time_shift_with_window_0_is_ddim_bit_for_bit(xl_dirs):
    common = dict(prompt="a cat", negative_prompt="red", guidance_scale=5.0, steps=4, num_samples=2, progress=False)
    a = gensample.run("ddim", str(xl_dirs["epsilon"]), **common).samples["x"]
    b = gensample.run("ts-ddim", str(xl_dirs["epsilon"]), window=0, **common).samples["x"]
    np.testing.assert_array_equal(a, b)


def test_in_memory_pipeline_equals_its_folder(xl_dirs, tmp_path):
    """gensample.run(model=pipe) on a live StableDiffusionXLPipeline: the same samples as its saved
    folder; run.json records the object, and the pipeline is left as it was."""
    pipe = _pipeline(xl_dirs["epsilon"])
    dtype = pipe.unet.dtype
    common = dict(prompt="a cat", negative_prompt="red", guidance_scale=5.0, steps=3, num_samples=2, progress=False)
    live = gensample.run("ddim", pipe, output=str(tmp_path / "o"), **common)
    folder = gensample.run("ddim", str(xl_dirs["epsilon"]), **common)
    np.testing.assert_array_equal(live.samples["x"], folder.samples["x"])
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    origin = rec["model_origin"]
    assert origin["class"].endswith("StableDiffusionXLPipeline") and "text_encoder_2" in origin["components"]
    assert rec["text_conditioning"]["sdxl"]["target_size"] == [PIXELS, PIXELS]
    assert pipe.unet.dtype == dtype


# -- every image method from the CLI ------------------------------------------------------------
@pytest.fixture(scope="module")
def oms_xl(xl_dirs, tmp_path_factory):
    """A tiny OMS-XL release (oms_module/ fp16 only + text pointers to a tiny SD 2.x folder)."""
    from sd_models import save_sd_pipeline

    root = tmp_path_factory.mktemp("omsxl")
    sd2 = save_sd_pipeline(root / "sd2", 2, "nested")
    write_oms_xl_release(root / "rel", sd2)
    return root / "rel"


@pytest.fixture(scope="module")
def image_png(tmp_path_factory):
    from PIL import Image

    f = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)).save(f)
    return f


# case -> (sampler, extra args); "IMG" / "OMS" are replaced by the fixtures' paths
CLI_CASES = {
    "ddpm": ("ddpm", []), "ddim": ("ddim", []), "dpm": ("dpm", []), "euler": ("euler", []),
    "ts-ddim": ("ts-ddim", []), "ts-ddpm": ("ts-ddpm", []),
    "fkc-cfg": ("fkc", ["--particles", 2, "--fkc-target", "cfg"]),
    "fkc-product": ("fkc", ["--particles", 2, "--fkc-target", "product", "--experts-prompts", "a cat|a dog"]),
    "oms": ("oms", ["--oms-module", "OMS", "--oms-variant", "fp16"]),
    "dps": ("dps", ["--from-image", "IMG", "--task", "sr-avgpool"]),
    "psld": ("psld", ["--from-image", "IMG", "--task", "sr-avgpool"]),
    "stsl": ("stsl", ["--from-image", "IMG", "--task", "sr-avgpool", "--inner-steps", 1]),
    "smc-post": ("smc-post", ["--from-image", "IMG", "--task", "sr-avgpool", "--particles", 2]),
    "ddim+oms-module": ("ddim", ["--oms-module", "OMS", "--oms-variant", "fp16"]),
    "fkc+time-shift": ("fkc", ["--particles", 2, "--fkc-target", "cfg", "--time-shift"]),
    "dps+time-shift": ("dps", ["--from-image", "IMG", "--task", "sr-avgpool", "--time-shift", "--data-var", 0.5]),
    "fkc+oms+proposal": ("fkc", ["--particles", 2, "--fkc-target", "cfg", "--oms-module", "OMS", "--oms-variant",
                                 "fp16", "--proposal", "ddpm"]),
    "v:ddim": ("ddim", []), "v:fkc-cfg": ("fkc", ["--particles", 2, "--fkc-target", "cfg"]),
    "v:ts-ddim": ("ts-ddim", []), "z:ddim": ("ddim", []), "z:oms": ("oms", ["--oms-module", "OMS", "--oms-variant", "fp16"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_every_image_method_writes_decoded_pngs(xl_dirs, oms_xl, image_png, case, tmp_path):
    from PIL import Image

    sampler, extra = CLI_CASES[case]
    folder = xl_dirs[{"v:": "v_prediction", "z:": "v_zero_snr"}.get(case[:2], "epsilon")]
    extra = [oms_xl if a == "OMS" else image_png if a == "IMG" else a for a in extra]
    # the product target has no CFG scale; plain smc-post samples the unguided posterior
    cfg = [] if case in ("fkc-product", "smc-post") else ["--guidance-scale", 5]
    out = tmp_path / "o"
    res = invoke("run", "--sampler", sampler, "--model", folder, "--prompt", "a cat", "--negative-prompt", "red", *cfg,
                 "--steps", 4, "-n", 2, "-o", out, "--no-progress", "--device", "cpu", *extra)
    clean(res, 0)
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png"]
    assert all(Image.open(p).size == (PIXELS, PIXELS) and Image.open(p).mode == "RGB" for p in pngs)
    with np.load(out / "samples.npz") as z:
        if "images" in z.files:  # generation samplers: latents in x, decoded pixels beside them
            assert z["x"].shape == (2, 4, LATENT, LATENT) and z["images"].shape == (2, 3, PIXELS, PIXELS)
            assert np.isfinite(z["images"]).all() and np.abs(z["images"]).max() <= 1.0
        else:  # the inverse-problem solvers return pixels
            assert z["x"].shape == (2, 3, PIXELS, PIXELS) and np.isfinite(z["x"]).all()
    rec = json.loads((out / "run.json").read_text())
    tc = rec["text_conditioning"]
    assert tc["prompts"] == ["a cat"] and tc["negative_prompt"] == "red"
    assert tc["sdxl"]["target_size"] == [PIXELS, PIXELS] and "tokenizer_2" in tc["tokens"]
    if "OMS" in CLI_CASES[case][1]:
        assert rec["stats"]["oms"]["text_encoder"] == "oms"


def test_oms_xl_release_changes_the_start_and_uses_its_own_text_encoder(xl_dirs, oms_xl):
    """The OMS-XL module drives x_T: with the module the samples differ from the bare ddim ones
    (same seeds), and --oms-guidance changes them again; the release's own text encoder is used."""
    common = dict(prompt="a cat", steps=3, num_samples=2, progress=False)
    bare = gensample.run("ddim", str(xl_dirs["epsilon"]), **common)
    oms = gensample.run("ddim", str(xl_dirs["epsilon"]), oms_module=str(oms_xl), oms_variant="fp16", **common)
    guided = gensample.run("ddim", str(xl_dirs["epsilon"]), oms_module=str(oms_xl), oms_variant="fp16",
                           oms_guidance=2.0, **common)
    assert not np.allclose(bare.samples["x"], oms.samples["x"]) and not np.allclose(oms.samples["x"], guided.samples["x"])
    assert oms.record["stats"]["oms"]["text_encoder"] == "oms"


def test_oms_module_on_sdxl_context_falls_back_to_the_base_encoders(xl_dirs, tmp_path):
    """A module without text folders that attends to SDXL's own context (OMS-L: CLIP-L + bigG
    penultimate states, here 24 + 40 = 64 wide) is conditioned by the base's two encoders; a
    module of another width is refused naming both widths. An OMS-L-style release whose
    oms_text_encoder names SDXL encoders runs with --oms-text-encoder base."""
    from oms_fixtures import write_oms_release

    folder = str(xl_dirs["epsilon"])
    write_oms_release(tmp_path / "l", None, cross_attention_dim=HIDDEN_1 + HIDDEN_2)
    common = dict(prompt="a cat", steps=2, num_samples=2, progress=False, oms_variant="fp16")
    res = gensample.run("ddim", folder, oms_module=str(tmp_path / "l"), oms_guidance=2.0, **common)
    assert res.record["stats"]["oms"]["text_encoder"] == "base" and np.isfinite(res.samples["x"]).all()
    write_oms_release(tmp_path / "w", None, cross_attention_dim=48)
    with pytest.raises(ValueError, match="attends to 48-dim .* give 64-dim"):
        gensample.run("ddim", folder, oms_module=str(tmp_path / "w"), **common)
    (tmp_path / "l" / "oms_text_encoder").mkdir()
    (tmp_path / "l" / "oms_tokenizer").mkdir()
    for sub in ("oms_text_encoder", "oms_tokenizer"):
        (tmp_path / "l" / sub / "config.json").write_text(json.dumps({"_class_name": "SDXLTextEncoders"}))
    with pytest.raises(ValueError, match="--oms-text-encoder base"):
        gensample.run("ddim", folder, oms_module=str(tmp_path / "l"), **common)
    again = gensample.run("ddim", folder, oms_module=str(tmp_path / "l"), oms_text_encoder="base", oms_guidance=2.0,
                          **common)
    np.testing.assert_array_equal(again.samples["x"], res.samples["x"])


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,words", [
    ("StableDiffusionXLImg2ImgPipeline", "SDXL refiner / image-to-image"),
    ("StableDiffusionXLInpaintPipeline", "SDXL refiner / image-to-image pipeline (it denoises a given image, inside a mask)"),
    ("StableDiffusionXLPipeline+aesthetics", "SDXL refiner (it conditions on an aesthetic score"),
])
def test_refiner_and_img2img_folders_are_refused_by_name(xl_dirs, tmp_path, cls, words):
    import shutil

    folder = shutil.copytree(xl_dirs["epsilon"], tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = cls.split("+")[0]
    if cls.endswith("aesthetics"):
        index["requires_aesthetics_score"] = True
    (folder / "model_index.json").write_text(json.dumps(index))
    res = invoke("run", "--sampler", "ddim", "--model", folder, "--steps", 2, "-n", 1, "-o", tmp_path / "o")
    clean(res, 2, words, "not supported yet")
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and words in errors[0]  # one message, on one line
    assert not (tmp_path / "o").exists()


def test_unet_without_text_time_embedding_is_a_loading_error(tmp_path):
    from gensample.models.loading import from_object

    pipe = build_sdxl_pipeline(tmp_path)
    pipe.unet.register_to_config(addition_embed_type=None)
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        from_object(pipe)


# -- the real SDXL base UNet config (slow) ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sampler,extra", [("ts-ddim", []), ("fkc", ["--particles", 1, "--fkc-target", "cfg"])])
def test_real_size_sdxl_unet_one_step_at_512(tmp_path_factory, sampler, extra):
    """SDXL base 1.0's UNet config (random weights) with tiny text encoders of the real widths
    (768 + 1280, pooled 1280): one step through the CLI path at 512x512 (64x64 latents)."""
    from sdxl_models import real_size_sdxl_pipeline

    import gc

    root = tmp_path_factory.getbasetemp() / "xlreal"
    folder = root / "xl"
    if not (folder / "model_index.json").exists():  # built once, in fp16 (5 GB), freed before the run
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)
        try:
            pipe = real_size_sdxl_pipeline(root)
        finally:
            torch.set_default_dtype(default)
        pipe.save_pretrained(folder, variant="fp16")
        del pipe
        gc.collect()
    out = root / f"o-{sampler}"
    t0 = time.perf_counter()
    res = invoke("run", "--sampler", sampler, "--model", folder, "--weights-variant", "fp16", "--prompt", "a cat",
                 "--negative-prompt", "red", "--guidance-scale", 5, "--height", 512, "--width", 512, "--steps", 1,
                 "-n", 1, "-o", out, "--no-progress", "--device", "cpu", *extra)
    clean(res, 0)
    print(f"{sampler}: {time.perf_counter() - t0:.1f} s")
    with np.load(out / "samples.npz") as z:
        assert z["x"].shape == (1, 4, 64, 64) and z["images"].shape == (1, 3, 512, 512)
        assert np.isfinite(z["images"]).all()
