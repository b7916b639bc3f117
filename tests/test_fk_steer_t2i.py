"""FK steering on text-to-image / latent models and the CLIP-based rewards (docs/fk_steering.md
"Rewards", "Text-to-image and latent models").

Everything is built offline: a tiny random Stable Diffusion pipeline (tests/sd_models.py) and a
tiny random CLIPModel from a small CLIPConfig, saved with save_pretrained beside the offline CLIP
tokenizer of tests/sd_models.py and an image-processor config. The oracle for the rewards is
transformers' own CLIPModel forward (and, for the aesthetic head, a torch module with the released
layer layout loaded strictly from the head file).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

import gensample  # noqa: E402
from gensample import rewards as rewards_mod  # noqa: E402
from gensample.cli import main  # noqa: E402
from gensample.rewards import AestheticReward, ClipScoreReward, load_aesthetic_head, resolve_reward  # noqa: E402

from sd_models import MAX_TOKENS, PIXELS, build_tokenizer, save_sd_pipeline  # noqa: E402

CLIP_IMAGE = 16  # the tiny CLIP's input size (= the tiny SD's pixel size)
MEAN, STD = (0.5, 0.4, 0.45), (0.25, 0.3, 0.2)  # deliberately not OpenAI's: the reward must read the saved config


def save_tiny_clip(folder, seed: int = 0):
    """A random CLIPModel (2 layers, width 32, 16 x 16 images, 4 x 4 patches), its tokenizer and a
    CLIPImageProcessor config (resize 16, crop 16, MEAN / STD), saved offline into ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = build_tokenizer(folder.parent / f"_{folder.name}_tok")
    v = len(tok)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=v, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, bos_token_id=v - 2,
                                      eos_token_id=v - 1, pad_token_id=v - 1),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        image_size=CLIP_IMAGE, patch_size=4),
                     projection_dim=24)
    CLIPModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE},
                       image_mean=list(MEAN), image_std=list(STD)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fk_t2i")
    return {"sd": save_sd_pipeline(root / "sd1", 1), "clip": save_tiny_clip(root / "clip")}


def _images(n, h=CLIP_IMAGE, w=CLIP_IMAGE, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [-1, 1]


def _clip_reference(folder, images, prompts):
    """cos(image, text) from CLIPModel's own forward (logits_per_image / logit_scale), the images
    normalised here with the saved mean / std (they are already 16 x 16: resize and crop are identities)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    pix = ((images + 1) / 2 - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pix)
    return (out.logits_per_image / model.logit_scale.exp()).double(), out.image_embeds.double()


# -- rewards ---------------------------------------------------------------------------------------
def test_clip_reward_is_the_cosine_of_clip_embeddings(tiny):
    images, prompts = _images(4), ["a red cat", "a dog", "a red cat", "red"]
    ref, _ = _clip_reference(tiny["clip"], images, prompts)
    reward = resolve_reward(f"clip:{tiny['clip']}")
    assert isinstance(reward, ClipScoreReward)
    torch.testing.assert_close(reward(images, prompts=prompts), ref.diagonal(), rtol=0, atol=1e-5)
    small = ClipScoreReward(str(tiny["clip"]), batch_size=3)  # batching (3 + 1) gives the same numbers
    torch.testing.assert_close(small(images, prompts=prompts), ref.diagonal(), rtol=0, atol=1e-5)
    torch.testing.assert_close(reward(images, prompts="a dog"), ref[:, 1], rtol=0, atol=1e-5)  # one prompt for all
    with pytest.raises(ValueError, match="prompts"):
        reward(images)
    with pytest.raises(ValueError, match="2 prompts for 4"):
        reward(images, prompts=["a", "b"])
    with pytest.raises(ValueError, match="cannot load"):
        ClipScoreReward(str(tiny["clip"].parent / "missing"))(images, prompts=prompts)


def test_clip_reward_resizes_and_crops_like_the_image_processor(tiny):
    """A 24 x 32 image: resize the short side to 16, centre-crop 16 x 16. Against CLIPImageProcessor
    on the same picture as a uint8 PIL image (its own bicubic resampler, not ours): the two pixel
    inputs differ by 1/255-level rounding and kernel details only, so the cosines agree to 2e-3,
    while the same pipeline with the wrong normalisation (OpenAI's statistics) does not."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    g = torch.Generator().manual_seed(1)
    base = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 8, generator=g) * 2 - 1, size=(24, 32), mode="bilinear",
                                           align_corners=False)  # smooth pictures: resampler details matter little
    reward = ClipScoreReward(str(tiny["clip"]))
    ours = reward(base, prompts=["a red cat"] * 2)
    proc = CLIPImageProcessor.from_pretrained(tiny["clip"])
    pil = [Image.fromarray(((b.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()) for b in base]
    pix = proc(images=pil, return_tensors="pt").pixel_values  # (2, 3, 16, 16)
    assert pix.shape == (2, 3, CLIP_IMAGE, CLIP_IMAGE)
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    ids = AutoTokenizer.from_pretrained(tiny["clip"])(["a red cat"], padding="max_length", max_length=MAX_TOKENS,
                                                       return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pix)
    ref = (out.logits_per_image[:, 0] / model.logit_scale.exp()).double()
    tol = 2e-3  # measured gap ~2e-4; a wrong preprocessing lands further off (the baseline below)
    assert (ours - ref).abs().max() < tol, (ours, ref)
    wrong = ClipScoreReward(str(tiny["clip"]))
    wrong.encoder._load()
    wrong.encoder.mean, wrong.encoder.std = rewards_mod.OPENAI_CLIP_MEAN, rewards_mod.OPENAI_CLIP_STD
    assert (wrong(base, prompts=["a red cat"] * 2) - ref).abs().max() > tol


def test_aesthetic_reward_reads_the_released_head_layout(tiny, tmp_path):
    """The head file has the improved-aesthetic-predictor's keys (Linear, Dropout, ..., Linear, Linear:
    layers.0/2/4/6/7); the reward equals that module, loaded strictly, on CLIPModel's normalised image embeds."""
    torch.manual_seed(3)
    E = 24  # the tiny CLIP's projection dim (the released head reads ViT-L/14's 768)
    head = torch.nn.Sequential(torch.nn.Linear(E, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 8), torch.nn.Dropout(0.2),
                               torch.nn.Linear(8, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)).eval()
    path = tmp_path / "head.pth"
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    ref_head = torch.nn.Module()
    ref_head.layers = torch.nn.Sequential(*[type(m)(*((m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else (m.p,)))
                                            for m in head])
    ref_head.load_state_dict(torch.load(path, weights_only=True), strict=True)  # the layout is the released one
    images = _images(3, seed=2)
    _, embeds = _clip_reference(tiny["clip"], images, ["x"])
    with torch.no_grad():
        expected = ref_head.eval().layers(embeds.float()).double()[:, 0]
    reward = resolve_reward(f"aesthetic:head={path},clip={tiny['clip']}")
    assert isinstance(reward, AestheticReward)
    torch.testing.assert_close(reward(images), expected, rtol=0, atol=1e-5)
    torch.save({"layers.0.weight": torch.zeros(4, E), "layers.0.bias": torch.zeros(4), "layers.2.weight": torch.zeros(1, 5),
                "layers.2.bias": torch.zeros(1)}, tmp_path / "bad.pth")
    for bad, match in [(tmp_path / "missing.pth", "does not exist"), (tmp_path / "bad.pth", "do not chain")]:
        with pytest.raises(ValueError, match=match):
            load_aesthetic_head(bad)
    for spec in ["aesthetic", "aesthetic:clip=x", "aesthetic:head"]:
        with pytest.raises(ValueError, match="aesthetic"):
            resolve_reward(spec)


# -- the sampler on a latent text-to-image model ---------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_clip_reward_on_a_tiny_sd_pipeline(tiny, tmp_path, monkeypatch):
    """The issue's command shape: `--reward clip --prompt "..."` on a tiny SD pipeline writes PNGs,
    samples.npz with weights and per-step rewards, rewards.png, and the reward's cost in run.json.
    The last reward column is the CLIP score of the VAE-decoded samples (the images in samples.npz)
    for the run's prompt: the reward saw decoded pixels and each particle's prompt."""
    from gensample.runs import fk_steer as runs_fk

    monkeypatch.setattr(rewards_mod, "DEFAULT_CLIP_MODEL", str(tiny["clip"]))  # `clip` alone: the default model
    runs_fk._resolve_named.cache_clear()
    out = tmp_path / "o"
    r = invoke("run", "--sampler", "fk-steer", "--model", tiny["sd"], "--reward", "clip", "--prompt", "a red cat",
               "--particles", "2", "-n", "4", "--steps", "4", "--final", "weighted", "--no-progress", "-o", out)
    assert r.exit_code == 0, r.output
    runs_fk._resolve_named.cache_clear()
    assert len(list((out / "images").glob("*.png"))) == 4 and (out / "rewards.png").is_file() and (out / "grid.png").is_file()
    with np.load(out / "samples.npz") as z:
        images, w, rew = z["images"], z["weights"], z["rewards"]
    assert images.shape == (4, 3, PIXELS, PIXELS) and rew.shape == (4, 5)
    np.testing.assert_allclose(w.reshape(2, 2).sum(1), 1.0)
    score = ClipScoreReward(str(tiny["clip"]))(torch.from_numpy(images), prompts=["a red cat"] * 4)
    np.testing.assert_allclose(rew[:, -1], score.numpy(), rtol=0, atol=1e-5)
    rec = json.loads((out / "run.json").read_text())
    assert rec["stats"]["reward_calls"] == 5 and rec["stats"]["reward_seconds"] > 0
    assert rec["config"]["reward"] == "clip" and rec["text_conditioning"]["prompts"] == ["a red cat"]


def test_particle_groups_take_prompts_in_turn_and_the_reward_sees_them(tiny):
    """Two prompts, three groups of K = 2: group g is conditioned on prompts[g % 2] and the reward gets
    that prompt on each of the group's rows, at every scored step; latents arrive decoded (pixels)."""
    seen = []

    def spy(images, prompts=None):
        seen.append((tuple(images.shape), list(prompts)))
        return images.flatten(1).mean(1).double()

    res = gensample.run(sampler="fk-steer", model=str(tiny["sd"]), reward=spy, prompt=["a cat", "a dog"], particles=2,
                        num_samples=6, steps=3, progress=False)
    assert res.x.shape[0] == 6
    rows = ["a cat", "a cat", "a dog", "a dog", "a cat", "a cat"]
    probe, calls = seen[0], seen[1:]
    assert probe == ((1, 3, PIXELS, PIXELS), ["a cat"])  # the validation probe: one decoded row
    assert len(calls) == 4 and all(c == ((6, 3, PIXELS, PIXELS), rows) for c in calls)


def test_cfg_target_on_a_text_model(tiny):
    """--guidance-scale w on a text model: FKC's CFG target p(x|c)^w p(x|neg)^(1-w) (two experts per
    model call) times exp(lambda r); reward every 2 steps (3 calls for 4 steps)."""
    res = gensample.run(sampler="fk-steer", model=str(tiny["sd"]), reward=lambda x, prompts=None: -x.flatten(1).abs().mean(1),
                        prompt="a red cat", guidance_scale=3.0, particles=2, num_samples=4, steps=4, reward_every=2,
                        progress=False)
    st = res.record["stats"]
    assert st["fk_steer"]["target"] == "cfg" and st["fk_steer"]["betas"] == [3.0, -2.0]
    assert st["model_rows"] == 4 * 4 * 2 and st["reward_calls"] == 3


@pytest.mark.parametrize("model,reward,match", [("sd", "digits-classifier:3", "does not fit model"),
                                                ("gmm2d", "clip", "prompts")])
def test_rewards_that_do_not_fit_the_model_are_usage_errors(tiny, tmp_path, model, reward, match):
    """Probed before sampling: a pixel-space reward on a latent model (it gets decoded 3 x 16 x 16
    images), CLIP on a model without prompts; exit 2, one message, no run.json."""
    spec = f"clip:{tiny['clip']}" if reward == "clip" else reward
    r = invoke("run", "--sampler", "fk-steer", "--model", tiny["sd"] if model == "sd" else model, "--reward", spec,
               "--particles", "2", "-n", "2", "--steps", "2", "--no-progress", "-o", tmp_path / "o")
    assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o" / "run.json").exists()
