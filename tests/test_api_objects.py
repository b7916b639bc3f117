"""gensample.run(model=<an object the caller holds>): a diffusers pipeline or a UNet, used as it is.

The oracle is the folder path: the same pipeline saved with ``save_pretrained`` and loaded by
gensample's loader must give bit-identical samples (docs/python_api.md). The models are tiny random
SD 1.x pipelines and pixel UNets built offline (tests/sd_models.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import gensample  # noqa: E402
from gensample import api  # noqa: E402
from gensample.models.loading import from_object  # noqa: E402

from sd_models import PIXELS, build_pixel_unet, build_sd_pipeline  # noqa: E402

COMMON = dict(prompt="a cat", negative_prompt="red", steps=3, num_samples=2, progress=False)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(pipe, folder, image): an in-memory tiny SD 1.x pipeline, the same pipeline saved, a PNG."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sdobj")
    pipe = build_sd_pipeline(root, 1)
    pipe.save_pretrained(root / "saved")
    img = root / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)).save(img)
    return pipe, str(root / "saved"), str(img)


def _snapshot(pipe) -> dict:
    return {"scheduler": pipe.scheduler, "sched_cfg": dict(pipe.scheduler.config),
            "timesteps": pipe.scheduler.timesteps.clone(), "dtypes": {k: next(m.parameters()).dtype for k, m in _mods(pipe)},
            "grad": {k: [q.requires_grad for q in m.parameters()] for k, m in _mods(pipe)},
            "weights": {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in _mods(pipe)}}


def _mods(pipe):
    return [(k, v) for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)]


CASES = {
    "ddim": dict(guidance_scale=5.0),
    "ts-ddim": dict(guidance_scale=5.0),
    "fkc": dict(guidance_scale=5.0, particles=2, fkc_target="cfg"),
    "dps": dict(from_image="IMG"),
    "stsl": dict(from_image="IMG"),
}


@pytest.mark.parametrize("sampler", sorted(CASES))
def test_pipeline_object_equals_its_saved_folder(sd, sampler):
    pipe, folder, img = sd
    extra = {k: (img if v == "IMG" else v) for k, v in CASES[sampler].items()}
    before = _snapshot(pipe)
    mem = gensample.run(sampler, pipe, **COMMON, **extra)
    disk = gensample.run(sampler, folder, **COMMON, **extra)
    assert sorted(mem.samples) == sorted(disk.samples)
    for key in disk.samples:
        np.testing.assert_array_equal(mem.samples[key], disk.samples[key], err_msg=f"{sampler}: {key}")
    # the caller's pipeline is not changed: same scheduler object, config and timesteps; same weights and dtypes
    after = _snapshot(pipe)
    assert after["scheduler"] is before["scheduler"] and after["sched_cfg"] == before["sched_cfg"]
    assert torch.equal(after["timesteps"], before["timesteps"]) and after["dtypes"] == before["dtypes"]
    assert after["grad"] == before["grad"]
    for part, sd_before in before["weights"].items():
        assert all(torch.equal(sd_before[n], after["weights"][part][n]) for n in sd_before), part


def test_object_dtype_is_respected_and_recorded(tmp_path):
    """A pipeline cast to bf16 runs in bf16 on its own device (CPU here), is left in bf16, and
    run.json says so; an explicit dtype / device other than the object's is refused."""
    pipe = build_sd_pipeline(tmp_path, 1).to(torch.bfloat16)
    out = tmp_path / "o"
    res = gensample.run("ddim", pipe, **COMMON, output=str(out))
    assert np.isfinite(res.samples["x"]).all() and np.isfinite(res.samples["images"]).all()
    assert {next(m.parameters()).dtype for _, m in _mods(pipe)} == {torch.bfloat16}
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["dtype"] == "bf16" and rec["device"] == "cpu"
    assert rec["model_origin"]["dtype"] == "bfloat16" and rec["model_origin"]["device"] == "cpu"
    assert rec["model_origin"]["components"]["unet"].endswith("UNet2DConditionModel")
    fp32 = gensample.run("ddim", build_sd_pipeline(tmp_path, 1), **COMMON).samples["x"]
    assert not np.array_equal(fp32, res.samples["x"])  # bf16 weights were used, not an fp32 copy
    with pytest.raises(ValueError, match="dtype='fp32', but the model object's UNet is bfloat16"):
        gensample.run("ddim", pipe, **COMMON, dtype="fp32")
    with pytest.raises(ValueError, match="malformed"):
        gensample.run("ddim", pipe, **COMMON, device="cuda:x")


def test_record_origin_and_folder_hash_without_memory_address(tmp_path):
    from diffusers import StableDiffusionPipeline

    a, b = build_sd_pipeline(tmp_path, 1), build_sd_pipeline(tmp_path, 1)  # equal, separate objects
    other = build_sd_pipeline(tmp_path, 1, seed=1)  # other weights, same configs

    def out_dir(p):
        cfg = api.resolve_options("ddim", model=from_object(p).name, prompt="a cat")
        return api.default_output_dir(cfg)

    assert from_object(a).name == from_object(b).name and out_dir(a) == out_dir(b)
    assert "0x" not in from_object(a).name
    assert out_dir(a) != out_dir(other)
    a.unet.peft_config = {"my_lora": object()}  # what peft leaves on a module with an adapter
    assert out_dir(a) != out_dir(b)
    assert from_object(a).origin["adapters"]["unet"]["adapters"] == ["my_lora"]
    del a.unet.peft_config
    # _name_or_path of a pipeline loaded from a folder is recorded; a rerun into the folder resumes (same config)
    b.save_pretrained(tmp_path / "s")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "s", safety_checker=None, requires_safety_checker=False)
    out = tmp_path / "o"
    gensample.run("ddim", loaded, **COMMON, output=str(out))
    rec = json.loads((out / "run.json").read_text())
    assert rec["model_origin"]["_name_or_path"] == str(tmp_path / "s") and str(tmp_path / "s") in rec["model"]
    again = gensample.run("ddim", loaded, **COMMON, output=str(out))
    assert again.record["samples_drawn_this_invocation"] == 0


def test_bare_pixel_unet_object_equals_its_folder(tmp_path):
    unet = build_pixel_unet(3).eval()  # weights require grad, as a freshly built or trained module's do
    unet.save_pretrained(tmp_path / "u")
    kw = dict(steps=4, num_samples=3, progress=False)
    mem = gensample.run("ddim", unet, **kw).samples["x"]
    np.testing.assert_array_equal(mem, gensample.run("ddim", str(tmp_path / "u"), **kw).samples["x"])
    assert all(p.requires_grad for p in unet.parameters())  # the caller's flags are back after the run
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2"))
    pipe.save_pretrained(tmp_path / "p")
    mem = gensample.run("ddpm", pipe, **kw).samples["x"]  # the pipeline's own schedule, not the default one
    np.testing.assert_array_equal(mem, gensample.run("ddpm", str(tmp_path / "p"), **kw).samples["x"])
    assert not np.array_equal(mem, gensample.run("ddpm", unet, **kw).samples["x"])


def test_wrong_objects_are_refused_clearly(sd, tmp_path):
    pipe, _, _ = sd
    with pytest.raises(TypeError) as err:
        gensample.run("ddim", pipe.tokenizer, **COMMON)
    msg = str(err.value)
    assert "CLIPTokenizer" in msg and "UNet2DModel" in msg and "pipeline" in msg
    assert len(msg) < 400 and "{" not in msg  # a short repr, never the config dump
    with pytest.raises(ValueError, match="bare UNet2DConditionModel needs its text encoder"):
        gensample.run("ddim", pipe.unet, **COMMON)
    with pytest.raises(ValueError, match="in-memory model object .* cannot be shared"):
        gensample.run("ddim", pipe, **COMMON, num_processes=2, output=str(tmp_path / "o"))


def test_flow_matching_transformer_object_is_refused_with_the_reason():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                               pooled_projection_dim=16, out_channels=4)
    with pytest.raises(ValueError, match="flow-matching transformer models .* not supported yet"):
        gensample.run("ddim", tr, steps=2, num_samples=1, progress=False)


@pytest.mark.gpu
def test_fp16_cuda_pipeline_object_equals_its_folder_and_keeps_its_dtype(sd):
    """The common diffusers case: a pipeline in fp16 on CUDA. The folder run casts the same weights
    to fp16 on CUDA; both decode through an fp32 VAE (force_upcast); the object's VAE is fp16 again."""
    import copy

    pipe, folder, _ = sd
    half = copy.deepcopy(pipe).to("cuda", torch.float16)
    kw = dict(COMMON, guidance_scale=5.0)
    mem = gensample.run("ddim", half, **kw)
    disk = gensample.run("ddim", folder, device="cuda", dtype="fp16", **kw)
    assert mem.record["config"]["dtype"] == "fp16" and mem.record["device"].startswith("cuda")
    for key in disk.samples:
        np.testing.assert_array_equal(mem.samples[key], disk.samples[key], err_msg=key)
    assert {next(m.parameters()).dtype for _, m in _mods(half)} == {torch.float16}
    assert {next(m.parameters()).device.type for _, m in _mods(half)} == {"cuda"}
    with pytest.raises(ValueError, match="lives on cuda"):
        gensample.run("ddim", half, device="cpu", **kw)
