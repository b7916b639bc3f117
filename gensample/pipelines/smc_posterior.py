"""`SMCPosteriorPipeline`: the `smc-post` particle sampler (docs/smc_posterior.md) as a diffusers pipeline.

Pixel models only (``UNet2DModel``, no VAE). Thin: the math lives in
`gensample.samplers.smc_posterior.sample_smc_posterior`.
"""

from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel

from ..core.denoiser import Denoiser
from ..core.schedule import alphas_cumprod_from_config
from ..samplers.operators import LinearOperator
from ..samplers.smc_posterior import SMCPosteriorConfig, SMCPosteriorResult, draw_blocks, sample_smc_posterior
from ._images import to_output_type


class SMCPosteriorPipeline(DiffusionPipeline):
    """Posterior sampling for y = A x + sigma_y n with a pixel diffusion prior, corrected by SMC.

    Components: ``unet`` (a ``UNet2DModel``; eps / v / x0 prediction per ``scheduler.config``) and
    ``scheduler`` (any VP scheduler config; the DDIM timestep grid is built from it).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.last_result: Optional[SMCPosteriorResult] = None

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: LinearOperator,
        noise_std: float = 0.05,
        num_particles: int = 16,
        num_inference_steps: int = 50,
        batch_size: int = 1,
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
        device) or a list of ``batch_size`` generators (one per system)."""
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
        denoiser = Denoiser(self.unet, ac, self.scheduler.config.get("prediction_type", "epsilon"), plain_callable=False)
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)[0]
        shape = (c.in_channels, size, size)
        x_T = draw_blocks(gens, batch_size * K, shape, device)
        y = torch.as_tensor(measurement).to(device=device, dtype=torch.float64)
        bar = self.progress_bar(total=num_inference_steps)
        res = sample_smc_posterior(denoiser, operator, y, x_T, cfg, alphas_cumprod=ac, timesteps=sched.timesteps,
                                   final_alpha_bar=float(sched.final_alpha_cumprod), noise_generators=gens,
                                   resample_generators=rgens, on_step=lambda n: bar.update(n), sampler="SMCPosteriorPipeline")
        bar.close()
        res.stats.update(nfe=denoiser.calls, model_rows=denoiser.rows)
        self.last_result = res
        images = ((res.x.clamp(-1, 1) + 1) / 2).float()
        images = to_output_type(self, images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
