"""FKCPipeline: Feynman-Kac correctors with SMC for diffusers UNets (Skreta et al., ICML 2025, arXiv 2503.02819; docs/fkc.md).

Thin: it builds the experts' conditioning and one batched expert call, then runs the loop of
``gensample.samplers.fkc.sample_fkc`` (move, float64 log-weights, per-group resampling).

- ``UNet2DModel`` (class-conditional, ``num_class_embeds`` with the last embedding as the null
  class): experts are class labels.
- ``UNet2DConditionModel`` + ``CLIPTextModel`` + tokenizer (+ ``AutoencoderKL``), Stable
  Diffusion style: experts are prompts (or ``prompt_embeds``).
- SDXL (``addition_embed_type="text_time"``): the SDXL pipeline's two text encoders and
  tokenizers (``text_encoder_2`` / ``tokenizer_2``, ``FKCPipeline.from_pipe(sdxl_pipe)``); each
  expert is a prompt's flat conditioning (hidden states, pooled embedding, size/crop time ids),
  encoded by diffusers' own ``StableDiffusionXLPipeline.encode_prompt`` (``_sdxl.py``), with the
  pipeline's ``force_zeros_for_empty_prompt`` rule for a missing negative prompt and its
  micro-conditioning arguments (``original_size``, ``crops_coords_top_left``, ``target_size`` and
  the negative ones).

Denoiser checks at construction (``check_denoiser``) accept a ``UNet2DModel``, a Stable Diffusion
1.x / 2.x ``UNet2DConditionModel`` (text cross-attention and nothing else) and an SDXL UNet whose
text encoders fit it (hidden sizes add up to ``cross_attention_dim``, the pooled projection plus
the six time ids to the added embedding). Other added or class conditioning, extra input channels
(inpainting, depth, upscaling) and transformer denoisers (SD3, Flux: flow matching; DiT, PixArt)
are refused with the reason.

The scheduler is always an ``FKCScheduler`` (another DDPM-family scheduler is converted with
``from_config``; a flow-matching one is refused). Its ``fkc_*`` config fields do not set the
target: the call's ``target`` / ``beta`` / ``guidance_scale`` / ``expert_betas`` do. The loop
sums the log-weights and resamples itself (``sample_fkc``), which a stock diffusers pipeline does
not: ``FKCScheduler`` placed in one refuses a non-trivial target (gensample.schedulers.fkc).
``FKCPipeline.from_pipe(pipe)`` reuses a loaded SD 1.x/2.x, SDXL, DDPM or DDIM pipeline's modules.

Targets: ``"cfg"`` p(x|c)^w p(x|neg)^(1-w) per group (w = guidance_scale, diffusers convention);
``"product"`` prod_i p(x|c_i)^beta_i over ``experts`` (one group); ``"anneal"`` p(x|c)^beta.
Each prompt / class label is a group of ``num_particles`` particles that resample only among
themselves. Log-weights stay float64 whatever the UNet dtype.
"""

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Union

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..samplers.fkc import DEFAULTS, FINALS, TARGET_BETA, FKCConfig, TARGETS, eps_and_x0, sample_fkc
from ..schedulers.fkc import FKCScheduler
from . import _sdxl
from ._images import decode_latents, to_output_type

PIPELINE_TARGETS = TARGETS


@dataclass
class FKCPipelineOutput(BaseOutput):
    """images; weights (rows,) normalised within each group; ess (G, steps) ESS before resampling."""

    images: Any
    weights: np.ndarray
    ess: np.ndarray


SUPPORTED_DENOISERS = ("UNet2DModel (unconditional, or class-conditional through num_class_embeds with the last "
                       "embedding as the null class)",
                       "UNet2DConditionModel with text cross-attention only (Stable Diffusion 1.x / 2.x)",
                       "UNet2DConditionModel with addition_embed_type='text_time' and two CLIP text encoders (SDXL)")
# StableDiffusionXLPipeline's call arguments that only an SDXL UNet takes
SDXL_ARGUMENTS = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                  "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                  "negative_crops_coords_top_left", "negative_target_size")


def check_denoiser(unet, text_encoder=None, vae=None, text_encoder_2=None) -> None:
    """Raise a ValueError naming the reason and ``SUPPORTED_DENOISERS`` when ``unet`` cannot be
    driven by FKCPipeline's expert calls (``unet(x, t, encoder_hidden_states=...)``, SDXL's
    ``added_cond_kwargs`` of pooled text and time ids, or ``unet(x, t, class_labels=...)``), or when
    the text encoder(s) / VAE do not fit it."""
    supported = "FKCPipeline supports: " + "; ".join(SUPPORTED_DENOISERS)
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet is checked as the module it wraps
    name = type(unet).__name__
    if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        if "SD3" in name or "Flux" in name:
            why = "a flow-matching transformer (SD3 / Flux): FKC on flow-matching models is not supported yet"
        elif "Transformer" in name:
            why = "a transformer denoiser, which FKCPipeline does not drive"
        else:
            why = "not a diffusers UNet"
        raise ValueError(f"unet: got {name}, {why}. {supported}.")
    cfg = unet.config
    in_ch, out_ch = int(cfg.in_channels), int(cfg.out_channels)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"unet: {name} has in_channels={in_ch}, out_channels={out_ch}: a UNet that takes extra input "
                         f"channels (inpainting, depth, upscaling) needs an input image FKCPipeline does not pass. {supported}.")
    if cfg.get("class_embed_type") is not None:
        raise ValueError(f"unet: {name} has class_embed_type={cfg.class_embed_type!r}, which needs class embeddings "
                         f"FKCPipeline does not build. {supported}.")
    if isinstance(unet, UNet2DConditionModel):
        added = cfg.get("addition_embed_type")
        if added is not None and added != "text_time":
            raise ValueError(f"unet: {name} has addition_embed_type={added!r}, an added conditioning FKCPipeline does "
                             f"not build. {supported}.")
        if cfg.get("num_class_embeds") is not None:
            raise ValueError(f"unet: {name} has num_class_embeds={cfg.num_class_embeds} besides text conditioning "
                             f"(e.g. a noise-level class of an upscaler), which FKCPipeline does not pass. {supported}.")
        if cfg.get("encoder_hid_dim_type") not in (None, "text_proj"):
            raise ValueError(f"unet: {name} has encoder_hid_dim_type={cfg.encoder_hid_dim_type!r} (image "
                             f"conditioning), which FKCPipeline does not build. {supported}.")
        if added == "text_time":  # SDXL: two encoders, concatenated hidden states + pooled projection
            _sdxl.check_text_encoders(unet, text_encoder, text_encoder_2)
            text_encoder = None
        text_dim = cfg.get("encoder_hid_dim") or cfg.get("cross_attention_dim")
        hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
        if isinstance(text_dim, int) and isinstance(hidden, int) and hidden != text_dim:
            raise ValueError(f"text_encoder: hidden size {hidden} does not match the UNet's text dimension {text_dim} "
                             f"(cross_attention_dim / encoder_hid_dim)")
    latent = getattr(getattr(vae, "config", None), "latent_channels", None)
    if isinstance(latent, int) and latent != in_ch:
        raise ValueError(f"vae: latent_channels={latent} does not match the UNet's in_channels={in_ch}")


class FKCPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents"]

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """``DiffusionPipeline.from_pipe``; a flow-matching pipeline (SD3 / SD3.5, Flux) gives a
        ``FlowFKCPipeline`` around it (FKC through the sampler core, which runs flows)."""
        face = FlowFKCPipeline.from_flow_pipe(cls, pipeline, kwargs)
        return face if face is not None else super().from_pipe(pipeline, **kwargs)

    def __init__(self, unet: Union[UNet2DModel, UNet2DConditionModel], scheduler: SchedulerMixin,
                 vae: Optional[Union[AutoencoderKL, AutoencoderTiny]] = None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt: bool = True):
        """``text_encoder_2`` / ``tokenizer_2`` / ``force_zeros_for_empty_prompt``: SDXL's second
        encoder and its rule for a missing negative prompt (zero embeddings, as
        StableDiffusionXLPipeline; ``from_pipe`` carries the SDXL pipeline's value over). The
        annotations let DiffusionPipeline.from_pipe hand over a loaded pipeline's UNet and VAE."""
        super().__init__()
        check_denoiser(unet, text_encoder, vae, text_encoder_2)
        if not isinstance(scheduler, FKCScheduler):
            scheduler = FKCScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))

    # -- conditioning ------------------------------------------------------------------------
    @property
    def is_text_conditional(self) -> bool:
        return self.unet.config.get("cross_attention_dim") is not None  # UNet2DConditionModel

    @property
    def is_sdxl(self) -> bool:
        return _sdxl.is_sdxl_unet(self.unet)

    def encode_prompt(self, prompts: List[str], device) -> torch.Tensor:
        """CLIP text embeddings (n, L, D) for a list of prompts."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("prompts need a tokenizer and a text_encoder; pass prompt_embeds instead")
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    def _text_conditioning(self, prompts, negative, do_cfg: bool, device, prompt_embeds=None,
                           negative_prompt_embeds=None, sdxl_kwargs=None):
        """(cond, uncond) flat dicts with one row per prompt (uncond None unless ``do_cfg``):
        ``{"encoder_hidden_states"}`` for SD 1.x / 2.x, plus ``text_embeds`` / ``time_ids`` for SDXL
        (``_sdxl.encode``, diffusers' own encoding)."""
        if self.is_sdxl:
            kw = dict(sdxl_kwargs or {})
            return _sdxl.encode(self, prompts, negative, do_cfg=do_cfg, device=device, prompt_embeds=prompt_embeds,
                                negative_prompt_embeds=negative_prompt_embeds, **kw)
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(list(prompts), device)
        cond, uncond = {"encoder_hidden_states": prompt_embeds}, None
        if do_cfg:
            if negative_prompt_embeds is None:
                G = prompt_embeds.shape[0]
                neg = negative if negative is not None else ""
                neg = [neg] * G if isinstance(neg, str) else list(neg)
                if len(neg) != G:
                    raise ValueError(f"negative_prompt must be a string or a list of {G}, got {len(neg)}")
                negative_prompt_embeds = self.encode_prompt(neg, device)
            uncond = {"encoder_hidden_states": negative_prompt_embeds}
        return cond, uncond

    def _groups_and_experts(self, target, prompt, negative_prompt, class_labels, experts, prompt_embeds,
                            negative_prompt_embeds, device, sdxl_kwargs=None):
        """List over groups of M conditionings (text: flat dicts of rows without batch dim; class: ints)."""
        text = self.is_text_conditional
        if target == "product":
            if experts is None or len(experts) < 2:
                raise ValueError("target='product' needs experts=[c1, c2, ...] (prompts or class labels), at least two")
            if not text:
                return [[int(c) for c in experts]]
            per_prompt = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
            given = sorted(k for k in per_prompt if (sdxl_kwargs or {}).get(k) is not None)
            if given:
                raise ValueError(f"target='product' encodes its experts from the prompts in experts=[...]; {given} "
                                 f"do not apply to it")
            kw = {k: v for k, v in (sdxl_kwargs or {}).items() if k not in per_prompt}
            cond, _ = self._text_conditioning(list(experts), None, False, device, sdxl_kwargs=kw)
            return [[_sdxl.rows(cond, i) for i in range(len(experts))]]
        if text:
            if prompt_embeds is None:
                if prompt is None:
                    raise ValueError(f"target={target!r} needs prompt (str or list) or prompt_embeds")
                prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            cond, uncond = self._text_conditioning(prompt, negative_prompt, target == "cfg", device, prompt_embeds,
                                                   negative_prompt_embeds, sdxl_kwargs)
            G = cond["encoder_hidden_states"].shape[0]
            if target == "anneal":
                return [[_sdxl.rows(cond, g)] for g in range(G)]
            return [[_sdxl.rows(cond, g), _sdxl.rows(uncond, g)] for g in range(G)]
        n_embeds = int(self.unet.config.get("num_class_embeds") or 0)
        null = n_embeds - 1 if n_embeds else None
        if class_labels is None:
            if target == "cfg":
                raise ValueError("target='cfg' on a class-conditional UNet needs class_labels")
            return [[null]]
        labels = [class_labels] if isinstance(class_labels, int) else [int(c) for c in class_labels]
        if n_embeds and any(not 0 <= c < n_embeds - 1 for c in labels):
            raise ValueError(f"class_labels must be in [0, {n_embeds - 2}] (the last embedding is the null class), got {labels}")
        if target == "anneal":
            return [[c] for c in labels]
        if null is None:
            raise ValueError("target='cfg' needs a UNet with num_class_embeds (last embedding = null class)")
        return [[c, null] for c in labels]

    # -- call ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        class_labels: Optional[Union[int, List[int]]] = None,
        target: str = "cfg",
        experts: Optional[List[Any]] = None,
        expert_betas: Optional[List[float]] = None,
        beta: float = TARGET_BETA["anneal"],
        guidance_scale: float = 2.0,
        num_particles: int = 4,
        num_inference_steps: int = 50,
        eta: float = DEFAULTS["eta"],
        resample: str = DEFAULTS["resample"],
        ess_threshold: float = DEFAULTS["ess_threshold"],
        scheme: str = DEFAULTS["scheme"],
        final: str = DEFAULTS["final"],
        quadrature: str = DEFAULTS["quadrature"],
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],  # noqa: B006 (diffusers signature)
        **sdxl_kwargs,
    ):
        """Sample ``num_particles`` particles per group (prompt / class label) from the target.

        ``sdxl_kwargs`` (SDXL UNets only, StableDiffusionXLPipeline's meaning): ``prompt_2``,
        ``negative_prompt_2``, ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``,
        ``original_size``, ``crops_coords_top_left``, ``target_size``, ``negative_original_size``,
        ``negative_crops_coords_top_left``, ``negative_target_size``; the time ids use the pixel
        ``height`` / ``width`` (default: the UNet's sample size times the VAE factor)."""
        bad = sorted(set(sdxl_kwargs) - set(SDXL_ARGUMENTS))
        if bad:
            raise TypeError(f"FKCPipeline.__call__ got unexpected keyword argument(s) {bad}; SDXL arguments are "
                            f"{list(SDXL_ARGUMENTS)}")
        if sdxl_kwargs and not self.is_sdxl:
            raise ValueError(f"{sorted(sdxl_kwargs)} are SDXL arguments; this pipeline's UNet is not an SDXL UNet "
                             f"(addition_embed_type='text_time')")
        if target not in PIPELINE_TARGETS:
            raise ValueError(f"target must be one of {PIPELINE_TARGETS}, got {target!r}")
        if final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {final!r}")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {name!r}")
        device = self._execution_device
        if self.is_sdxl:
            sdxl_kwargs.update(height=height, width=width)
        groups = self._groups_and_experts(target, prompt, negative_prompt, class_labels, experts, prompt_embeds,
                                          negative_prompt_embeds, device, sdxl_kwargs)
        M = len(groups[0])
        if target == "cfg":
            betas = (float(guidance_scale), 1.0 - float(guidance_scale))
        elif target == "anneal":
            betas = (float(beta),)
        else:
            betas = tuple(float(b) for b in (expert_betas if expert_betas is not None else [1.0] * M))
            if len(betas) != M:
                raise ValueError(f"expert_betas must have one exponent per expert ({M}), got {len(betas)}")
        cfg = FKCConfig(betas=betas, eta=eta, resample=resample, ess_threshold=ess_threshold, scheme=scheme, final=final,
                        quadrature=quadrature)
        G, K = len(groups), num_particles
        N = G * K

        # expert conditioning for the (M * N) rows of one batched call: expert-major
        text = self.is_text_conditional
        if text:  # per key: (M, G, ...) -> K particles per group -> (M*N, ...)
            per_expert = [_sdxl.stack_rows([groups[g][i] for g in range(G)]) for i in range(M)]
            cond = {k: torch.cat([e[k].repeat_interleave(K, dim=0) for e in per_expert]).to(device=device,
                                                                                          dtype=self.unet.dtype)
                    for k in per_expert[0]}
        elif groups[0][0] is None:
            cond = {}
        else:
            lab = torch.tensor([[groups[g][i] for g in range(G)] for i in range(M)])  # (M, G)
            cond = {"class_labels": lab.repeat_interleave(K, dim=1).reshape(-1).to(device)}

        self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        ab = self.scheduler.alphas_cumprod.double()
        if hasattr(self.scheduler, "_ab64"):
            ab = self.scheduler._ab64
        pred_type = self.scheduler.config.prediction_type
        unet_kw = _sdxl.unet_kwargs(cond)  # the conditioning is fixed over the loop

        def expert_eps(x, t):
            xs = x.repeat(M, *([1] * (x.ndim - 1))).to(self.unet.dtype)  # (M*N, C, H, W)
            out = self.unet(xs, t.to(device), return_dict=False, **unet_kw)[0].float()
            if out.shape[1] == 2 * x.shape[1]:
                out = out[:, : x.shape[1]]
            eps, x0 = eps_and_x0(out, xs.float(), ab[int(t)], pred_type)  # x0 from the raw output (zero SNR)
            return eps.float().reshape(M, *x.shape), x0.float().reshape(M, *x.shape)

        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (N, self.unet.config.in_channels, height or size[0], width or size[1])
        if self.vae is not None and (height or width):
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            shape = (N, self.unet.config.in_channels, (height or size[0] * scale) // scale, (width or size[1] * scale) // scale)
        if isinstance(generator, list) and len(generator) != N:
            raise ValueError(f"generator list must have num_groups * num_particles = {N} entries, got {len(generator)}")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        if latents is None:  # drawn on the generator's device (CPU or CUDA), then moved
            gen_device = (generator[0] if isinstance(generator, list) else generator).device
            latents = randn_tensor(shape, generator=generator, device=gen_device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)
        resample_gens = [generator[g * K] for g in range(G)] if isinstance(generator, list) else generator

        bar = self.progress_bar(total=len(self.scheduler.timesteps))
        timesteps = self.scheduler.timesteps.cpu()

        def on_step(k, x, log_w):
            bar.update()
            if callback_on_step_end is not None:
                outs = callback_on_step_end(self, k, timesteps[k], {"latents": x})
                return outs.get("latents", x) if outs else x
            return x

        res = sample_fkc(expert_eps, latents, cfg, ab, timesteps, group_size=K, noise_generators=generator,
                         resample_generators=resample_gens, final_alpha_bar=self.scheduler.final_alpha_cumprod,
                         on_step=on_step, sampler="FKCPipeline")
        bar.close()
        x = res.x
        if output_type == "latent":
            images = x
        else:
            if self.vae is not None:
                x = decode_latents(self.vae, x)
            images = (x / 2 + 0.5).clamp(0, 1)
            images = to_output_type(self, images, output_type)
        self.maybe_free_model_hooks()
        weights, ess = res.weights.cpu().numpy(), res.ess.cpu().numpy()
        if not return_dict:
            return (images, weights, ess)
        return FKCPipelineOutput(images=images, weights=weights, ess=ess)


# -- flow-matching pipelines (SD3 / SD3.5, Flux): faces over the sampler core ---------------------
# run options a flow face sets from its own arguments (or never: no output folder, no launch)
FLOW_FACE_RESERVED = ("sampler", "model", "config", "num_samples", "seed", "steps", "progress", "output", "overwrite",
                      "num_processes", "prompt")


class FlowFace:
    """Shared base of the diffusers faces on a flow-matching pipeline (``FlowFKCPipeline``,
    ``FlowSTSLPipeline``, ``FlowSMCPosteriorPipeline``).

    A face holds the flow pipeline (SD3 / SD3.5, Flux) and runs ``gensample.api.run(sampler,
    model=pipe, ...)`` on the object as it is (nothing is copied, cast or moved): the text
    encoding, the sigma grid, the VP twin of the velocity model and the loop are those of
    ``gensample run --sampler <sampler>`` on the same pipeline folder, so a face's output equals
    that run's for the same ``seed``. ``self.last_run`` keeps the ``RunResult`` of the last call
    (its ``samples`` and run record). Randomness is an integer ``seed`` (the run's per-sample
    seeds); a torch.Generator is refused with a ValueError naming ``seed``.
    """

    face_name = "FlowFace"
    output_types = ("pil", "np", "pt")

    def __init__(self, pipe):
        from ..schedulers._config import flow_pipeline_reason

        if flow_pipeline_reason(pipe) is None:
            raise ValueError(f"pipe must be a flow-matching pipeline (StableDiffusion3Pipeline, FluxPipeline, ...), "
                             f"got {type(pipe).__name__}")
        self.pipe = pipe
        self.last_run = None

    @classmethod
    def from_flow_pipe(cls, owner, pipeline, kwargs: dict):
        """``owner.from_pipe(pipeline, **kwargs)`` for a flow-matching ``pipeline``: this face
        around it; None when ``pipeline`` is not a flow pipeline (the owner's UNet path)."""
        from ..schedulers._config import flow_pipeline_reason

        if flow_pipeline_reason(pipeline) is None:
            return None
        if kwargs:
            raise ValueError(f"{owner.__name__}.from_pipe of a flow-matching pipeline takes no component overrides, "
                             f"got {sorted(kwargs)}")
        return cls(pipeline)

    @property
    def components(self) -> dict:
        return dict(self.pipe.components)

    def _check_common(self, output_type, seed, generator=None) -> None:
        if output_type not in self.output_types:
            raise ValueError(f"output_type must be one of {list(self.output_types)}, got {output_type!r}")
        if generator is not None:
            raise ValueError(f"generator: {self.face_name} draws with the run's per-sample seeds; pass seed=INT "
                             f"instead of a torch.Generator")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")

    def _run(self, sampler: str, opts: dict, extra: Optional[dict] = None) -> dict:
        """``api.run(sampler, model=self.pipe, **opts, **extra)`` in memory; ``extra`` (the caller's
        pass-through run options) may not set what the face's own arguments set."""
        from .. import api

        extra = dict(extra or {})
        clash = sorted(k for k in extra if k in FLOW_FACE_RESERVED or k in opts)
        if clash:
            reserved = sorted(set(FLOW_FACE_RESERVED) | set(opts))
            raise ValueError(f"{clash[0]}: set by {self.face_name}'s own arguments (or not available on a face: no "
                             f"output folder, one process); reserved run options are {reserved}")
        res = api.run(sampler, model=self.pipe, progress=False, **opts, **extra)
        self.last_run = res
        return res.samples

    def _images(self, pixels, output_type: str):
        """The run's decoded images in [-1, 1] -> [0, 1] -> ``output_type`` (as diffusers' pipelines)."""
        images = ((torch.as_tensor(pixels).float().clamp(-1, 1) + 1) / 2)
        return to_output_type(self.pipe, images, output_type)


class FlowFKCPipeline(FlowFace):
    """FKC on a flow-matching text-to-image pipeline (SD3 / SD3.5; Flux where its targets apply),
    built by ``FKCPipeline.from_pipe(flow_pipe)`` around the pipeline's own components.

    The particles move by the flow's SDE proposal (DDIM(eta) on the VP twin of the velocity model,
    docs/flow_matching.md) and carry float64 FK weights, as ``gensample run --sampler fkc`` does:
    the call is ``gensample.api.run("fkc", model=<the flow pipeline>, ...)`` (``FlowFace``).
    Targets: ``"cfg"`` p(x|prompt)^w p(x|negative)^(1-w) (w = guidance_scale; needs a true
    unconditional branch: guidance-distilled Flux-dev is refused by the core with the reason),
    ``"anneal"`` p(x|prompt)^beta, ``"product"`` prod_i p(x|experts[i])^beta over prompts.
    ``prompt`` may be a list: group g of ``num_particles`` particles targets prompts[g] (the run's
    prompts[g % P] rule with one group per prompt).
    """

    face_name = "FlowFKCPipeline"
    output_types = ("pil", "np", "pt", "latent")

    def __call__(self, prompt: Optional[Union[str, List[str]]] = None, negative_prompt: Optional[str] = None,
                 target: str = "cfg", experts: Optional[List[str]] = None, expert_betas: Optional[List[float]] = None,
                 beta: Optional[float] = None, guidance_scale: float = 2.0, num_particles: int = 4,
                 num_inference_steps: int = 28, eta: float = DEFAULTS["eta"], resample: str = DEFAULTS["resample"],
                 ess_threshold: float = DEFAULTS["ess_threshold"], scheme: str = DEFAULTS["scheme"],
                 final: str = DEFAULTS["final"], quadrature: str = DEFAULTS["quadrature"], height: Optional[int] = None,
                 width: Optional[int] = None, seed: int = 0, output_type: str = "pil", return_dict: bool = True):
        """``num_particles`` particles per group from the target: one group, or one per prompt of a
        list. output_type: "pil" | "np" | "pt" (decoded images in [0, 1]) | "latent" (the flow
        latents the run keeps). Returns FKCPipelineOutput(images, weights (rows,) normalised within
        each group, ess (groups, steps)); ``final="one_per_group"`` gives one image per group."""
        if target not in PIPELINE_TARGETS:
            raise ValueError(f"target must be one of {PIPELINE_TARGETS}, got {target!r}")
        if final not in FINALS:
            raise ValueError(f"final must be one of {list(FINALS)}, got {final!r}")
        self._check_common(output_type, seed)
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        opts = dict(fkc_target=target, particles=num_particles, steps=int(num_inference_steps), eta=float(eta),
                    resample=resample, ess_threshold=float(ess_threshold), scheme=scheme, final=final,
                    quadrature=quadrature, seed=int(seed))
        if target == "product":
            if not experts or len(experts) < 2 or not all(isinstance(e, str) for e in experts):
                raise ValueError(f"experts must be a list of two or more prompts for target='product', got {experts!r}")
            if any("|" in e for e in experts):
                raise ValueError(f"experts prompts must not contain '|', got {experts!r}")
            if expert_betas is not None:
                if len(set(float(b) for b in expert_betas)) != 1 or len(expert_betas) != len(experts):
                    raise ValueError(f"expert_betas must be one common exponent per expert on a flow pipeline (the "
                                     f"run's --beta), got {expert_betas!r}")
                beta = float(expert_betas[0])
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError(f"prompt must be one string (or None) for target='product': the experts are the "
                                 f"prompts in experts=[...], got {prompt!r}")
            opts["experts_prompts"] = "|".join(experts)
            prompt = prompt if prompt is not None else experts[0]
        elif experts is not None or expert_betas is not None:
            raise ValueError(f"experts / expert_betas apply to target='product', got target={target!r}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (not isinstance(prompts, (list, tuple)) or not prompts
                or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"prompt must be a string or a non-empty list of strings (one per particle group), "
                             f"got {prompt!r}")
        groups = len(prompts)
        opts["prompt"] = prompts[0] if groups == 1 else list(prompts)
        # the run counts output samples: groups with final="one_per_group", else particles
        opts["num_samples"] = groups if final == "one_per_group" else groups * num_particles
        if negative_prompt is not None:
            opts["negative_prompt"] = negative_prompt
        if target == "cfg":
            opts["guidance_scale"] = float(guidance_scale)
        elif beta is not None:
            opts["beta"] = float(beta)
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                opts[name] = int(value)
        res = self._run("fkc", opts)
        images = torch.as_tensor(res["x"]) if output_type == "latent" else self._images(res["images"], output_type)
        # the run keeps its group's ESS trace on every row: one row per group
        ess = np.asarray(res["ess"])
        weights, ess = np.asarray(res["weights"]), ess if final == "one_per_group" else ess[::num_particles]
        if not return_dict:
            return (images, weights, ess)
        return FKCPipelineOutput(images=images, weights=weights, ess=ess)
