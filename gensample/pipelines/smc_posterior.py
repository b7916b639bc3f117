"""`SMCPosteriorPipeline`: the `smc-post` particle sampler (docs/smc_posterior.md) as a diffusers pipeline.

Pixel models (``UNet2DModel``, no VAE) and latent ones (``vae`` + ``UNet2DConditionModel``: Stable
Diffusion components, or SDXL's through ``SMCPosteriorPipeline.from_pipe(sdxl_pipe)``): the particles
move in latent space, the twist and the final likelihood read the decoded image D(z0_hat)
(docs/smc_posterior.md). Text conditioning is the prompt (default the null prompt ""), encoded
as in `gensample.pipelines.stsl` (SDXL: diffusers' own encoding, ``_sdxl.py``). Thin: the math lives
in `gensample.samplers.smc_posterior.sample_smc_posterior`.

A flow-matching pipeline (SD3 / SD3.5, Flux): ``SMCPosteriorPipeline.from_pipe(flow_pipe)`` returns a
``FlowSMCPosteriorPipeline`` that runs ``gensample.api.run("smc-post", model=flow_pipe, ...)`` with the
measurement taken as ``FlowSTSLPipeline`` takes it (``gensample.pipelines.stsl.flow_measurement_options``).
"""

import tempfile
from typing import List, Optional, Union

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DConditionModel, UNet2DModel

from ..core.denoiser import Denoiser
from ..core.schedule import alphas_cumprod_from_config
from ..samplers.operators import LinearOperator
from ..samplers.smc_posterior import SMCPosteriorConfig, SMCPosteriorResult, draw_blocks, sample_smc_posterior
from ..samplers.stsl import Codec
from . import _sdxl
from ._images import to_output_type
from .fkc import FlowFace


class SMCPosteriorPipeline(DiffusionPipeline):
    """Posterior sampling for y = A x + sigma_y n with a pixel or latent diffusion prior, corrected by SMC.

    Components: ``unet`` (eps / v / x0 prediction per ``scheduler.config``), ``scheduler`` (any VP
    scheduler config; the DDIM timestep grid is built from it); for latent models ``vae``, and for a
    text-conditional UNet ``text_encoder`` / ``tokenizer`` (+ ``text_encoder_2`` / ``tokenizer_2``
    for SDXL) to encode ``prompt``.
    """

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """``DiffusionPipeline.from_pipe``; a flow-matching pipeline (SD3 / SD3.5, Flux) gives a
        ``FlowSMCPosteriorPipeline`` around it (smc-post through the sampler core, which runs flows)."""
        face = FlowSMCPosteriorPipeline.from_flow_pipe(cls, pipeline, kwargs)
        return face if face is not None else super().from_pipe(pipeline, **kwargs)

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]

    def __init__(self, unet: Union[UNet2DModel, UNet2DConditionModel], scheduler: SchedulerMixin,
                 vae: Optional[AutoencoderKL] = None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        if _sdxl.is_sdxl_unet(unet):
            _sdxl.check_text_encoders(unet, text_encoder, text_encoder_2)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))
        self.last_result: Optional[SMCPosteriorResult] = None

    def _condition(self, prompt: str, prompt_embeds, pooled_prompt_embeds, device) -> Optional[dict]:
        """One row of the UNet's text conditioning (flat; SDXL: hidden states, pooled, time ids), or None."""
        if _sdxl.is_sdxl_unet(self.unet):
            cond, _ = _sdxl.encode(self, None if prompt_embeds is not None else [prompt], do_cfg=False, device=device,
                                   prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
            return cond
        if not isinstance(self.unet, UNet2DConditionModel):
            return None
        if prompt_embeds is None:
            if self.tokenizer is None or self.text_encoder is None:
                raise ValueError("this pipeline has no tokenizer/text_encoder: pass prompt_embeds for a text-conditional UNet")
            from ..models.text import encode_prompts

            prompt_embeds = encode_prompts(self.tokenizer, self.text_encoder, [prompt], device)
        return {"encoder_hidden_states": prompt_embeds}

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: LinearOperator,
        noise_std: float = 0.05,
        num_particles: int = 16,
        num_inference_steps: int = 50,
        batch_size: int = 1,
        prompt: str = "",
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **smc_kwargs,
    ):
        """measurement: y, (1, *operator.out_shape), images in [-1, 1]. Returns ``batch_size`` images,
        each drawn from its own system of ``num_particles`` particles (final "resample"), or every
        particle (``final="weighted"``; weights in ``self.last_result.weights``). smc_kwargs:
        `SMCPosteriorConfig` fields (ess_threshold, scheme, final, prior_var, guidance_weight).
        generator: one torch.Generator (particle and resampling generators are seeded from it, on its
        device) or a list of ``batch_size`` generators (one per system).
        prompt / prompt_embeds (+ pooled_prompt_embeds for SDXL): the prior's text conditioning on a
        text-conditional UNet (default the null prompt ""); no classifier-free guidance."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be one of ['pil', 'np', 'pt'], got {output_type!r}")
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator must be a gensample LinearOperator, got {type(operator).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        cfg = SMCPosteriorConfig(particles=num_particles, steps=num_inference_steps, noise_std=noise_std, **smc_kwargs)
        device = self._execution_device
        K = cfg.particles
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"generator list has {len(generator)} entries; batch_size is {batch_size}")
            sys_gens = generator
        else:
            sys_gens = [generator] * batch_size if generator is not None else [torch.Generator().manual_seed(0)] * batch_size
        # per system: one seed from its generator (on that generator's device) -> K particle + 1 resampling generator
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device).item()) for g in sys_gens]
        gens = [torch.Generator(device=g.device).manual_seed(s) for g, s in zip(sys_gens, seeds)]  # noise of the K particles
        rgens = [torch.Generator().manual_seed(s + 1) for s in seeds]
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler.config, prediction_type="epsilon")
        sched.set_timesteps(num_inference_steps, device=device)
        ac = alphas_cumprod_from_config(self.scheduler.config)
        network = _sdxl.adapter(self.unet) if _sdxl.is_sdxl_unet(self.unet) else self.unet
        denoiser = Denoiser(network, ac, self.scheduler.config.get("prediction_type", "epsilon"), plain_callable=False)
        row = self._condition(prompt, prompt_embeds, pooled_prompt_embeds, device)
        cond = None if row is None else {k: v.to(device)[:1].expand(batch_size * K, *v.shape[1:]) for k, v in row.items()}
        codec = Codec(self.vae) if self.vae is not None else None
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)[0]
        shape = (c.in_channels, size, size)
        x_T = draw_blocks(gens, batch_size * K, shape, device)
        y = torch.as_tensor(measurement).to(device=device, dtype=torch.float64)
        bar = self.progress_bar(total=num_inference_steps)
        res = sample_smc_posterior(denoiser, operator, y, x_T, cfg, alphas_cumprod=ac, timesteps=sched.timesteps,
                                   final_alpha_bar=float(sched.final_alpha_cumprod), noise_generators=gens,
                                   resample_generators=rgens, cond=cond, on_step=lambda n: bar.update(n),
                                   sampler="SMCPosteriorPipeline", codec=codec)
        bar.close()
        res.stats.update(nfe=denoiser.calls, model_rows=denoiser.rows)
        self.last_result = res
        images = ((res.x.clamp(-1, 1) + 1) / 2).float()
        images = to_output_type(self, images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class FlowSMCPosteriorPipeline(FlowFace):
    """smc-post on a flow-matching pipeline (SD3 / SD3.5, Flux), built by
    ``SMCPosteriorPipeline.from_pipe(flow_pipe)``: each call is ``gensample.api.run("smc-post",
    model=flow_pipe, ...)`` (``FlowFace``): the particles move in the flow latent space with the VP
    twin of the velocity model (docs/flow_matching.md), the twist and the final likelihood read the
    decoded image, as ``gensample run --sampler smc-post --model <pipeline folder> --from-image IMG``.
    ``self.last_run.samples`` keeps ``weights`` and ``ess`` (one row per output sample)."""

    face_name = "FlowSMCPosteriorPipeline"

    def __call__(
        self,
        measurement=None,
        operator: Optional[str] = None,
        noise_std: float = 0.05,
        num_particles: int = 16,
        num_inference_steps: int = 50,
        batch_size: int = 1,
        prompt: str = "",
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        generator=None,
        output_type: str = "pil",
        return_dict: bool = True,
        image=None,
        seed: int = 0,
        **smc_kwargs,
    ):
        """SMCPosteriorPipeline's call on a flow pipeline. The measurement (``image`` or
        ``measurement``) and ``operator`` (a task name, its arguments among ``smc_kwargs``) as in
        ``FlowSTSLPipeline.__call__``. ``batch_size`` systems of ``num_particles`` particles, one
        image each (``final="weighted"``: every particle, ``batch_size * num_particles`` images).
        smc_kwargs: the run's smc-post options (ess_threshold, scheme, final, prior_var,
        guidance_weight, height, width, ...). Randomness: ``seed``. ``prompt`` is encoded by the
        pipeline's own encoders; no classifier-free guidance."""
        from .stsl import _check_flow_text, flow_measurement_options

        self._check_common(output_type, seed, generator)
        _check_flow_text(self.face_name, prompt, prompt_embeds, pooled_prompt_embeds)
        for name, value in (("batch_size", batch_size), ("num_particles", num_particles)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        final = smc_kwargs.get("final")
        # the run counts output samples: systems, or every particle with final="weighted"
        opts = dict(steps=int(num_inference_steps), particles=num_particles, noise_std=float(noise_std), seed=seed,
                    num_samples=batch_size * num_particles if final == "weighted" else batch_size)
        if prompt:
            opts["prompt"] = prompt
        with tempfile.TemporaryDirectory(prefix="gensample-face-") as tmp:
            opts.update(flow_measurement_options(self.face_name, measurement, image, operator, tmp))
            res = self._run("smc-post", opts, smc_kwargs)
        images = self._images(res["x"], output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
