"""diffusers-style scheduler checks (specs/ecosystem.md sec. 4), parametrised over our schedulers.

To add a scheduler: append a `Case` to CASES (constructor, kwargs sweep, a sibling class for the
round trip). Tests take valid timesteps from the per-case fixture and never branch on the class.
Fixtures (ecosystem sec. 4): a (4, 3, 8, 8) sample, model x * t / (t + 1), residual 0.1 x.
"""

import json
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from diffusers import DDIMScheduler, DDPMScheduler

from gensample.samplers.time_shift import TimeShiftScheduler


@dataclass
class Case:
    id: str
    cls: type
    config: dict
    step_kwargs: dict = field(default_factory=dict)
    sibling: type = DDIMScheduler  # a stock class whose config loads into ours
    our_keys: tuple = ()  # keys that must survive the round trip through the sibling


TS_KEYS = ("window_size", "cutoff", "variant", "eta", "enabled")
CASES = [
    Case("ts-ddim-paper", TimeShiftScheduler, {"window_size": 40, "cutoff": 200, "clip_sample": False}, {}, DDIMScheduler, TS_KEYS),
    Case("ts-ddpm-pnm", TimeShiftScheduler, {"window_size": 30, "cutoff": 100, "variant": "reference_pnm", "eta": 1.0},
         {}, DDPMScheduler, TS_KEYS),
    Case("ts-vpred-eta", TimeShiftScheduler, {"window_size": 8, "cutoff": 0, "prediction_type": "v_prediction",
                                              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
         {"eta": 0.5}, DDIMScheduler, TS_KEYS),
]


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request):
    return request.param


def dummy_sample(seed=0) -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (4, 3, 8, 8)


def dummy_model(x, t):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if torch.as_tensor(t).ndim else t
    return x * t / (t + 1)


def one_step(sched, case, t, sample, seed=0, **kw):
    t_model = sched.model_timesteps(sample, t) if hasattr(sched, "model_timesteps") else t
    residual = 0.1 * dummy_model(sample, t_model)
    return sched.step(residual, t, sample, generator=torch.Generator().manual_seed(seed), **case.step_kwargs, **kw)


def timesteps_of(sched, n=10):
    sched.set_timesteps(n)
    return sched.timesteps[1:3]  # past the first step (which TS never shifts)


def test_save_reload_gives_same_step(case, tmp_path):
    s = case.cls(**case.config)
    s.save_pretrained(tmp_path)
    s2 = case.cls.from_pretrained(tmp_path)
    for t in timesteps_of(s):
        s2.set_timesteps(10)
        a = one_step(s, case, t, dummy_sample()).prev_sample
        b = one_step(s2, case, t, dummy_sample()).prev_sample
        assert (a - b).abs().max() < 1e-5


def test_config_round_trip(case, tmp_path):
    s = case.cls(**case.config)
    s.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == case.cls.__name__
    s2 = case.cls.from_pretrained(tmp_path)
    drop = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert drop(s.config) == drop(s2.config)


def test_from_config_both_ways(case):
    stock = case.sibling(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    ours = case.cls.from_config(stock.config)
    assert ours.config.beta_schedule == "squaredcos_cap_v2" and ours.config.clip_sample is False
    torch.testing.assert_close(ours.alphas_cumprod, stock.alphas_cumprod)
    s = case.cls(**case.config)
    back = case.sibling.from_config(s.config)
    again = case.cls.from_config(back.config)
    for key in case.our_keys:
        assert again.config[key] == s.config[key], key


def test_output_shape_and_dtype(case):
    s = case.cls(**case.config)
    for t in timesteps_of(s):
        out = one_step(s, case, t, dummy_sample())
        assert out.prev_sample.shape == dummy_sample().shape and out.prev_sample.dtype == torch.float32


def test_fp16_stays_fp16(case):
    s = case.cls(**case.config)
    x = dummy_sample().half()
    for t in timesteps_of(s):
        assert one_step(s, case, t, x).prev_sample.dtype == torch.float16


def test_tuple_equals_dataclass(case):
    s = case.cls(**case.config)
    for t in timesteps_of(s):
        a = one_step(s, case, t, dummy_sample())
        b = one_step(s, case, t, dummy_sample(), return_dict=False)
        assert isinstance(b, tuple) and torch.equal(a.prev_sample, b[0]) and torch.equal(a.pred_original_sample, b[1])


def test_public_attributes(case):
    s = case.cls(**case.config)
    assert s.init_noise_sigma == 1.0 and len(s) == s.config.num_train_timesteps
    x = dummy_sample()
    s.set_timesteps(10)
    assert torch.equal(s.scale_model_input(x, s.timesteps[0]), x)
    assert s.order == 1 and isinstance(s._compatibles, list)


def test_add_noise_keeps_shape_and_device(case):
    s = case.cls(**case.config)
    x, noise = dummy_sample(), dummy_sample(1)
    t = torch.tensor([0, 10, 500, 999])
    out = s.add_noise(x, noise, t)
    assert out.shape == x.shape and out.device == x.device
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, ab.sqrt() * x + (1 - ab).sqrt() * noise)


def test_kwargs_rule(case):
    import inspect

    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(case.cls.__init__).parameters.values())
    assert bool(getattr(case.cls, "_deprecated_kwargs", [])) == has_var_kw


def test_trained_betas_survive_save_load(case, tmp_path):
    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    s = case.cls(**case.config, trained_betas=betas)
    s.save_pretrained(tmp_path)
    s2 = case.cls.from_pretrained(tmp_path)
    assert s2.config.trained_betas == betas
    torch.testing.assert_close(s2.alphas_cumprod, s.alphas_cumprod)


def test_config_attribute_access_warns(case):
    s = case.cls(**case.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ = s.num_train_timesteps
    assert any("config" in str(w.message) for w in caught)


def test_step_before_set_timesteps_raises(case):
    s = case.cls(**case.config)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(dummy_sample(), 500, dummy_sample())


@pytest.mark.parametrize("bad", [[500, 600], [1000, 10], [10, 10], []])
def test_bad_custom_timesteps_rejected(case, bad):
    with pytest.raises(ValueError, match="timesteps"):
        case.cls(**case.config).set_timesteps(timesteps=bad)


def test_num_steps_equal_T_gives_T_steps(case):
    s = case.cls(**case.config)
    s.set_timesteps(s.config.num_train_timesteps)
    assert len(s.timesteps) == s.config.num_train_timesteps and s.timesteps[0] == 999 and s.timesteps[-1] == 0
    with pytest.raises(ValueError):
        s.set_timesteps(s.config.num_train_timesteps + 1)


def test_full_loop_deterministic(case):
    def loop():
        s = case.cls(**case.config)
        s.set_timesteps(10)
        x, gen = dummy_sample(), torch.Generator().manual_seed(7)
        for t in s.timesteps:
            t_model = s.model_timesteps(x, t) if hasattr(s, "model_timesteps") else t
            x = s.step(0.1 * dummy_model(x, t_model), t, x, generator=gen, **case.step_kwargs).prev_sample
        return x

    a, b = loop(), loop()
    assert torch.equal(a, b) and torch.isfinite(a).all()
