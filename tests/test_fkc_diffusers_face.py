"""FKC's diffusers face as a diffusers user meets it (issue 25, items 4-7 and 9 for FKC).

- item 4: FKCScheduler with a non-trivial target, stepped by a stock pipeline (which throws the
  log-weight increments away), raises at the first step and names the fix; a trivial target
  (fkc_betas=[1.0], all increments exactly 0) only warns once and samples as DDPM / DDIM do.
- item 5: flow-matching configs are refused by from_config / from_pretrained / FKCPipeline.
- item 6: step takes DDIMScheduler.step's keywords (DDIMPipeline passes eta=...).
- item 7: FKCPipeline validates its denoiser at construction (SDXL UNet, SD3 / Flux transformers).
- item 9: folders that recorded ``gensample.samplers.fkc`` as FKCScheduler's module still load,
  with a FutureWarning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, FlowMatchLCMScheduler,
                       UniPCMultistepScheduler)

from gensample.pipelines.fkc import FKCPipeline
from gensample.schedulers.fkc import FKCScheduler
from sd_models import build_pixel_unet, build_sd_pipeline, build_unet


def _pipe(cls, **sched_kwargs):
    p = cls(unet=build_pixel_unet(attention=False), scheduler=DDPMScheduler())
    p.set_progress_bar_config(disable=True)
    p.scheduler = FKCScheduler(**sched_kwargs)  # the idiom of issue 25: assign into a stock pipeline
    return p


# -- item 4: a stock pipeline cannot collect the weights ---------------------------------------------
NON_TRIVIAL = {"anneal": [2.0], "cfg": [3.0, -2.0], "product": [1.0, 1.0], "geometric-mean": [0.5, 0.5]}


@pytest.mark.parametrize("betas", list(NON_TRIVIAL.values()), ids=list(NON_TRIVIAL))
@pytest.mark.parametrize("pipe_cls", [DDPMPipeline, DDIMPipeline])
def test_stock_pipeline_refuses_a_non_trivial_target_at_the_first_step(pipe_cls, betas):
    p = _pipe(pipe_cls, fkc_betas=betas)
    calls = []
    p.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"FKCPipeline.*gensample run --sampler fkc") as err:
        p(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert pipe_cls.__name__ in str(err.value) and str(betas) in str(err.value)
    assert len(calls) == 1  # refused at the first step, not after the whole loop


def test_stable_diffusion_pipeline_refuses_fkc_cfg_weights(tmp_path):
    p = build_sd_pipeline(tmp_path)
    p.set_progress_bar_config(disable=True)
    p.scheduler = FKCScheduler.from_config(p.scheduler.config, fkc_betas=[3.0, -2.0])
    with pytest.raises(ValueError, match="StableDiffusionPipeline.*log-weight increments are thrown away"):
        p("a cat", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))


def test_the_suggested_fix_runs_and_own_loops_are_not_refused():
    """FKCPipeline.from_pipe(pipe) works on the refused pipeline; a plain loop of one's own (no
    pipeline on the stack) and a pipeline inside collecting_log_weights() step freely."""
    p = _pipe(DDPMPipeline, fkc_betas=[2.0])
    fkc = FKCPipeline.from_pipe(p)
    fkc.set_progress_bar_config(disable=True)
    out = fkc(target="anneal", beta=2.0, num_particles=2, num_inference_steps=2, output_type="pt",
              generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 8, 8)
    s = FKCScheduler(fkc_betas=[2.0])
    s.set_timesteps(3)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (s.step(0.1 * x, s.timesteps[0], x, generator=torch.Generator().manual_seed(1)).log_weight_increment != 0).all()
    with p.scheduler.collecting_log_weights():
        p(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="thrown away"):  # the declaration ends with the block
        p(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))


def test_trivial_target_warns_once_and_is_ddpm():
    """fkc_betas=[1.0]: every increment is exactly 0; DDPMPipeline samples as with DDPMScheduler
    (DDIM eta = 1 is DDPM's posterior step; FKC never clips x0, so the control has clip_sample=False).
    float32 (DDPM) vs float64 (FKC) arithmetic over 10 steps: atol 1e-4."""
    p = _pipe(DDPMPipeline)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = p(num_inference_steps=10, output_type="np", generator=torch.Generator().manual_seed(0)).images
        p(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    msgs = [str(w.message) for w in rec if "FKCScheduler" in str(w.message)]
    assert len(msgs) == 1 and "log-weight increment is zero" in msgs[0]
    p.scheduler = DDPMScheduler(clip_sample=False)
    b = p(num_inference_steps=10, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a - 0.5).max() > 0.05  # not a constant image


# -- item 6: DDIMPipeline's step keywords ----------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_keywords_and_equivalence(eta):
    p = _pipe(DDIMPipeline, fkc_eta=0.3)  # the pipeline's eta overrides fkc_eta, as for DDIMScheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = p(num_inference_steps=5, eta=eta, use_clipped_model_output=True, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
    p.scheduler = DDIMScheduler(clip_sample=False)
    b = p(num_inference_steps=5, eta=eta, use_clipped_model_output=True, output_type="np",
          generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_step_variance_noise_and_bad_keywords():
    s = FKCScheduler(fkc_betas=[2.0])
    s.set_timesteps(4)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    a = s.step(0.1 * x, s.timesteps[0], x, eta=1.0, variance_noise=z)
    b = s.step(0.1 * x, s.timesteps[0], x, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.prev_sample, b.prev_sample)
    torch.testing.assert_close(a.log_weight_increment, b.log_weight_increment)
    c = s.step(0.1 * x, s.timesteps[0], x, eta=0.0, variance_noise=z)  # eta = 0: noise unused
    assert not torch.equal(c.prev_sample, a.prev_sample)
    torch.testing.assert_close(c.log_weight_increment, a.log_weight_increment)  # the weight does not depend on eta
    with pytest.raises(ValueError, match="generator or variance_noise"):
        s.step(0.1 * x, s.timesteps[0], x, generator=torch.Generator(), variance_noise=z)
    with pytest.raises(ValueError, match="eta must be"):
        s.step(0.1 * x, s.timesteps[0], x, eta=-1.0)


def test_previous_timestep_as_ddpm():
    """diffusers' DDPM test_custom_timesteps: the step from each grid time goes to the next one, -1 at the end."""
    s, ref = FKCScheduler(), DDPMScheduler()
    s.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    ref.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    assert [int(s.previous_timestep(t)) for t in s.timesteps] == [int(ref.previous_timestep(t)) for t in ref.timesteps]
    assert int(s.previous_timestep(0)) == -1


# -- item 5: flow-matching configs ---------------------------------------------------------------
FLOW_CONFIGS = {
    "flow-euler": lambda: FlowMatchEulerDiscreteScheduler().config,
    "flow-euler-shift3": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0).config,
    "flow-heun": lambda: FlowMatchHeunDiscreteScheduler().config,
    "flow-lcm": lambda: FlowMatchLCMScheduler().config,
    "dpm-flow-sigmas": lambda: DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction").config,
}


@pytest.mark.parametrize("make", list(FLOW_CONFIGS.values()), ids=list(FLOW_CONFIGS))
def test_flow_matching_configs_are_refused(make):
    with pytest.raises(ValueError, match="flow-matching"):
        FKCScheduler.from_config(make())


@pytest.mark.parametrize("stock", [DDIMScheduler, DDPMScheduler, UniPCMultistepScheduler, DPMSolverMultistepScheduler])
def test_ddpm_family_configs_still_load(stock):
    s = FKCScheduler.from_config(stock(beta_schedule="scaled_linear").config, fkc_betas=[2.0])
    torch.testing.assert_close(s.alphas_cumprod, stock(beta_schedule="scaled_linear").alphas_cumprod)


def test_flow_folder_and_pipeline_scheduler_refused(tmp_path):
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="flow-matching"):
        FKCScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="flow-matching"):
        FKCPipeline(unet=build_pixel_unet(attention=False), scheduler=FlowMatchEulerDiscreteScheduler())


# -- item 7: the denoiser is checked at construction ------------------------------------------------
def _sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                                 pooled_projection_dim=8, out_channels=4)


def _flux_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4))


@pytest.mark.parametrize("make, match", [
    (_sd3_transformer, "SD3Transformer2DModel, a flow-matching transformer"),
    (_flux_transformer, "FluxTransformer2DModel, a flow-matching transformer"),
    (lambda: build_unet(1, in_channels=9), "in_channels=9, out_channels=4.*inpainting"),
    (lambda: torch.nn.Linear(2, 2), "Linear, not a diffusers UNet"),
], ids=["sd3", "flux", "inpaint", "not-a-unet"])
def test_unsupported_denoisers_refused_at_construction(make, match):
    with pytest.raises(ValueError, match=match) as err:
        FKCPipeline(unet=make(), scheduler=DDIMScheduler())
    assert "FKCPipeline supports" in str(err.value) and "UNet2DConditionModel" in str(err.value)


def test_from_pipe_of_an_sd_pipeline_is_accepted_and_text_width_checked(tmp_path):
    sd = build_sd_pipeline(tmp_path)
    fkc = FKCPipeline.from_pipe(sd)
    assert isinstance(fkc.scheduler, FKCScheduler) and fkc.unet is sd.unet
    wide = build_unet(1, cross_attention_dim=2 * sd.unet.config.cross_attention_dim)
    with pytest.raises(ValueError, match="text_encoder: hidden size"):
        FKCPipeline(unet=wide, scheduler=sd.scheduler, vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer)


# -- item 9: the old module path of FKCScheduler ----------------------------------------------------
def test_folder_recording_the_old_module_loads_with_a_deprecation_warning(tmp_path):
    pipe = FKCPipeline(unet=build_pixel_unet(attention=False, num_class_embeds=3), scheduler=DDPMScheduler())
    pipe.save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["scheduler"] == ["gensample.schedulers.fkc", "FKCScheduler"]
    index["scheduler"] = ["gensample.samplers.fkc", "FKCScheduler"]  # as folders saved before the move recorded it
    index_path.write_text(json.dumps(index))
    with pytest.warns(FutureWarning, match="gensample.samplers.fkc.FKCScheduler moved to gensample.schedulers.fkc"):
        again = FKCPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is FKCScheduler
    assert again.scheduler.config.fkc_betas == pipe.scheduler.config.fkc_betas


def test_old_module_alias_resolves_with_a_warning():
    import gensample.samplers.fkc as old

    with pytest.warns(FutureWarning, match="Import it from gensample.schedulers.fkc"):
        assert old.FKCScheduler is FKCScheduler
    with pytest.warns(FutureWarning):
        from gensample.samplers.fkc import FKCSchedulerOutput  # noqa: F401
    assert not hasattr(old, "NoSuchName")


def test_old_module_alias_imports_nothing_at_import_time():
    """The alias is a module-level __getattr__: the math module's top level imports neither
    diffusers nor gensample.schedulers (checked on the source: a fresh interpreter costs ~20 s on
    a loaded 2-core machine; the subprocess version is test_old_module_alias_is_lazy, slow)."""
    import ast
    import inspect

    import gensample.samplers.fkc as old

    top = [n for n in ast.parse(inspect.getsource(old)).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any("diffusers" in m or "schedulers" in m for m in names), names


@pytest.mark.slow
def test_old_module_alias_is_lazy():
    """Importing gensample.samplers.fkc still imports neither diffusers nor the schedulers
    package; the alias resolves on attribute access only; other names still raise."""
    code = ("import sys, warnings, gensample.samplers.fkc as m\n"
            "assert 'diffusers' not in sys.modules and 'gensample.schedulers.fkc' not in sys.modules\n"
            "assert not hasattr(m, 'NoSuchName')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    from gensample.samplers.fkc import FKCScheduler, FKCSchedulerOutput\n"
            "from gensample.schedulers.fkc import FKCScheduler as New\n"
            "assert FKCScheduler is New and len(w) == 2 and all(x.category is FutureWarning for x in w)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
