"""Released MAR checkpoints (`--model mar:...`) and the KL-16 VAE: strict loading, golden outputs of
the reference code (tests/fixtures/mar/README.md), sizes from shapes, and the CLI writing PNGs."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gensample.cli import main
from gensample.core.schedule import alphas_cumprod_from_config
from gensample.models.kl_vae import export_ldm_state_dict, ldm_vae_config, load_ldm_vae
from gensample.models.loading import load_model
from gensample.models.mar import MAR_SCHEDULER_CONFIG
from gensample.models.mar_backbone import (MAR_SIZES, MARConfig, MARModel, mar_config_from_state_dict,
                                           released_config, write_release_checkpoint)
from gensample.samplers.disa import DiSAConfig, HeadDDPM, StepBudgetSchedule, sample_head, sample_mar

FIX = Path(__file__).parent / "fixtures" / "mar"
# The golden tensors were computed by the reference code in float32 on CPU; ours runs the same
# operations in the same order, so the differences are rounding (observed 0.0 for the transformer
# and the head, ~1e-6 relative for the VAE whose attention is computed differently).
RTOL = 1e-5


def _gold():
    return torch.load(FIX / "golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """The fixture checkpoint in the folder form: checkpoint-last.pth + config.json (2 heads, which
    shapes cannot tell) + kl16.ckpt."""
    d = tmp_path_factory.mktemp("mar_release")
    shutil.copy(FIX / "tiny_mar.pth", d / "checkpoint-last.pth")
    (d / "config.json").write_text(json.dumps({"encoder_num_heads": 2, "decoder_num_heads": 2}))
    return d


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_golden_backbone_and_head_forward(tiny_release):
    gold = _gold()
    model = load_model(f"mar:{tiny_release}")
    assert model.kind == "mar" and model.extras["mar_weights"] == "model_ema"
    assert model.extras["variance_type"] == "learned_range"
    mar = model.extras["mar"]
    b = gold["labels"].numel()
    labels = torch.cat([gold["labels"], torch.full((b,), mar.null_class)])  # second half: fake_latent
    with torch.no_grad():
        z = model.extras["backbone"](torch.cat([gold["tokens"]] * 2), torch.cat([gold["mask"]] * 2).bool(), labels)
        out = model.extras["head"](gold["head_x"], gold["head_t"], gold["head_z"])
    assert _max_rel(z, gold["z"]) <= RTOL
    assert _max_rel(out, gold["head_out"]) <= RTOL
    # a wrong null condition (class 0 instead of fake_latent) is far off: the test can fail
    with torch.no_grad():
        z_bad = model.extras["backbone"](torch.cat([gold["tokens"]] * 2), torch.cat([gold["mask"]] * 2).bool(),
                                         torch.cat([gold["labels"], torch.zeros(b, dtype=torch.long)]))
    assert _max_rel(z_bad, gold["z"]) > 1e-2


def test_golden_head_sample_learned_range_cfg(tiny_release):
    """Our head sampler vs the reference p_sample_loop (CFG 3, temperature 0.9, 10 respaced steps,
    learned-range variance). The reference draws xi for the doubled batch from the global RNG at
    every step; the conditional half is what we feed."""
    gold = _gold()
    model = load_model(f"mar:{tiny_release}")
    mask = gold["mask"].bool()
    with torch.no_grad():
        z = model.extras["backbone"](torch.cat([gold["tokens"]] * 2), torch.cat([mask] * 2),
                                     torch.cat([gold["labels"], torch.full((3,), 10)]))
    m = gold["sample_M"]
    zc, zu = z[:3][mask][:m], z[3:][mask][:m]
    calls = {"n": 0}

    def draw_noise():
        calls["n"] += 1
        if calls["n"] == 1:
            torch.manual_seed(gold["sample_seed"])
            return gold["sample_noise0"]
        return torch.randn(2 * m, 16)[:m]

    ddpm = HeadDDPM(alphas_cumprod_from_config(MAR_SCHEDULER_CONFIG))
    table = ddpm.table(gold["sample_steps"])
    kw = dict(temperature=gold["sample_temperature"], guidance_scale=gold["sample_cfg"], z_uncond=zu)
    with torch.no_grad():
        x = sample_head(model.extras["head"], zc, table, draw_noise, **kw)
        calls["n"] = 0
        x_fixed = sample_head(lambda *a: model.extras["head"](*a)[:, :16], zc, table, draw_noise, **kw)
    # A random head's eps is not ~x_t at t = 999 (alpha_bar = 2.4e-9), so x0_hat and the sample reach
    # ~1e4-1e5: differences are measured relative to that scale. Ours: ~float32 rounding; dropping
    # v (the fixed variance) moves the sample by far more.
    err, err_fixed = _max_rel(x, gold["sample"]), _max_rel(x_fixed, gold["sample"])
    print(f"head sample max rel diff {err:.2e} (fixed-variance arm {err_fixed:.2e})")
    assert err <= 1e-6  # observed 1.1e-7
    assert err_fixed > 4e-6  # observed 8.1e-6 (deterministic: fixed weights and seeds)


# -- the whole sample_tokens loop (golden_loop.pt; tests/fixtures/mar/README.md) -------------------
# Reference: main_mar.py --evaluate (load "model", switch to the "model_ema" parameters) then
# MAR.sample_tokens with its orders and every normal draw recorded. Configs: "a" CFG 3 linear
# schedule, temperature 0.9, 4 AR steps x 10 head steps; "b" CFG 2.5 constant, temperature 1.1,
# 6 x 8; "c" no CFG, no labels (fake_latent), 16 x 5 (every step clamped to one token).
# Tolerance: the random head's eps is not ~x_t at t = 999, so x0_hat is x_t / sqrt(alpha_bar) ~ 2e4
# times a unit-scale input and the tokens reach ~7e4; a float32 rounding difference of one ulp in eps
# (6e-8 relative) then shows as ~1e-7 of the output's scale. Observed 1.6e-7 .. 5.7e-7 (no growth
# over the AR iterations); 2e-6 is ~16 ulps. The wrong arms below are off by 3e-5 (temperature,
# which only scales the per-step noise, small next to the amplified x_T) to 0.18 (the "model" weights).
LOOP_RTOL = 2e-6
LOOP_CONFIGS = ("a", "b", "c")


def _gold_loop():
    return torch.load(FIX / "golden_loop.pt", weights_only=True)


def _sample_loop(model, g, **change):
    """Our sample_mar on the reference's orders and noise; latents (B, C, h, w) as sample_tokens returns."""
    opts = dict(temperature=g["temperature"], guidance_scale=g["cfg"], cfg_schedule=g["cfg_schedule"],
                orders=g["orders"], noise=g["noise"], noise_rows_reversed=False)
    opts.update(change)
    steps = g["steps"]
    cfg = DiSAConfig(ar_steps=g["num_iter"], schedule=StepBudgetSchedule("constant", steps, steps),
                     temperature=opts["temperature"], guidance_scale=opts["guidance_scale"],
                     cfg_schedule=opts["cfg_schedule"])
    ddpm = HeadDDPM(alphas_cumprod_from_config(MAR_SCHEDULER_CONFIG), variance_type=model.extras["variance_type"])
    noise, used = opts["noise"], [0]

    def noise_fn(k, shape):  # the recorded draws in the reference's order: x_T, then one per step
        out = noise[used[0]: used[0] + shape[0]]
        used[0] += shape[0]
        return out.flip(0) if opts["noise_rows_reversed"] else out

    bsz = g["orders"].shape[0]
    with torch.no_grad():
        tokens, _ = sample_mar(model.extras["backbone"], model.extras["head"], ddpm, cfg,
                               [torch.Generator() for _ in range(bsz)], num_tokens=model.extras["num_tokens"],
                               token_dim=model.extras["token_dim"], class_labels=g["labels"],
                               null_class=model.null_class, orders=opts["orders"], noise_fn=noise_fn)
    assert used[0] == noise.shape[0]  # every recorded draw consumed, in order
    return model.extras["detokenize"](tokens)


@pytest.mark.parametrize("name", LOOP_CONFIGS)
def test_golden_sample_tokens_loop(tiny_release, name):
    """Issue 25 item 16: MAR's whole loop (random order, cosine mask schedule, CFG schedule,
    temperature, learned-range head) against the reference on fixed weights, orders and noise."""
    g = _gold_loop()[name]
    model = load_model(f"mar:{tiny_release}")
    err = _max_rel(_sample_loop(model, g), g["tokens"])
    print(f"sample_tokens loop {name}: max diff {err:.2e} of the output's max |x|")
    assert err <= LOOP_RTOL


def test_golden_loop_detects_wrong_schedules_orders_and_temperature(tiny_release):
    """The loop golden has power: each of these changes moves the output by far more than LOOP_RTOL."""
    gold = _gold_loop()
    model = load_model(f"mar:{tiny_release}")
    a, b = gold["a"], gold["b"]
    swapped = a["orders"].clone()
    swapped[:, [0, -1]] = swapped[:, [-1, 0]]  # a slot of the last iteration exchanged with one of the first
    arms = {
        "cfg schedule constant for linear": (a, dict(cfg_schedule="constant")),
        "cfg schedule linear for constant": (b, dict(cfg_schedule="linear")),
        "temperature 1": (a, dict(temperature=1.0)),
        "orders of another draw": (a, dict(orders=swapped)),
        "noise rows not image-major": (a, dict(noise_rows_reversed=True)),
    }
    for what, (g, change) in arms.items():
        err = _max_rel(_sample_loop(model, g, **change), g["tokens"])
        print(f"{what}: {err:.2e}")
        assert err > 10 * LOOP_RTOL, f"{what}: only {err:.2e} off"


def test_fixture_model_and_model_ema_differ_and_sampling_uses_model_ema(tiny_release, tmp_path):
    """Issue 25 item 16: the fixture's two containers differ, and sampling uses "model_ema", as the
    reference's main_mar.py --evaluate does (its evaluate() switches to the EMA parameters). Loading
    "model" instead (a checkpoint without EMA, or the two swapped) misses both goldens."""
    ck = torch.load(FIX / "tiny_mar.pth", weights_only=False)
    differ = [k for k in ck["model"] if not torch.equal(ck["model"][k], ck["model_ema"][k])]
    for key in ("fake_latent", "class_emb.weight", "z_proj.weight", "mask_token", "diffloss.net.input_proj.weight",
                "diffloss.net.final_layer.linear.weight", "encoder_blocks.0.norm1.weight"):
        assert key in differ
    model = load_model(f"mar:{tiny_release}")
    assert model.extras["mar_weights"] == "model_ema"
    ours = model.extras["mar"].state_dict()
    assert all(torch.equal(ours[k], ck["model_ema"][k]) for k in ck["model_ema"])
    g = _gold_loop()["a"]
    assert _max_rel(_sample_loop(model, g), g["tokens"]) <= LOOP_RTOL
    variants = {"no_ema": {"model": ck["model"], "epoch": 0, "args": ck["args"]},
                "swapped": {"model": ck["model_ema"], "model_ema": ck["model"], "epoch": 0, "args": ck["args"]}}
    for name, container in variants.items():
        d = tmp_path / name
        d.mkdir()
        torch.save(container, d / "checkpoint-last.pth")
        (d / "config.json").write_text(json.dumps({"encoder_num_heads": 2, "decoder_num_heads": 2}))
        wrong = load_model(f"mar:{d}")
        assert wrong.extras["mar_weights"] == {"no_ema": "model", "swapped": "model_ema"}[name]
        err = _max_rel(_sample_loop(wrong, g), g["tokens"])
        assert err > 1e3 * LOOP_RTOL, f"{name}: the training weights are only {err:.2e} off the EMA golden"
        gold = _gold()
        b = gold["labels"].numel()
        with torch.no_grad():
            z = wrong.extras["backbone"](torch.cat([gold["tokens"]] * 2), torch.cat([gold["mask"]] * 2).bool(),
                                         torch.cat([gold["labels"], torch.full((b,), wrong.null_class)]))
        assert _max_rel(z, gold["z"]) > 1e-2


def test_golden_vae_decode_and_encode():
    gold = _gold()
    vae = load_ldm_vae(FIX / "tiny_kl.ckpt")
    assert list(vae.config.down_block_types) == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    with torch.no_grad():
        decoded = vae.decode(gold["vae_latents"]).sample
        moments = vae.quant_conv(vae.encoder(gold["vae_image"]))
    assert _max_rel(decoded, gold["vae_decoded"]) <= RTOL
    assert _max_rel(moments, gold["vae_moments"]) <= RTOL


def test_kl16_config_maps_exactly():
    """The KL-16 layout (ch 128, ch_mult (1,1,2,2,4), 2 res blocks, z 16, encoder attention at 16x16)
    round-trips: diffusers -> LDM names -> inferred config -> the same architecture."""
    from diffusers import AutoencoderKL

    cfg = {"in_channels": 3, "out_channels": 3, "block_out_channels": [128, 128, 256, 256, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
           "up_block_types": ["UpDecoderBlock2D"] * 5, "layers_per_block": 2, "latent_channels": 16}
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    ldm = export_ldm_state_dict(vae)
    assert "encoder.down.4.attn.1.q.weight" in ldm and "decoder.up.4.attn.0.q.weight" not in ldm
    assert ldm["encoder.down.4.attn.0.q.weight"].shape == (512, 512, 1, 1)
    got = ldm_vae_config(ldm)
    assert {k: got[k] for k in cfg} == cfg and got["scaling_factor"] == 0.2325


@pytest.mark.parametrize("name", sorted(MAR_SIZES))
def test_released_sizes_from_shapes(name):
    with torch.device("meta"):
        model = MARModel(released_config(name))
    state = model.state_dict()
    inferred = mar_config_from_state_dict(state)
    assert inferred == released_config(name)  # heads: 12 / 16 / 16 by width
    assert (inferred.seq_len, inferred.buffer_size, inferred.class_num) == (256, 64, 1000)
    names = set(state)
    for key in ("fake_latent", "diffusion_pos_embed_learned", "encoder_blocks.0.attn.qkv.weight",
                "decoder_blocks.0.mlp.fc2.bias", "diffloss.net.final_layer.adaLN_modulation.1.weight"):
        assert key in names


def test_strict_load_rejects_a_broken_checkpoint(tmp_path):
    ck = torch.load(FIX / "tiny_mar.pth", weights_only=False)
    state = dict(ck["model_ema"])
    state["diffloss.net.extra.weight"] = torch.zeros(1)
    torch.save({"model_ema": state}, tmp_path / "bad.pth")
    result = CliRunner().invoke(main, ["run", "--sampler", "disa", "--model", f"mar:{tmp_path / 'bad.pth'}",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "does not match the MAR layout" in result.output


# -- end to end: the CLI on release-format random checkpoints ------------------------------------
def _tiny_vae_ckpt(path: Path, z: int = 16, levels: int = 5):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32] * levels, down_block_types=["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"] * levels, layers_per_block=1, latent_channels=z)
    torch.save({"model": export_ldm_state_dict(vae)}, path)
    return vae


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """A tiny-width MAR with the real token layout (256 tokens of 16, 64-slot buffer) in the release's
    .pth format, and a 5-level KL VAE (16x16x16 latents -> 256x256) in the LDM layout."""
    d = tmp_path_factory.mktemp("tiny256")
    cfg = MARConfig(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1, decoder_embed_dim=32,
                    decoder_depth=1, decoder_num_heads=1, class_num=10, diffloss_d=1, diffloss_w=32)
    model = MARModel(cfg).init_random(torch.Generator().manual_seed(0))
    write_release_checkpoint(model, d / "checkpoint-last.pth", "mar_tiny")
    _tiny_vae_ckpt(d / "kl16_tiny.ckpt")
    return d


def test_cli_disa_writes_256px_pngs(tiny256, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    args = ["run", "--sampler", "disa", "--model", f"mar:{tiny256 / 'checkpoint-last.pth'}",
            "--vae", str(tiny256 / "kl16_tiny.ckpt"), "--class-label", "3", "-n", "2", "--ar-steps", "4",
            "--head-steps-max", "6", "--head-steps-min", "2", "--guidance-scale", "2.0", "--timestep-clip", "950",
            "--device", "cpu", "--no-progress", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 2
    assert all(Image.open(p).size == (256, 256) for p in pngs)
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["vae"].endswith("kl16_tiny.ckpt")


def test_without_vae_writes_latents(tiny256, tmp_path):
    import numpy as np

    out = tmp_path / "lat"
    result = CliRunner().invoke(main, ["run", "--sampler", "mar", "--model", f"mar:{tiny256 / 'checkpoint-last.pth'}",
                                       "-n", "1", "--ar-steps", "2", "--head-steps-max", "3", "--device", "cpu",
                                       "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    x = np.load(out / "samples.npz")["x"]
    assert x.shape == (1, 16, 16, 16) and not (out / "images").exists()


def test_vae_mismatch_and_wrong_model_exit_2(tiny256, tmp_path):
    _tiny_vae_ckpt(tmp_path / "z4.ckpt", z=4, levels=2)
    runner = CliRunner()
    r = runner.invoke(main, ["run", "--sampler", "disa", "--model", f"mar:{tiny256 / 'checkpoint-last.pth'}",
                             "--vae", str(tmp_path / "z4.ckpt"), "-o", str(tmp_path / "a")])
    assert r.exit_code == 2 and "4 latent channels" in r.output
    r = runner.invoke(main, ["run", "--sampler", "disa", "--model", "mar-digits", "--vae", str(tmp_path / "z4.ckpt"),
                             "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "released MAR" in r.output
    r = runner.invoke(main, ["run", "--sampler", "disa", "--model", f"mar:{tmp_path / 'none.pth'}", "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_reproduce_recipe_tiny_mode(tiny256, tmp_path):
    """configs/reproduce/disa_mar_b.yaml (the DiSA paper's MAR-B run) end to end, with the model,
    VAE, sample count and AR steps overridden to the tiny random checkpoint."""
    import yaml

    recipe = Path(__file__).parents[1] / "configs" / "reproduce" / "disa_mar_b.yaml"
    cfg = yaml.safe_load(recipe.read_text())
    assert (cfg["sampler"], cfg["ar_steps"], cfg["head_steps_max"], cfg["head_steps_min"], cfg["schedule"],
            cfg["timestep_clip"], cfg["guidance_scale"], cfg["cfg_schedule"], cfg["temperature"]) == (
        "disa", 64, 50, 5, "linear", 950, 2.9, "linear", 1.0)
    out = tmp_path / "rep"
    result = CliRunner().invoke(main, ["run", "--config", str(recipe), "--model", f"mar:{tiny256 / 'checkpoint-last.pth'}",
                                       "--vae", str(tiny256 / "kl16_tiny.ckpt"), "-n", "1", "--ar-steps", "3",
                                       "--device", "cpu", "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["head_steps_max"] == 50 and rec["config"]["timestep_clip"] == 950
    assert len(list((out / "images").glob("*.png"))) == 1


@pytest.mark.slow
def test_mar_b_real_shapes_cli(tmp_path):
    """MAR-B shapes (208M parameters, ~0.8 GB checkpoint) and the real KL-16 VAE shapes, random
    weights, release formats: loads strictly and writes a 256x256 PNG (2 AR steps to stay short)."""
    from diffusers import AutoencoderKL
    from PIL import Image

    model = MARModel(released_config("mar_base")).init_random(torch.Generator().manual_seed(0))
    write_release_checkpoint(model, tmp_path / "checkpoint-last.pth", "mar_base")
    del model
    vae = AutoencoderKL(block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"] * 5)
    torch.save({"model": export_ldm_state_dict(vae)}, tmp_path / "kl16.ckpt")
    del vae
    m = load_model(f"mar:{tmp_path}")
    assert m.extras["mar_size"] == "mar_base" and m.is_image and m.event_shape == (16, 16, 16)
    assert m.extras["pixel_shape"] == (3, 256, 256)
    del m
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--sampler", "disa", "--model", f"mar:{tmp_path}", "--class-label", "3",
                                       "-n", "1", "--ar-steps", "2", "--head-steps-max", "3", "--head-steps-min", "2",
                                       "--device", "cpu", "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(next((out / "images").glob("*.png"))).size == (256, 256)


def test_pipeline_from_release_matches_cli(tiny256, tmp_path):
    """ARDiffusionPipeline with the VAE decodes tokens to 256x256 pixels, and equals the CLI run with
    the same per-sample seeds (one code path for the math)."""
    import numpy as np

    from gensample.pipelines.ar_diffusion import ARDiffusionPipeline
    from gensample.samplers.registry import sample_seed

    pipe = ARDiffusionPipeline.from_mar_release(str(tiny256 / "checkpoint-last.pth"), str(tiny256 / "kl16_tiny.ckpt"))
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in range(2)]
    out = pipe(class_labels=[3, 3], num_ar_steps=4, head_steps_max=6, head_steps_min=2, guidance_scale=2.0,
               generator=gens, output_type="pt")
    assert out.images.shape == (2, 3, 256, 256)
    run_dir = tmp_path / "cli"
    result = CliRunner().invoke(main, ["run", "--sampler", "disa", "--model", f"mar:{tiny256 / 'checkpoint-last.pth'}",
                                       "--vae", str(tiny256 / "kl16_tiny.ckpt"), "--class-label", "3", "-n", "2",
                                       "--ar-steps", "4", "--head-steps-max", "6", "--head-steps-min", "2",
                                       "--guidance-scale", "2.0", "--seed", "0", "--device", "cpu", "--no-progress",
                                       "-o", str(run_dir)])
    assert result.exit_code == 0, result.output
    cli = np.load(run_dir / "samples.npz")["images"] / 2 + 0.5
    assert np.abs(out.images.numpy() - np.clip(cli, 0, 1)).max() <= 1e-5
    tokens = pipe(class_labels=[3], num_ar_steps=4, head_steps_max=6, head_steps_min=2, generator=gens[:1],
                  output_type="latent").images
    assert tokens.shape == (1, 256, 16)


def test_folder_form_finds_checkpoint_and_vae(tiny256, tmp_path):
    shutil.copy(tiny256 / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")
    shutil.copy(tiny256 / "kl16_tiny.ckpt", tmp_path / "kl16.ckpt")
    m = load_model(f"mar:{tmp_path}")
    assert m.is_image and m.is_latent and m.event_shape == (16, 16, 16)
    assert m.extras["pixel_shape"] == (3, 256, 256) and m.extras["vae"].config.scaling_factor == 0.2325
    assert m.extras["mar_size"] == "custom" and m.null_class == 10
    (tmp_path / "second.pth").write_bytes(b"")
    (tmp_path / "checkpoint-last.pth").rename(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="expected one checkpoint"):
        load_model(f"mar:{tmp_path}")
