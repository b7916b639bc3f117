"""The diffusers scheduler contract, parametrised over every gensample scheduler.

Our own tests of every check in diffusers' ``SchedulerCommonTest`` (tests/schedulers/
test_schedulers.py of the diffusers repository), one test per check, never branching on the class:

| diffusers check                                   | here                                   |
|---------------------------------------------------|----------------------------------------|
| check_over_configs / check_over_forward /         | test_save_load_gives_same_steps        |
| test_from_save_pretrained                         |                                        |
| test_from_pretrained                              | test_config_round_trip                 |
| test_compatibles                                  | test_compatibles_round_trip            |
| test_step_shape                                   | test_step_shape                        |
| test_scheduler_outputs_equivalence                | test_tuple_equals_dataclass            |
| test_scheduler_public_api                         | test_public_api                        |
| test_add_noise_device                             | test_add_noise_shape_and_device        |
| test_deprecated_kwargs                            | test_deprecated_kwargs_rule            |
| test_trained_betas                                | test_trained_betas_survive_save_load   |
| test_getattr_is_correct                           | test_getattr_is_correct                |
| (SchedulerBaseTests) unexpected config keys       | test_unexpected_config_key_is_ignored  |
| (DDIM/DDPM test_inference with default configs)    | test_from_config_of_a_default_built_   |
|                                                   | stock_config_keeps_its_values          |

Grid-only restriction: diffusers steps from the raw timesteps 0 and 1. Our schedulers step only
from times on the grid of their last ``set_timesteps`` (Time-Shift needs the grid to place its
window, FKC the next grid time for its weight, DiSA's head follows MAR's respaced table step by
step, first-hitting counts revealed tokens), so every check here walks the grid from its first
time, in order, and a time off the grid raises (test_off_grid_timestep_raises). The masked
scheduler's ancestral grid is the exception: it takes any continuous time in (0, 1] and steps to
the next grid time below it. ``trained_betas`` and the continuous-model add_noise do not apply to
the masked (token) scheduler; its cases are left out of those two checks and say so.

Beyond diffusers' checks, our own contract for every case: fp16 in gives fp16 out, step before
set_timesteps raises, off-grid times, determinism with seeded generators, the full T-step grid, the
training chain (alphas = 1 - betas, alphas_cumprod = cumprod(alphas)), a non-descending custom grid
raises (schedulers that take ``timesteps=``), and for the token cases a prompt position is kept and the
x0 prediction has no mask. Config variants (DiSA's timestep clip, first-hitting with 2 tokens per step,
the ancestral cosine / argmax sampler) are cases of their own, so each goes through every check.
The subject test files (test_fkc.py, test_disa_head.py, test_first_hitting.py, test_time_shift.py)
keep only method-specific math and errors.

Two more rules of ours: ``from_config`` of a default-built DDIM/DDPM config keeps the source's value
of every shared key (diffusers would let our defaults win), and a flow-matching config is refused
(no betas to build the schedule from).

To add a scheduler: append a `Case` (constructor config, its init_noise_sigma, fixtures).
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, PNDMScheduler)

from gensample.schedulers.disa import DiSAHeadScheduler
from gensample.schedulers.first_hitting import MaskedDiffusionScheduler
from gensample.schedulers.fkc import FKCScheduler
from gensample.schedulers.time_shift import TimeShiftScheduler

VOCAB = 6  # token ids 0..5; the mask is id 6 (an extra logit column)


# -- fixtures ---------------------------------------------------------------------------------
def image_sample(seed=0, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)  # (4, 3, 8, 8)


def token_sample(seed=0) -> torch.Tensor:
    """(4, 8) LongTensor: every position masked (first-hitting reveals all 8)."""
    return torch.full((4, 8), VOCAB, dtype=torch.long)


def prompted_token_sample(seed=0) -> torch.Tensor:
    """(4, 8) LongTensor: a one-token prompt (id 0) at position 0, the other 7 positions masked."""
    x = token_sample(seed)
    x[:, 0] = 0
    return x


def image_output(sched, x, t):
    """diffusers' dummy model x t / (t + 1), residual 0.1: at the model time the scheduler asks
    for (Time-Shift hands it over to step), else at the grid time."""
    t_model = sched.model_timesteps(x, t) if hasattr(sched, "model_timesteps") else torch.as_tensor(t)
    tt = t_model.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if t_model.ndim else t_model.to(x.dtype)
    return 0.1 * x * tt / (tt + 1)


def two_expert_output(sched, x, t):
    """(2, B, ...) outputs of two experts (FKC product of two densities)."""
    out = image_output(sched, x, t)
    return torch.stack([out, -0.5 * out])


def token_output(sched, x, t):
    """Fixed logits (B, L, V + 1) with a mask column (the scheduler forces it to -inf)."""
    g = torch.Generator().manual_seed(11)
    return torch.randn(x.shape[0], x.shape[1], VOCAB + 1, generator=g)


@dataclass
class Case:
    id: str
    cls: type
    config: dict
    init_noise_sigma: float
    sample: Callable = image_sample
    output: Callable = image_output
    set_kwargs: dict = field(default_factory=lambda: {"num_inference_steps": 10})
    tokens: bool = False
    off_grid_raises: bool = True
    full_grid: dict = field(default_factory=dict)  # overrides for set_timesteps(T) (TS: eta > 0 needs w/2 < stride 1)
    sibling: type | None = DDIMScheduler  # a stock class whose config loads into ours (from_config both ways)
    our_keys: tuple = ()  # keys that must survive the round trip through the sibling
    prompt_set_kwargs: dict = field(default_factory=dict)  # token cases: set_timesteps for prompted_token_sample

    def make(self, **overrides):
        return self.cls(**{**self.config, **overrides})


TS_KEYS = ("window_size", "cutoff", "variant", "eta", "enabled", "data_var")
CASES = [
    Case("ts-ddim-paper", TimeShiftScheduler, {"window_size": 40, "cutoff": 200}, 1.0, our_keys=TS_KEYS),
    Case("ts-ddpm-pnm", TimeShiftScheduler, {"window_size": 30, "cutoff": 100, "variant": "reference_pnm", "eta": 1.0},
         1.0, sibling=DDPMScheduler, our_keys=TS_KEYS, full_grid={"window_size": 1}),
    Case("ts-vpred-data-aware", TimeShiftScheduler, {"window_size": 8, "cutoff": 0, "prediction_type": "v_prediction",
                                                     "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                     "beta_end": 0.012, "data_var": 0.5, "eta": 0.5},
         1.0, our_keys=TS_KEYS, full_grid={"window_size": 1}),
    Case("fkc-anneal", FKCScheduler, {"fkc_betas": [2.0], "fkc_eta": 1.0}, 1.0 / 2**0.5,
         our_keys=("fkc_betas", "fkc_eta", "fkc_resample")),
    Case("fkc-product-tuple", FKCScheduler, {"fkc_betas": (0.5, 0.5), "fkc_eta": 0.0}, 1.0, output=two_expert_output,
         sibling=DDPMScheduler, our_keys=("fkc_betas", "fkc_eta")),
    Case("disa-head", DiSAHeadScheduler, {"disa_temperature": 0.9}, 1.0, sibling=DDPMScheduler,
         our_keys=("disa_temperature",)),
    Case("disa-head-clip950", DiSAHeadScheduler, {"disa_timestep_clip": 950}, 1.0, sibling=DDPMScheduler,
         our_keys=("disa_timestep_clip",), full_grid={"disa_timestep_clip": None}),  # the clip caps the grid top
    Case("masked-first-hitting", MaskedDiffusionScheduler, {"mask_token_id": VOCAB}, 1.0, sample=token_sample,
         output=token_output, set_kwargs={"num_masked": 8}, tokens=True, sibling=None,
         prompt_set_kwargs={"num_masked": 7}),
    Case("masked-first-hitting-2-per-step", MaskedDiffusionScheduler, {"mask_token_id": VOCAB, "tokens_per_step": 2},
         1.0, sample=token_sample, output=token_output, set_kwargs={"num_masked": 8}, tokens=True, sibling=None,
         prompt_set_kwargs={"num_masked": 7}),
    Case("masked-ancestral", MaskedDiffusionScheduler, {"mask_token_id": VOCAB, "sampler": "ancestral"}, 1.0,
         sample=token_sample, output=token_output, tokens=True, off_grid_raises=False, sibling=None,
         prompt_set_kwargs={"num_inference_steps": 4}),
    Case("masked-ancestral-cosine-argmax", MaskedDiffusionScheduler,
         {"mask_token_id": VOCAB, "sampler": "ancestral", "masking_schedule": "cosine", "final_step": "argmax"}, 1.0,
         sample=token_sample, output=token_output, set_kwargs={"num_inference_steps": 4}, tokens=True,
         off_grid_raises=False, sibling=None, prompt_set_kwargs={"num_inference_steps": 4}),
]
CONTINUOUS = [c for c in CASES if not c.tokens]
TOKENS = [c for c in CASES if c.tokens]
# schedulers whose set_timesteps takes a custom grid (diffusers' `timesteps=`)
CUSTOM_GRID = [c for c in CASES if "timesteps" in inspect.signature(c.cls.set_timesteps).parameters]


def _ids(cases):
    return [c.id for c in cases]


@pytest.fixture(params=CASES, ids=_ids(CASES))
def case(request):
    return request.param


@pytest.fixture(params=CONTINUOUS, ids=_ids(CONTINUOUS))
def ccase(request):
    return request.param


@pytest.fixture(params=TOKENS, ids=_ids(TOKENS))
def tcase(request):
    return request.param


def walk(case, sched, n=3, seed=0, x=None, **step_kw):
    """Set the grid and step the first n grid times in order, feeding each step's prev_sample to
    the next (seeded generator per step). Returns the list of step outputs."""
    sched.set_timesteps(**case.set_kwargs)
    x = case.sample(seed) if x is None else x
    outs = []
    for k, t in enumerate(sched.timesteps[:n]):
        out = sched.step(case.output(sched, x, t), t, x, generator=torch.Generator().manual_seed(100 + k), **step_kw)
        outs.append(out)
        x = out[0] if isinstance(out, tuple) else out.prev_sample
    return outs


def _prev(out):
    return out[0] if isinstance(out, tuple) else out.prev_sample


def _drop_private(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


# -- diffusers' SchedulerCommonTest, check by check ---------------------------------------------
def test_save_load_gives_same_steps(case, tmp_path):
    s = case.make()
    s.save_config(tmp_path)
    s2 = case.cls.from_pretrained(tmp_path)
    for a, b in zip(walk(case, s), walk(case, s2)):
        assert torch.equal(a.prev_sample, b.prev_sample) if case.tokens else (a.prev_sample - b.prev_sample).abs().sum() < 1e-5


def test_config_round_trip(case, tmp_path):
    s = case.make()
    s.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == case.cls.__name__
    s2 = case.cls.from_pretrained(tmp_path)
    assert _drop_private(s.config) == _drop_private(s2.config)  # tuples come back as lists: stored as lists
    assert "_use_default_values" not in s2.config or s2.config["_use_default_values"] == []


def test_compatibles_round_trip(case):
    s = case.make()
    comps = s.compatibles
    assert all(c is not None for c in comps)
    if not case.cls._compatibles:  # the masked scheduler, like diffusers' token schedulers, has none
        assert comps == [] or comps == [case.cls]
        return
    loaded = 0
    for comp_cls in comps:
        try:
            comp = comp_cls.from_config(s.config)
        except ImportError:  # optional dependency missing (DPMSolverSDEScheduler needs torchsde)
            continue
        assert comp is not None
        loaded += 1
    assert loaded >= 1
    new = case.cls.from_config(comp.config)
    ours = {k: v for k, v in new.config.items() if k in s.config and not k.startswith("_")}
    assert ours == _drop_private(s.config)
    extra = {k for k in new.config if k not in s.config}
    assert extra.isdisjoint(inspect.signature(case.cls.__init__).parameters)


def test_from_config_both_ways(ccase):
    if ccase.sibling is None:
        pytest.skip("no stock sibling")
    stock = ccase.sibling(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    ours = ccase.cls.from_config(stock.config)
    assert ours.config.beta_schedule == "squaredcos_cap_v2"
    torch.testing.assert_close(ours.alphas_cumprod.float(), stock.alphas_cumprod)
    s = ccase.make()
    # a stock config plus our own keys as from_config overrides (how a pipeline swaps its scheduler in)
    extra = {k: v for k, v in ccase.config.items() if k in ccase.our_keys}
    swapped = ccase.cls.from_config(stock.config, **extra)
    torch.testing.assert_close(swapped.alphas_cumprod.float(), stock.alphas_cumprod)
    for key in extra:
        assert swapped.config[key] == s.config[key], key
    again = ccase.cls.from_config(ccase.sibling.from_config(s.config).config)
    for key in ccase.our_keys:
        assert again.config[key] == s.config[key], key


# -- issue 25 item 3: the source's value wins for every key shared with DDIM/DDPM ----------------
STOCK_FAMILY = (DDIMScheduler, DDPMScheduler)
DDPM_FAMILY_KEYS = (set(inspect.signature(DDIMScheduler.__init__).parameters)
                    | set(inspect.signature(DDPMScheduler.__init__).parameters)) - {"self"}


def _shared(cls, stock_cls):
    return sorted(DDPM_FAMILY_KEYS & set(inspect.signature(cls.__init__).parameters)
                  & set(inspect.signature(stock_cls.__init__).parameters))


@pytest.mark.parametrize("stock_cls", STOCK_FAMILY, ids=lambda c: c.__name__)
def test_from_config_of_a_default_built_stock_config_keeps_its_values(ccase, stock_cls):
    """`Ours.from_config(DDIMScheduler().config)`: diffusers lists every key of a default-built
    config as defaulted, and its from_config would let *our* default win (DDIM's clip_sample=True
    became False). Every shared key must keep the source's value, and the reverse conversion must
    keep ours (our config does not mark shared keys as defaulted)."""
    stock = stock_cls()
    assert set(_shared(ccase.cls, stock_cls)) <= set(stock.config["_use_default_values"])  # the hard case
    ours = ccase.cls.from_config(stock.config)
    shared = _shared(ccase.cls, stock_cls)
    assert shared, "no shared key: the case does not exercise the rule"
    for key in shared:
        assert ours.config[key] == stock.config[key], (key, ours.config[key], stock.config[key])
    torch.testing.assert_close(ours.alphas_cumprod.float(), stock.alphas_cumprod)
    mine = ccase.make()
    back = stock_cls.from_config(mine.config)
    for key in shared:
        assert back.config[key] == mine.config[key], (key, back.config[key], mine.config[key])


# -- issue 25 item 5: flow-matching configs are refused -------------------------------------------
FLOW_CONFIGS = {
    "flow-match-euler": lambda: dict(FlowMatchEulerDiscreteScheduler().config),
    "flow-keys-no-betas": lambda: {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                                   "base_image_seq_len": 256},
    "dpm-flow-sigmas": lambda: dict(DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                                flow_shift=3.0).config),
}


@pytest.mark.parametrize("flow", sorted(FLOW_CONFIGS))
@pytest.mark.parametrize("cls", [TimeShiftScheduler, FKCScheduler, DiSAHeadScheduler, MaskedDiffusionScheduler],
                         ids=lambda c: c.__name__)
def test_flow_matching_config_is_refused(cls, flow):
    """A flow-matching config carries no betas: from_config would build the default DDPM schedule
    and a stock SD3 pipeline would run on it to the end. It must raise, naming the reason, except
    TimeShiftScheduler on a FlowMatchEulerDiscreteScheduler config, which gives the flow face
    (FlowTimeShiftScheduler, issue 27 item 5) with the source's flow keys."""
    if cls is TimeShiftScheduler and flow != "dpm-flow-sigmas":
        from gensample.schedulers.flow_time_shift import FlowTimeShiftScheduler

        src = FLOW_CONFIGS[flow]()
        face = cls.from_config(src)
        assert isinstance(face, FlowTimeShiftScheduler)
        assert all(face.config[k] == v for k, v in src.items() if not k.startswith("_")), src
        return
    with pytest.raises(ValueError, match="flow-matching"):
        cls.from_config(FLOW_CONFIGS[flow]())


def test_stock_ddpm_family_configs_are_not_flow():
    from gensample.schedulers._config import flow_matching_reason

    for stock in (DDIMScheduler(), DDPMScheduler(), EulerDiscreteScheduler(), PNDMScheduler(),
                  DPMSolverMultistepScheduler()):
        assert flow_matching_reason(dict(stock.config)) is None, type(stock).__name__


def test_step_shape(case):
    outs = walk(case, case.make(), n=2)
    x = case.sample()
    assert all(o.prev_sample.shape == x.shape and o.prev_sample.dtype == x.dtype for o in outs)


def test_tuple_equals_dataclass(case):
    a = walk(case, case.make())
    b = walk(case, case.make(), return_dict=False)
    for d, t in zip(a, b):
        assert isinstance(t, tuple) and len(t) == 2  # diffusers' (prev_sample, pred_original_sample)
        assert torch.equal(d.prev_sample, t[0]) and torch.equal(d.pred_original_sample, t[1])


def test_public_api(case):
    s = case.make()
    assert s.init_noise_sigma == pytest.approx(case.init_noise_sigma)
    assert callable(s.step) and callable(s.scale_model_input) and s.order == 1
    s.set_timesteps(**case.set_kwargs)
    x = case.sample()
    assert s.scale_model_input(x, s.timesteps[0]) is x  # the identity, like DDIM's


def test_add_noise_shape_and_device(ccase):
    s = ccase.make()
    s.set_timesteps(**ccase.set_kwargs)
    x, noise = image_sample(), image_sample(1)
    t = s.timesteps[5][None].expand(4)
    out = s.add_noise(x, noise, t)
    assert out.shape == x.shape and out.device == x.device and out.dtype == x.dtype
    ab = s.alphas_cumprod[t].double().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out.double(), ab.sqrt() * x.double() + (1 - ab).sqrt() * noise.double(), rtol=1e-5, atol=1e-6)


def test_add_noise_tokens_masks_with_the_schedule():
    """The masked scheduler's add_noise (no noise tensor: q(x_t | x_0) masks each token with prob
    1 - alpha_t): t = 0 keeps every token, t = 1 masks every one."""
    s = MaskedDiffusionScheduler(mask_token_id=VOCAB)
    x0 = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.add_noise(x0, 0.0), x0)
    assert (s.add_noise(x0, 1.0) == VOCAB).all()


def test_deprecated_kwargs_rule(case):
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(case.cls.__init__).parameters.values())
    assert bool(getattr(case.cls, "_deprecated_kwargs", [])) == has_var_kw


def test_trained_betas_survive_save_load(ccase, tmp_path):
    betas = np.linspace(1e-4, 0.02, 1000)
    s = ccase.make(trained_betas=betas)
    s.save_pretrained(tmp_path)
    s2 = ccase.cls.from_pretrained(tmp_path)
    assert s.betas.tolist() == s2.betas.tolist()
    torch.testing.assert_close(s2.alphas_cumprod, s.alphas_cumprod)
    assert len(s.betas) == len(s.alphas) == len(s.alphas_cumprod) == 1000


def test_getattr_is_correct(case, caplog):
    s = case.make()
    s.dummy_attribute = 5
    s.register_to_config(test_attribute=5)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hasattr(s, "dummy_attribute") and getattr(s, "dummy_attribute") == 5 and s.dummy_attribute == 5
        assert getattr(s, "save_pretrained") == s.save_pretrained
    assert caplog.text == ""
    with pytest.warns(FutureWarning):
        assert s.test_attribute == 5
    with pytest.raises(AttributeError, match=f"'{case.cls.__name__}' object has no attribute 'does_not_exist'"):
        s.does_not_exist  # noqa: B018


def test_unexpected_config_key_is_ignored(case, tmp_path):
    case.make().save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    data = json.loads(path.read_text())
    data["unexpected"] = True
    path.write_text(json.dumps(data))
    s = case.cls.from_config(case.cls.load_config(tmp_path))
    assert type(s) is case.cls and "unexpected" not in inspect.signature(case.cls.__init__).parameters
    # the same as a stock scheduler does with such a key (kept as a hidden config entry)
    DDIMScheduler().save_config(tmp_path / "stock")
    stock_path = tmp_path / "stock" / "scheduler_config.json"
    stock_path.write_text(json.dumps({**json.loads(stock_path.read_text()), "unexpected": True}))
    stock = DDIMScheduler.from_config(DDIMScheduler.load_config(tmp_path / "stock"))
    assert ("unexpected" in s.config) == ("unexpected" in stock.config)


# -- beyond SchedulerCommonTest: our own contract -----------------------------------------------
def test_fp16_stays_fp16(ccase):
    x = image_sample(dtype=torch.float16)
    assert all(o.prev_sample.dtype == torch.float16 for o in walk(ccase, ccase.make(), x=x))


def test_step_before_set_timesteps_raises(case):
    s = case.make()
    x = case.sample()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(case.output(s, x, 1) if case.tokens else x, 1, x)


def test_off_grid_timestep_raises(case):
    s = case.make()
    s.set_timesteps(**case.set_kwargs)
    x = case.sample()
    grid = s.timesteps.tolist()
    off = (grid[0] + grid[1]) / 2 if case.tokens else int(grid[1]) + 1
    if case.off_grid_raises:
        with pytest.raises(ValueError, match="timestep"):
            s.step(case.output(s, x, grid[0]), off, x, generator=torch.Generator().manual_seed(0))
    else:  # ancestral masked grid: a continuous time steps to the next grid time below it
        out = s.step(case.output(s, x, grid[0]), off, x, generator=torch.Generator().manual_seed(0))
        assert (out.t == grid[1]).all()


def test_full_loop_deterministic(case):
    a = walk(case, case.make(), n=10)
    b = walk(case, case.make(), n=10)
    assert all(torch.equal(p.prev_sample, q.prev_sample) for p, q in zip(a, b))
    if not case.tokens:
        assert torch.isfinite(a[-1].prev_sample).all()


def test_num_steps_equal_T_gives_T_steps(ccase):
    s = ccase.make(**ccase.full_grid)
    T = s.config.num_train_timesteps
    s.set_timesteps(T)
    assert len(s.timesteps) == T and int(s.timesteps[0]) == T - 1 and int(s.timesteps[-1]) == 0


def test_step_signature_matches_diffusers():
    """``return_dict`` sits where DDIMScheduler.step has it; extras come after it."""
    ddim = list(inspect.signature(DDIMScheduler.step).parameters)
    ts = list(inspect.signature(TimeShiftScheduler.step).parameters)
    assert ts[: len(ddim)] == ddim
    for cls in (FKCScheduler, DiSAHeadScheduler, MaskedDiffusionScheduler):
        params = list(inspect.signature(cls.step).parameters)
        assert params[:4] == ["self", "model_output", "timestep", "sample"] and "return_dict" in params


def test_training_chain(ccase):
    """betas / alphas / alphas_cumprod are the training chain of num_train_timesteps entries:
    alphas = 1 - betas exactly and alphas_cumprod = cumprod(alphas)."""
    s = ccase.make()
    T = s.config.num_train_timesteps
    assert s.betas.shape == s.alphas.shape == s.alphas_cumprod.shape == (T,)
    assert torch.equal(s.alphas, 1 - s.betas)
    torch.testing.assert_close(torch.cumprod(s.alphas.double(), 0), s.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cgcase", CUSTOM_GRID, ids=_ids(CUSTOM_GRID))
def test_custom_grid_must_descend(cgcase):
    s = cgcase.make()
    with pytest.raises(ValueError, match="strictly descending"):
        s.set_timesteps(timesteps=[1, 5])


def test_token_step_keeps_the_prompt_and_predicts_no_mask(tcase):
    """A prompt (unmasked) position is never changed; the x0 prediction has no mask token left."""
    s = tcase.make()
    s.set_timesteps(**tcase.prompt_set_kwargs)
    x = prompted_token_sample()
    for k, t in enumerate(s.timesteps[:3]):
        out = s.step(tcase.output(s, x, t), t, x, generator=torch.Generator().manual_seed(1 + k))
        assert (out.prev_sample[:, 0] == 0).all() and (out.pred_original_sample != VOCAB).all()
        x = out.prev_sample


def test_masked_step_honours_its_timestep():
    """Ancestral: stepping from grid time k goes to grid time k + 1 whatever was stepped before."""
    s = MaskedDiffusionScheduler(mask_token_id=VOCAB, sampler="ancestral")
    s.set_timesteps(10)
    x = token_sample()
    grid = s.timesteps.tolist()
    out = s.step(token_output(s, x, grid[3]), grid[3], x, generator=torch.Generator().manual_seed(0))
    assert (out.t == grid[4]).all()
