"""OMSPipeline: One More Step in front of any diffusers image pipeline (Hu et al., "One More Step",
CVPR 2024, arXiv 2311.15744; docs/oms.md "Python").

    pipe = OMSPipeline.from_release("h1t/oms_b_openclip_15_21", base_pipeline=sd_pipe, variant="fp16")
    # or OMSPipeline(oms_module=psi, base_pipeline=sd_pipe, oms_text_encoder=te, oms_tokenizer=tok)
    image = pipe(prompt="a starry night", oms_prompt="dark night sky", oms_guidance_scale=2.0,
                 num_inference_steps=20, generator=torch.Generator().manual_seed(100)).images[0]

- Latent pipelines whose ``__call__`` takes ``latents`` (StableDiffusionPipeline, SDXL, LCM ...):
  x_T goes in as ``latents``, in VP scale (the base multiplies by its init_noise_sigma, which is
  1 for DDIM/PNDM/LCM/DPM and 1/sqrt(alpha_bar_t0) for Euler-leading; docs/oms.md "Python").
- Pixel pipelines without ``latents`` (DDPMPipeline, DDIMPipeline: a ``unet`` + ``scheduler``):
  the same loop is run here from x_T (``base_class_labels`` for class-conditional UNets).
- OMS conditioning: ``oms_prompt_embeds`` / ``oms_negative_embeds`` (no tokenizer needed), or
  ``oms_prompt`` / ``oms_negative_prompt`` strings encoded with ``oms_text_encoder``
  (last_hidden_state, padded to the tokenizer's max length; without one, the base pipeline's
  ``text_encoder`` / ``tokenizer``, as the reference pipeline does), or ``oms_class_labels`` for
  class-conditional modules. The OMS negative defaults to the empty prompt / null class. Text
  features whose width differs from the module's ``cross_attention_dim`` are refused with both
  widths (an SDXL base's first encoder, CLIP-L, does not fit a module trained on OpenCLIP ViT-H:
  give the module's own encoder, as ``from_release`` does for h1t/oms_b_openclip_xl).
- Randomness: x_T' and z are drawn on the generator's device (CPU or CUDA generators), then moved.

Fixed relative to the reference code (docs/oms.md "Not reproduced from the reference code"):
psi's input is unit-variance noise (never
scaled by init_noise_sigma); the negative batch is sized prompt-batch x num_images_per_prompt;
noise uses the std, not the variance (``oms_legacy_variance=True`` reproduces the bug).
"""

import inspect
from typing import Any, Dict, List, Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..models.oms import OMSModule, load_oms_release
from ..samplers.oms import OMSConfig, first_alpha_bar, oms_initial_latents, to_scheduler_scale


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


class OMSPipeline(DiffusionPipeline):
    """One More Step + a frozen base pipeline (``base_pipeline`` is held, not registered: saving
    an OMSPipeline saves the OMS parts only)."""

    model_cpu_offload_seq = "oms_text_encoder->oms_module"
    _optional_components = ["oms_text_encoder", "oms_tokenizer"]

    def __init__(self, oms_module: OMSModule, base_pipeline: Any = None, oms_text_encoder: Any = None,
                 oms_tokenizer: Any = None):
        super().__init__()
        self.register_modules(oms_module=oms_module, oms_text_encoder=oms_text_encoder, oms_tokenizer=oms_tokenizer)
        object.__setattr__(self, "base_pipeline", base_pipeline)

    @classmethod
    def from_release(cls, path_or_id: str, base_pipeline: Any = None, variant: Optional[str] = "fp16") -> "OMSPipeline":
        """A released OMS folder or hub id (``oms_module/`` + fp16 weights [+ ``oms_text_encoder/``,
        ``oms_tokenizer/``]; see ``gensample.models.oms.load_oms_release``) around ``base_pipeline``."""
        rel = load_oms_release(str(path_or_id), variant)
        return cls(oms_module=rel.module, base_pipeline=base_pipeline, oms_text_encoder=rel.text_encoder,
                   oms_tokenizer=rel.tokenizer)

    # -- conditioning ---------------------------------------------------------------------
    def _text_parts(self):
        """(text_encoder, tokenizer) for OMS prompts: the OMS pair, else the base pipeline's."""
        enc, tok = self.oms_text_encoder, self.oms_tokenizer
        if enc is None and tok is None and self.base_pipeline is not None:
            enc, tok = getattr(self.base_pipeline, "text_encoder", None), getattr(self.base_pipeline, "tokenizer", None)
        return enc, tok

    def encode_oms_prompt(self, prompt: Union[str, List[str]], device) -> torch.Tensor:
        """(B, L, D) last_hidden_state of the OMS text encoder (the base pipeline's when the OMS
        folder has none), padded to the tokenizer's max length."""
        enc, tok = self._text_parts()
        if enc is None or tok is None:
            raise ValueError("oms_prompt needs oms_text_encoder and oms_tokenizer (or a base pipeline with a "
                             "text_encoder); or pass oms_prompt_embeds")
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(enc.device)
        return enc(ids)[0].to(device)

    def _oms_condition(self, n_prompts: int, per_prompt: int, device, oms_prompt, oms_prompt_embeds,
                       oms_negative_prompt, oms_negative_embeds, oms_class_labels, need_uncond: bool):
        """(cond, uncond) psi keyword dicts, each with batch n_prompts * per_prompt."""
        total = n_prompts * per_prompt
        if oms_class_labels is not None:
            if self.oms_module.null_class is None:
                raise ValueError("oms_class_labels given but the OMS module has no class embedding")
            labels = torch.as_tensor(oms_class_labels, dtype=torch.long, device=device).reshape(-1)
            labels = labels.expand(total) if labels.numel() == 1 else labels
            if labels.numel() != total:
                raise ValueError(f"oms_class_labels must have 1 or {total} entries, got {labels.numel()}")
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.oms_module.null_class)}
        given = oms_prompt_embeds is not None
        if oms_prompt_embeds is None:
            if oms_prompt is None:
                raise ValueError("give oms_prompt, oms_prompt_embeds or oms_class_labels (or a prompt for the base)")
            oms_prompt_embeds = self.encode_oms_prompt(oms_prompt, device)
        self._check_width(oms_prompt_embeds, "oms_prompt_embeds", encoded=not given)
        cond = self._per_image(oms_prompt_embeds.to(device), n_prompts, per_prompt, "oms_prompt_embeds")
        uncond = None
        if need_uncond:
            neg_given = oms_negative_embeds is not None
            if oms_negative_embeds is None:
                neg = oms_negative_prompt if oms_negative_prompt is not None else ""
                neg = [neg] * n_prompts if isinstance(neg, str) else neg
                oms_negative_embeds = self.encode_oms_prompt(neg, device)
            self._check_width(oms_negative_embeds, "oms_negative_embeds", encoded=not neg_given)
            uncond = {"encoder_hidden_states": self._per_image(oms_negative_embeds.to(device), n_prompts, per_prompt,
                                                               "oms_negative_embeds")}
        return {"encoder_hidden_states": cond}, uncond

    def _check_width(self, embeds: torch.Tensor, name: str, encoded: bool) -> None:
        """The OMS module's cross-attention width must match the text features it is given: e.g. an
        SDXL base pipeline's first encoder (CLIP-L, 768) does not fit a module trained on OpenCLIP
        ViT-H (1024), so an OMS folder without its own text encoder cannot fall back to it."""
        width = self.oms_module.config.get("cross_attention_dim")
        if isinstance(width, int) and embeds.shape[-1] != width:
            enc, _ = self._text_parts()
            source = ("the given embeddings" if not encoded else "the OMS text encoder" if self.oms_text_encoder is not None
                      else f"the base pipeline's text_encoder, {type(enc).__name__}")
            raise ValueError(f"{name}: width {embeds.shape[-1]} (from {source}) does not match the OMS module's "
                             f"cross_attention_dim {width}; pass oms_text_encoder / oms_tokenizer of the module's "
                             f"own text encoder (OMSPipeline.from_release loads them) or {name} of width {width}")

    @staticmethod
    def _per_image(embeds: torch.Tensor, n_prompts: int, per_prompt: int, name: str) -> torch.Tensor:
        """Embeddings for 1 or n_prompts prompts -> one row per image (repeat_interleave)."""
        if embeds.ndim != 3:
            raise ValueError(f"{name} must have shape (B, L, D), got {tuple(embeds.shape)}")
        if embeds.shape[0] == 1:
            embeds = embeds.expand(n_prompts, *embeds.shape[1:])
        if embeds.shape[0] != n_prompts:
            raise ValueError(f"{name} has batch {embeds.shape[0]}; expected 1 or the prompt batch {n_prompts}")
        return embeds.repeat_interleave(per_prompt, dim=0)

    # -- shapes -----------------------------------------------------------------------------
    def _latent_shape(self, batch: int, height, width):
        unet = self.base_pipeline.unet
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if hasattr(self.base_pipeline, "vae_scale_factor"):
            f = self.base_pipeline.vae_scale_factor
            h = height // f if height is not None else h
            w = width // f if width is not None else w
        return (batch, unet.config.in_channels, h, w)

    @staticmethod
    def _prompt_batch(kwargs) -> int:
        prompt, embeds = kwargs.get("prompt"), kwargs.get("prompt_embeds")
        if embeds is not None:
            return embeds.shape[0]
        if isinstance(prompt, (list, tuple)):
            return len(prompt)
        if prompt is not None:
            return 1
        return int(kwargs.get("batch_size", 1))

    # -- call -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str], None] = None, oms_prompt: Union[str, List[str], None] = None,
                 oms_prompt_embeds: Optional[torch.Tensor] = None, oms_negative_prompt: Union[str, List[str], None] = None,
                 oms_negative_embeds: Optional[torch.Tensor] = None, oms_class_labels: Any = None,
                 oms_guidance_scale: float = 1.0, oms_flag: bool = True, oms_eta: float = 1.0,
                 oms_legacy_variance: bool = False, oms_generator: Any = None, num_inference_steps: int = 50,
                 num_images_per_prompt: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                 generator: Any = None, base_class_labels: Optional[torch.Tensor] = None, eta: float = 0.0,
                 output_type: str = "pil", return_dict: bool = True, **base_kwargs: Dict[str, Any]):
        """Draw x_T with the OMS step, then run the base pipeline from it.

        oms_flag=False calls the base pipeline exactly as given (no OMS). ``oms_generator``
        (default: ``generator``) drives x_T' and z. Other keywords go to the base pipeline.
        """
        base = self.base_pipeline
        if base is None:
            raise ValueError("OMSPipeline needs base_pipeline (any diffusers image pipeline)")
        takes_latents = _accepts(base.__call__, "latents")
        fwd = dict(base_kwargs, num_inference_steps=num_inference_steps, generator=generator,
                   output_type=output_type, return_dict=return_dict)
        if prompt is not None:
            fwd["prompt"] = prompt
        for key, val in (("height", height), ("width", width), ("num_images_per_prompt", num_images_per_prompt)):
            if val is not None:
                fwd[key] = val
        if takes_latents and _accepts(base.__call__, "eta"):
            fwd["eta"] = eta
        if not takes_latents and _accepts(base.__call__, "eta"):
            fwd["eta"] = eta
        if not oms_flag:
            return base(**fwd)  # the bare base pipeline, untouched
        fwd.pop("eta", None) if not takes_latents else None
        cfg = OMSConfig(guidance_scale=oms_guidance_scale, eta=oms_eta, legacy_variance=oms_legacy_variance)
        device = self._execution_device
        n_prompts = self._prompt_batch(dict(base_kwargs, prompt=prompt))
        per_prompt = num_images_per_prompt or 1
        if oms_prompt is None and oms_prompt_embeds is None and oms_class_labels is None:
            oms_prompt = prompt
        cond, uncond = self._oms_condition(n_prompts, per_prompt, device, oms_prompt, oms_prompt_embeds,
                                           oms_negative_prompt, oms_negative_embeds, oms_class_labels,
                                           need_uncond=cfg.guidance_scale != 1.0)
        total = n_prompts * per_prompt
        if "batch_size" in base_kwargs and not takes_latents:
            total = int(base_kwargs["batch_size"])
        shape = self._latent_shape(total, height, width)
        if self.oms_module.config.in_channels != shape[1]:
            raise ValueError(f"OMS module has {self.oms_module.config.in_channels} channels; the base expects {shape[1]}")
        gen = oms_generator if oms_generator is not None else generator
        x_Tp = randn_tensor(shape, generator=gen, device=device, dtype=torch.float32)  # unit variance, never scaled
        sched = base.scheduler
        sched.set_timesteps(num_inference_steps, device=device)
        a = first_alpha_bar(sched)
        x_T = oms_initial_latents(self.oms_module, x_Tp, cond, uncond, a, cfg, gen)
        if takes_latents:
            # the base pipeline multiplies by init_noise_sigma itself: hand over VP scale
            return base(latents=x_T.to(base.unet.dtype), **fwd)
        return self._pixel_loop(to_scheduler_scale(x_T, sched, a).to(base.unet.dtype), fwd, eta, base_class_labels)

    def _pixel_loop(self, x: torch.Tensor, fwd: dict, eta: float, class_labels):
        """DDPMPipeline / DDIMPipeline order from a given x_T (those pipelines take no latents)."""
        base = self.base_pipeline
        sched = base.scheduler
        sched.set_timesteps(fwd["num_inference_steps"], device=x.device)
        step_kw = {}
        if _accepts(sched.step, "generator"):
            step_kw["generator"] = fwd.get("generator")
        if _accepts(sched.step, "eta"):
            step_kw["eta"] = eta
        extra = {} if class_labels is None else {"class_labels": torch.as_tensor(class_labels, device=x.device)}
        for t in self.progress_bar(sched.timesteps):
            out = base.unet(sched.scale_model_input(x, t), t, **extra).sample
            x = sched.step(out, t, x, **step_kw).prev_sample
        image = (x / 2 + 0.5).clamp(0, 1)
        if fwd["output_type"] == "pt":
            images = image
        else:
            images = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if fwd["output_type"] == "pil":
                images = self.numpy_to_pil(images)
        if not fwd["return_dict"]:
            return (images,)
        return ImagePipelineOutput(images=images)
