"""The Flux family (Black Forest Labs' FLUX.1 [dev] / [schnell]; the rectified-flow MM-DiT of Esser et
al. 2024, arXiv 2403.03206, with rotary position ids): loader, text conditioning, transformer adapter.

- Text: CLIP-L's pooled output (``pooled_projections`` (P, 768)) and T5's last hidden state of
  ``max_sequence_length`` tokens (``encoder_hidden_states`` (P, L, 4096); default 512, the limit).
- Latents: the VAE latent (B, C, h, w) is cut into 2x2 patches and packed into a sequence
  (B, h/2 * w/2, 4C); every patch gets a position id (0, row, col), every text token (0, 0, 0).
  The adapter packs the sampler's (B, C, h, w) latent, builds both ids, calls the transformer and
  unpacks the velocity, so samplers never see the packing.
- Time: the transformer takes sigma (the pipeline divides the scheduler's sigma * 1000 by 1000).
- Guidance-distilled models ([dev], ``transformer.config.guidance_embeds``) take the guidance scale
  as an input (a ``guidance`` row per sample, default 1.0: set it with the run's guidance_scale);
  true classifier-free guidance needs a negative prompt and a second call.
- Dynamic shifting: mu from the packed sequence length (h/2)(w/2); the pipeline passes
  sigmas = linspace(1, 1/N, N) to the scheduler (``extras["flow_base_sigmas"]``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .flow_pipelines import (
    T5_CLASSES,
    T5_TOKENIZER_CLASSES,
    FlowPipelineModel,
    FlowPromptEncoder,
    FlowVelocity,
    check_pair,
    flow_family,
    sigma_mu_of,
    t5_embeds,
    text_parts,
)
from .loading import TOKENIZER_CLASSES, VAE_CLASSES, register_family
from .text import max_tokens, module_device_dtype, token_usage, warn_truncated

PIPELINE_CLASSES = ("FluxPipeline",)
TRANSFORMER_CLASSES = ("FluxTransformer2DModel",)
CLIP_CLASSES = ("CLIPTextModel",)
PARTS = {
    "transformer": (TRANSFORMER_CLASSES, True), "vae": (VAE_CLASSES, True),
    "text_encoder": (CLIP_CLASSES, True), "tokenizer": (TOKENIZER_CLASSES, True),
    "text_encoder_2": (T5_CLASSES, True), "tokenizer_2": (T5_TOKENIZER_CLASSES, True),
}
DEFAULT_MAX_SHIFT = 1.15  # FluxPipeline's fallback for a config without max_shift
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels; 1024 px with the 8x VAE)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches in row-major order, channels (c, dy, dx)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack``: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """(h2 * w2, 3) position ids of the packed patches: (0, row, col)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxVelocity(FlowVelocity):
    """v(x_sigma, sigma) of a FluxTransformer2DModel called as ``(sample (B, C, h, w), timestep (B,)
    = sigma * 1000, encoder_hidden_states, pooled_projections[, guidance])``: packs, builds the text /
    image ids, calls the transformer with ``timestep / 1000`` (cast to the sample's dtype first, as
    the pipeline does) and unpacks. ``guidance`` is required iff the transformer is
    guidance-distilled."""

    def forward(self, sample, timestep, encoder_hidden_states=None, pooled_projections=None, guidance=None, **kwargs):
        if encoder_hidden_states is None or pooled_projections is None:
            raise TypeError("the Flux transformer needs encoder_hidden_states and pooled_projections (prompt embeddings)")
        distilled = bool(self.transformer.config.guidance_embeds)
        if distilled and guidance is None:
            raise TypeError("this Flux transformer is guidance-distilled (guidance_embeds=True): it needs a guidance "
                            "row per sample")
        if not distilled:
            guidance = None  # an undistilled transformer has no guidance embedding
        b, _, h, w = sample.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs 2x2 latent patches: the latent height and width must be even, got {h}x{w}")
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(b)
        t = t.to(sample.dtype) / 1000  # (B,) sigma
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype)
        out = self.transformer(hidden_states=pack(sample), timestep=t, guidance=guidance,
                               pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                               txt_ids=txt_ids, img_ids=image_ids(h // 2, w // 2, sample.device, sample.dtype),
                               return_dict=False)[0]  # (B, h/2 * w/2, 4C)
        return unpack(out, h, w)


class FluxPromptEncoder(FlowPromptEncoder):
    """Prompts -> ``{"encoder_hidden_states": (P, L, D_T5), "pooled_projections": (P, D_clip)}`` exactly
    as ``FluxPipeline.encode_prompt`` (one image per prompt), plus ``"guidance": (P,)`` float32 filled
    with the embedded guidance scale when the transformer is guidance-distilled."""

    default_max_sequence_length = 512

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, guidance_embeds: bool = False):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.guidance_embeds = bool(guidance_embeds)
        self.guidance = 1.0  # the embedded guidance scale (``set_guidance``)

    def _modules(self) -> list:
        return [self.text_encoder, self.text_encoder_2]

    def set_guidance(self, value) -> None:
        """The embedded guidance scale of a guidance-distilled model (a finite float >= 0)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"--guidance-scale (the embedded guidance of a guidance-distilled Flux model) must be a "
                             f"finite number >= 0, got {value!r}")
        self.guidance = float(value)

    def cache_key(self) -> tuple:
        return (*super().cache_key(), self.guidance if self.guidance_embeds else None)

    def encode(self, prompts: Sequence[str]) -> dict:
        prompts = list(prompts)
        device = self.device
        warn_truncated(self.tokenizer, prompts, self.text_encoder)
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_tokens(self.tokenizer, self.text_encoder),
                             truncation=True, return_tensors="pt").input_ids
        enc_device, enc_dtype = module_device_dtype(self.text_encoder)
        with torch.no_grad():
            pooled = self.text_encoder(ids.to(enc_device), output_hidden_states=False).pooler_output
        cond = {"encoder_hidden_states": t5_embeds(self.tokenizer_2, self.text_encoder_2, prompts,
                                                   self.max_sequence_length, device),  # (P, L, D_T5)
                "pooled_projections": pooled.to(dtype=enc_dtype, device=device)}  # (P, D_clip)
        if self.guidance_embeds:
            cond["guidance"] = torch.full((len(prompts),), self.guidance, dtype=torch.float32, device=device)
        return cond

    def run_record(self) -> dict:
        """What run.json says about the Flux conditioning (``LoadedModel.text_record``)."""
        return {"flux": {"max_sequence_length": self.max_sequence_length,
                         "embedded_guidance": self.guidance if self.guidance_embeds else None}}

    def token_usage(self, prompts: Sequence[str]) -> dict:
        prompts = list(prompts)
        return {"clip_l": token_usage(self.tokenizer, prompts, self.text_encoder),
                "t5": token_usage(self.tokenizer_2, prompts, max_len=self.max_sequence_length)}


def pipeline_sigmas(steps: int) -> list:
    """The unshifted sigmas FluxPipeline hands to ``set_timesteps``: linspace(1, 1/N, N) (float64,
    the scheduler casts to float32)."""
    return np.linspace(1.0, 1 / steps, steps).tolist()


def _no_sigmas(steps: int) -> None:
    """A scheduler with ``use_flow_sigmas``: FluxPipeline passes no sigmas (the scheduler's own grid)."""
    return None


def build_model(name, parts: dict, scheduler_config: dict, spec: str) -> FlowPipelineModel:
    """The LoadedModel of Flux components (``parts``: PARTS' names)."""
    tr, vae = parts["transformer"], parts["vae"]
    c = tr.config
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        check_pair(parts, enc, tok, spec)
    lat = int(vae.config.latent_channels)
    out_ch = int(c.out_channels or c.in_channels)
    if int(c.in_channels) != 4 * lat or out_ch != int(c.in_channels):
        raise ValueError(f"--model {spec}: the transformer takes {c.in_channels} channels (out {out_ch}); packing 2x2 "
                         f"patches of the VAE's {lat} latent channels gives {4 * lat} (control / fill transformers "
                         f"take extra image channels and are not supported)")
    if int(parts["text_encoder"].config.hidden_size) != int(c.pooled_projection_dim):
        raise ValueError(f"--model {spec}: CLIP gives {parts['text_encoder'].config.hidden_size}-dim pooled output; the "
                         f"transformer expects pooled_projection_dim={c.pooled_projection_dim}")
    if int(parts["text_encoder_2"].config.d_model) != int(c.joint_attention_dim):
        raise ValueError(f"--model {spec}: T5 gives {parts['text_encoder_2'].config.d_model}-dim states; the "
                         f"transformer expects joint_attention_dim={c.joint_attention_dim}")
    sched = scheduler_config
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    size = 2 * ((DEFAULT_SAMPLE_SIZE * f) // (f * 2))  # the pipeline's default pixels, in latent pixels
    distilled = bool(c.guidance_embeds)
    extras = {"vae": vae, "pixel_shape": (int(vae.config.out_channels), size * f, size * f), "text_conditional": True,
              "family": "flux", "sigma_mu": sigma_mu_of(sched, 2, DEFAULT_MAX_SHIFT),  # the packed length (h/2)(w/2)
              "flow_base_sigmas": _no_sigmas if sched.get("use_flow_sigmas") else pipeline_sigmas, "latent_multiple": 2,
              "embedded_guidance": distilled, **text_parts(parts)}
    model = FlowPipelineModel(name=name, kind="diffusion", unet=FluxVelocity(tr), scheduler_config=sched,
                              event_shape=(lat, size, size), prediction_type="flow", is_image=True, extras=extras)
    model.extras["prompt_encoder"] = FluxPromptEncoder(parts["tokenizer"], parts["text_encoder"], parts["tokenizer_2"],
                                                       parts["text_encoder_2"], guidance_embeds=distilled)
    return model


# FluxPipeline folders / objects (Flux-dev, Flux-schnell and their fine-tunes; Fill / Kontext / Control /
# image-to-image pipelines fall through to the refusals of ``loading.check_pipeline_kind``)
register_family(flow_family("flux", PIPELINE_CLASSES, PARTS, build_model))
