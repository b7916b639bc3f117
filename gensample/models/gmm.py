"""Exact analytic Gaussian mixtures: the oracle for every continuous sampler.

p(x) = sum_k w_k N(x; mu_k, s_k^2 I), x of any event shape (vectors or C x H x W images).
Under the VP forward process x_t = sqrt(ab) x0 + sqrt(1-ab) eps the noised marginal is again a
mixture, q_t(x) = sum_k w_k N(x; sqrt(ab) mu_k, (ab s_k^2 + 1 - ab) I), so its score and the exact
eps = -sqrt(1-ab) grad log q_t are closed form (Tweedie): the samplers are checked exactly against these.

Components may carry a class label; p(x | c) is the sub-mixture of components with label c
(weights renormalised). The label ``num_classes`` (and -1) means "unconditional" (the null class
used for classifier-free guidance).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..core.schedule import alpha_bar_at, expand_to


def _check_json_labels(path, labels, num_classes) -> int | None:
    """Class labels of a mixture file: integers in [0, C), C = ``num_classes`` when the file
    declares it, else the largest label + 1 (label C is the unconditional null class of CFG).
    A fraction, a bool, a negative label or one >= C is refused naming the offending value,
    never rounded. Returns the declared C (None when not declared)."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"mixture file {path}: 'num_classes' must be an integer >= 1, got {num_classes!r}")
    if not isinstance(labels, list):
        raise ValueError(f"mixture file {path}: 'labels' must be a list of integers, got {labels!r}")
    for k, lab in enumerate(labels):
        if isinstance(lab, bool) or not isinstance(lab, (int, float)) or isinstance(lab, float) and not lab.is_integer():
            raise ValueError(f"mixture file {path}: labels must be integers, got {lab!r} (component {k})")
    top = num_classes if num_classes is not None else (int(max(labels)) + 1 if labels else 0)
    for k, lab in enumerate(labels):
        if not 0 <= int(lab) < top:
            where = f"'num_classes': {num_classes}" if num_classes is not None else "labels are class indices"
            raise ValueError(f"mixture file {path}: label {lab!r} (component {k}) is outside [0, {top}) ({where}; "
                             f"label {top} is the unconditional null class)")
    return num_classes


@dataclass
class MixtureOutput:
    sample: torch.Tensor


class GaussianMixture:
    """Mixture of isotropic Gaussians, all math in float64.

    weights: (K,) positive, normalised here. means: (K, *event_shape). stds: (K,) positive.
    labels: optional (K,) ints in [0, num_classes). num_classes: default max(labels) + 1; label
    num_classes is the null class (CFG's unconditional branch).
    """

    def __init__(self, weights, means, stds, labels=None, num_classes: int | None = None):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        s = torch.as_tensor(stds, dtype=torch.float64)
        if w.ndim != 1 or w.numel() < 1:
            raise ValueError(f"weights must be a non-empty 1-D list, got shape {tuple(w.shape)}")
        K = w.numel()
        if mu.ndim < 2 or mu.shape[0] != K:
            raise ValueError(f"means must have shape (K={K}, *event_shape), got {tuple(mu.shape)}")
        if s.ndim == 0:
            s = s.expand(K).clone()
        if s.shape != (K,):
            raise ValueError(f"stds must have shape (K={K},), got {tuple(s.shape)}")
        if not (torch.isfinite(w).all() and torch.isfinite(mu).all() and torch.isfinite(s).all()):
            raise ValueError("weights, means and stds must be finite")
        if (w <= 0).any():
            raise ValueError("weights must be > 0")
        if (s <= 0).any():
            raise ValueError("stds must be > 0")
        self.weights = w / w.sum()
        self.means = mu
        self.stds = s
        self.event_shape = tuple(mu.shape[1:])
        self.dim = int(math.prod(self.event_shape))
        if labels is None:
            self.labels = None
            self.num_classes = 0
        else:
            lab = torch.as_tensor(labels, dtype=torch.long)
            if lab.shape != (K,):
                raise ValueError(f"labels must have shape (K={K},), got {tuple(lab.shape)}")
            if (lab < 0).any():
                raise ValueError("labels must be >= 0")
            self.labels = lab
            self.num_classes = int(lab.max()) + 1 if num_classes is None else int(num_classes)
            if self.num_classes <= int(lab.max()):
                raise ValueError(f"labels must be < num_classes={self.num_classes}, got {int(lab.max())}")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> "GaussianMixture":
        """Load {"weights": [...], "means": [[...]...], "stds": [...], "labels": [...]?, "num_classes": C?}
        (labels: integers in [0, C); ``_check_json_labels``)."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ValueError(f"mixture file not found: {path}") from err
        except IsADirectoryError:
            raise ValueError(f"mixture file {path} is a directory; gmm:FILE needs a JSON file") from None
        except OSError as err:
            raise ValueError(f"cannot read mixture file {path}: {err.strerror or err}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"mixture file {path} is not valid JSON: {err}") from err
        if not isinstance(spec, dict):
            raise ValueError(f"mixture file {path} must hold a JSON object with keys weights, means, stds[, labels]")
        missing = [k for k in ("weights", "means", "stds") if k not in spec]
        if missing:
            raise ValueError(f"mixture file {path} lacks key(s) {missing}; needs weights, means, stds (labels optional)")
        unknown = sorted(set(spec) - {"weights", "means", "stds", "labels", "num_classes"})
        if unknown:
            raise ValueError(f"mixture file {path} has unknown key(s) {unknown}; allowed: weights, means, stds, labels, num_classes")
        declared = None
        if spec.get("labels") is not None:
            declared = _check_json_labels(path, spec["labels"], spec.get("num_classes"))
        elif spec.get("num_classes") is not None:
            raise ValueError(f"mixture file {path}: 'num_classes' needs 'labels' (one class label per component)")
        arrays = {}
        for key in ("weights", "means", "stds", "labels"):
            if spec.get(key) is None:
                if key != "labels":  # required key given as null
                    raise ValueError(f"mixture file {path}: {key!r} must be an array, got null")
                continue
            try:
                arrays[key] = torch.as_tensor(spec[key], dtype=torch.long if key == "labels" else torch.float64)
            except (TypeError, ValueError, RuntimeError, OverflowError) as err:
                raise ValueError(f"mixture file {path}: malformed arrays in {key!r} ({err})") from None
        try:
            return cls(arrays["weights"], arrays["means"], arrays["stds"], arrays.get("labels"), num_classes=declared)
        except ValueError as err:
            raise ValueError(f"mixture file {path}: {err}") from None

    def to_json(self) -> dict:
        out = {"weights": self.weights.tolist(), "means": self.means.tolist(), "stds": self.stds.tolist()}
        if self.labels is not None:
            out["labels"] = self.labels.tolist()
            if self.num_classes != int(self.labels.max()) + 1:
                out["num_classes"] = self.num_classes
        return out

    # -- conditioning ----------------------------------------------------------------------
    def _check_label(self, label: int | None) -> None:
        if label is None or self.is_null(label):
            return
        if self.labels is None:
            raise ValueError("this mixture has no class labels; class_label must be None")
        if not (0 <= int(label) < self.num_classes) or not (self.labels == int(label)).any():
            raise ValueError(f"class_label {label} is not a label of this mixture; its labels are "
                             f"{sorted(set(self.labels.tolist()))} ({self.num_classes} = unconditional)")

    def is_null(self, label) -> bool:
        return label is None or int(label) < 0 or (self.num_classes > 0 and int(label) == self.num_classes)

    def conditional(self, label: int | None) -> "GaussianMixture":
        """The sub-mixture p(x | c) (itself when label is None/null)."""
        self._check_label(label)
        if self.is_null(label):
            return self
        keep = self.labels == int(label)
        return GaussianMixture(self.weights[keep], self.means[keep], self.stds[keep], self.labels[keep])

    def log_weights_for(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, K) log prior weights, -inf on components outside each sample's class."""
        lw = self.weights.log().expand(batch, -1).clone()
        if labels is None:
            return lw
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(self.weights.device)
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        if self.labels is None:
            if ((labels >= 0) & (labels != 0)).any():  # tolerate null / 0 for unconditional models
                raise ValueError("this mixture has no class labels")
            return lw
        null = (labels < 0) | (labels >= self.num_classes)
        mask = self.labels[None, :] == labels[:, None]  # (B, K)
        mask = mask | null[:, None]
        if not mask.any(1).all():
            raise ValueError(f"class labels must be among this mixture's labels {sorted(set(self.labels.tolist()))} "
                             f"(or {self.num_classes} = unconditional)")
        return lw.masked_fill(~mask, -math.inf)

    # -- exact quantities ------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, label: int | None = None) -> torch.Tensor:
        """n exact draws, float64 (n, *event_shape)."""
        mix = self.conditional(label)
        k = torch.multinomial(mix.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.event_shape), generator=generator, dtype=torch.float64)
        return mix.means[k] + expand_to(mix.stds[k], z) * z

    def noised_params(self, alpha_bar) -> tuple[torch.Tensor, torch.Tensor]:
        """Means (B or 1, K, *event) and variances (B or 1, K) of q_t at alpha_bar (scalar or (B,))."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=self.means.device).reshape(-1, 1)  # (B, 1)
        var = ab * self.stds[None] ** 2 + (1 - ab)  # (B, K)
        mean = ab.sqrt().reshape(-1, 1, *([1] * len(self.event_shape))) * self.means[None]
        return mean, var

    def _comp_terms(self, x: torch.Tensor, alpha_bar, labels=None):
        """Flattened x (B, D), sqrt(ab) (B|1, 1), variances (B|1, K) and logits (B, K).

        ||x - sqrt(ab) mu_k||^2 is expanded as ||x||^2 - 2 sqrt(ab) x.mu_k + ab ||mu_k||^2 so the
        cost is one (B, D) x (D, K) matmul, not a (B, K, D) tensor (float64 keeps it exact enough).
        """
        x = x.double()
        B = x.shape[0]
        flat = x.reshape(B, -1)  # (B, D)
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=self.means.device).reshape(-1, 1)  # (B|1, 1)
        var = ab * self.stds[None] ** 2 + (1 - ab)  # (B|1, K)
        mu = self.means.reshape(self.means.shape[0], -1)  # (K, D)
        sab = ab.sqrt()
        sq = (flat**2).sum(1, keepdim=True) - 2 * sab * (flat @ mu.T) + ab * (mu**2).sum(1)[None]  # (B, K)
        sq = sq.clamp(min=0)
        logn = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        logits = self.log_weights_for(labels, B).to(x.device) + logn  # (B, K)
        return flat, sab, var, logits

    def log_prob(self, x: torch.Tensor, alpha_bar=1.0, labels=None) -> torch.Tensor:
        """log q_t(x) (alpha_bar = 1: the data density). Returns (B,) float64."""
        _, _, _, logits = self._comp_terms(x, alpha_bar, labels)
        return logits.logsumexp(1)

    def responsibilities(self, x: torch.Tensor, alpha_bar=1.0, labels=None) -> torch.Tensor:
        _, _, _, logits = self._comp_terms(x, alpha_bar, labels)
        return torch.softmax(logits, 1)

    def score(self, x: torch.Tensor, alpha_bar, labels=None) -> torch.Tensor:
        """grad_x log q_t(x) = -sum_k r_k (x - sqrt(ab) mu_k) / v_k, float64, shape of x."""
        flat, sab, var, logits = self._comp_terms(x, alpha_bar, labels)
        r_over_v = torch.softmax(logits, 1) / var  # (B, K)
        mu = self.means.reshape(self.means.shape[0], -1)  # (K, D)
        s = -(flat * r_over_v.sum(1, keepdim=True) - sab * (r_over_v @ mu))  # (B, D)
        return s.reshape(x.shape)

    def eps(self, x: torch.Tensor, alpha_bar, labels=None) -> torch.Tensor:
        """Exact eps(x_t) = -sqrt(1 - ab) score, float64."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device)
        return -expand_to((1 - ab).sqrt(), x) * self.score(x, ab, labels)

    def velocity(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """Exact flow velocity v = E[eps - x0 | x_sigma] on x_sigma = (1 - sigma) x0 + sigma eps
        (docs/flow_matching.md "The exact oracle"), float64, shape of x; sigma scalar or (B,) in [0, 1].

        Given component k, (x0, x_sigma) is jointly Gaussian with Var(x_sigma) = V_k = (1 - sigma)^2
        s_k^2 + sigma^2, Cov(x0, x_sigma) = (1 - sigma) s_k^2, Cov(eps, x_sigma) = sigma (per
        coordinate), so with r_k = x - (1 - sigma) mu_k:
        E[eps - x0 | x, k] = (sigma - (1 - sigma) s_k^2) r_k / V_k - mu_k, finite for every sigma
        in [0, 1]. The component posterior is that of the VP twin (x / c, alpha_bar(sigma)): the
        common factor c does not change the responsibilities."""
        from ..core.flow import twin_alpha_bar, twin_scale

        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)  # (B|1, 1)
        flat = x.double().reshape(x.shape[0], -1)  # (B, D)
        _, _, _, logits = self._comp_terms(flat / twin_scale(s), twin_alpha_bar(s).reshape(-1), labels)
        r = torch.softmax(logits, 1)  # (B, K)
        V = (1 - s) ** 2 * self.stds[None] ** 2 + s**2  # (B|1, K)
        gain = r * (s - (1 - s) * self.stds[None] ** 2) / V  # (B, K)
        mu = self.means.reshape(self.means.shape[0], -1)  # (K, D)
        # sum_k r_k [g_k (x - (1 - sigma) mu_k) - mu_k], g_k = gain_k / r_k
        v = gain.sum(1, keepdim=True) * flat - (1 - s) * (gain @ mu) - r @ mu  # (B, D)
        return v.reshape(x.shape)

    def mean(self, label=None) -> torch.Tensor:
        mix = self.conditional(label)
        return (mix.weights.reshape(-1, *([1] * len(self.event_shape))) * mix.means).sum(0)

    def covariance(self, label=None) -> torch.Tensor:
        """(D, D) covariance of the (conditional) mixture."""
        mix = self.conditional(label)
        mu = mix.means.reshape(mix.means.shape[0], -1)
        m = (mix.weights[:, None] * mu).sum(0)
        d = mu - m
        cov = (mix.weights[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
        return cov + torch.diag(torch.full((self.dim,), float((mix.weights * mix.stds**2).sum()), dtype=torch.float64))

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Most responsible component of each clean sample (B,) long."""
        return self.responsibilities(x, 1.0).argmax(1)


class GMMUNet(torch.nn.Module):
    """Exact eps model with the diffusers UNet call signature.

    ``model(sample, timestep, class_labels=None, return_dict=True).sample`` is the exact eps of
    the mixture noised with ``alphas_cumprod`` at (possibly fractional, per-sample) timestep.
    ``config`` carries ``sample_size``, ``in_channels`` and ``num_class_embeds`` like UNet2DModel.
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("alphas_cumprod", alphas_cumprod.double().clone(), persistent=False)
        shape = mixture.event_shape
        from types import SimpleNamespace

        self.config = SimpleNamespace(
            sample_size=shape[-1] if len(shape) == 3 else None,
            in_channels=shape[0] if len(shape) == 3 else None,
            out_channels=shape[0] if len(shape) == 3 else None,
            num_class_embeds=(mixture.num_classes + 1) if mixture.num_classes else None,
            event_shape=shape,
        )
        self._anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True, **unused):
        t = torch.as_tensor(timestep, device=sample.device).double()
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        ab = alpha_bar_at(self.alphas_cumprod.to(sample.device), t)
        eps = self.mixture.eps(sample.double(), ab, class_labels)
        eps = eps.to(sample.dtype)
        return MixtureOutput(eps) if return_dict else (eps,)

    # Keep the mixture on CPU float64 regardless of .to(); moves are cheap for our sizes.
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        dev = self._anchor.device
        m = self.mixture
        m.weights, m.means, m.stds = m.weights.to(dev), m.means.to(dev), m.stds.to(dev)
        if m.labels is not None:
            m.labels = m.labels.to(dev)
        return self


class GMMFlowNet(GMMUNet):
    """Exact flow-matching velocity with the diffusers transformer call signature:
    ``model(sample, timestep, class_labels=None).sample`` = E[eps - x0 | x_sigma] at
    sigma = timestep / num_train_timesteps (the flow contract's units, docs/flow_matching.md)."""

    def __init__(self, mixture: GaussianMixture, num_train_timesteps: int = 1000):
        super().__init__(mixture, torch.ones(int(num_train_timesteps), dtype=torch.float64))
        self.num_train_timesteps = int(num_train_timesteps)

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True, **unused):
        t = torch.as_tensor(timestep, device=sample.device).double()
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        v = self.mixture.velocity(sample.double(), t / self.num_train_timesteps, class_labels).to(sample.dtype)
        return MixtureOutput(v) if return_dict else (v,)


def flow_scheduler_config(shift: float = 1.0, num_train_timesteps: int = 1000) -> dict:
    """A FlowMatchEulerDiscreteScheduler config (as saved by diffusers) with static ``shift``."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"flow_shift must be a finite number > 0, got {shift!r}")
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": int(num_train_timesteps),
            "shift": float(shift), "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False, "shift_terminal": None,
            "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "time_shift_type": "exponential", "stochastic_sampling": False}


def as_flow_model(model, shift: float = 1.0):
    """The flow-matching form of an analytic mixture model (``--flow``, ``--flow-shift S``): a
    LoadedModel with prediction_type "flow", the exact velocity network (``GMMFlowNet``) and a
    FlowMatch config with static shift S; everything else (classes, event shape) as ``model``.
    ValueError for a model without an exact mixture (``extras["mixture"]``)."""
    from dataclasses import replace

    mixture = (getattr(model, "extras", None) or {}).get("mixture")
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"--flow needs an analytic mixture model (gmm2d, gmm-digits, gmm:FILE.json), "
                         f"got {getattr(model, 'name', model)!r}")
    cfg = flow_scheduler_config(shift)
    return replace(model, name=f"{model.name}[flow, shift {float(shift):g}]", unet=GMMFlowNet(mixture, cfg["num_train_timesteps"]),
                   scheduler_config=cfg, prediction_type="flow", extras=dict(model.extras))


def from_arrays(weights: Sequence[float], means, stds, labels=None) -> GaussianMixture:
    return GaussianMixture(weights, means, stds, labels)
