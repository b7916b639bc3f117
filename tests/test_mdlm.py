"""MDLM DiT (gensample.models.mdlm): golden output vs the reference code, release formats, CLI.

The fixture tests/fixtures/mdlm/ was produced by running MDLM's own ``models/dit.py`` on fixed
tiny random weights (see its README.md); our implementation must reproduce those logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gensample import api
from gensample.cli import main
from gensample.models.mdlm import MDLMNetwork, load_mdlm, read_lightning_ckpt
from gensample.samplers.first_hitting import MaskedDiffusionConfig, sample_ancestral, time_input

FIX = Path(__file__).parent / "fixtures" / "mdlm"
REF = torch.load(FIX / "reference_logits.pt")
# The reference ran in float32 on CPU with the same op order up to SDPA; allow float32 rounding.
ATOL = 1e-4


def _net(spec: str) -> MDLMNetwork:
    return load_mdlm(spec).extras["network"]


@pytest.mark.parametrize("spec", [str(FIX), str(FIX / "tiny_mdlm.ckpt")])
def test_dit_matches_reference_logits(spec):
    net = _net(spec)
    with torch.no_grad():
        out = net(REF["input_ids"], None)  # time-agnostic: sigma = 0, as MDLM's _process_sigma
        long = net(REF["long_input_ids"], None)  # longer than model_length: rotary has no cap
    assert (out - REF["logits_sigma0"]).abs().max().item() <= ATOL
    assert (long - REF["logits_long"]).abs().max().item() <= ATOL
    # a perturbed weight must break the match (the comparison has power)
    with torch.no_grad():
        net.backbone.blocks[1].attn_qkv.weight[0, 0] += 0.5
        assert (net(REF["input_ids"], None) - REF["logits_sigma0"]).abs().max().item() > 10 * ATOL


def test_time_conditioned_dit_matches_reference():
    src = _net(str(FIX))
    net = MDLMNetwork(**{**src.config, "time_conditioning": True})
    net.load_state_dict(src.state_dict())
    with torch.no_grad():
        out = net(REF["input_ids"], REF["sigma_t"])
    assert (out - REF["logits_sigma_t"]).abs().max().item() <= ATOL
    with pytest.raises(ValueError, match="time-conditioned"):
        net(REF["input_ids"], None)


def test_release_config_mask_length_schedule_and_tokenizer():
    m = load_mdlm(str(FIX))
    cfg = json.loads((FIX / "config.json").read_text())
    assert m.kind == "masked_lm" and m.extras["mask_token_id"] == cfg["vocab_size"] - 1
    assert m.extras["length"] == cfg["model_length"] and m.extras["masking_schedule"] == "loglinear"
    assert m.extras["max_length"] is None and m.extras["time_conditioning"] is False
    tok = m.extras["tokenizer"]
    assert tok.encode("ab ab c!") == [8, 9, 6, 3, 10]
    assert tok.decode([8, 11, 9]) == "ab_ ab"  # the mask id decodes as '_'


def test_lightning_ckpt_uses_ema_and_reads_hydra_config():
    state, cfg, shadow = read_lightning_ckpt(FIX / "tiny_mdlm.ckpt")
    assert cfg["model"]["n_heads"] == 4 and cfg["noise"]["type"] == "loglinear" and len(shadow) > 0
    m = load_mdlm(str(FIX / "tiny_mdlm.ckpt"))
    assert m.extras["weights_source"] == "ema"
    # the raw state_dict (training weights) differs from the EMA weights the reference evaluated
    assert not torch.equal(state["backbone.vocab_embed.embedding"], m.extras["network"].backbone.vocab_embed.embedding)


def test_strict_loading_rejects_wrong_layouts(tmp_path):
    net = _net(str(FIX))
    net.save_pretrained(tmp_path / "ok")
    again = load_mdlm(str(tmp_path / "ok")).extras["network"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    from safetensors.torch import load_file, save_file

    for edit, match in [(lambda sd: sd.pop("backbone.blocks.1.norm2.weight"), "missing"),
                        (lambda sd: sd.__setitem__("backbone.extra.weight", torch.zeros(1)), "unexpected"),
                        (lambda sd: sd.__setitem__("backbone.output_layer.linear.bias", torch.zeros(5)), "shape")]:
        bad = tmp_path / f"bad_{match}"
        bad.mkdir()
        (bad / "config.json").write_text((FIX / "config.json").read_text())
        sd = load_file(str(FIX / "model.safetensors"))
        edit(sd)
        save_file(sd, str(bad / "model.safetensors"))
        with pytest.raises(ValueError, match=match):
            load_mdlm(str(bad))
    with pytest.raises(ValueError, match="config.json and model.safetensors"):
        load_mdlm(str(tmp_path))


@pytest.mark.parametrize("sampler,extra", [("fhs", []), ("mdm-ancestral", ["--steps", "6"])])
def test_cli_samples_mdlm_folder_and_ckpt(tmp_path, sampler, extra):
    for i, spec in enumerate([str(FIX), str(FIX / "tiny_mdlm.ckpt")]):
        out = tmp_path / f"run{i}"
        r = CliRunner().invoke(main, ["run", "--sampler", sampler, "--model", f"mdlm:{spec}", "-n", "3",
                                      "--length", "14", "--prompt", "ab", "-o", str(out), *extra])
        assert r.exit_code == 0, r.output
        with np.load(out / "samples.npz") as z:
            tokens = z["tokens"]
        assert tokens.shape == (3, 14) and (tokens != 11).all() and (tokens[:, 0] == 8).all()
        lines = (out / "samples.txt").read_text().splitlines()
        assert len(lines) == 3 and all(line.startswith("ab") for line in lines)
        rec = json.loads((out / "run.json").read_text())
        assert rec["stats"]["masking_schedule"] == "loglinear"


def test_cli_mdlm_errors_exit_2(tmp_path):
    for spec, match in [(str(tmp_path / "nothing_here"), "no such folder or file"),
                        (str(FIX / "config.json"), "Lightning .ckpt")]:
        r = CliRunner().invoke(main, ["run", "--sampler", "fhs", "--model", f"mdlm:{spec}", "-n", "1",
                                      "-o", str(tmp_path / "o")])
        assert r.exit_code == 2 and match in r.output and "Traceback" not in r.output, r.output


def test_linear_schedule_never_feeds_infinite_sigma():
    assert torch.isfinite(time_input(torch.tensor([1.0]), "linear")).all()
    seen = []

    def net(ids, time):
        seen.append(time)
        return torch.zeros(*ids.shape, 3)

    cfg = MaskedDiffusionConfig(mask_token_id=3, schedule="linear", num_inference_steps=4, time_conditioning=True)
    sample_ancestral(net, torch.full((2, 5), 3), cfg, torch.Generator().manual_seed(0))
    assert seen and all(torch.isfinite(t).all() for t in seen)
    assert seen[0].max().item() == pytest.approx(-np.log(1e-3), rel=1e-6)


def test_mlm_remote_code_flag_mask_token_and_signature(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gensample.models.masked_lm import HFMaskedLMAdapter

    class TimedModel(torch.nn.Module):  # an MDLM-hub-like forward: no attention_mask, a timesteps arg
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, input_ids, timesteps):
            self.calls.append(timesteps)
            return torch.zeros(*input_ids.shape, 4)

    inner = TimedModel()
    HFMaskedLMAdapter(inner)(torch.zeros(2, 3, dtype=torch.long), None)
    assert torch.equal(inner.calls[-1], torch.zeros(2))
    HFMaskedLMAdapter(inner, time_conditioning=True)(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0.5, 2.0]))
    assert torch.equal(inner.calls[-1], torch.tensor([0.5, 2.0]))
    # a GPT-2 tokenizer (no mask token) is refused with a pointer to mdlm:
    tok = transformers.AutoTokenizer.from_pretrained(str(FIX), local_files_only=True)
    folder = tmp_path / "gpt2ish"
    tok.save_pretrained(folder)
    r = CliRunner().invoke(main, ["run", "--sampler", "fhs", "--model", f"mlm:{folder}", "-n", "1", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no mask token" in r.output and "mdlm:" in r.output, r.output


def test_mlm_without_max_position_embeddings_is_not_capped(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import gensample.models.masked_lm as mlm

    class Cfg:
        model_length = 40
        time_conditioning = False

    class Net(torch.nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 13)

    class Tok:
        mask_token_id = 4
        all_special_ids = [0, 4]

        def encode(self, text, add_special_tokens=False):
            return [5]

        def decode(self, ids, skip_special_tokens=False):
            return "x" * len(ids)

    import transformers

    (tmp_path / "m").mkdir()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: Cfg())
    monkeypatch.setattr(transformers.AutoModelForMaskedLM, "from_pretrained", lambda *a, **k: Net())
    m = mlm.load_hf_masked_lm(str(tmp_path / "m"))
    assert m.extras["length"] == 40 and m.extras["max_length"] is None
    res = api.run("fhs", model=f"mlm:{tmp_path / 'm'}", num_samples=1, length=100, progress=False)
    assert res.samples["tokens"].shape == (1, 100)


def test_mlm_remote_code_needs_the_flag(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")

    class Tok:
        mask_token_id = 4
        all_special_ids = [4]

        def encode(self, text, add_special_tokens=False):
            return [5]

        def decode(self, ids, skip_special_tokens=False):
            return ""

    class Net(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, 8)

    seen = []

    def model_from(*a, trust_remote_code=None, **k):
        seen.append(trust_remote_code)
        if not trust_remote_code:
            raise ValueError("requires you to execute the modeling file; set the option `trust_remote_code=True`")
        return Net()

    (tmp_path / "m").mkdir()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: type("C", (), {})())
    monkeypatch.setattr(transformers.AutoModelForMaskedLM, "from_pretrained", model_from)
    spec = f"mlm:{tmp_path / 'm'}"
    r = CliRunner().invoke(main, ["run", "--sampler", "fhs", "--model", spec, "-n", "1", "--length", "6",
                                  "-o", str(tmp_path / "o1")])
    assert r.exit_code == 2 and "--trust-remote-code" in r.output, r.output
    r = CliRunner().invoke(main, ["run", "--sampler", "fhs", "--model", spec, "-n", "1", "--length", "6",
                                  "--trust-remote-code", "-o", str(tmp_path / "o2")])
    assert r.exit_code == 0, r.output
    assert False in seen and True in seen and None not in seen  # always explicit, never a prompt


@pytest.mark.parametrize("recipe", ["fhs_mdlm_owt.yaml", "fhs_mdlm_owt_ancestral.yaml"])
def test_reproduction_recipe_dry_run(tmp_path, recipe):
    """The recipe runs end to end on a random-weight model of the release's layout (tiny sizes)."""
    import yaml

    path = Path(__file__).parents[1] / "configs" / "reproduce" / recipe
    cfg = yaml.safe_load(path.read_text())
    assert cfg["model"] == "mdlm:kuleshov-group/mdlm-owt" and cfg["length"] == 1024
    folder = tmp_path / "mdlm-owt-tiny"
    torch.manual_seed(0)
    MDLMNetwork(vocab_size=12, model_length=cfg["length"], hidden_dim=16, cond_dim=8, n_blocks=1, n_heads=2).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((FIX / f).read_bytes())
    out = tmp_path / "out"
    args = ["run", "--config", str(path), "--model", f"mdlm:{folder}", "--device", "cpu", "-n", "2",
            "--batch-size", "2", "--length", "12", "-o", str(out)]
    if "steps" in cfg:
        args += ["--steps", "8"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["sampler"] == cfg["sampler"] and rec["stats"]["sampling_time_s"] > 0
    assert len((out / "samples.txt").read_text().splitlines()) == 2
