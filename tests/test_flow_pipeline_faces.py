"""STSL / DPS / smc-post / FKC pipelines built from a flow-matching pipeline (issue 27 item 5).

``STSLPipeline.from_pipe(sd3)`` / ``SMCPosteriorPipeline.from_pipe(sd3)`` / ``FKCPipeline.from_pipe(sd3)``
return faces that run ``gensample.api.run(sampler, model=sd3, ...)`` on the object as it is: each face's
images are the run's decoded samples for the same seed, bit for bit. Tiny SD3 from tests/flow_models.py
(latents 4x8x8, pixels 3x16x16); every run is a few transformer calls.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flow_models import PIXELS, tiny_flux_pipeline, tiny_sd3_pipeline

from gensample import api
from gensample.pipelines.fkc import FKCPipeline, FlowFKCPipeline
from gensample.pipelines.smc_posterior import FlowSMCPosteriorPipeline, SMCPosteriorPipeline
from gensample.pipelines.stsl import FlowSTSLPipeline, STSLPipeline

torch.set_num_threads(1)
TASK = "sr-avgpool"  # y: 3x8x8


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("flow_pipeline_faces") / "sd3")


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """A random RGB ground truth of the pipeline's pixel size, as a PNG file and a PIL image."""
    rgb = np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("truth") / "x.png"
    Image.fromarray(rgb).save(path)
    return str(path), Image.fromarray(rgb)


def _unit(x):
    """The run's decoded [-1, 1] samples as a face's "pt" images in [0, 1]."""
    return (torch.as_tensor(x).float().clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("method,kw", [("stsl", dict(inner_steps=1)), ("dps", dict(zeta=0.5))])
def test_stsl_face_from_sd3_is_the_run_bit_for_bit(sd3, truth, method, kw):
    face = STSLPipeline.from_pipe(sd3)
    assert isinstance(face, FlowSTSLPipeline) and face.pipe is sd3
    out = face(image=truth[0], operator=TASK, method=method, num_inference_steps=2, batch_size=2, prompt="a cat",
               seed=3, output_type="pt", **kw).images
    ref = api.run(method, model=sd3, from_image=truth[0], task=TASK, steps=2, num_samples=2, seed=3, prompt="a cat",
                  progress=False, **kw).samples
    assert out.shape == (2, 3, PIXELS, PIXELS)
    assert torch.equal(out, _unit(ref["x"]))
    assert face.last_run.samples["y"].shape == (2, 3, PIXELS // 2, PIXELS // 2)
    # PIL output: the pipeline's pixel size; another seed gives other images
    pil = face(image=truth[1], operator=TASK, method=method, num_inference_steps=2, seed=3, **kw).images
    assert len(pil) == 1 and pil[0].size == (PIXELS, PIXELS)
    other = face(image=truth[0], operator=TASK, method=method, num_inference_steps=2, seed=4, output_type="pt", **kw)
    assert not torch.equal(other.images[0], out[0])


def test_smc_post_face_from_sd3_is_the_run_bit_for_bit(sd3, truth, tmp_path):
    face = SMCPosteriorPipeline.from_pipe(sd3)
    assert isinstance(face, FlowSMCPosteriorPipeline)
    # image as a PIL image (written losslessly for the run) against the run on the PNG file
    out = face(image=truth[1], operator=TASK, num_particles=2, num_inference_steps=2, batch_size=2, prompt="a cat",
               seed=1, output_type="pt")
    ref = api.run("smc-post", model=sd3, from_image=truth[0], task=TASK, particles=2, steps=2, num_samples=2, seed=1,
                  prompt="a cat", progress=False).samples
    assert out.images.shape == (2, 3, PIXELS, PIXELS)
    assert torch.equal(out.images, _unit(ref["x"]))
    assert np.array_equal(np.asarray(face.last_run.samples["weights"]), np.asarray(ref["weights"]))
    # the measurement y itself (the UNet faces' first argument) against the run's --measurement file
    y = torch.as_tensor(ref["y"][:1]).double()
    np.save(tmp_path / "y.npy", y[0].numpy())
    out_y = face(y, TASK, num_particles=2, num_inference_steps=2, seed=2, output_type="np").images
    ref_y = api.run("smc-post", model=sd3, measurement=str(tmp_path / "y.npy"), task=TASK, particles=2, steps=2,
                    num_samples=1, seed=2, progress=False).samples["x"]
    assert out_y.shape == (1, PIXELS, PIXELS, 3)
    assert np.array_equal(out_y, _unit(ref_y).permute(0, 2, 3, 1).numpy())
    # final="weighted": every particle of each system
    w = face(image=truth[0], operator=TASK, num_particles=2, num_inference_steps=2, final="weighted", output_type="pt")
    assert w.images.shape == (2, 3, PIXELS, PIXELS)


@pytest.mark.parametrize("prompt,target,kw", [(["a cat", "a dog"], "anneal", dict(beta=1.0, eta=1.0)),
                                              ("a cat", "cfg", dict(negative_prompt="a dog", guidance_scale=3.0))])
def test_fkc_face_takes_one_prompt_per_group_and_is_the_run(sd3, prompt, target, kw):
    """A list of P prompts: P groups of K particles, group g conditioned on prompts[g] (the run's
    prompts[g % P]); images, weights and the per-group ESS are the run's for the same seed."""
    fkc = FKCPipeline.from_pipe(sd3)
    assert isinstance(fkc, FlowFKCPipeline)
    P = len(prompt) if isinstance(prompt, list) else 1
    out = fkc(prompt, target=target, num_particles=2, num_inference_steps=2, seed=5, output_type="pt", **kw)
    ref = api.run("fkc", model=sd3, prompt=prompt, fkc_target=target, particles=2, num_samples=2 * P, steps=2, seed=5,
                  progress=False, **kw).samples
    assert out.images.shape == (2 * P, 3, PIXELS, PIXELS)
    assert torch.equal(out.images, _unit(ref["images"]))
    assert np.array_equal(out.weights, np.asarray(ref["weights"]))
    assert out.ess.shape == (P, 2) and np.array_equal(out.ess, np.asarray(ref["ess"])[::2])
    for g in range(P):  # weights normalised within each group
        assert abs(out.weights[2 * g:2 * g + 2].sum() - 1) < 1e-9
    one = fkc(prompt, target=target, num_particles=2, num_inference_steps=2, seed=5, final="one_per_group",
              output_type="pil", **kw)
    assert len(one.images) == P and one.images[0].size == (PIXELS, PIXELS) and one.ess.shape == (P, 2)


@pytest.mark.parametrize("sampler", ["dps", "smc-post"])
def test_posterior_faces_from_flux_are_the_run(tmp_path, truth, sampler):
    """Flux (packed latents, dynamic shifting): the face passes the run's own options through
    (height / width / max_sequence_length) and its images are the run's."""
    flux = tiny_flux_pipeline(tmp_path / "flux")
    face = (STSLPipeline if sampler == "dps" else SMCPosteriorPipeline).from_pipe(flux)
    assert isinstance(face, FlowSTSLPipeline if sampler == "dps" else FlowSMCPosteriorPipeline)
    size = dict(height=PIXELS, width=PIXELS, max_sequence_length=16)
    kw = dict(method="dps") if sampler == "dps" else dict(num_particles=2)
    out = face(image=truth[0], operator="inpaint-box", num_inference_steps=2, prompt="a cat", seed=0,
               output_type="pt", **kw, **size).images
    run_kw = dict(particles=2) if sampler == "smc-post" else {}
    ref = api.run(sampler, model=flux, from_image=truth[0], task="inpaint-box", steps=2, num_samples=1, seed=0,
                  prompt="a cat", progress=False, **run_kw, **size).samples["x"]
    assert out.shape == (1, 3, PIXELS, PIXELS) and torch.equal(out, _unit(ref))


def test_flow_faces_refuse_bad_arguments_naming_them(sd3, truth):
    from gensample.samplers.operators import make_operator

    stsl, smc = STSLPipeline.from_pipe(sd3), SMCPosteriorPipeline.from_pipe(sd3)
    fkc = FKCPipeline.from_pipe(sd3)
    img = truth[0]
    cases = [
        (lambda: stsl(image=img, operator=make_operator(TASK, (3, PIXELS, PIXELS))), r"^operator: .*task name"),
        (lambda: stsl(image=img, operator=3), r"^operator must be a task name"),
        (lambda: stsl(operator=TASK), r"measurement= .*image="),
        (lambda: stsl(torch.zeros(1, 3, 8, 8), TASK, image=img), r"measurement= .*image=.*both"),
        (lambda: stsl(image=img + ".missing", operator=TASK), r"^image: file not found"),
        (lambda: stsl(image=torch.zeros(3, 16, 16), operator=TASK), r"^image must be"),
        (lambda: stsl(image=img, method="ddim"), r"^method must be one of"),
        (lambda: stsl(image=img, guidance_scale=2.0), r"guidance_scale must be 1.0"),
        (lambda: stsl(image=img, generator=torch.Generator()), r"^generator: .*seed="),
        (lambda: stsl(image=img, seed=-1), r"^seed must be"),
        (lambda: stsl(image=img, output_type="latent"), r"^output_type must be one of"),
        (lambda: stsl(image=img, prompt_embeds=torch.zeros(1, 4, 32)), r"^prompt_embeds: "),
        (lambda: stsl(image=img, batch_size=0), r"^batch_size must be"),
        (lambda: stsl(image=img, steps=3), r"^steps: set by"),
        (lambda: smc(image=img, num_particles=0), r"^num_particles must be"),
        (lambda: smc(measurement=[0.0], operator=TASK), r"^measurement must be a tensor"),
        (lambda: smc(image=img, pooled_prompt_embeds=torch.zeros(1, 64)), r"^pooled_prompt_embeds: "),
        (lambda: fkc(["a cat", 3]), r"^prompt must be a string or a non-empty list"),
        (lambda: fkc([]), r"^prompt must be a string or a non-empty list"),
        (lambda: fkc("a cat", final="best"), r"^final must be one of"),
        (lambda: fkc(["a", "b"], target="product", experts=["a", "b"]), r"^prompt must be one string"),
        (lambda: FKCPipeline.from_pipe(sd3, vae=None), r"takes no component overrides"),
        (lambda: STSLPipeline.from_pipe(sd3, vae=None), r"^STSLPipeline.from_pipe .*component overrides"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()
