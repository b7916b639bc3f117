"""The SD3 / SD3.5 family (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", arXiv 2403.03206): loader, text conditioning, transformer adapter.

Text conditioning (sec. 5.1 "Text encoders"): three encoders, CLIP-L and CLIP-G
(``CLIPTextModelWithProjection``) and T5-XXL (optional: without it the T5 part is zeros, as
diffusers does when ``text_encoder_3`` is None, and as the paper's T5 dropout trained for).

- context ``encoder_hidden_states`` (P, 77 + L_T5, D_T5): the penultimate hidden states of the
  two CLIP encoders, concatenated along the channels and zero-padded to the T5 width, followed
  along the sequence by T5's last hidden state of ``max_sequence_length`` tokens (default 256);
- ``pooled_projections`` (P, D_L + D_G): the two CLIP projected pooled embeddings, concatenated.

The MM-DiT sees the latent as patch_size x patch_size patches (its own ``pos_embed``), so the adapter
passes the unpacked latent and the timestep sigma * 1000 unchanged (the units SD3 was trained in).
"""

from __future__ import annotations

from typing import Sequence

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

PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
TRANSFORMER_CLASSES = ("SD3Transformer2DModel",)
CLIP_CLASSES = ("CLIPTextModelWithProjection",)
PARTS = {
    "transformer": (TRANSFORMER_CLASSES, True), "vae": (VAE_CLASSES, True),
    "text_encoder": (CLIP_CLASSES, True), "tokenizer": (TOKENIZER_CLASSES, True),
    "text_encoder_2": (CLIP_CLASSES, True), "tokenizer_2": (TOKENIZER_CLASSES, True),
    "text_encoder_3": (T5_CLASSES, False), "tokenizer_3": (T5_TOKENIZER_CLASSES, False),
}
DEFAULT_MAX_SHIFT = 1.16  # StableDiffusion3Pipeline's fallback for a config without max_shift


class SD3Velocity(FlowVelocity):
    """v(x_sigma, sigma) of an SD3Transformer2DModel called as ``(sample, timestep,
    encoder_hidden_states, pooled_projections)``; ``timestep`` (B,) or scalar, sigma * 1000, passed
    as float32 (the scheduler's timesteps)."""

    def forward(self, sample, timestep, encoder_hidden_states=None, pooled_projections=None, **kwargs):
        if encoder_hidden_states is None or pooled_projections is None:
            raise TypeError("the SD3 transformer needs encoder_hidden_states and pooled_projections (prompt embeddings)")
        t = torch.as_tensor(timestep, device=sample.device).float()
        if t.ndim == 0:
            t = t.expand(sample.shape[0])  # (B,)
        return self.transformer(hidden_states=sample, timestep=t, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]  # (B, C, h, w)


class SD3PromptEncoder(FlowPromptEncoder):
    """Prompts -> ``{"encoder_hidden_states": (P, L_clip + L_T5, D), "pooled_projections": (P, D_pool)}``
    exactly as ``StableDiffusion3Pipeline.encode_prompt`` (no clip_skip, one image per prompt).
    ``encode_negative``: the negative prompt, "" when None (the pipeline's default)."""

    default_max_sequence_length = 256

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, tokenizer_3=None, text_encoder_3=None,
                 joint_attention_dim: int = 4096):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3
        self.joint_attention_dim = int(joint_attention_dim)

    def _modules(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    @property
    def clip_length(self) -> int:
        """The pipeline pads both CLIP prompts to the first tokenizer's length (77)."""
        return max_tokens(self.tokenizer, self.text_encoder)

    def _clip(self, tokenizer, encoder, prompts: list, device) -> tuple:
        warn_truncated(tokenizer, prompts, encoder)
        ids = tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids.to(module_device_dtype(encoder)[0]), output_hidden_states=True)
        dtype = module_device_dtype(self.text_encoder)[1]  # both cast to text_encoder's dtype, as diffusers
        return out.hidden_states[-2].to(dtype=dtype, device=device), out[0].to(device)  # (P, L, D), (P, D_proj)

    def encode(self, prompts: Sequence[str]) -> dict:
        prompts = list(prompts)
        device = self.device
        hidden_l, pooled_l = self._clip(self.tokenizer, self.text_encoder, prompts, device)
        hidden_g, pooled_g = self._clip(self.tokenizer_2, self.text_encoder_2, prompts, device)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)  # (P, 77, D_L + D_G)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=device,
                             dtype=module_device_dtype(self.text_encoder)[1])
        else:
            t5 = t5_embeds(self.tokenizer_3, self.text_encoder_3, prompts, self.max_sequence_length, device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero channels up to T5's width
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),  # (P, 77 + L_T5, D_T5)
                "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1)}  # (P, D_L + D_G)

    def run_record(self) -> dict:
        """What run.json says about the SD3 conditioning (``LoadedModel.text_record``)."""
        return {"sd3": {"max_sequence_length": self.max_sequence_length, "t5": self.text_encoder_3 is not None}}

    def token_usage(self, prompts: Sequence[str]) -> dict:
        prompts = list(prompts)
        rec = {"clip_l": token_usage(self.tokenizer, prompts, self.text_encoder),
               "clip_g": token_usage(self.tokenizer_2, prompts, self.text_encoder_2)}
        if self.tokenizer_3 is not None:
            rec["t5"] = token_usage(self.tokenizer_3, prompts, max_len=self.max_sequence_length)
        else:
            rec["t5"] = {"note": f"no T5 encoder: {self.max_sequence_length} zero embeddings"}
        return rec


def build_model(name, parts: dict, scheduler_config: dict, spec: str) -> FlowPipelineModel:
    """The LoadedModel of SD3 components (``parts``: PARTS' names, T5 optional)."""
    tr, vae = parts["transformer"], parts["vae"]
    c = tr.config
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")):
        check_pair(parts, enc, tok, spec)
    if int(vae.config.latent_channels) != int(c.in_channels) or int(c.out_channels) != int(c.in_channels):
        raise ValueError(f"--model {spec}: the VAE's {vae.config.latent_channels} latent channels do not match the "
                         f"transformer's {c.in_channels} in / {c.out_channels} out channels")
    pooled = sum(int(parts[k].config.projection_dim) for k in ("text_encoder", "text_encoder_2"))
    if pooled != int(c.pooled_projection_dim):
        raise ValueError(f"--model {spec}: the CLIP encoders' projections give {pooled} pooled channels; the "
                         f"transformer expects pooled_projection_dim={c.pooled_projection_dim}")
    if parts["text_encoder_3"] is not None and int(parts["text_encoder_3"].config.d_model) != int(c.joint_attention_dim):
        raise ValueError(f"--model {spec}: T5 gives {parts['text_encoder_3'].config.d_model}-dim states; the "
                         f"transformer expects joint_attention_dim={c.joint_attention_dim}")
    sched = scheduler_config
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(c.sample_size)  # the pipeline's default_sample_size: pixels = sample_size * f
    patch = int(c.patch_size)  # image_seq_len = (h // patch) * (w // patch), the pipeline's
    extras = {"vae": vae, "pixel_shape": (int(vae.config.out_channels), size * f, size * f), "text_conditional": True,
              "family": "sd3", "sigma_mu": sigma_mu_of(sched, patch, DEFAULT_MAX_SHIFT), "flow_base_sigmas": None,
              "latent_multiple": patch, "embedded_guidance": False, **text_parts(parts)}
    model = FlowPipelineModel(name=name, kind="diffusion", unet=SD3Velocity(tr), scheduler_config=sched,
                              event_shape=(int(c.in_channels), size, size), prediction_type="flow", is_image=True,
                              extras=extras)
    model.extras["prompt_encoder"] = SD3PromptEncoder(
        parts["tokenizer"], parts["text_encoder"], parts["tokenizer_2"], parts["text_encoder_2"], parts["tokenizer_3"],
        parts["text_encoder_3"], joint_attention_dim=int(c.joint_attention_dim))
    return model


# StableDiffusion3Pipeline folders / objects (SD3 and SD3.5 text-to-image; T5 may be left out)
register_family(flow_family("sd3", PIPELINE_CLASSES, PARTS, build_model))
