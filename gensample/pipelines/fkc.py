"""FKCPipeline: Feynman-Kac correctors with SMC for diffusers UNets (Skreta et al., ICML 2025, arXiv 2503.02819; docs/fkc.md).

Thin: it builds the experts' conditioning and one batched expert call, then runs the loop of
``gensample.samplers.fkc.sample_fkc`` (move, float64 log-weights, per-group resampling).

- ``UNet2DModel`` (class-conditional, ``num_class_embeds`` with the last embedding as the null
  class): experts are class labels.
- ``UNet2DConditionModel`` + ``CLIPTextModel`` + tokenizer (+ ``AutoencoderKL``), Stable
  Diffusion style: experts are prompts (or ``prompt_embeds``).

Denoisers (checked at construction, ``check_denoiser``): a ``UNet2DModel`` or a Stable Diffusion
1.x / 2.x ``UNet2DConditionModel`` (text cross-attention and nothing else). SDXL UNets
(``addition_embed_type="text_time"``: pooled embeddings and size/crop ids from two text encoders),
other added or class conditioning, extra input channels (inpainting, depth, upscaling) and
transformer denoisers (SD3, Flux: flow matching; DiT, PixArt) are refused with the reason.

The scheduler is always an ``FKCScheduler`` (another DDPM-family scheduler is converted with
``from_config``; a flow-matching one is refused). Its ``fkc_*`` config fields do not set the
target: the call's ``target`` / ``beta`` / ``guidance_scale`` / ``expert_betas`` do. The loop
sums the log-weights and resamples itself (``sample_fkc``), which a stock diffusers pipeline does
not: ``FKCScheduler`` placed in one refuses a non-trivial target (gensample.schedulers.fkc).
``FKCPipeline.from_pipe(pipe)`` reuses a loaded SD 1.x/2.x, DDPM or DDIM pipeline's modules.

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
from ._images import to_output_type

PIPELINE_TARGETS = TARGETS


@dataclass
class FKCPipelineOutput(BaseOutput):
    """images; weights (rows,) normalised within each group; ess (G, steps) ESS before resampling."""

    images: Any
    weights: np.ndarray
    ess: np.ndarray


SUPPORTED_DENOISERS = ("UNet2DModel (unconditional, or class-conditional through num_class_embeds with the last "
                       "embedding as the null class)",
                       "UNet2DConditionModel with text cross-attention only (Stable Diffusion 1.x / 2.x)")


def check_denoiser(unet, text_encoder=None, vae=None) -> None:
    """Raise a ValueError naming the reason and ``SUPPORTED_DENOISERS`` when ``unet`` cannot be
    driven by FKCPipeline's expert calls (``unet(x, t, encoder_hidden_states=...)`` or
    ``unet(x, t, class_labels=...)``), or when the text encoder / VAE do not fit it."""
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
        if added == "text_time":
            raise ValueError(f"unet: {name} has addition_embed_type='text_time' (an SDXL UNet: it needs pooled text "
                             f"embeddings and size/crop time ids from two text encoders), which FKCPipeline does not "
                             f"build. {supported}.")
        if added is not None:
            raise ValueError(f"unet: {name} has addition_embed_type={added!r}, an added conditioning FKCPipeline does "
                             f"not build. {supported}.")
        if cfg.get("num_class_embeds") is not None:
            raise ValueError(f"unet: {name} has num_class_embeds={cfg.num_class_embeds} besides text conditioning "
                             f"(e.g. a noise-level class of an upscaler), which FKCPipeline does not pass. {supported}.")
        if cfg.get("encoder_hid_dim_type") not in (None, "text_proj"):
            raise ValueError(f"unet: {name} has encoder_hid_dim_type={cfg.encoder_hid_dim_type!r} (image "
                             f"conditioning), which FKCPipeline does not build. {supported}.")
        text_dim = cfg.get("encoder_hid_dim") or cfg.get("cross_attention_dim")
        hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
        if isinstance(text_dim, int) and isinstance(hidden, int) and hidden != text_dim:
            raise ValueError(f"text_encoder: hidden size {hidden} does not match the UNet's text dimension {text_dim} "
                             f"(cross_attention_dim / encoder_hid_dim)")
    latent = getattr(getattr(vae, "config", None), "latent_channels", None)
    if isinstance(latent, int) and latent != in_ch:
        raise ValueError(f"vae: latent_channels={latent} does not match the UNet's in_channels={in_ch}")


class FKCPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: Union[UNet2DModel, UNet2DConditionModel], scheduler: SchedulerMixin,
                 vae: Optional[Union[AutoencoderKL, AutoencoderTiny]] = None, text_encoder=None, tokenizer=None):
        # the annotations let DiffusionPipeline.from_pipe hand over a loaded pipeline's UNet and VAE
        super().__init__()
        check_denoiser(unet, text_encoder, vae)
        if not isinstance(scheduler, FKCScheduler):
            scheduler = FKCScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)

    # -- conditioning ------------------------------------------------------------------------
    @property
    def is_text_conditional(self) -> bool:
        return self.unet.config.get("cross_attention_dim") is not None  # UNet2DConditionModel

    def encode_prompt(self, prompts: List[str], device) -> torch.Tensor:
        """CLIP text embeddings (n, L, D) for a list of prompts."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("prompts need a tokenizer and a text_encoder; pass prompt_embeds instead")
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    def _groups_and_experts(self, target, prompt, negative_prompt, class_labels, experts, prompt_embeds,
                            negative_prompt_embeds, device):
        """List over groups of M conditionings (text: (L, D) tensors; class: ints)."""
        text = self.is_text_conditional
        if target == "product":
            if experts is None or len(experts) < 2:
                raise ValueError("target='product' needs experts=[c1, c2, ...] (prompts or class labels), at least two")
            conds = self.encode_prompt(list(experts), device) if text else [int(c) for c in experts]
            return [list(conds)]
        if text:
            if prompt_embeds is None:
                if prompt is None:
                    raise ValueError(f"target={target!r} needs prompt (str or list) or prompt_embeds")
                prompt = [prompt] if isinstance(prompt, str) else list(prompt)
                prompt_embeds = self.encode_prompt(prompt, device)
            G = prompt_embeds.shape[0]
            if target == "anneal":
                return [[prompt_embeds[g]] for g in range(G)]
            if negative_prompt_embeds is None:
                neg = negative_prompt if negative_prompt is not None else ""
                neg = [neg] * G if isinstance(neg, str) else list(neg)
                if len(neg) != G:
                    raise ValueError(f"negative_prompt must be a string or a list of {G}, got {len(neg)}")
                negative_prompt_embeds = self.encode_prompt(neg, device)
            return [[prompt_embeds[g], negative_prompt_embeds[g]] for g in range(G)]
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
    ):
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
        groups = self._groups_and_experts(target, prompt, negative_prompt, class_labels, experts, prompt_embeds,
                                          negative_prompt_embeds, device)
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
        if text:
            emb = torch.stack([torch.stack([groups[g][i] for g in range(G)]) for i in range(M)])  # (M, G, L, D)
            emb = emb.repeat_interleave(K, dim=1).reshape(M * N, *emb.shape[2:])  # (M*N, L, D)
            cond = {"encoder_hidden_states": emb.to(device=device, dtype=self.unet.dtype)}
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

        def expert_eps(x, t):
            xs = x.repeat(M, *([1] * (x.ndim - 1))).to(self.unet.dtype)  # (M*N, C, H, W)
            out = self.unet(xs, t.to(device), return_dict=False, **cond)[0].float()
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
                x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0].float()
            images = (x / 2 + 0.5).clamp(0, 1)
            images = to_output_type(self, images, output_type)
        self.maybe_free_model_hooks()
        weights, ess = res.weights.cpu().numpy(), res.ess.cpu().numpy()
        if not return_dict:
            return (images, weights, ess)
        return FKCPipelineOutput(images=images, weights=weights, ess=ess)
