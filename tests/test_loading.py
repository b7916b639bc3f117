"""The diffusers loader: nested / flat / bare layouts, hub ids (any layout, variant files), latent
models decoded by generation samplers (digits-ldm), and model errors (docs/text_to_image.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gensample
from gensample.cli import main
from gensample.models import loading
from gensample.models.loading import LoadedModel, hub_allow_patterns, load_model
from sd_models import flatten


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ddpm_pipeline_folder(folder: Path, layout: str, num_class_embeds=None) -> Path:
    """A tiny random DDPMPipeline (UNet2DModel 3x8x8) saved nested, or flat as google/ddpm-* are."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return flatten(folder) if layout == "flat" else folder


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_ddpm_pipeline_layouts_load_and_sample(tmp_path, layout):
    from PIL import Image

    folder = _ddpm_pipeline_folder(tmp_path / "ddpm", layout)
    m = load_model(str(folder))
    assert type(m.unet).__name__ == "UNet2DModel" and m.event_shape == (3, 8, 8) and not m.is_latent
    assert not m.text_conditional
    out = tmp_path / "o"
    res = invoke("run", "--sampler", "ddim", "--model", folder, "--steps", 3, "-n", 2, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert Image.open(out / "images" / "000001.png").size == (8, 8)
    with np.load(out / "samples.npz") as z:
        assert z["x"].shape == (2, 3, 8, 8) and "images" not in z.files


def test_layouts_give_identical_samples(tmp_path):
    a = _ddpm_pipeline_folder(tmp_path / "a", "nested")
    b = _ddpm_pipeline_folder(tmp_path / "b", "flat")
    xa = gensample.run("ddim", str(a), steps=3, num_samples=2, progress=False).samples["x"]
    xb = gensample.run("ddim", str(b), steps=3, num_samples=2, progress=False).samples["x"]
    np.testing.assert_array_equal(xa, xb)


def test_class_conditional_pixel_pipeline_keeps_working(tmp_path):
    folder = _ddpm_pipeline_folder(tmp_path / "c", "flat", num_class_embeds=4)  # 3 classes + null
    m = load_model(str(folder))
    assert m.num_classes == 3 and m.null_class == 3
    r = gensample.run("ddim", str(folder), class_label=1, guidance_scale=2.0, steps=2, num_samples=2, progress=False)
    assert r.samples["x"].shape == (2, 3, 8, 8)


def test_folder_of_neither_layout_says_what_it_looked_for(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"0")
    res = invoke("run", "--sampler", "ddim", "--model", tmp_path / "junk", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "Traceback" not in res.output
    for name in ("model_index.json", "unet/config.json", "scheduler_config.json", "config.json"):
        assert name in res.output


def test_missing_component_and_unsupported_pipelines(tmp_path):
    folder = _ddpm_pipeline_folder(tmp_path / "p", "nested")
    shutil.rmtree(folder / "unet")
    with pytest.raises(ValueError, match=r"component 'unet'.*unet/config.json.*flat layout"):
        load_model(str(folder))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(ValueError, match="SDXL"):
        load_model(str(folder))


SD3_INDEX = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"]}
FLUX_INDEX = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"]}
SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
              "scheduler": ["diffusers", "EulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
REFINER_INDEX = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
                 "text_encoder": [None, None], "tokenizer": [None, None],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
PIXART_INDEX = {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"]}


@pytest.mark.parametrize("index,reason,not_said", [
    ({**SD3_INDEX, "_class_name": "StableDiffusion3Img2ImgPipeline"}, r"StableDiffusion3Img2ImgPipeline .*is a flow-matching transformer pipeline that is not supported yet", "SDXL"),
    ({**FLUX_INDEX, "_class_name": "FluxFillPipeline"}, r"FluxFillPipeline .*is a flow-matching transformer pipeline that is not supported yet", "SDXL"),
    (REFINER_INDEX, r"StableDiffusionXLImg2ImgPipeline is an SDXL refiner / image-to-image pipeline", "flow"),
    (PIXART_INDEX, r"PixArtAlphaPipeline has a transformer denoiser \(PixArtTransformer2DModel\)", "SDXL"),
])
def test_unsupported_pipeline_folders_name_the_real_reason(tmp_path, index, reason, not_said):
    """Only model_index.json is read: the refusal comes before any component is looked for."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({**index, "_diffusers_version": "0.42.1"}))
    with pytest.raises(ValueError, match=reason) as err:
        load_model(str(folder))
    assert not_said not in str(err.value)
    res = invoke("run", "--sampler", "ddim", "--model", folder, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "not supported yet" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_bare_conditional_unet_asks_for_the_pipeline(tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, norm_num_groups=8,
                         cross_attention_dim=8, attention_head_dim=2,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "u")
    res = invoke("run", "--sampler", "ddim", "--model", tmp_path / "u", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "text encoder and tokenizer" in res.output


# -- hub ids ---------------------------------------------------------------------------------------
SD_FILES = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "README.md",
            "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.bin", "text_encoder/config.json",
            "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
            "scheduler/scheduler_config.json", "safety_checker/model.safetensors", "safety_checker/config.json"]


def test_hub_allow_patterns_pick_one_weight_file_per_component():
    plain = hub_allow_patterns(SD_FILES)
    assert "unet/diffusion_pytorch_model.safetensors" in plain and "vae/diffusion_pytorch_model.bin" in plain
    assert not any(f.startswith("v1-5") or ".fp16." in f or "non_ema" in f for f in plain)
    assert "unet/diffusion_pytorch_model.bin" not in plain  # safetensors preferred
    fp16 = hub_allow_patterns(SD_FILES, "fp16")
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"} <= set(fp16)
    assert "vae/diffusion_pytorch_model.bin" in fp16  # no fp16 file there: the plain one
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16
    flat = hub_allow_patterns(["model_index.json", "config.json", "scheduler_config.json", "diffusion_pytorch_model.bin",
                               "diffusion_pytorch_model.safetensors"])
    assert flat == ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json", "scheduler_config.json"]
    shards = ["unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
              "unet/diffusion_pytorch_model-00001-of-00002.safetensors", "unet/diffusion_pytorch_model-00002-of-00002.safetensors"]
    assert hub_allow_patterns(shards, "fp16") == shards[:2] and hub_allow_patterns(shards) == shards[2:]


def test_hub_id_of_a_flat_repository_loads(tmp_path, monkeypatch):
    """google/ddpm-*-style hub repos are flat: the hub branch must not ask for subfolder="unet"."""
    import huggingface_hub

    folder = _ddpm_pipeline_folder(tmp_path / "snap", "flat")
    seen = {}

    def fake_list(repo_id, **kw):
        seen["repo"] = repo_id
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        seen["patterns"] = allow_patterns
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake_list)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(loading, "hub_offline_reason", lambda: None)  # as if online (this machine may not be)
    m = load_model("google/ddpm-tiny-test")
    assert seen["repo"] == "google/ddpm-tiny-test" and "config.json" in seen["patterns"]
    assert type(m.unet).__name__ == "UNet2DModel" and m.event_shape == (3, 8, 8)


def test_unreachable_hub_id_is_a_user_error(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(loading, "hub_offline_reason", lambda: None)  # the host resolves, the listing fails
    res = invoke("run", "--sampler", "ddim", "--model", "someone/no-such-model", "-o", tmp_path / "o")
    assert res.exit_code == 2 and "someone/no-such-model" in res.output and "offline" in res.output


# -- latent models: generation samplers decode ----------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "ts-ddim"])
def test_digits_ldm_generation_samplers_write_decoded_digits(tmp_path, sampler):
    from PIL import Image

    out = tmp_path / "o"
    res = invoke("run", "--sampler", sampler, "--model", "digits-ldm", "--steps", 5, "-n", 3, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    with np.load(out / "samples.npz") as z:
        assert z["x"].shape == (3, 2, 4, 4) and z["images"].shape == (3, 1, 8, 8)
        m = load_model("digits-ldm")
        np.testing.assert_allclose(z["images"], m.decode(torch.from_numpy(z["x"])).numpy(), atol=1e-5)
    assert Image.open(out / "images" / "000002.png").size == (8, 8) and (out / "grid.png").exists()


# -- model errors --------------------------------------------------------------------------------
class _OneArgNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, sample):  # no timestep argument: calling it as a UNet raises TypeError
        return sample * self.w


def test_model_forward_type_error_is_a_model_error_exit_1(tmp_path, monkeypatch):
    from gensample import zoo

    zoo.discover()
    monkeypatch.setitem(zoo.ZOO, "broken-net", zoo.ZooEntry(
        "broken-net", "test", lambda: LoadedModel(name="broken-net", unet=_OneArgNet(), event_shape=(1, 4, 4), is_image=True)))
    res = invoke("run", "--sampler", "ddim", "--model", "broken-net", "--steps", 2, "-n", 1, "-o", tmp_path / "o")
    assert res.exit_code == 1, res.output
    assert "broken-net" in res.output and "_OneArgNet(sample=Tensor(1, 1, 4, 4)" in res.output
    assert "TypeError" in res.output and "Traceback" not in res.output


# -- the real SD-1.5 UNet size ---------------------------------------------------------------------
@pytest.mark.slow
def test_sd15_unet_config_one_ts_ddim_step_through_the_cli(tmp_path, monkeypatch):
    """SD-1.5's UNet config (320/640/1280/1280, cross-attention 768, 64x64x4 latents) with random
    weights (~3.4 GB fp32) runs one ts-ddim step via `gensample run`; small VAE (f = 8) and CLIP."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from gensample import zoo
    from gensample.models.loading import _assemble

    import sd_models

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280)).eval().requires_grad_(False)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    tok = sd_models.build_tokenizer(tmp_path / "tok")
    from transformers import CLIPTextConfig, CLIPTextModel

    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=12, max_position_embeddings=sd_models.MAX_TOKENS,
                                       bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1)).eval()
    sched = dict(sd_models.build_scheduler(1).config)
    model = _assemble("sd15-random", unet, sched, vae, enc, tok, "sd15-random")
    assert model.event_shape == (4, 64, 64) and model.extras["pixel_shape"] == (3, 512, 512)
    zoo.discover()
    monkeypatch.setitem(zoo.ZOO, "sd15-random", zoo.ZooEntry("sd15-random", "test", lambda: model))
    out = tmp_path / "o"
    res = invoke("run", "--sampler", "ts-ddim", "--model", "sd15-random", "--prompt", "a photo of a cat",
                 "--guidance-scale", 7.5, "--steps", 1, "-n", 1, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.output
    with np.load(out / "samples.npz") as z:
        assert z["x"].shape == (1, 4, 64, 64) and z["images"].shape == (1, 3, 512, 512)
        assert np.isfinite(z["x"]).all()
    assert json.loads((out / "run.json").read_text())["nfe"] == 1


def test_weights_fingerprint_reads_tensors_over_2_pow_24_entries():
    """The sampled positions are computed in float64: in float32 linspace rounds past the last index
    of a tensor with more than 2^24 entries (every real SD3.5 / Flux weight matrix), an IndexError."""
    from gensample.models.loading import weights_fingerprint

    big = torch.nn.Linear(4097, 4096, bias=False)  # 16,781,312 > 2^24 = 16,777,216 entries
    torch.nn.init.zeros_(big.weight)
    a = weights_fingerprint({"m": big})
    with torch.no_grad():
        big.weight[-1, -1] = 1.0  # the last entry is one of the sampled positions
    assert weights_fingerprint({"m": big}) != a
