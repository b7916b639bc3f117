"""DiSA / MAR end to end on the shipped mar-digits model: API, CLI, pipeline (docs/disa.md)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample import api
from gensample.cli import main
from gensample.models.loading import load_model
from gensample.pipelines.ar_diffusion import ARDiffusionPipeline
from gensample.samplers.disa import StepBudgetSchedule, head_budget
from gensample.schedulers.disa import DiSAHeadScheduler



def run(sampler, **kw):
    kw.setdefault("num_samples", 2)
    kw.setdefault("seed", 0)
    return api.run(sampler, "mar-digits", device="cpu", progress=False, **kw)


def test_model_entry():
    m = load_model("mar-digits")
    assert m.kind == "mar" and m.event_shape == (1, 8, 8) and m.is_image
    assert m.extras["num_tokens"] == 16 and m.extras["token_dim"] == 4
    assert m.num_classes == 10 and m.null_class == 10


def test_training_split_is_the_shared_digits_split():
    from gensample.eval.digits_data import real_digits
    from gensample.models.mar import digits_split

    (x_tr, _), (x_te, _) = digits_split()
    for ours, split in ((x_tr, "train"), (x_te, "test")):
        ref = torch.as_tensor(real_digits(split)[0])
        key = lambda t: sorted(map(tuple, t.reshape(len(t), -1).tolist()))  # noqa: E731
        assert key(ours) == key(ref)


def test_api_counts_run_json_and_pngs(tmp_path):
    n = 2
    res = run("disa", num_samples=n, batch_size=n, output=str(tmp_path / "o"))
    calls, rows = head_budget(StepBudgetSchedule("linear", 50, 5), 16, 8)
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["stats"]["head_calls"] == calls == 217 and rec["nfe"] == calls
    assert rec["stats"]["head_rows"] == n * rows == n * 344
    assert rec["stats"]["head_steps"] == [[50, 43, 37, 30, 24, 17, 11, 5]]
    assert len(list((tmp_path / "o" / "images").glob("*.png"))) == n and (tmp_path / "o" / "grid.png").exists()
    assert res.x.shape == (n, 1, 8, 8) and np.isfinite(res.x).all()
    assert res.samples["class_labels"].shape == (n,)


def test_cfg_doubles_rows():
    res = run("disa", num_samples=2, batch_size=2, guidance_scale=3.0, head_steps_max=10, head_steps_min=2)
    calls, rows = head_budget(StepBudgetSchedule("linear", 10, 2), 16, 8)
    assert res.record["stats"]["head_calls"] == calls and res.record["stats"]["head_rows"] == 2 * 2 * rows


@pytest.mark.parametrize("disa_opts, mar_opts", [
    (dict(schedule="constant", head_steps_max=20), dict(head_steps_max=20)),
    (dict(schedule="linear", head_steps_max=20, head_steps_min=20), dict(head_steps_max=20)),
    (dict(schedule="cosine", head_steps_max=20, head_steps_min=20, timestep_clip=950),
     dict(head_steps_max=20, timestep_clip=950)),
])
def test_annealing_off_equals_mar_bit_for_bit(disa_opts, mar_opts):
    # docs/disa.md: Constant(U) (or U = L) through the DiSA path equals the plain MAR sampler.
    a = run("disa", **disa_opts).x
    b = run("mar", **mar_opts).x
    assert np.array_equal(a, b)


def test_hidden_clip_breaks_parity():
    # docs/disa.md: clipping t > 950 on one side only changes the samples (and the step count).
    a = run("disa", schedule="constant", head_steps_max=50, timestep_clip=950, num_samples=1)
    b = run("mar", head_steps_max=50, num_samples=1)
    assert not np.array_equal(a.x, b.x)
    assert a.record["stats"]["head_calls"] == 8 * 48 and b.record["stats"]["head_calls"] == 8 * 50


def test_batch_size_invariance():
    # per-sample generators: the same samples whatever the batching (up to BLAS batch-shape rounding)
    a = run("disa", num_samples=4, batch_size=4, head_steps_max=10, head_steps_min=2).x
    b = run("disa", num_samples=4, batch_size=1, head_steps_max=10, head_steps_min=2).x
    assert np.allclose(a, b, atol=1e-4, rtol=0)


def test_pipeline_with_zoo_parts(tmp_path):
    m = load_model("mar-digits")
    sched = DiSAHeadScheduler.from_config(m.scheduler_config)
    pipe = ARDiffusionPipeline(m.extras["backbone"], m.extras["head"], sched)
    pipe.set_progress_bar_config(disable=True)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    out = pipe(class_labels=[3, 7], generator=gens([0, 1]), head_steps_max=10, head_steps_min=2, output_type="np")
    assert out.images.shape == (2, 8, 8, 1) and 0 <= out.images.min() and out.images.max() <= 1
    assert out.stats["head_calls"] == head_budget(StepBudgetSchedule("linear", 10, 2), 16, 8)[0]
    one = pipe(class_labels=[7], generator=gens([1]), head_steps_max=10, head_steps_min=2, output_type="np")
    assert np.allclose(one.images[0], out.images[1], atol=1e-4, rtol=0)  # batch of one equals its element
    tokens, _ = pipe(class_labels=[7], generator=gens([1]), head_steps_max=10, head_steps_min=2,
                     output_type="latent", return_dict=False)
    assert tokens.shape == (1, 16, 4)
    pipe.save_pretrained(tmp_path)
    again = ARDiffusionPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    re = again(class_labels=[7], generator=gens([1]), head_steps_max=10, head_steps_min=2, output_type="np")
    assert np.array_equal(re.images, one.images)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="tensor")


def test_cli_demo_and_flags(tmp_path):
    r = CliRunner().invoke(main, ["run", "--sampler", "disa", "-n", "2", "-o", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["model"] == "mar-digits" and rec["stats"]["head_calls"] == 217
    args = ["run", "--sampler", "disa", "--model", "mar-digits", "-n", "2", "-o", str(tmp_path / "b"), "--ar-steps", "4",
            "--head-steps-max", "12", "--head-steps-min", "3", "--schedule", "two-stage", "--temperature", "0.9",
            "--timestep-clip", "950"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert rec["stats"]["head_steps"] == [[12, 12, 3, 3]] and rec["config"]["temperature"] == 0.9


@pytest.mark.parametrize("args, message", [
    (["--sampler", "disa", "--head-steps-min", "60"], "head_steps_min"),
    (["--sampler", "disa", "--steps", "10"], "--steps does not apply"),
    (["--sampler", "disa", "--ar-steps", "17"], "--ar-steps must be <="),
    (["--sampler", "disa", "--head-steps-max", "1001"], "--head-steps-max must be <="),
    (["--sampler", "disa", "--model", "gmm2d"], "needs a model of kind"),
    (["--sampler", "ddim", "--model", "mar-digits"], "needs a model of kind"),
    (["--sampler", "mar", "--schedule", "linear"], "does not apply"),
    (["--sampler", "disa", "--schedule", "exponential"], "exponential"),
    (["--sampler", "disa", "--temperature", "-1"], "--temperature must be >="),
    (["--sampler", "disa", "--timestep-clip", "1000"], "--timestep-clip must be <"),
])
def test_cli_user_errors_exit_2(args, message, tmp_path):
    r = CliRunner().invoke(main, ["run", *args, "-n", "1", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_quality_smoke_with_broken_baseline():
    # Class accuracy of the shipped classifier on mar-digits samples of the sampled labels.
    # n = 100: a binomial sd of at most 0.05, so 0.7 leaves > 3 sd below the accuracy measured with
    # 5-50 head steps (0.91-0.99, docs/disa.md); a 1-step head (x_T through one t = 0 step) must fail it.
    from gensample.eval.digits import class_accuracy

    good = run("mar", num_samples=100, batch_size=100, head_steps_max=10)
    bad = run("mar", num_samples=100, batch_size=100, head_steps_max=1)
    assert class_accuracy(good.x, good.samples["class_labels"]) >= 0.7
    assert class_accuracy(bad.x, bad.samples["class_labels"]) < 0.5


@pytest.mark.parametrize("name", ["disa.yaml", "disa_mar_baseline.yaml", "disa_reference_clip.yaml"])
def test_configs_resolve(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = api.resolve_options(api.load_config_file(path)["sampler"], config=str(path))
    assert cfg["model"] == "mar-digits" and cfg["ar_steps"] == 8


def test_folder_saved_with_the_old_scheduler_path_loads_with_a_warning(tmp_path):
    """Issue 25 item 9 (DiSA): a folder saved before the schedulers moved records
    ``gensample.samplers.disa`` as the scheduler's library; it still loads, with a FutureWarning that
    names the new path, and gives the same scheduler."""
    import subprocess
    import sys

    m = load_model("mar-digits")
    pipe = ARDiffusionPipeline(m.extras["backbone"], m.extras["head"], DiSAHeadScheduler.from_config(m.scheduler_config))
    pipe.save_pretrained(tmp_path)
    index_file = tmp_path / "model_index.json"
    index = json.loads(index_file.read_text())
    assert index["scheduler"] == ["gensample.schedulers.disa", "DiSAHeadScheduler"]
    index["scheduler"] = ["gensample.samplers.disa", "DiSAHeadScheduler"]
    index_file.write_text(json.dumps(index))
    with pytest.warns(FutureWarning, match=r"moved to gensample\.schedulers\.disa\.DiSAHeadScheduler"):
        again = ARDiffusionPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is DiSAHeadScheduler
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.scheduler.config) == public(pipe.scheduler.config)
    import gensample.samplers.disa as old

    with pytest.raises(AttributeError, match="NoSuchScheduler"):
        old.NoSuchScheduler  # noqa: B018
    # the alias is lazy: importing the old module alone loads neither diffusers nor the schedulers
    code = ("import sys, gensample.samplers.disa; "
            "print(sorted(m for m in sys.modules if m.startswith(('diffusers', 'gensample.schedulers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
