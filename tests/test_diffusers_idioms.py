"""diffusers idioms on folders saved by earlier releases (issue 25 item 9).

Folders saved before the schedulers moved to ``gensample.schedulers`` record the old module
(``gensample.samplers.time_shift`` / ``.first_hitting`` / ``.disa``) as the scheduler's library in
``model_index.json``; diffusers imports that module and asks it for the class. The old modules
keep a lazy alias for one release, with a FutureWarning naming the new path."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline

from gensample.pipelines.time_shift import enable_time_shift
from gensample.schedulers.disa import DiSAHeadScheduler
from gensample.schedulers.first_hitting import MaskedDiffusionScheduler
from gensample.schedulers.time_shift import TimeShiftScheduler
from sd_models import build_pixel_unet


class SchedulerOnlyPipeline(DiffusionPipeline):
    """A pipeline holding one scheduler: the smallest folder diffusers writes a model_index for."""

    def __init__(self, scheduler):
        super().__init__()
        self.register_modules(scheduler=scheduler)


def _rewrite_library(folder, old_module):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index["scheduler"][0] = old_module
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("scheduler,old,new", [
    (TimeShiftScheduler(window_size=12, cutoff=100), "gensample.samplers.time_shift", "gensample.schedulers.time_shift"),
    (MaskedDiffusionScheduler(mask_token_id=7, tokens_per_step=2), "gensample.samplers.first_hitting",
     "gensample.schedulers.first_hitting"),
    (DiSAHeadScheduler(disa_temperature=0.9), "gensample.samplers.disa", "gensample.schedulers.disa"),
], ids=["time_shift", "first_hitting", "disa"])
def test_folder_saved_with_the_old_module_path_loads_with_a_warning(tmp_path, scheduler, old, new):
    SchedulerOnlyPipeline(scheduler).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == [new, type(scheduler).__name__]  # what a current save records
    _rewrite_library(tmp_path, old)
    with pytest.warns(FutureWarning, match=rf"{old}\.{type(scheduler).__name__} moved to {new}"):
        loaded = SchedulerOnlyPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is type(scheduler)
    assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def test_old_ddim_time_shift_folder_loads_and_gives_the_same_images(tmp_path):
    """The issue's case: a Time-Shift DDIMPipeline saved by the old release (library rewritten to
    gensample.samplers.time_shift) loads with a FutureWarning and, re-enabled, draws the same images."""
    pipe = DDIMPipeline(unet=build_pixel_unet().eval(), scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    enable_time_shift(pipe, window_size=12, cutoff=100)
    kw = dict(batch_size=2, num_inference_steps=5, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.save_pretrained(tmp_path)
    _rewrite_library(tmp_path, "gensample.samplers.time_shift")
    with pytest.warns(FutureWarning, match="gensample.schedulers.time_shift"):
        loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is DDIMPipeline
    loaded.set_progress_bar_config(disable=True)
    enable_time_shift(loaded)
    assert np.array_equal(loaded(generator=torch.Generator().manual_seed(0), **kw).images, a)


def test_old_paths_stay_lazy_and_unknown_names_raise():
    """The method files import neither diffusers nor gensample.schedulers; the alias resolves only
    the moved names (anything else is an AttributeError, as for any module)."""
    code = ("import sys, gensample.samplers.time_shift as ts, gensample.samplers.first_hitting as fh; "
            "bad = [m for m in sys.modules if m.startswith(('diffusers', 'gensample.schedulers'))]; "
            "assert not bad, bad; "
            "assert not hasattr(ts, 'NoSuchScheduler') and not hasattr(fh, 'NoSuchScheduler')")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- issue 25 item 10: docs/time_shift.md describes the real API ------------------------------------
def test_time_shift_docs_name_only_real_classes_and_document_per_pipeline_use():
    """Every CamelCase class the doc names (``...Scheduler``, ``...Pipeline``, ``...Wrapper``) exists
    in gensample or diffusers (the doc described a ``TimeShiftModelWrapper`` that did not), and the
    doc covers per-pipeline enabling, from_pipe, and re-enabling after from_pretrained."""
    import re
    from pathlib import Path

    import diffusers

    import gensample.pipelines.time_shift as pipelines_ts
    import gensample.schedulers as schedulers

    text = (Path(__file__).resolve().parents[1] / "docs" / "time_shift.md").read_text()
    names = set(re.findall(r"\b([A-Z][A-Za-z0-9]*(?:Scheduler|Pipeline|Wrapper|Model))\b", text))
    assert "TimeShiftScheduler" in names
    missing = sorted(n for n in names if not any(hasattr(m, n) for m in (schedulers, pipelines_ts, diffusers)))
    assert not missing, missing
    for func in re.findall(r"`(enable_time_shift|disable_time_shift|make_time_shift_scheduler)\(", text):
        assert hasattr(pipelines_ts, func) or hasattr(schedulers, func), func
    for needed in ("from_pipe", "enable_time_shift(loaded)", "from_pretrained", "Several pipelines, one UNet"):
        assert needed in text, needed


def test_ddpm_variance_type_the_step_does_not_use_is_said_and_positional_generator_is_taken():
    """TS-DDPM draws with the posterior variance: a fixed_large / learned DDPM config warns at
    from_config (fixed_small does not); DDPMScheduler.step's positional generator is accepted."""
    import warnings as _w

    import torch
    from diffusers import DDPMScheduler

    from gensample.schedulers.time_shift import TimeShiftScheduler

    with pytest.warns(UserWarning, match="variance_type='fixed_large' is not used"):
        TimeShiftScheduler.from_config(DDPMScheduler(variance_type="fixed_large").config)
    with _w.catch_warnings():
        _w.simplefilter("error")
        ts = TimeShiftScheduler.from_config(DDPMScheduler().config, eta=1.0, enabled=False)
    ts.set_timesteps(4)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = ts.timesteps[0]
    a = ts.step(eps, t, x, torch.Generator().manual_seed(5)).prev_sample
    b = ts.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="generator= once"):
        ts.step(eps, t, x, torch.Generator(), generator=torch.Generator())
