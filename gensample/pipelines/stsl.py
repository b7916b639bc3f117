"""`STSLPipeline`: DPS / PSLD / STSL posterior sampling for inverse problems as a diffusers pipeline.

Pixel models (``UNet2DModel``, no VAE) and latent models (``vae`` + ``UNet2DModel`` or
``UNet2DConditionModel``, e.g. Stable Diffusion components) share the loop in
`gensample.samplers.stsl.sample_inverse` (docs/stsl.md). Text conditioning is the null prompt ""
unless ``prompt`` / ``prompt_embeds`` are given; classifier-free guidance is refused (see
``guidance_scale``). SDXL (``addition_embed_type="text_time"``, ``STSLPipeline.from_pipe(sdxl_pipe)``):
the prompt is encoded by diffusers' own SDXL code with both text encoders (``_sdxl.py``: hidden
states, pooled embedding, size/crop time ids) and the network is called through
``_sdxl.adapter``; the latents are SDXL's VAE latents. Thin: no math here.

A flow-matching pipeline (SD3 / SD3.5, Flux): ``STSLPipeline.from_pipe(flow_pipe)`` returns a
``FlowSTSLPipeline`` that runs ``gensample.api.run(method, model=flow_pipe, ...)`` with the measurement
made by the run from a ground-truth ``image`` (``from_image``) or given as ``measurement`` (y), and the
operator named by its task (``flow_measurement_options``).
"""

import os
import tempfile
from pathlib import Path
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
from .fkc import FlowFace


class STSLPipeline(DiffusionPipeline):
    """Posterior sampling for y = A x + noise with a pixel or latent diffusion prior.

    Components: ``unet`` (eps / v / x0 prediction, per ``scheduler.config.prediction_type``),
    ``scheduler`` (any VP scheduler config; the loop runs a DDIMScheduler built from it),
    optional ``vae`` (AutoencoderKL; latent path), ``text_encoder`` and ``tokenizer`` (only to
    encode ``prompt``; pass ``prompt_embeds`` to do without them); for an SDXL UNet also
    ``text_encoder_2`` and ``tokenizer_2`` (``force_zeros_for_empty_prompt`` is kept for
    ``from_pipe`` round trips; the posterior samplers use no negative prompt).
    """

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """``DiffusionPipeline.from_pipe``; a flow-matching pipeline (SD3 / SD3.5, Flux) gives a
        ``FlowSTSLPipeline`` around it (stsl / dps / psld through the sampler core, which runs flows)."""
        face = FlowSTSLPipeline.from_flow_pipe(cls, pipeline, kwargs)
        return face if face is not None else super().from_pipe(pipeline, **kwargs)

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


# -- flow-matching pipelines (SD3 / SD3.5, Flux): the run's inverse samplers -------------------------
# keyword arguments of make_operator that the run takes as options (with operator=<task name>)
OPERATOR_ARGUMENTS = ("task_seed", "missing", "box_size", "sr_factor", "blur_sigma", "blur_size")


def flow_measurement_options(face: str, measurement, image, operator, workdir) -> dict:
    """Run options for the measurement of a flow face's call: ``task`` = ``operator`` (a task name,
    one of ``gensample.samplers.operators.TASKS``; its arguments ride along as run options) and
    either ``from_image`` (``image``: the ground truth, a file path, a PIL image or a uint8 array,
    resized by the run to the pipeline's pixel shape; y = A x + noise_std n with the run's seeded
    noise) or ``measurement`` (y itself, a tensor / array of the operator's output shape in the
    [-1, 1] image convention). Arrays and PIL images are written to ``workdir`` (atomically)."""
    from PIL import Image

    from ..io import atomic_write_bytes
    from ..samplers.operators import TASKS

    opts = {}
    if isinstance(operator, LinearOperator):
        raise ValueError(f"operator: {face} builds the run's operator from its task name; pass operator=<one of "
                         f"{list(TASKS)}> and its arguments ({', '.join(OPERATOR_ARGUMENTS)}) as keywords, got a "
                         f"{type(operator).__name__} object")
    if operator is not None:
        if not isinstance(operator, str):
            raise ValueError(f"operator must be a task name, one of {list(TASKS)}, got {operator!r}")
        opts["task"] = operator
    if (measurement is None) == (image is None):
        raise ValueError(f"{face} needs exactly one of measurement= (y, the operator's output) or image= (the ground "
                         f"truth x, measured by the run); got {'both' if image is not None else 'neither'}")
    workdir = Path(workdir)
    if image is not None:
        if isinstance(image, (str, os.PathLike)):
            if not Path(image).is_file():
                raise ValueError(f"image: file not found: {os.fspath(image)!r}")
            opts["from_image"] = os.fspath(image)
            return opts
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a file path, a PIL image or a uint8 array (H, W[, C]), got "
                             f"{type(image).__name__}")
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")  # lossless: the run reads back the same pixels
        atomic_write_bytes(workdir / "image.png", buf.getvalue())
        opts["from_image"] = str(workdir / "image.png")
        return opts
    if not isinstance(measurement, (torch.Tensor, np.ndarray)):
        raise ValueError(f"measurement must be a tensor or array (y, the operator's output shape), got "
                         f"{type(measurement).__name__}")
    if isinstance(measurement, torch.Tensor):
        y = measurement.detach().cpu().double().numpy()
    else:
        y = np.asarray(measurement, np.float64)
    if y.ndim >= 1 and y.shape[0] == 1:
        y = y[0]  # (1, *out) as the UNet faces take it
    import io

    buf = io.BytesIO()
    np.save(buf, y)
    atomic_write_bytes(workdir / "measurement.npy", buf.getvalue())
    opts["measurement"] = str(workdir / "measurement.npy")
    return opts


class FlowSTSLPipeline(FlowFace):
    """STSL / DPS / PSLD on a flow-matching pipeline (SD3 / SD3.5, Flux), built by
    ``STSLPipeline.from_pipe(flow_pipe)``: each call is ``gensample.api.run(method, model=flow_pipe,
    ...)`` (``FlowFace``), so the posterior sampler runs in the flow latent space with the VP twin of
    the velocity model (docs/flow_matching.md) exactly as ``gensample run --sampler <method>
    --model <pipeline folder> --from-image IMG`` does. ``self.last_run.samples`` keeps ``y``,
    ``x_true`` and the PSNR / SSIM of a ground-truth image."""

    face_name = "FlowSTSLPipeline"

    def __call__(
        self,
        measurement=None,
        operator: Optional[str] = None,
        method: str = "stsl",
        num_inference_steps: int = 50,
        batch_size: int = 1,
        prompt: str = "",
        prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        generator=None,
        output_type: str = "pil",
        return_dict: bool = True,
        image=None,
        seed: int = 0,
        **method_kwargs,
    ):
        """STSLPipeline's call on a flow pipeline. The measurement: ``image`` (ground truth; the run
        measures it, ``noise_std`` default 0.05) or ``measurement`` (y, (1, *out_shape) in [-1, 1]);
        ``operator``: the task name (default the run's: inpaint-box), with ``task_seed``, ``missing``,
        ``box_size``, ``sr_factor``, ``blur_sigma``, ``blur_size`` among ``method_kwargs``.
        method: "stsl" | "dps" | "psld"; method_kwargs: the run's options of that sampler
        (inner_steps, trace_rule, trace_weight, probe_scale, data_weight, zeta, ddim_eta, init,
        noise_std, height, width, ...; ``clamp_x0`` maps to the run's ``clamp``). ``prompt`` is
        encoded by the pipeline's own encoders (``prompt_embeds`` cannot be passed to the run);
        guidance_scale must be 1.0, as on STSLPipeline. Randomness: ``seed`` (sample i uses the
        run's seed of index i). Returns ``batch_size`` images (``output_type`` "pil" | "np" | "pt")."""
        if method not in ("stsl", "dps", "psld"):
            raise ValueError(f"method must be one of ['stsl', 'dps', 'psld'], got {method!r}")
        self._check_common(output_type, seed, generator)
        if not isinstance(guidance_scale, (int, float)) or float(guidance_scale) != 1.0:
            raise ValueError(f"{self.face_name} does not support classifier-free guidance: guidance_scale must be 1.0, "
                             f"got {guidance_scale!r} (the samplers target p(x | y) under the prompt-conditional prior)")
        _check_flow_text(self.face_name, prompt, prompt_embeds, pooled_prompt_embeds)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        extra = dict(method_kwargs)
        if "clamp_x0" in extra:
            extra["clamp"] = "on" if extra.pop("clamp_x0") else "off"
        opts = dict(steps=int(num_inference_steps), num_samples=batch_size, seed=seed)
        if prompt:
            opts["prompt"] = prompt
        with tempfile.TemporaryDirectory(prefix="gensample-face-") as tmp:
            opts.update(flow_measurement_options(self.face_name, measurement, image, operator, tmp))
            res = self._run(method, opts, extra)
        images = self._images(res["x"], output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _check_flow_text(face: str, prompt, prompt_embeds, pooled_prompt_embeds) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be one string on {face}, got {prompt!r}")
    for name, value in (("prompt_embeds", prompt_embeds), ("pooled_prompt_embeds", pooled_prompt_embeds)):
        if value is not None:
            raise ValueError(f"{name}: {face} encodes prompt with the flow pipeline's own text encoders (the run's "
                             f"encoding); pass prompt=... instead of embeddings")
