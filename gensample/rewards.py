"""Reward plug-ins for reward-guided sampling (FK steering, docs/fk_steering.md "Rewards").

A reward is any callable ``fn(x0_hat, prompts=None) -> (N,) tensor``: x0_hat is an (N, ...) batch in
the model's sample space (the mixture's vectors, pixels in [-1, 1] for pixel models, the VAE-decoded
pixels in [-1, 1] for latent models), prompts an optional list of N strings (text-to-image models:
each sample's prompt; read by the CLIP reward). Higher is better; the sampler targets
p(x0) exp(lambda r(x0)).

Given by name (``resolve_reward``):

- ``quadratic:c=C,s=S``: r(x) = -||x - c||^2 / (2 s^2), c a number (every coordinate) or
  coordinates separated by ``;`` (``c=1;-2``); s > 0. With a Gaussian-mixture prior the tilted law
  is again a Gaussian mixture (the exact oracle, docs/fk_steering.md "Oracle").
- ``digits-classifier:C``: log p(C | x) of the embedded digits classifier (gensample.eval.digits),
  x an (N, 1, 8, 8) image in [-1, 1] (x0_hat is clipped to [-1, 1] first).
- ``clip[:MODEL]``: CLIP score, the cosine similarity of the CLIP image embedding of x0_hat (pixels
  in [-1, 1], VAE-decoded for latent models) and the text embedding of the sample's prompt
  (Radford et al. 2021; Hessel et al. 2021 report 100 * max(cos, 0) as CLIPScore). MODEL: a local
  folder or hub id holding a transformers ``CLIPModel`` + tokenizer (default ``DEFAULT_CLIP_MODEL``).
- ``aesthetic:head=FILE[,clip=MODEL]``: the LAION aesthetic predictor (improved-aesthetic-predictor):
  an MLP head (``FILE``: its released state dict, keys ``layers.{0,2,4,6,7}.weight/bias``, .pth or
  .safetensors) on the L2-normalised CLIP ViT-L/14 image embedding (MODEL, default ``AESTHETIC_CLIP_MODEL``).
- ``module:function``: ``function`` of an importable module (PYTHONPATH), called as above.

A name of a built-in wins over a module of the same name (a module called ``clip`` must be wrapped).
ImageReward, PickScore and HPS are plugged in as callables (docs/fk_steering.md "Rewards").
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch

BUILTINS = ("quadratic", "digits-classifier", "clip", "aesthetic")
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # `--reward clip` without a model
AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"  # the LAION head reads ViT-L/14 embeddings (768)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # used when the model folder has no preprocessor config
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QuadraticReward:
    """r(x) = -||x - c||^2 / (2 s^2), summed over every element of a sample. Returns (N,) float64."""

    def __init__(self, c, s: float = 1.0):
        center = torch.as_tensor(c, dtype=torch.float64)
        if center.ndim > 1 or not torch.isfinite(center).all():
            raise ValueError(f"quadratic reward: c must be a finite number or a list of finite numbers, got {c!r}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"quadratic reward: s must be a finite number > 0, got {s!r}")
        self.c, self.s = center, float(s)

    def __call__(self, x0_hat: torch.Tensor, prompts=None) -> torch.Tensor:
        x = x0_hat.double().flatten(1)  # (N, D)
        c = self.c.to(x.device)
        if c.ndim == 1 and c.numel() != x.shape[1]:
            raise ValueError(f"quadratic reward: c has {c.numel()} coordinates, the samples have {x.shape[1]}")
        return -((x - c) ** 2).sum(1) / (2 * self.s**2)

    def __repr__(self) -> str:
        return f"quadratic(c={self.c.tolist()}, s={self.s:g})"


class DigitsClassifierReward:
    """r(x) = log p(label | x) of the shipped digits CNN (gensample.eval.digits), x clipped to [-1, 1].

    x0_hat: (N, 1, 8, 8). Returns (N,) float64."""

    def __init__(self, label: int):
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
            raise ValueError(f"digits-classifier reward: the class must be an integer in [0, 9], got {label!r}")
        self.label = label

    def __call__(self, x0_hat: torch.Tensor, prompts=None) -> torch.Tensor:
        from .eval.digits import _as_images, _net

        x = _as_images(x0_hat.detach().clamp(-1.0, 1.0), "x0_hat")  # (N, 1, 8, 8) float32 CPU
        with torch.no_grad():
            logits = _net()(x).double()  # (N, 10)
        return torch.log_softmax(logits, 1)[:, self.label].to(x0_hat.device)

    def __repr__(self) -> str:
        return f"digits-classifier({self.label})"


def _field(value, name: str):
    """A size field of an image-processor config: a number (every side), a dict, or an object with attributes."""
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


class _ClipImageEncoder:
    """A transformers ``CLIPModel`` turning pixel tensors in [-1, 1] into L2-normalised embeddings.

    Preprocessing on tensors, on the images' device, as CLIP's image processor does to a picture:
    resize the shorter side to ``size`` (bicubic, antialiased), centre-crop ``crop``, map [-1, 1]
    to [0, 1], normalise by the processor's mean / std (read from the folder's preprocessor config,
    else OpenAI CLIP's). Grey images are repeated to 3 channels. Loaded on first use; ``model`` may be
    a folder, a hub id (from the local cache when offline) or a ``CLIPModel`` object.
    """

    def __init__(self, model, tokenizer=None, batch_size: int = 32):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(model, str) and not hasattr(model, "vision_model"):
            raise TypeError(f"model must be a CLIP folder / hub id (str) or a transformers CLIPModel, got {type(model).__name__}")
        self.source, self._model, self._tokenizer = model, (None if isinstance(model, str) else model), tokenizer
        self.batch_size = batch_size
        self._text_cache: dict = {}
        self.size = self.crop = None
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def _load(self):
        if self._model is not None and self.size is not None:
            return self._model
        from transformers import CLIPModel

        if self._model is None:
            try:
                self._model = CLIPModel.from_pretrained(self.source)
            except (OSError, ValueError) as err:
                raise ValueError(f"CLIP reward: cannot load a CLIPModel from {self.source!r} ({err})") from None
        self._model.eval().requires_grad_(False)
        image_size = int(self._model.config.vision_config.image_size)
        self.size, self.crop = image_size, (image_size, image_size)  # shorter side, (h, w) crop
        if isinstance(self.source, str):
            try:
                from transformers import CLIPImageProcessor

                proc = CLIPImageProcessor.from_pretrained(self.source)
            except (OSError, ValueError):
                proc = None  # no preprocessor config: the model's image size, OpenAI's statistics
            if proc is not None:
                size, crop = getattr(proc, "size", None), getattr(proc, "crop_size", None)
                self.size = int(_field(size, "shortest_edge") or _field(size, "height") or image_size)
                self.crop = (int(_field(crop, "height") or image_size), int(_field(crop, "width") or image_size))
                self.mean, self.std = tuple(proc.image_mean), tuple(proc.image_std)
        return self._model

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if not isinstance(self.source, str):
                raise ValueError("CLIP reward: pass tokenizer= with a CLIPModel object")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.source)
            except (OSError, ValueError) as err:
                raise ValueError(f"CLIP reward: cannot load the tokenizer of {self.source!r} ({err})") from None
        return self._tokenizer

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [-1, 1] -> (n, 3, crop_h, crop_w) normalised CLIP input, float32."""
        import torch.nn.functional as F

        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"CLIP reward: images must have shape (N, 3, H, W) (or 1 channel), got {tuple(x.shape)}")
        x = x.float().clamp(-1.0, 1.0)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        new = (max(self.crop[0], round(h * scale)), max(self.crop[1], round(w * scale)))
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
        top, left = (new[0] - self.crop[0]) // 2, (new[1] - self.crop[1]) // 2
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
        return ((x + 1.0) / 2.0 - mean) / std

    def image_embeds(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) float32 unit-norm image embeddings (the visual projection of the pooled output)."""
        model = self._load()
        param = next(model.parameters())
        if param.device != x.device:
            model.to(x.device)
            param = next(model.parameters())
        out = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                pix = self._pixels(x[i:i + self.batch_size]).to(param.dtype)
                pooled = model.vision_model(pixel_values=pix).pooler_output
                out.append(model.visual_projection(pooled).float())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts, device) -> torch.Tensor:
        """(P, E) float32 unit-norm text embeddings, each distinct prompt encoded once."""
        model = self._load()
        tok = self.tokenizer()
        max_len = int(model.config.text_config.max_position_embeddings)
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            ids = tok(todo, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
            dev = next(model.parameters()).device
            with torch.no_grad():
                pooled = model.text_model(input_ids=ids.input_ids.to(dev), attention_mask=ids.attention_mask.to(dev)).pooler_output
                emb = model.text_projection(pooled).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            self._text_cache.update({p: e.cpu() for p, e in zip(todo, emb)})
        return torch.stack([self._text_cache[p] for p in prompts]).to(device)


class ClipScoreReward:
    """r(x, prompt) = cos(E_image(x), E_text(prompt)), in [-1, 1] (CLIPScore / 100 without its clip at 0).

    x0_hat: (N, 3, H, W) pixels in [-1, 1]; prompts: N strings (one per sample: a text-to-image run
    passes each particle's prompt). Returns (N,) float64 on x0_hat's device. Batched
    (``batch_size`` images per CLIP call); the text embeddings are cached per prompt."""

    def __init__(self, model=DEFAULT_CLIP_MODEL, tokenizer=None, batch_size: int = 32):
        self.encoder = _ClipImageEncoder(model, tokenizer, batch_size)

    def __call__(self, x0_hat: torch.Tensor, prompts=None) -> torch.Tensor:
        n = x0_hat.shape[0]
        if prompts is None or isinstance(prompts, str):
            prompts = None if prompts is None else [prompts] * n
        if prompts is None:
            raise ValueError("the clip reward scores images against prompts: run it on a text-to-image model with "
                             "--prompt, or call it with prompts=[...] (one per sample)")
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"the clip reward got {len(prompts)} prompts for {n} images (one per image)")
        img = self.encoder.image_embeds(x0_hat.detach())
        txt = self.encoder.text_embeds(prompts, img.device)
        return (img.double() * txt.double()).sum(-1).to(x0_hat.device)

    def __repr__(self) -> str:
        src = self.encoder.source
        return f"clip({src if isinstance(src, str) else type(src).__name__})"


def load_aesthetic_head(path) -> list:
    """The LAION aesthetic MLP from its released state dict: [(weight, bias), ...] of the linear layers
    ``layers.{i}`` in order of i (no activations in the released linear-MSE model; its dropouts are
    identity at inference). .safetensors or a torch pickle of tensors (loaded with weights_only)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"aesthetic reward: head file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not idx:
        raise ValueError(f"aesthetic reward: {str(path)!r} has no layers.N.weight entries (the improved-aesthetic-predictor layout)")
    layers = [(state[f"layers.{i}.weight"].float(), state[f"layers.{i}.bias"].float()) for i in idx]
    for (w0, _), (w1, _) in zip(layers, layers[1:]):
        if w1.shape[1] != w0.shape[0]:
            raise ValueError(f"aesthetic reward: layer shapes do not chain in {str(path)!r}: {tuple(w0.shape)} then {tuple(w1.shape)}")
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"aesthetic reward: the head must end in one output, got {tuple(layers[-1][0].shape)}")
    return layers


class AestheticReward:
    """LAION aesthetic score: MLP(E_image(x) / ||E_image(x)||), CLIP ViT-L/14 embeddings (768-d).

    x0_hat: (N, 3, H, W) pixels in [-1, 1]; prompts unused. Returns (N,) float64 (about 1..10 on
    real photographs with the released head)."""

    def __init__(self, head, model=AESTHETIC_CLIP_MODEL, batch_size: int = 32):
        self.head_path = str(head)
        self.layers = load_aesthetic_head(head)
        self.encoder = _ClipImageEncoder(model, None, batch_size)

    def __call__(self, x0_hat: torch.Tensor, prompts=None) -> torch.Tensor:
        h = self.encoder.image_embeds(x0_hat.detach()).double()  # (N, E) unit norm
        if h.shape[1] != self.layers[0][0].shape[1]:
            raise ValueError(f"aesthetic reward: the head takes {self.layers[0][0].shape[1]}-d embeddings, the CLIP model "
                             f"gives {h.shape[1]}-d (the released head needs ViT-L/14)")
        for w, b in self.layers:
            h = h @ w.double().to(h.device).T + b.double().to(h.device)
        return h[:, 0].to(x0_hat.device)

    def __repr__(self) -> str:
        src = self.encoder.source
        return f"aesthetic(head={self.head_path}, clip={src if isinstance(src, str) else type(src).__name__})"


def _parse_quadratic(args: str) -> QuadraticReward:
    fields = {}
    for part in filter(None, args.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("c", "s"):
            raise ValueError(f"--reward quadratic takes c=C,s=S (C a number or numbers separated by ';'), got {args!r}")
        fields[key.strip()] = value.strip()
    if "c" not in fields:
        raise ValueError(f"--reward quadratic needs c=C (the reward's centre), got {args!r}")
    try:
        c = [float(v) for v in fields["c"].split(";")]
        s = float(fields.get("s", "1"))
    except ValueError:
        raise ValueError(f"--reward quadratic: c and s must be numbers, got {args!r}") from None
    return QuadraticReward(c[0] if len(c) == 1 else c, s)


def _parse_digits(args: str) -> DigitsClassifierReward:
    try:
        label = int(args)
    except ValueError:
        raise ValueError(f"--reward digits-classifier:C needs a class C in 0..9, got {args!r}") from None
    return DigitsClassifierReward(label)


def _parse_clip(args: str) -> ClipScoreReward:
    return ClipScoreReward(args.strip() or DEFAULT_CLIP_MODEL)


def _parse_aesthetic(args: str) -> AestheticReward:
    fields = {}
    for part in filter(None, args.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("head", "clip"):
            raise ValueError(f"--reward aesthetic takes head=FILE[,clip=MODEL], got {args!r}")
        fields[key.strip()] = value.strip()
    if not fields.get("head"):
        raise ValueError(f"--reward aesthetic needs head=FILE (the LAION MLP state dict), got {args!r}")
    return AestheticReward(fields["head"], fields.get("clip") or AESTHETIC_CLIP_MODEL)


_FACTORIES = {"quadratic": _parse_quadratic, "digits-classifier": _parse_digits, "clip": _parse_clip,
              "aesthetic": _parse_aesthetic}
_USAGE = {"quadratic": "quadratic:c=C,s=S", "digits-classifier": "digits-classifier:C (a class 0..9)",
          "aesthetic": "aesthetic:head=FILE[,clip=MODEL]"}


class CallableReward:
    """A Python reward given to ``gensample.run(..., reward=fn)``: calls ``fn``; its str names it
    (``callable:module.qualname``), so run.json and the output-folder check see a stable value."""

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"reward must be callable, got {type(fn).__name__}")
        self.fn = getattr(fn, "fn", fn)

    def __call__(self, x0_hat, prompts=None):
        return self.fn(x0_hat) if prompts is None else self.fn(x0_hat, prompts=prompts)

    def __str__(self) -> str:
        fn = self.fn
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        return f"callable:{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"

    __repr__ = __str__

    def __eq__(self, other):
        return isinstance(other, CallableReward) and other.fn is self.fn

    __hash__ = object.__hash__


def reward_option(value):
    """The --reward option's type: a callable (the Python API) kept as a ``CallableReward``, else a str."""
    if isinstance(value, CallableReward):
        return value
    if callable(value):
        return CallableReward(value)
    if not isinstance(value, str):
        raise ValueError(f"--reward must be NAME:ARGS, module:function or (Python) a callable, got {type(value).__name__}")
    return value


def resolve_reward(spec) -> Callable:
    """A reward callable from ``spec``: a callable (returned as is), ``NAME:ARGS`` of a built-in
    (``BUILTINS``), or ``module:function`` importable from PYTHONPATH."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--reward must be a callable, NAME:ARGS (one of {list(BUILTINS)}) or module:function, got {spec!r}")
    name, sep, args = spec.strip().partition(":")
    if name in _FACTORIES:
        if not sep and name != "clip":
            raise ValueError(f"--reward {name} needs arguments: {_USAGE[name]}")
        return _FACTORIES[name](args)
    if not sep or not args:
        raise ValueError(f"--reward must be NAME:ARGS (one of {list(BUILTINS)}) or module:function, got {spec!r}")
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ValueError(f"--reward {spec!r}: cannot import module {name!r} ({err}); is it on PYTHONPATH?") from None
    fn = getattr(module, args, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: module {name!r} has no callable {args!r}")
    return fn
