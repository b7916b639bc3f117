"""`STSLPipeline`: DPS / PSLD / STSL posterior sampling for inverse problems as a diffusers pipeline.

Pixel models (``UNet2DModel``, no VAE) and latent models (``vae`` + ``UNet2DModel`` or
``UNet2DConditionModel``, e.g. Stable Diffusion components) share the loop in
`gensample.samplers.stsl.sample_inverse` (docs/stsl.md). Text conditioning is the null prompt ""
unless ``prompt`` / ``prompt_embeds`` are given; classifier-free guidance is refused (see
``guidance_scale``). SDXL (``addition_embed_type="text_time"``, ``STSLPipeline.from_pipe(sdxl_pipe)``):
the prompt is encoded by diffusers' own SDXL code with both text encoders (``_sdxl.py``: hidden
states, pooled embedding, size/crop time ids) and the network is called through
``_sdxl.adapter``; the latents are SDXL's VAE latents. Thin: no math here.
"""

from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DConditionModel, UNet2DModel

from ..core.denoiser import Denoiser
from ..core.schedule import alphas_cumprod_from_config
from ..samplers.operators import LinearOperator
from ..samplers.stsl import Codec, Counters, InverseConfig, draw_normal, init_latent, sample_inverse
from . import _sdxl
from ._images import to_output_type


class STSLPipeline(DiffusionPipeline):
    """Posterior sampling for y = A x + noise with a pixel or latent diffusion prior.

    Components: ``unet`` (eps / v / x0 prediction, per ``scheduler.config.prediction_type``),
    ``scheduler`` (any VP scheduler config; the loop runs a DDIMScheduler built from it),
    optional ``vae`` (AutoencoderKL; latent path), ``text_encoder`` and ``tokenizer`` (only to
    encode ``prompt``; pass ``prompt_embeds`` to do without them); for an SDXL UNet also
    ``text_encoder_2`` and ``tokenizer_2`` (``force_zeros_for_empty_prompt`` is kept for
    ``from_pipe`` round trips; the posterior samplers use no negative prompt).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]

    def __init__(
        self,
        unet: Union[UNet2DModel, UNet2DConditionModel],
        scheduler: SchedulerMixin,
        vae: Optional[AutoencoderKL] = None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        if _sdxl.is_sdxl_unet(unet):
            _sdxl.check_text_encoders(unet, text_encoder, text_encoder_2)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
        self.last_counters: Optional[Counters] = None
        self.last_config: Optional[InverseConfig] = None

    def _encode_prompt(self, prompt: str, batch: int, device) -> torch.Tensor:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this pipeline has no tokenizer/text_encoder: pass prompt_embeds for a text-conditional UNet")
        ids = self.tokenizer([prompt] * batch, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: LinearOperator,
        method: str = "stsl",
        num_inference_steps: int = 50,
        batch_size: int = 1,
        prompt: str = "",
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **method_kwargs,
    ):
        """measurement: y, (1 or batch_size, *operator.out_shape) in the [-1, 1] image convention.
        method: "stsl" | "dps" | "psld"; method_kwargs: `InverseConfig` fields (inner_steps,
        trace_rule, trace_weight, probe_scale, data_weight, zeta, gamma, omega, ddim_eta, init, ...).
        guidance_scale: only 1.0 (no classifier-free guidance) is accepted: the posterior samplers
        target p(x | y) under the conditional prior of ``prompt``; CFG would change that prior (and the
        guided eps is not the score of any density the likelihood terms assume), so any other value
        raises ValueError instead of being silently ignored.
        DPS clamps x0_hat to [-1, 1] before A by default (as the CLI's ``--clamp auto`` does for
        images); pass ``clamp_x0=False`` to turn it off.
        SDXL UNets: ``prompt_embeds`` need ``pooled_prompt_embeds`` (StableDiffusionXLPipeline's
        meaning); the time ids are those of the UNet's default size (no crop).
        Random draws (initial noise, probes, DDPM noise) use ``generator``'s own device, then move.
        Returns images (``output_type`` "pil" | "np" | "pt"); ``self.last_counters`` holds the NFEs."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be one of ['pil', 'np', 'pt'], got {output_type!r}")
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator must be a gensample LinearOperator, got {type(operator).__name__}")
        if not isinstance(guidance_scale, (int, float)) or float(guidance_scale) != 1.0:
            raise ValueError(f"STSLPipeline does not support classifier-free guidance: guidance_scale must be 1.0, got "
                             f"{guidance_scale!r} (the samplers target p(x | y) under the prompt-conditional prior)")
        device = self._execution_device
        method_kwargs.setdefault("clamp_x0", method == "dps")
        cfg = InverseConfig(method=method, steps=num_inference_steps, **method_kwargs)
        self.last_config = cfg
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"generator list has {len(generator)} entries; batch_size is {batch_size}")
            gens = generator
        else:
            if generator is not None:
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
                gdev = generator.device
            else:
                seed, gdev = 0, torch.device("cpu")
            gens = [torch.Generator(device=gdev).manual_seed(seed + i) for i in range(batch_size)]
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler.config, prediction_type="epsilon")
        sched.set_timesteps(num_inference_steps, device=device)
        ac = alphas_cumprod_from_config(self.scheduler.config)
        sdxl = _sdxl.is_sdxl_unet(self.unet)
        network = _sdxl.adapter(self.unet) if sdxl else self.unet
        denoiser = Denoiser(network, ac, self.scheduler.config.get("prediction_type", "epsilon"), plain_callable=False)
        cond = None
        if sdxl:
            if prompt_embeds is None and (self.text_encoder_2 is None or self.tokenizer_2 is None):
                raise ValueError("an SDXL UNet needs text_encoder_2 and tokenizer_2 to encode prompt (STSLPipeline."
                                 "from_pipe(sdxl_pipe) carries them over); or pass prompt_embeds and pooled_prompt_embeds")
            rows, _ = _sdxl.encode(self, None if prompt_embeds is not None else [prompt], do_cfg=False, device=device,
                                   prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
            cond = {k: v.to(device).expand(batch_size, *v.shape[1:]) for k, v in rows.items()}
        elif isinstance(self.unet, UNet2DConditionModel):
            if prompt_embeds is None:
                prompt_embeds = self._encode_prompt(prompt, batch_size, device)
            cond = {"encoder_hidden_states": prompt_embeds.to(device).expand(batch_size, *prompt_embeds.shape[1:])}
        counters = Counters()
        codec = Codec(self.vae, counters)
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)[0]
        latent_shape = (c.in_channels, size, size)
        y = measurement.to(device=device, dtype=torch.float32)
        y = y.expand(batch_size, *operator.out_shape)
        noise = draw_normal(gens, latent_shape, device)
        z = init_latent(cfg, sched, codec, operator, y, noise, ac, counters)
        bar = self.progress_bar(total=num_inference_steps)
        x0, _, counters = sample_inverse(
            denoiser, sched, codec, operator, y, z, cfg, alphas_cumprod=ac, generators=gens, cond=cond,
            randn=lambda shape: draw_normal(gens, shape, device),
            on_step=lambda n: bar.update(n), counters=counters, sampler_name=f"STSLPipeline[{method}]",
        )
        bar.close()
        self.last_counters = counters
        images = ((x0.clamp(-1, 1) + 1) / 2).float()  # (B, C, H, W) in [0, 1]
        images = to_output_type(self, images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
