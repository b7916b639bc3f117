"""DiffusionGemma (transformers' native ``DiffusionGemmaForBlockDiffusion``) as a block-sampler network.

DiffusionGemma is a block-diffusion LM with an encoder-decoder split: a causal encoder writes the clean
context (prompt and committed blocks) into a KV cache once, and a bidirectional decoder denoises a
"canvas" of ``canvas_length`` tokens cross-attending to that cache, conditioned on its previous logits
(self-conditioning). Its corruption is uniform (a canvas starts as random vocabulary tokens), not a mask.

``DiffusionGemmaNetwork`` maps it onto the masked block sampler's interface (docs/masked_lms.md,
"Models and the CLI"): ``network(x, block=(start, end))`` returns logits (B, end - start, V) of the block;
positions of the block still holding the placeholder id (the model's pad id; never drawn) are fed to the
decoder as uniformly random tokens, drawn from the network's own generator each call, as the stock
uniform-corruption scheduler renoises uncommitted positions; committed positions are fed as they are.
The encoder cache is exact and incremental: only tokens before ``start`` that are not yet cached are
encoded (the prompt on the first block, each committed block afterwards); a changed prefix or batch
shape rebuilds it. Self-conditioning passes the previous call's logits of the same block (none at a
block's first call). With this mapping the first-hitting reveal order is a heuristic for this model
(its exactness argument is for masked corruption); the confidence strategies mirror the stock sampler.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


NOISE_OFFSET = 0x9E3779B97F4A7C15 % 2**62  # canvas-noise streams: seed + offset


class DiffusionGemmaNetwork(nn.Module):
    """``forward(input_ids (B, L), block=(start, end)) -> logits (B, end - start, V)``; ``block`` None: the
    canvas starting at the first placeholder column."""

    logit_shift = 0

    def __init__(self, model: nn.Module, placeholder_id: int):
        super().__init__()
        self.model = model
        self.placeholder_id = int(placeholder_id)
        cfg = model.config
        self.canvas_length = int(cfg.canvas_length)
        self.vocab_size = int(cfg.get_text_config(decoder=True).vocab_size)
        self.reset()

    def reset(self, seeds=None) -> None:
        """Forget the encoder cache and self-conditioning; ``seeds``: one per row, each seeding that row's own
        canvas-noise generator (a stream apart from the sampler's: seed + NOISE_OFFSET), so a sample's noise
        depends on its seed only."""
        seeds = [0] if seeds is None else list(seeds)
        self.noise = [torch.Generator("cpu").manual_seed((int(s) + NOISE_OFFSET) % 2**63) for s in seeds]
        self._cache = None
        self._cached_ids = None
        self._sc = None
        self.encoder_calls = 0

    def _encode(self, prefix: torch.Tensor) -> None:
        from transformers.cache_utils import DynamicCache

        n_cached = 0 if self._cached_ids is None else self._cached_ids.shape[1]
        fresh = (self._cached_ids is None or self._cached_ids.shape[0] != prefix.shape[0]
                 or n_cached > prefix.shape[1] or not torch.equal(self._cached_ids, prefix[:, :n_cached]))
        if fresh:
            self._cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
            n_cached = 0
        if prefix.shape[1] > n_cached:
            dev = prefix.device
            self.model.model.encoder(
                input_ids=prefix[:, n_cached:], cache=self._cache,
                attention_mask=torch.ones(prefix.shape, dtype=torch.bool, device=dev),
                position_ids=torch.arange(n_cached, prefix.shape[1], device=dev).unsqueeze(0))
            self.encoder_calls += 1
        self._cached_ids = prefix.clone()

    def forward(self, input_ids: torch.Tensor, time=None, block: tuple | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        bsz, length = input_ids.shape
        if block is None:
            open_cols = (input_ids == self.placeholder_id).any(0).nonzero()
            if len(open_cols) == 0:
                raise ValueError("DiffusionGemma network called without block= on a sequence with no open position")
            start = int(open_cols[0])
            block = (start, min(start + self.canvas_length, length))
        start, end = int(block[0]), int(block[1])
        if start < 1:
            raise ValueError("DiffusionGemma needs a non-empty context before the block (a prompt or a BOS token)")
        self._encode(input_ids[:, :start])
        canvas = input_ids[:, start:end]
        open_ = canvas == self.placeholder_id
        if len(self.noise) != bsz:
            self.noise = [self.noise[0]] * bsz if len(self.noise) == 1 else self.noise
            if len(self.noise) != bsz:
                raise ValueError(f"DiffusionGemma network: {len(self.noise)} noise generators for {bsz} rows; call reset(seeds)")
        noise = torch.stack([torch.randint(0, self.vocab_size, canvas.shape[1:], generator=g) for g in self.noise])
        noise = noise.to(canvas.device)
        canvas = torch.where(open_, noise, canvas)
        dev = input_ids.device
        dec_mask = torch.ones((bsz, end), dtype=torch.bool, device=dev)
        mask_mapping = self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config, inputs_embeds=torch.empty((bsz, end - start, 0), device=dev),
            cache=self._cache, decoder_attention_mask=dec_mask)
        sc_key = (bsz, start, end)
        sc = self._sc[1] if self._sc is not None and self._sc[0] == sc_key else None
        logits = self.model(decoder_input_ids=canvas, cache=self._cache, self_conditioning_logits=sc,
                            decoder_attention_mask=mask_mapping,
                            decoder_position_ids=torch.arange(start, end, device=dev).unsqueeze(0)).logits
        self._sc = (sc_key, logits.to(self.model.model.decoder.embed_tokens.weight.dtype))
        return logits


def load_diffusion_gemma(path: str, name: str | None = None, *, model_dir: Path | None = None,
                         tokenizer_dir: Path | None = None):
    """``--model dgemma:DIR``: a ``DiffusionGemmaForBlockDiffusion`` folder saved with ``save_pretrained``
    (plus its tokenizer), or a saved ``DiffusionGemmaPipeline`` folder (model/ and processor/ or
    tokenizer/ subfolders). Loaded with transformers (native class, no remote code)."""
    try:
        from transformers import DiffusionGemmaForBlockDiffusion
    except ImportError:
        import transformers

        raise ValueError(f"--model dgemma:{path}: DiffusionGemmaForBlockDiffusion needs a newer transformers than the "
                         f"installed {transformers.__version__} (one that has the diffusion_gemma model)") from None

    from .llada import extra_eos_ids, read_config
    from .masked_lm import DLMTokenizer, dlm_model, load_local_tokenizer

    spec = f"dgemma:{path}"
    folder = Path(path)
    model_dir = Path(model_dir or folder)
    raw = read_config(model_dir, spec)
    if raw.get("model_type") != "diffusion_gemma":
        raise ValueError(f"--model {spec}: config.json describes model_type {raw.get('model_type')!r}, not "
                         "'diffusion_gemma'")
    try:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(model_dir), local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {spec}: cannot load DiffusionGemmaForBlockDiffusion there ({err})") from None
    tdir = Path(tokenizer_dir or folder)
    hf_tok = load_local_tokenizer(tdir, spec)
    text = model.config.get_text_config(decoder=True)
    placeholder = text.pad_token_id if text.pad_token_id is not None else hf_tok.pad_token_id
    if placeholder is None:
        raise ValueError(f"--model {spec}: the model has no pad token id to mark open canvas positions")
    tok = DLMTokenizer(hf_tok, int(placeholder), eos_ids=[text.eos_token_id, *extra_eos_ids(hf_tok, ("<end_of_turn>", "<eos>"))],
                       pad_token_id=int(placeholder))
    net = DiffusionGemmaNetwork(model, int(placeholder))
    return dlm_model(name or spec, net, tok, family="diffusion_gemma", logits_size=net.vocab_size,
                     max_length=int(text.max_position_embeddings), network_cached=net,
                     canvas_length=net.canvas_length)


def _pipeline_parts(folder: Path, comps: dict) -> tuple[Path, Path]:
    model_sub = next((k for k, v in comps.items() if v[1] == "DiffusionGemmaForBlockDiffusion"), "model")
    tok_sub = next((k for k in ("processor", "tokenizer") if (folder / k).is_dir()), model_sub)
    return folder / model_sub, folder / tok_sub


def _register_family() -> None:
    from .loading import Family, register_family

    def detect(class_name: str, comps: dict) -> bool:
        """A saved DiffusionGemmaPipeline (model_index.json), or a bare model folder (config.json's
        architectures, no components)."""
        return class_name in ("DiffusionGemmaPipeline", "DiffusionGemmaForBlockDiffusion") or any(
            v[1] == "DiffusionGemmaForBlockDiffusion" for v in comps.values())

    def load_folder(folder, index, comps, name, spec, variant):
        if variant is not None:
            raise ValueError(f"--model {spec}: --weights-variant does not apply to DiffusionGemma folders")
        if not comps:  # a bare model folder
            return load_diffusion_gemma(str(folder), name=name)
        model_dir, tok_dir = _pipeline_parts(Path(folder), comps)
        return load_diffusion_gemma(str(folder), name=name, model_dir=model_dir, tokenizer_dir=tok_dir)

    register_family(Family(name="diffusion_gemma", detect=detect, load_folder=load_folder))


_register_family()
