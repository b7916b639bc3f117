"""LLaDA, Dream and DiffusionGemma as block-sampler models: golden forwards against the reference modeling
code, the prefix / encoder caches, the loaders, and `gensample run --sampler fhs-block` end to end.

Golden fixtures: tests/fixtures/llada and tests/fixtures/dream (NOTE.md there says how they were made).
Tiny tokenizers are built here offline (a word-level tokenizer over a made-up vocabulary).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gensample.models.dream import DreamNetwork, build_dream
from gensample.models.llada import LLaDANetwork, PrefixCachedNetwork, build_llada

FIX = Path(__file__).parent / "fixtures"
WORDS = ("the cat dog sat ran on a mat log big small red blue and is was to of in it he she we they you "
         "one two three four five six seven eight nine ten yes no hello world good bad sun moon sky sea").split()


# -- offline tokenizers and model folders ------------------------------------------------------------------
def make_tokenizer(folder: Path, size: int, specials: dict, *, bos=None, eos=None, pad=None, chat=False):
    """A word-level PreTrainedTokenizerFast with ``size`` ids: ``specials`` {id: token} at their ids, the
    words of WORDS, then filler words; optional BOS post-processing and a tiny chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, words = {}, iter(list(WORDS) + [f"w{i}" for i in range(size)])
    for i in range(size):
        vocab[specials[i] if i in specials else next(words)] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials.get(pad, "the")))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{specials[bos]} $A", special_tokens=[(specials[bos], bos)])
    kw = {"bos_token": specials.get(bos), "eos_token": specials.get(eos), "pad_token": specials.get(pad),
          "additional_special_tokens": [t for i, t in specials.items() if i not in (bos, eos, pad)]}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in kw.items() if v is not None})
    if chat:
        tok.chat_template = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(str(folder))
    return tok


def llada_folder(tmp: Path, chat=False) -> Path:
    d = tmp / ("llada-instruct" if chat else "llada")
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIX / "llada" / f, d / f)
    # config: vocab 120 (ids >= 120 are never produced), eos = pad = 118, mask 126 (outside the tokenizer)
    make_tokenizer(d, 120, {114: "<|user|>", 115: "<|assistant|>", 116: "<|startoftext|>", 117: "<|unk|>",
                            118: "<|endoftext|>", 119: "<|eot_id|>"}, bos=116, eos=118, pad=118, chat=chat)
    return d


def dream_folder(tmp: Path) -> Path:
    d = tmp / "dream"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIX / "dream" / f, d / f)
    make_tokenizer(d, 100, {93: "<|user|>", 94: "<|assistant|>", 95: "<|beginoftext|>", 96: "<|endoftext|>",
                            97: "<|pad|>", 98: "<|mask|>", 99: "<|im_end|>"}, bos=95, eos=96, pad=97)
    return d


def dgemma_folder(tmp: Path) -> Path:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    d = tmp / "dgemma"
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                max_position_embeddings=128, sliding_window=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=32, patch_size=4,
                  pooling_kernel_size=1)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=8, boi_token_id=None,
                               eoi_token_id=None, image_token_id=None)
    torch.manual_seed(0)
    DiffusionGemmaForBlockDiffusion(cfg).eval().save_pretrained(str(d))
    make_tokenizer(d, 96, {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<end_of_turn>"}, bos=2, eos=1, pad=0)
    return d


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dlm")
    return {"llada": llada_folder(tmp), "llada-instruct": llada_folder(tmp, chat=True), "dream": dream_folder(tmp)}


@pytest.fixture(scope="module")
def dgemma(tmp_path_factory):
    pytest.importorskip("transformers.models.diffusion_gemma")
    return dgemma_folder(tmp_path_factory.mktemp("dg"))


# -- item 1: golden forwards ----------------------------------------------------------------------------------
def test_llada_forward_matches_reference_golden():
    net = build_llada(FIX / "llada")
    gold = load_file(str(FIX / "llada" / "golden.safetensors"))
    with torch.no_grad():
        out = net(gold["input_ids"])
    assert out.shape == gold["logits"].shape
    torch.testing.assert_close(out, gold["logits"], atol=1e-5, rtol=0)


def test_dream_forward_matches_reference_golden_and_shifts_by_one():
    net = build_dream(FIX / "dream")
    gold = load_file(str(FIX / "dream" / "golden.safetensors"))
    with torch.no_grad():
        raw = net.raw_logits(gold["input_ids"])
        aligned = net(gold["input_ids"])
    torch.testing.assert_close(raw, gold["logits"], atol=1e-5, rtol=0)
    # row i of the aligned logits scores position i: the reference's row i - 1 (row 0 kept)
    torch.testing.assert_close(aligned[:, 1:], gold["logits"][:, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(aligned[:, 0], gold["logits"][:, 0], atol=1e-5, rtol=0)


def test_release_networks_are_built_on_meta_and_take_the_folder_tensors(monkeypatch):
    """build_llada / build_dream make no random float32 copy of the network first (a 7-8 B release would need
    ~32 GB for it): the network is built on the meta device and every parameter is a loaded tensor."""
    made = []
    original = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: made.append(self.weight.is_meta) or original(self))
    for net in (build_llada(FIX / "llada"), build_dream(FIX / "dream")):
        assert all(not p.is_meta and p.device.type == "cpu" for p in net.parameters())
    assert made and all(made)  # every Linear was initialised (if at all) on meta only


def test_release_state_dict_names_are_required():
    state = load_file(str(FIX / "llada" / "model.safetensors"))
    assert "model.transformer.blocks.0.up_proj.weight" in state and "model.transformer.ff_out.weight" in state
    cfg = json.loads((FIX / "llada" / "config.json").read_text())
    net = LLaDANetwork(cfg)
    assert set(net.state_dict()) == set(state)
    dstate = load_file(str(FIX / "dream" / "model.safetensors"))
    assert set(DreamNetwork(json.loads((FIX / "dream" / "config.json").read_text())).state_dict()) == set(dstate)


def test_llada_config_refusals_name_the_setting():
    cfg = json.loads((FIX / "llada" / "config.json").read_text())
    with pytest.raises(ValueError, match="block_type"):
        LLaDANetwork({**cfg, "block_type": "sequential"})
    with pytest.raises(ValueError, match="activation_type"):
        LLaDANetwork({**cfg, "activation_type": "swiglu"})


# -- item 4: caches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_prefix_cache_exact_at_refresh_and_while_block_unchanged(family):
    net = build_llada(FIX / "llada") if family == "llada" else build_dream(FIX / "dream")
    x = load_file(str(FIX / family / "golden.safetensors"))["input_ids"]
    cached = PrefixCachedNetwork(net)
    with torch.no_grad():
        full = net(x)
        first = cached(x, block=(4, 8))
        again = cached(x, block=(4, 8))  # second call: only rows >= 4 - shift recomputed
    assert cached.refreshes == 1 and cached.calls == 2
    assert first.shape == (x.shape[0], 4, full.shape[2])  # the block's rows only
    torch.testing.assert_close(first, full[:, 4:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full[:, 4:8], atol=1e-5, rtol=0)


def test_prefix_cache_is_approximate_when_the_block_changes_so_it_is_opt_in():
    net = build_llada(FIX / "llada")
    x = load_file(str(FIX / "llada" / "golden.safetensors"))["input_ids"].clone()
    cached = PrefixCachedNetwork(net)
    with torch.no_grad():
        cached(x, block=(4, 8))
        x[:, 5] = 3  # a token of the block changes: the kept prefix keys/values are now stale
        approx = cached(x, block=(4, 8))
        exact = net(x)
        assert cached.refreshes == 1
        assert (approx - exact[:, 4:8]).abs().max() > 1e-3
        x[:, 1] = 7  # a prefix token changes: refresh, exact again
        torch.testing.assert_close(cached(x, block=(4, 8)), net(x)[:, 4:8], atol=1e-5, rtol=0)
        assert cached.refreshes == 2


def test_diffusion_gemma_encoder_cache_is_incremental_and_exact(dgemma):
    from transformers.cache_utils import DynamicCache

    from gensample.models.diffusion_gemma import load_diffusion_gemma

    model = load_diffusion_gemma(str(dgemma))
    net = model.extras["network_cached"]
    hf = net.model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 96, (2, 21), generator=g)  # prompt 5, two committed canvases of 8
    net.reset(seeds=[1, 2])
    with torch.no_grad():
        first = net(x, block=(5, 13))
        second = net(x, block=(13, 21))  # encodes only the 8 new tokens
        assert net.encoder_calls == 2
        # the same logits from a cache built in one go over the 13-token prefix
        cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
        hf.model.encoder(input_ids=x[:, :13], cache=cache, attention_mask=torch.ones(2, 13, dtype=torch.bool),
                         position_ids=torch.arange(13).unsqueeze(0))
        mm = hf.model.decoder.create_diffusion_decoder_attention_mask(
            config=hf.config, inputs_embeds=torch.empty((2, 8, 0)), cache=cache,
            decoder_attention_mask=torch.ones(2, 21, dtype=torch.bool))
        ref = hf(decoder_input_ids=x[:, 13:21], cache=cache, decoder_attention_mask=mm,
                 decoder_position_ids=torch.arange(13, 21).unsqueeze(0)).logits
    assert first.shape == (2, 8, 96)
    torch.testing.assert_close(second, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remasking,rows", [("fhs", 2), ("low-confidence", 8)])
def test_fhs_block_float64_work_is_per_drawn_row(folders, remasking, rows):
    """No full-vocabulary float64 copy of the logits: every float64 tensor the run creates holds at most the
    rows that need a draw in one step times the vocabulary (a dispatch-mode spy): fhs draws only its 2
    commits per step; a confidence strategy needs a proposal at each open position of the block (8)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gensample.models.llada import load_llada
    from gensample.runs.block_unmasking import _run
    from gensample.samplers.registry import RunContext

    class Spy(TorchDispatchMode):
        biggest = 0  # reset per parametrization: the class is defined inside the test

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    Spy.biggest = max(Spy.biggest, t.numel())
            return out

    model = load_llada(str(folders["llada"]))
    opts = {"prompt": ["the cat"], "gen_length": 16, "block_length": 8, "steps": 4, "remasking": remasking,
            "temperature": 1.0, "chat_template": False, "block_cache": "none"}
    model.prepare_batch([0, 1, 2])
    with torch.no_grad(), Spy():
        _run(model, opts, [11, 12, 13], RunContext("fhs-block"))
    vocab = 128
    assert 0 < Spy.biggest <= 3 * rows * vocab  # B x rows x V; the full logits would be 3 x 18 x 128


# -- items 2 and 3: loaders, CLI and gensample.run ----------------------------------------------------------
def test_prefixes_load_llada_dream_and_dgemma(folders, dgemma):
    from gensample.models.loading import load_model

    from gensample.samplers.block_unmasking import _accepts_block

    llada = load_model(f"llada:{folders['llada']}")
    assert llada.kind == "masked_lm" and llada.extras["family"] == "llada"
    assert not _accepts_block(llada.extras["network"])  # the default network is the exact, uncached one
    assert _accepts_block(llada.extras["network_cached"])  # the prefix cache: opt-in (--block-cache prefix)
    assert llada.extras["mask_token_id"] == 126 and 126 not in llada.extras["exclude_ids"]
    assert set(range(120, 126)) <= set(llada.extras["exclude_ids"])  # ids the tokenizer never produces
    assert 118 in llada.extras["eos_token_ids"] and 119 in llada.extras["eos_token_ids"]
    dream = load_model(f"dlm:{folders['dream']}")
    assert dream.extras["family"] == "dream" and dream.extras["mask_token_id"] == 98
    dg = load_model(f"dgemma:{dgemma}")
    assert dg.extras["family"] == "diffusion_gemma" and dg.extras["canvas_length"] == 8
    with pytest.raises(ValueError, match="not a LLaDA model"):
        load_model(f"llada:{folders['dream']}")
    with pytest.raises(ValueError, match="model_type"):
        load_model(f"dream:{folders['llada']}")


def test_infill_template_syntax():
    from gensample.runs.block_unmasking import parse_infill

    class Tok:
        def encode(self, text):
            return [len(w) for w in text.split()]

    assert parse_infill("The [MASK]x3 sat [MASK] on", Tok(), 99) == [3, 99, 99, 99, 3, 99, 2]
    with pytest.raises(ValueError, match="no mask span"):
        parse_infill("no spans here", Tok(), 99)
    with pytest.raises(ValueError, match="N >= 1"):
        parse_infill("a [MASK]x0 b", Tok(), 99)


def _texts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "texts.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("remasking", ["fhs", "low-confidence", "margin", "entropy", "random"])
def test_cli_writes_texts_and_tokens_for_each_remasking(folders, tmp_path, remasking):
    from cli_helpers import clean, invoke

    out = tmp_path / "run"
    res = invoke("run", "--sampler", "fhs-block", "--model", f"llada:{folders['llada']}", "--prompt", "the cat sat",
                 "--gen-length", 16, "--block-length", 8, "--steps", 4, "--remasking", remasking,
                 "--num-samples", 2, "--seed", 3, "--output", out, "--no-progress")
    clean(res, 0)
    tokens = np.load(out / "samples.npz")["tokens"]
    prompt = [116, *[WORDS.index(w) for w in "the cat sat".split()]]  # BOS + words (ids follow WORDS)
    assert tokens.shape == (2, len(prompt) + 16)
    assert (tokens[:, :len(prompt)] == prompt).all()
    assert not (tokens[:, len(prompt):] == 126).any()  # every mask filled
    assert ((tokens[:, len(prompt):] < 120)).all()  # never an id outside the tokenizer
    recs = _texts(out)
    assert [r["index"] for r in recs] == [0, 1] and all(len(r["tokens"]) == 16 for r in recs)
    assert recs[0]["prompt"].split()[-3:] == ["the", "cat", "sat"]
    run = json.loads((out / "run.json").read_text())
    assert run["stats"]["nfe"] == 2 * 4  # 2 blocks x 4 steps, one call per step (one batch)


def test_api_run_infill_threshold_chat_and_prompt_batching(folders, tmp_path):
    import gensample

    infill = "the [MASK]x3 sat on a [MASK]x2 mat"
    common = dict(prompt=["the cat", "hello world good"], infill=infill, block_length=3, steps=3,
                  remasking="low-confidence", temperature=0.0, num_samples=4, seed=0, progress=False)
    res = gensample.run("fhs-block", f"llada:{folders['llada-instruct']}", threshold=1e-6,
                        output=str(tmp_path / "a"), **common)
    plain = gensample.run("fhs-block", f"llada:{folders['llada-instruct']}", output=str(tmp_path / "b"), **common)
    recs = _texts(tmp_path / "a")
    tokens = np.load(tmp_path / "a" / "samples.npz")["tokens"]
    fixed = {0: WORDS.index("the"), 4: WORDS.index("sat"), 5: WORDS.index("on"), 6: WORDS.index("a"),
             9: WORDS.index("mat")}
    for r in recs:
        assert len(r["tokens"]) == 10
        assert all(r["tokens"][i] == v for i, v in fixed.items())  # the template's text stays fixed
        assert 126 not in r["tokens"]
        # chat template: user tag, prompt i % 2, assistant tag
        want = ["the cat", "hello world good"][r["index"] % 2]
        assert r["prompt"] == f"<|user|> {want} <|assistant|>"
    # rows of the two prompt lengths were stored left-padded to one width
    assert tokens.shape[1] == 1 + 3 + 1 + 10 and (tokens[0, 0] == 118)
    # blocks of the window: [the M M] [M sat on] [a M M] [mat]; two prompt lengths -> two sampler calls.
    # Without a threshold a block's masks are split over its steps (2 + 1 + 2 calls); a threshold every
    # proposal passes commits a whole block per call (1 + 1 + 1).
    assert plain.record["stats"]["nfe"] == 2 * 5
    assert res.record["stats"]["nfe"] == 2 * 3


def test_dream_and_dgemma_run_through_the_cli(folders, dgemma, tmp_path):
    from cli_helpers import clean, invoke

    for spec, name in ((f"dream:{folders['dream']}", "d"), (f"dgemma:{dgemma}", "g")):
        out = tmp_path / name
        res = invoke("run", "--sampler", "fhs-block", "--model", spec, "--prompt", "the cat", "--gen-length", 16,
                     "--steps", 4, "--remasking", "margin", "--num-samples", 2, "--output", out, "--no-progress")
        clean(res, 0)
        assert len(_texts(out)) == 2
        toks = np.load(out / "samples.npz")["tokens"]
        assert toks.shape[1] == 3 + 16


def test_cli_usage_errors_exit_2(folders, dgemma, tmp_path):
    from cli_helpers import clean, invoke

    base = ("run", "--sampler", "fhs-block", "--output", tmp_path / "x", "--no-progress")
    clean(invoke(*base, "--model", f"llada:{folders['llada']}", "--remasking", "fhs", "--threshold", 0.5), 2,
          "--threshold")
    clean(invoke(*base, "--model", f"llada:{folders['llada']}", "--infill", "no spans"), 2, "no mask span")
    clean(invoke(*base, "--model", f"dgemma:{dgemma}", "--prompt", "the", "--block-length", 4, "--gen-length", 16), 2,
          "canvas_length")
    clean(invoke(*base, "--model", f"llada:{folders['llada']}", "--gen-length", 8, "--block-length", 16), 2,
          "--block-length")
    clean(invoke(*base, "--model", "mdm-text", "--gen-length", 100), 2, "maximum length 64")


def test_weights_of_another_shape_than_config_json_are_a_usage_error(folders, tmp_path):
    """config.json whose mlp_hidden_size does not match the weights: the loader's load_state_dict raises a
    shape mismatch; it is reported as a ValueError naming the folder (exit 2 from the CLI, no traceback)."""
    from cli_helpers import clean, invoke

    from gensample.models.llada import load_llada

    d = tmp_path / "llada-mismatch"
    shutil.copytree(folders["llada"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "mlp_hidden_size": 64}))
    with pytest.raises(ValueError, match="do not match the architecture in config.json") as err:
        load_llada(str(d))
    assert str(d) in str(err.value) and "size mismatch" in str(err.value) and "\n" not in str(err.value)
    clean(invoke("run", "--sampler", "fhs-block", "--model", f"llada:{d}", "--output", tmp_path / "x", "--no-progress"),
          2, "config.json")


def test_diffusion_gemma_on_an_older_transformers_is_a_usage_error(tmp_path, monkeypatch):
    """A transformers without DiffusionGemmaForBlockDiffusion: a ValueError naming the class and the
    installed version, not an ImportError."""
    import sys
    import types

    from gensample.models.diffusion_gemma import load_diffusion_gemma

    old = types.ModuleType("transformers")
    old.__version__ = "4.40.0"
    monkeypatch.setitem(sys.modules, "transformers", old)
    with pytest.raises(ValueError, match="DiffusionGemmaForBlockDiffusion needs a newer transformers than the "
                                         "installed 4.40.0"):
        load_diffusion_gemma(str(tmp_path))


def test_saved_diffusion_gemma_pipeline_loads_as_model_dir(dgemma, tmp_path):
    from diffusers import BlockRefinementScheduler, DiffusionGemmaPipeline
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from gensample.models.loading import load_model

    pipe = DiffusionGemmaPipeline(model=DiffusionGemmaForBlockDiffusion.from_pretrained(str(dgemma)),
                                  scheduler=BlockRefinementScheduler(), processor=AutoTokenizer.from_pretrained(str(dgemma)))
    pipe.save_pretrained(str(tmp_path / "pipe"))
    model = load_model(str(tmp_path / "pipe"))  # the DiffusionGemma family claims the folder
    assert model.kind == "masked_lm" and model.extras["family"] == "diffusion_gemma"
    assert model.extras["canvas_length"] == 8


def test_cli_block_cache_prefix_is_used_only_when_asked(folders, tmp_path):
    import gensample

    common = dict(prompt="the cat sat", gen_length=8, block_length=4, steps=4, remasking="entropy", num_samples=2,
                  seed=1, progress=False)
    cached = gensample.run("fhs-block", f"llada:{folders['llada']}", block_cache="prefix", output=str(tmp_path / "c"),
                           **common)
    plain = gensample.run("fhs-block", f"llada:{folders['llada']}", output=str(tmp_path / "p"), **common)
    st = cached.record["stats"]
    # 2 blocks x 4 calls; the cache is rebuilt at each block's first call and serves the other 3
    assert st["nfe"] == 8 and st["cache_calls"] == 8 and st["cache_refreshes"] == 2
    assert "cache_calls" not in plain.record["stats"]
    assert cached.samples["tokens"].shape == plain.samples["tokens"].shape


def test_bare_folders_are_claimed_by_their_family(folders, dgemma):
    """The families a bare transformers folder maps to (config.json's architectures), ready for the folder
    detection of `--model DIR` (see docs/masked_lms.md, "Not covered")."""
    import gensample.models.diffusion_gemma  # noqa: F401  (registers its family, as the zoo import does)
    from gensample.models.loading import family_of

    for folder, family in ((folders["llada"], "llada"), (folders["dream"], "dream"), (dgemma, "diffusion_gemma")):
        cfg = json.loads((folder / "config.json").read_text())
        fam = family_of(cfg["architectures"][0], {})
        assert fam is not None and fam.name == family
        model = fam.load_folder(folder, cfg, {}, "x", str(folder), None)
        assert model.extras["family"] == family
    assert family_of("UNet2DModel", {}) is None


def test_cli_prompts_file_batches_prompts_and_stops_at_eos(folders, tmp_path):
    from cli_helpers import clean, invoke

    pfile = tmp_path / "prompts.txt"
    pfile.write_text("the cat\nhello world good\nsun moon\n")
    out = tmp_path / "run"
    clean(invoke("run", "--sampler", "fhs-block", "--model", f"llada:{folders['llada-instruct']}", "--prompts", pfile,
                 "--gen-length", 8, "--block-length", 4, "--steps", 2, "--stop-at-eos", "-n", 6, "--output", out,
                 "--no-progress"), 0)
    recs = _texts(out)
    want = ["the cat", "hello world good", "sun moon"]
    assert [r["prompt"] for r in recs] == [f"<|user|> {want[i % 3]} <|assistant|>" for i in range(6)]
    for r in recs:  # the text stops before the first end token (<|endoftext|> 118 or <|eot_id|> 119)
        ends = [i for i, t in enumerate(r["tokens"]) if t in (118, 119)] + [len(r["tokens"])]
        assert len(r["text"].split()) == ends[0] and 126 not in r["tokens"]
