"""The GPU-path plumbing that can be checked without a GPU (issue 10): --compile wiring,
half-precision casting that keeps float64 schedule tensors, float32 sampler state around a
half-precision network. The CUDA runs themselves are in tests/test_gpu.py (marked gpu)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample import api
from gensample.cli import main
from gensample.core.denoiser import Denoiser
from gensample.parallel import cast_module


def test_compile_flag_wraps_the_unet_and_is_not_semantic(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(module, *args, **kwargs):  # stands in for torch.compile (needs a C compiler / GPU)
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "r"
    r = CliRunner().invoke(main, ["run", "--sampler", "ddim", "--model", "gmm2d", "-n", "3", "--steps", "4", "-o", str(out), "--compile"])
    assert r.exit_code == 0, r.output
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "GMMUNet"
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["compile"] is True and "compile" not in rec["semantic_config"]
    eager = api.run("ddim", "gmm2d", num_samples=3, steps=4, progress=False).samples["x"]
    np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], eager)
    # resuming without --compile is allowed (same samples)
    r = CliRunner().invoke(main, ["run", "--sampler", "ddim", "--model", "gmm2d", "-n", "3", "--steps", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_module_keeps_float64_tensors(dtype):
    net = torch.nn.Linear(3, 3)
    net.register_buffer("table", torch.linspace(0, 1, 5, dtype=torch.float64))
    net.register_buffer("steps", torch.arange(3))
    cast_module(net, torch.device("cpu"), dtype)
    assert net.weight.dtype == net.bias.dtype == dtype
    assert net.table.dtype == torch.float64 and net.steps.dtype == torch.int64
    cast_module(net, torch.device("cpu"), None)  # None: move only
    assert net.weight.dtype == dtype


def test_half_network_float32_sampler_state():
    """A bf16 network inside the Denoiser: inputs cast to bf16 for the call, eps back in the
    sampler's float32, schedule conversions in float64 (works on CPU, as on CUDA)."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 1)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, sample, timestep, **kw):
            assert sample.dtype == torch.bfloat16
            return (self.net(sample),)

    wrap = Wrap()
    ab = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    ref = Denoiser(wrap, ab, "v_prediction")
    x = torch.randn(2, 1, 4, 4)
    cast_module(wrap, torch.device("cpu"), torch.bfloat16)
    eps = ref(x, torch.tensor(300))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    assert ref.alphas_cumprod.dtype == torch.float64


def test_half_dtype_on_cpu_is_refused_before_loading(tmp_path):
    r = CliRunner().invoke(main, ["run", "--sampler", "ddim", "--model", "gmm2d", "-n", "2", "--dtype", "bf16",
                                  "--device", "cpu", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--dtype bf16 needs --device cuda" in r.output
