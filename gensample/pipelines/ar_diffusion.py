"""ARDiffusionPipeline: MAR-style masked autoregressive generation with a per-token diffusion head,
and DiSA step annealing (Zhao et al. 2025, arXiv 2505.20297; docs/disa.md). Thin: the math is
in ``gensample.samplers.disa``.

Plugging in your own MAR-like model: pass any two modules with these call signatures

    backbone(tokens, mask, class_labels) -> z
        tokens (B, N, C) float (masked slots hold zeros), mask (B, N) bool (True = unknown),
        class_labels (B,) int64 or None; the null class for CFG is ``null_class``; z (B, N, D).
    head(x_t, t, z) -> (M, C) eps_hat, or (M, 2C) [eps_hat, v] with a learned variance range
        x_t (M, C), t (M,) int64 training timesteps, z (M, D).

and a ``DiSAHeadScheduler`` built from the head's training schedule (any DDPM scheduler config
converts: ``DiSAHeadScheduler.from_config(ddpm.config)``, keeping the source's betas and variance
type, e.g. DDPM's linear / fixed_small, rather than our squaredcos / auto defaults). Tokens are turned into images with
``image_channels``, ``image_size`` and ``patch_size`` (row-major patches), or returned as tokens
with ``output_type="latent"``. ``num_tokens``/``token_dim`` are read from ``backbone.config`` when
present, else given to ``__init__``.

With a ``vae`` (a diffusers AutoencoderKL, e.g. MAR's KL-16 converted by
``gensample.models.kl_vae.load_ldm_vae``) the tokens are latents instead: (B, N, C) row-major
-> (B, C, sqrt N, sqrt N), decoded as D(z / vae.config.scaling_factor) (MAR: 0.2325) to pixels.
``ARDiffusionPipeline.from_mar_release(checkpoint, vae_path)`` builds one from a released MAR
checkpoint (docs/disa.md, "Released MAR checkpoints").
"""

from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..models.mar import unpatchify
from ..samplers.disa import DiSAConfig, StepBudgetSchedule, sample_mar
from ..schedulers.disa import DiSAHeadScheduler


@dataclass
class ARDiffusionPipelineOutput(BaseOutput):
    """images: PIL list, np (B, H, W, c) or pt (B, c, H, W) in [0, 1], or tokens (B, N, C) for
    output_type="latent". stats: head_calls, head_rows, nfe, timings, head_steps per iteration."""

    images: Union[List, np.ndarray, torch.Tensor]
    stats: dict


class ARDiffusionPipeline(DiffusionPipeline):
    """MAR generation (Li et al. 2024) with a DiSA step budget for the head (Zhao et al. 2025)."""

    model_cpu_offload_seq = "backbone->head->vae"
    _optional_components = ["vae"]

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module, scheduler: DiSAHeadScheduler,
                 num_tokens: Optional[int] = None, token_dim: Optional[int] = None, null_class: Optional[int] = None,
                 image_channels: int = 1, image_size: int = 8, patch_size: int = 2, vae: Optional[torch.nn.Module] = None):
        super().__init__()
        if not isinstance(scheduler, DiSAHeadScheduler):
            scheduler = DiSAHeadScheduler.from_config(scheduler.config)
        self.register_modules(backbone=backbone, head=head, scheduler=scheduler, vae=vae)
        bcfg = getattr(backbone, "config", None)
        num_tokens = num_tokens if num_tokens is not None else getattr(bcfg, "num_tokens", None)
        token_dim = token_dim if token_dim is not None else getattr(bcfg, "token_dim", None)
        if null_class is None and getattr(bcfg, "num_classes", None) is not None:
            null_class = bcfg.num_classes
        if num_tokens is None or token_dim is None:
            raise ValueError("num_tokens and token_dim are required when backbone.config does not define them")
        if vae is not None:
            grid = int(round(num_tokens ** 0.5))
            if grid * grid != num_tokens or vae.config.latent_channels != token_dim:
                raise ValueError(f"a vae needs a square token grid of latent_channels tokens; got {num_tokens} tokens of "
                                 f"{token_dim} for a VAE with {vae.config.latent_channels} latent channels")
        self.register_to_config(num_tokens=num_tokens, token_dim=token_dim, null_class=null_class,
                                image_channels=image_channels, image_size=image_size, patch_size=patch_size)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        batch_size: int = 1,
        num_ar_steps: int = 8,
        head_steps_max: int = 50,
        head_steps_min: int = 5,
        step_schedule: Union[str, StepBudgetSchedule] = "linear",
        temperature: float = 1.0,
        guidance_scale: float = 1.0,
        cfg_schedule: str = "linear",
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Draw ``batch_size`` images (or one per entry of ``class_labels``).

        step_schedule: "linear" | "cosine" | "two-stage" | "constant" (S = head_steps_max) or a
        StepBudgetSchedule. generator: one, or one per image (results then do not depend on batch
        composition). Class labels None: the null class (unconditional), if the model has one.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of ['pil', 'np', 'pt', 'latent'], got {output_type!r}")
        device = self._execution_device
        null = self.config.null_class
        if isinstance(class_labels, int):
            class_labels = [class_labels] * batch_size
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            batch_size = labels.numel()
        else:
            labels = None if null is None else torch.full((batch_size,), null, dtype=torch.long, device=device)
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"generator list has {len(generator)} entries for batch size {batch_size}")
            gens = generator
        else:
            gens = [generator if generator is not None else torch.Generator().manual_seed(int(torch.seed() % 2**63))] * batch_size
        schedule = step_schedule
        if isinstance(step_schedule, str):
            upper = head_steps_max
            lower = head_steps_max if step_schedule == "constant" else head_steps_min
            schedule = StepBudgetSchedule(step_schedule, upper, lower)
        cfg = DiSAConfig(ar_steps=num_ar_steps, schedule=schedule, temperature=temperature,
                         guidance_scale=guidance_scale, cfg_schedule=cfg_schedule)
        with self.progress_bar(total=num_ar_steps) as bar:
            tokens, stats = sample_mar(self.backbone, self.head, self.scheduler.ddpm, cfg, gens,
                                       num_tokens=self.config.num_tokens, token_dim=self.config.token_dim,
                                       class_labels=labels, null_class=null, device=device,
                                       on_step=bar.update, sampler="disa")
        if output_type == "latent":
            images = tokens
        else:
            if self.vae is not None:
                x = self.decode_latents(tokens)
            else:
                x = unpatchify(tokens.float(), self.config.image_channels, self.config.image_size, self.config.patch_size)
            x = (x / 2 + 0.5).clamp(0, 1)
            if output_type == "pt":
                images = x
            else:
                images = x.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, stats)
        return ARDiffusionPipelineOutput(images=images, stats=stats)

    def decode_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> (B, 3, H, W) pixels in [-1, 1]: D(unpatchify(tokens) / scaling_factor)."""
        b, n, c = tokens.shape
        grid = int(round(n ** 0.5))
        latents = tokens.reshape(b, grid, grid, c).permute(0, 3, 1, 2)  # (B, C, h, w), MAR's unpatchify (p = 1)
        p = next(self.vae.parameters())
        scale = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        return self.vae.decode((latents.to(device=p.device, dtype=torch.float32) / scale).to(p.dtype)).sample.float()

    @classmethod
    def from_mar_release(cls, checkpoint: str, vae_path: Optional[str] = None) -> "ARDiffusionPipeline":
        """A pipeline from a released MAR checkpoint (file or folder, as ``--model mar:...``) and
        optionally its KL-16 VAE; the head samples with the learned variance range."""
        from ..models.loading import load_model
        from ..zoo.mar import attach_vae

        model = load_model(f"mar:{checkpoint}")
        if vae_path is not None:
            attach_vae(model, vae_path)
        parts = model.extras
        sched = DiSAHeadScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
        return cls(parts["backbone"], parts["head"], sched, num_tokens=parts["num_tokens"], token_dim=parts["token_dim"],
                   null_class=model.null_class, vae=parts.get("vae"))
