"""SD3 and Flux end to end (issue 27, item 4 and "Must show"): tiny random pipelines saved with
``save_pretrained`` run through ``gensample run`` (in-process Click runner), ``gensample.run(model=DIR)``
and ``gensample.run(model=pipe)``; every method that applies to flows writes decoded PNGs of the
pipeline's pixel size, the three entry points draw the same samples, ``ddim`` on the VP twin
reproduces the stock pipeline, ``oms`` is refused with its reason, and ``--max-sequence-length``
reaches the T5 encoder (validated before torch is imported, refused for models without T5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import clean, invoke
from flow_models import PIXELS, tiny_flux_pipeline, tiny_sd3_pipeline

torch.set_num_threads(1)

# Flux's pipeline default is 128 latent pixels (256 px with the tiny 2x VAE): too slow for a CPU test,
# so Flux runs at an asked 16 x 16 (the PNGs must have the asked size)
SIZE = {"sd3": (), "flux": ("--height", PIXELS, "--width", PIXELS)}
PROMPT = "a red cat"
FROM_IMAGE = ("--task", "sr-avgpool")  # + --from-image <png of the fixture>


# (id, family, sampler, extra CLI args); "IMG" stands for the fixture's input PNG
CASES = [
    ("sd3-euler", "sd3", "euler", ()),
    ("sd3-ddim", "sd3", "ddim", ()),
    ("sd3-ts-ddim", "sd3", "ts-ddim", ()),
    ("sd3-fkc-cfg", "sd3", "fkc", ("--fkc-target", "cfg", "--guidance-scale", 3, "--negative-prompt", "blue dog",
                                   "--particles", 2)),
    ("sd3-fkc-product", "sd3", "fkc", ("--fkc-target", "product", "--experts-prompts", "a red cat|a blue dog",
                                       "--particles", 2)),
    ("sd3-dps", "sd3", "dps", ("--from-image", "IMG", *FROM_IMAGE)),
    ("sd3-smc-post", "sd3", "smc-post", ("--from-image", "IMG", *FROM_IMAGE, "--particles", 2)),
    ("sd3-stsl", "sd3", "stsl", ("--from-image", "IMG", *FROM_IMAGE, "--inner-steps", 1)),
    # the compositions (docs/flow_matching.md "Compositions on flows"); --data-var: the latent-aware statistic
    ("sd3-fkc-cfg-time-shift", "sd3", "fkc", ("--fkc-target", "cfg", "--guidance-scale", 3, "--negative-prompt", "blue dog",
                                              "--particles", 2, "--time-shift", "--data-var", 0.5)),
    ("sd3-dps-time-shift", "sd3", "dps", ("--from-image", "IMG", *FROM_IMAGE, "--time-shift", "--data-var", 0.5)),
    ("flux-euler", "flux", "euler", ()),
    ("flux-ddim", "flux", "ddim", ()),
    ("flux-ts-ddim", "flux", "ts-ddim", ()),
    ("flux-fkc-product", "flux", "fkc", ("--fkc-target", "product", "--experts-prompts", "a red cat|a blue dog",
                                         "--particles", 2)),
    ("flux-fkc-anneal", "flux", "fkc", ("--fkc-target", "anneal", "--beta", 2, "--particles", 2)),
    # undistilled Flux: a true unconditional branch (FluxPipeline's true_cfg_scale with a negative prompt)
    ("flux-fkc-cfg", "flux", "fkc", ("--fkc-target", "cfg", "--guidance-scale", 3, "--negative-prompt", "blue dog",
                                     "--particles", 2)),
    ("flux-dps", "flux", "dps", ("--from-image", "IMG", *FROM_IMAGE)),
    ("flux-smc-post", "flux", "smc-post", ("--from-image", "IMG", *FROM_IMAGE, "--particles", 2)),
    ("flux-stsl", "flux", "stsl", ("--from-image", "IMG", *FROM_IMAGE, "--inner-steps", 1)),
    ("flux-fkc-product-ddpm", "flux", "fkc", ("--fkc-target", "product", "--experts-prompts", "a red cat|a blue dog",
                                              "--particles", 2, "--proposal", "ddpm")),
    ("flux-psld-time-shift", "flux", "psld", ("--from-image", "IMG", *FROM_IMAGE, "--time-shift", "--data-var", 0.5)),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    """{family: (saved folder, the in-memory pipeline it was saved from)}, plus "IMG": a 16x16 RGB PNG."""
    root = tmp_path_factory.mktemp("flowcli")
    out = {}
    for family, build in (("sd3", tiny_sd3_pipeline), ("flux", tiny_flux_pipeline)):
        pipe = build(root / f"_{family}_src")
        pipe.save_pretrained(root / family)
        out[family] = (root / family, pipe)
    rgb = np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "in.png")
    out["IMG"] = root / "in.png"
    return out


def _args(flows, extra) -> list:
    return [flows["IMG"] if a == "IMG" else a for a in extra]


def _kwargs(flows, extra) -> dict:
    """CLI flags -> gensample.run keywords."""
    args, out, i = _args(flows, extra), {}, 0
    while i < len(args):  # "--flag value", or a bare "--flag" (a boolean: the next token is a flag or the end)
        key = str(args[i])[2:].replace("-", "_")
        bare = i + 1 == len(args) or str(args[i + 1]).startswith("--")
        out[key], i = (True, i + 1) if bare else (args[i + 1], i + 2)
    return out


_CLI_SAMPLES: dict = {}  # case id -> the CLI run's samples.npz arrays (reused by the API test)


def _cli(flows, tmp_path, case_id, family, sampler, extra):
    out = tmp_path / case_id
    res = invoke("run", "--sampler", sampler, "--model", flows[family][0], "--prompt", PROMPT, "--steps", 4, "-n", 2,
                 *SIZE[family], *_args(flows, extra), "--threads", 1, "-o", out, "--no-progress")
    clean(res, 0)
    with np.load(out / "samples.npz") as z:
        _CLI_SAMPLES[case_id] = {k: z[k] for k in z.files}
    return out


@pytest.mark.parametrize("case_id,family,sampler,extra", CASES, ids=IDS)
def test_cli_writes_decoded_pngs_of_the_pipeline_size(flows, tmp_path, case_id, family, sampler, extra):
    out = _cli(flows, tmp_path, case_id, family, sampler, extra)
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png"]
    assert all(Image.open(p).size == (PIXELS, PIXELS) for p in pngs)
    z = _CLI_SAMPLES[case_id]
    assert np.isfinite(z["x"]).all()
    if "--from-image" in extra:  # inverse problems keep the decoded pixels and the measurement
        assert z["x"].shape == (2, 3, PIXELS, PIXELS) and z["y"].shape == (2, 3, PIXELS // 2, PIXELS // 2)
    else:  # latents (the VAE's channels, 2x smaller) and the decoded images
        channels = 4 if family == "sd3" else 2
        assert z["x"].shape == (2, channels, PIXELS // 2, PIXELS // 2) and z["images"].shape == (2, 3, PIXELS, PIXELS)
    rec = json.loads((out / "run.json").read_text())
    assert rec["text_conditioning"]["prompts"] == [PROMPT] and rec["status"] == "complete"


@pytest.mark.parametrize("case_id,family,sampler,extra", CASES, ids=IDS)
def test_python_api_from_folder_and_object_match_the_cli(flows, tmp_path, case_id, family, sampler, extra):
    """gensample.run(model=DIR) and gensample.run(model=pipe) draw the CLI's samples (same seeds,
    one thread each; float32 on CPU, so equal to 1e-5 rather than bit for bit)."""
    import gensample

    folder, pipe = flows[family]
    if case_id not in _CLI_SAMPLES:  # this test run alone (-k): make the CLI's samples here
        _cli(flows, tmp_path, case_id, family, sampler, extra)
    size = {"height": PIXELS, "width": PIXELS} if family == "flux" else {}
    kw = dict(prompt=PROMPT, steps=4, num_samples=2, threads=1, progress=False, **size, **_kwargs(flows, extra))
    by_dir = gensample.run(sampler, str(folder), **kw).samples
    by_obj = gensample.run(sampler, pipe, **kw).samples
    cli = _CLI_SAMPLES[case_id]
    for got in (by_dir, by_obj):
        np.testing.assert_allclose(np.asarray(got["x"]), cli["x"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_oms_is_refused_on_flows_with_the_reason(flows, tmp_path, family):
    res = invoke("run", "--sampler", "oms", "--model", flows[family][0], "--prompt", PROMPT, "--steps", 4, "-n", 2,
                 *SIZE[family], "-o", tmp_path / "o", "--no-progress")
    clean(res, 2, "does not run on the flow-matching model", "terminal-SNR gap", "no gap to fix")
    import gensample

    with pytest.raises(ValueError, match="sigma = 1, pure noise, so there is no gap to fix"):
        gensample.run("oms", flows[family][1], prompt=PROMPT, steps=4, num_samples=2, progress=False)


def test_guidance_distilled_flux_refuses_fkc_cfg_with_the_reason(tmp_path):
    import gensample

    pipe = tiny_flux_pipeline(tmp_path, guidance=True)
    with pytest.raises(ValueError, match="guidance-distilled"):
        gensample.run("fkc", pipe, prompt=PROMPT, fkc_target="cfg", guidance_scale=3.0, particles=2, steps=2,
                      num_samples=2, height=PIXELS, width=PIXELS, progress=False)


# -- identity: DDIM(eta = 0) on the VP twin is the flow Euler step ---------------------------------------
@pytest.mark.parametrize("family,guidance,negative", [("sd3", 1.0, None), ("sd3", 5.0, "blue dog"), ("flux", 1.0, None),
                                                      ("flux", 4.0, "blue dog")])
def test_ddim_on_the_twin_equals_the_stock_pipeline(flows, family, guidance, negative):
    """Our ddim (eta 0) on the loaded SD3 / Flux model == the stock pipeline's Euler latents from the
    same initial noise (rebuilt from the run's per-sample seeds); with CFG on a negative prompt (SD3's
    guidance_scale, undistilled Flux's true_cfg_scale). float32 on CPU: 1e-5."""
    import gensample
    from gensample.core.noise import normal_rows
    from gensample.models.flux import pack, unpack
    from gensample.samplers.registry import sample_seed

    pipe = flows[family][1]
    size = {"height": PIXELS, "width": PIXELS}
    res = gensample.run("ddim", pipe, prompt=PROMPT, negative_prompt=negative, guidance_scale=guidance, steps=4,
                        num_samples=2, seed=5, progress=False, **size)
    shape = tuple(res.samples["x"].shape[1:])
    noise = normal_rows([torch.Generator().manual_seed(sample_seed(5, i)) for i in range(2)], shape)
    neg = {} if negative is None else {"negative_prompt": [negative] * 2}
    scale = {"guidance_scale": guidance} if family == "sd3" else {"true_cfg_scale": guidance}
    stock = pipe([PROMPT] * 2, num_inference_steps=4, output_type="latent", latents=noise if family == "sd3" else pack(noise),
                 **size, **neg, **scale).images
    if family == "flux":
        stock = unpack(stock, *shape[1:])
    np.testing.assert_allclose(res.samples["x"], stock.float().numpy(), rtol=0, atol=1e-5)


# -- --max-sequence-length -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_max_sequence_length_reaches_t5(flows, tmp_path, family):
    """--max-sequence-length 6 from the CLI: run.json records it, and the samples are the stock
    pipeline's with max_sequence_length=6 (T5 states of 6 tokens; the default length gives others)."""
    from gensample.core.noise import normal_rows
    from gensample.models.flux import pack, unpack
    from gensample.samplers.registry import sample_seed

    folder, pipe = flows[family]
    out = tmp_path / "o"
    clean(invoke("run", "--sampler", "euler", "--model", folder, "--prompt", PROMPT, "--steps", 3, "-n", 1,
                 "--max-sequence-length", 6, "--seed", 2, "--threads", 1, *SIZE[family], "-o", out, "--no-progress"), 0)
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["max_sequence_length"] == 6
    assert rec["text_conditioning"][family]["max_sequence_length"] == 6
    assert rec["text_conditioning"]["tokens"]["t5"]["max_tokens"] == 6
    with np.load(out / "samples.npz") as z:
        x = z["x"]
    noise = normal_rows([torch.Generator().manual_seed(sample_seed(2, 0))], x.shape[1:])
    size = {"height": PIXELS, "width": PIXELS}
    latents = noise if family == "sd3" else pack(noise)
    runs = {}
    for msl in (6, None):
        kw = {} if msl is None else {"max_sequence_length": msl}
        lat = pipe([PROMPT], num_inference_steps=3, output_type="latent", latents=latents, guidance_scale=1.0, **size,
                   **kw).images  # no CFG (the run's default guidance scale 1; SD3's pipeline default is 7)
        runs[msl] = (lat if family == "sd3" else unpack(lat, *x.shape[2:])).float().numpy()
    np.testing.assert_allclose(x, runs[6], rtol=0, atol=1e-5)
    assert np.abs(runs[None] - runs[6]).max() > 1e-3  # the length matters, so the match above says something


def test_max_sequence_length_is_refused_for_models_without_t5(tmp_path):
    res = invoke("run", "--sampler", "ddim", "--model", "gmm2d", "--max-sequence-length", 64, "--steps", 2, "-n", 2,
                 "-o", tmp_path / "o", "--no-progress")
    clean(res, 2, "--max-sequence-length 64", "SD3 / Flux", "no T5 prompt encoder")
    import gensample

    with pytest.raises(ValueError, match="no T5 prompt encoder"):
        gensample.run("ddim", "gmm2d", max_sequence_length=64, steps=2, num_samples=2, progress=False)
    with pytest.raises(ValueError, match="applies to SD3 / Flux pipelines; model 'markov-toy' is of kind 'masked_lm'"):
        gensample.run("fhs", "markov-toy", max_sequence_length=8, steps=2, num_samples=2, progress=False)


def test_max_sequence_length_usage_error_comes_before_torch(tmp_path):
    """A bad --max-sequence-length is a usage error (exit 2, one message, no traceback) answered from
    the options manifest, before torch is imported (checked in a fresh process; a stale manifest is
    rebuilt into the temporary user cache by the first call, so a later one is the steady state)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    bad = ["0", "513", "2.5", "abc"]
    code = ("import json, sys, click\nfrom gensample import options\n"
            "if options.manifest().source == 'built':\n    print('RESULT stale'); sys.exit(0)\n"
            "from gensample.cli import main\nout = []\n"
            "for value in sys.argv[1:]:\n"
            "    try:\n        main(['run', '--sampler', 'ddim', '--max-sequence-length', value], standalone_mode=False)\n"
            "        out.append([0, ''])\n"
            "    except click.UsageError as err:\n        out.append([err.exit_code, err.format_message()])\n"
            "print('RESULT', json.dumps([out, 'torch' in sys.modules]))\n")
    for _ in range(3):  # a source file edited meanwhile (a developer's tree) makes the manifest stale again
        res = subprocess.run([sys.executable, "-c", code, *bad], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
        if line != "RESULT stale":
            break
    answers, torch_loaded = json.loads(line[7:])
    assert not torch_loaded
    for value, (code_, msg) in zip(bad, answers):
        assert code_ == 2, (value, msg)
        if value in ("2.5", "abc"):  # click's own type check
            assert f"{value!r} is not a valid integer" in msg, msg
        else:
            assert msg == f"--max-sequence-length must be an integer in [1, 512] (the T5 token length of SD3 / Flux " \
                          f"prompts), got {int(value)}", msg
