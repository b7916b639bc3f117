"""Exact posterior of a Gaussian-mixture prior under a linear-Gaussian measurement (Bishop 2006, eq. 2.116).

Prior p(x) = sum_k w_k N(mu_k, s_k^2 I) (our isotropic `GaussianMixture`), measurement
y = A x + sigma n, A (M, D). Per component (Bishop 2006, eq. 2.116-2.117):
    Sigma'_k = (I / s_k^2 + A^T A / sigma^2)^-1,   mu'_k = Sigma'_k (mu_k / s_k^2 + A^T y / sigma^2),
    w'_k  propto  w_k N(y; A mu_k, s_k^2 A A^T + sigma^2 I).
All Sigma'_k share the eigenvectors U of A^T A (A^T A = U diag(lam) U^T), so in the rotated
coordinates u = U^T x every component is diagonal with variances 1 / (1/s_k^2 + lam/sigma^2).
That makes the VP-noised posterior (mean sqrt(ab) mu'_k, covariance ab Sigma'_k + (1 - ab) I) and its
exact eps cheap, which is what the `gold` sampler runs. Everything float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.schedule import alpha_bar_at, expand_to
from .gmm import GaussianMixture, MixtureOutput


class GaussianMixturePosterior:
    """p(x | y) for a `GaussianMixture` prior, y = A x + sigma n.

    A: (M, D) dense matrix (``LinearOperator.matrix()``); y: (M,) or (1, M); sigma > 0.
    """

    def __init__(self, prior: GaussianMixture, A: torch.Tensor, y: torch.Tensor, sigma: float):
        A = torch.as_tensor(A, dtype=torch.float64)
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        D = prior.dim
        if A.ndim != 2 or A.shape[1] != D:
            raise ValueError(f"A must have shape (M, {D}), got {tuple(A.shape)}")
        if y.numel() != A.shape[0]:
            raise ValueError(f"y must have {A.shape[0]} entries (rows of A), got {y.numel()}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0 for an exact posterior, got {sigma!r}")
        self.prior, self.A, self.y, self.sigma = prior, A, y, float(sigma)
        self.event_shape, self.dim = prior.event_shape, D
        lam, U = torch.linalg.eigh(A.T @ A)  # (D,), (D, D)
        self.basis = U
        lam = lam.clamp(min=0)
        s2 = prior.stds.double() ** 2  # (K,)
        mu = prior.means.reshape(-1, D)  # (K, D)
        self.rot_vars = 1.0 / (1.0 / s2[:, None] + lam[None, :] / sigma**2)  # (K, D) in u-coordinates
        rhs = mu @ U / s2[:, None] + (A.T @ y / sigma**2) @ U  # (K, D) = U^T(mu/s2 + A^T y / sigma^2)
        self.rot_means = self.rot_vars * rhs  # (K, D)
        self.means = self.rot_means @ U.T  # (K, D) original coordinates
        # log w'_k = log w_k + log N(y; A mu_k, s_k^2 A A^T + sigma^2 I)
        M = A.shape[0]
        AAt = A @ A.T
        eye = torch.eye(M, dtype=torch.float64)
        logw = []
        for k in range(mu.shape[0]):
            cov = s2[k] * AAt + sigma**2 * eye
            L = torch.linalg.cholesky(cov)
            r = torch.linalg.solve_triangular(L, (y - A @ mu[k])[:, None], upper=False)
            logw.append(-0.5 * (r**2).sum() - torch.log(torch.diagonal(L)).sum() - 0.5 * M * math.log(2 * math.pi))
        logw = prior.weights.log() + torch.stack(logw)
        self.log_weights = logw - logw.logsumexp(0)
        self.weights = self.log_weights.exp()

    # -- exact quantities ----------------------------------------------------------------------
    def mean(self) -> torch.Tensor:
        """(D,) posterior mean."""
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        """(D, D) posterior covariance (mixture of the component covariances plus mean spread)."""
        U = self.basis
        within = U @ torch.diag((self.weights[:, None] * self.rot_vars).sum(0)) @ U.T
        d = self.means - self.mean()
        return within + (self.weights[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)

    def variance(self) -> torch.Tensor:
        """(D,) per-coordinate posterior variance."""
        return torch.diagonal(self.covariance()).clone()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws, (n, *event_shape) float64."""
        dev = generator.device if generator is not None else torch.device("cpu")  # draw on the generator's device
        k = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator).cpu()
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64, device=dev).cpu()
        u = self.rot_means[k] + self.rot_vars[k].sqrt() * z
        return (u @ self.basis.T).reshape(n, *self.event_shape)

    def _terms(self, x: torch.Tensor, alpha_bar):
        B = x.shape[0]
        u = x.double().reshape(B, -1) @ self.basis.to(x.device)  # (B, D)
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)  # (B|1, 1, 1)
        var = ab * self.rot_vars.to(x.device)[None] + (1 - ab)  # (B|1, K, D)
        diff = u[:, None, :] - ab.sqrt() * self.rot_means.to(x.device)[None]  # (B, K, D)
        logn = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)  # (B, K)
        return self.log_weights.to(x.device)[None] + logn, diff, var

    def log_prob(self, x: torch.Tensor, alpha_bar=1.0) -> torch.Tensor:
        """log of the (noised) posterior density at x, (B,) float64."""
        logits, _, _ = self._terms(x, alpha_bar)
        return logits.logsumexp(1)

    def responsibilities(self, x: torch.Tensor, alpha_bar=1.0) -> torch.Tensor:
        """(B, K) posterior component probabilities of each x (E over p(x|y) of these = w'_k)."""
        logits, _, _ = self._terms(x, alpha_bar)
        return torch.softmax(logits, 1)

    def eps(self, x: torch.Tensor, alpha_bar) -> torch.Tensor:
        """Exact eps of the VP-noised posterior, -sqrt(1 - ab) grad log p_t(x | y); float64."""
        logits, diff, var = self._terms(x, alpha_bar)
        r = torch.softmax(logits, 1)  # (B, K)
        score_u = -(r[:, :, None] * diff / var).sum(1)  # (B, D)
        score = (score_u @ self.basis.T.to(x.device)).reshape(x.shape)
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device)
        return -expand_to((1 - ab).sqrt(), x) * score


class PosteriorUNet(torch.nn.Module):
    """The exact posterior eps with the diffusers UNet call signature (``.sample`` output)."""

    def __init__(self, posterior: GaussianMixturePosterior, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.posterior = posterior
        self.register_buffer("alphas_cumprod", alphas_cumprod.double().clone(), persistent=False)

    def forward(self, sample, timestep, return_dict: bool = True, **unused):
        t = torch.as_tensor(timestep, device=sample.device).double()
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        ab = alpha_bar_at(self.alphas_cumprod.to(sample.device), t)
        eps = self.posterior.eps(sample, ab).to(sample.dtype)
        return MixtureOutput(eps) if return_dict else (eps,)


@dataclass
class PosteriorDistance:
    """How far samples are from the exact posterior (docs/stsl.md, "Oracle results")."""

    weight_err: float  # max_k |mean_x r_k(x) - w'_k|
    weight_z: float  # the same in standard errors of the mean responsibility
    mean_err: float  # ||mean - mu_post|| / sqrt(D)  (RMS over coordinates)
    mean_err_measured: float  # max over rows a of A of |a^T (mean - mu_post)| / prior std of a^T x
    var_ratio_median: float  # median over coordinates of sample var / exact var
    var_ratio_min: float
    var_ratio_max: float
    top_mode_share: float  # fraction of samples whose most responsible component is the top-weight one
    top_mode_plurality: bool
    w2_gauss: float  # W2 between Gaussian fits (Bures), per sqrt(D)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def posterior_distance(x: torch.Tensor, post: GaussianMixturePosterior) -> PosteriorDistance:
    """Compare samples x (n, *event_shape) with the exact posterior ``post`` (docs/stsl.md, "Oracle results").
    ``mean_err_measured`` is the largest error of the mean along a row a of A, in units of the
    prior std of a^T x (for a mask: the observed coordinates)."""
    n, D = x.shape[0], post.dim
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    flat = x.double().reshape(n, D)
    r = post.responsibilities(flat.reshape(n, *post.event_shape))  # (n, K)
    r_mean = r.mean(0)
    # SE of the mean responsibility; r_k in [0, 1] with mean w'_k, so sd <= sqrt(w'(1 - w')): use the
    # larger of the sample sd and that bound (conservative where a component is nearly never hit)
    w = post.weights
    r_se = torch.maximum(r.std(0), (w * (1 - w)).sqrt()) / math.sqrt(n)
    err = (r_mean - w).abs()
    z = (err / r_se.clamp(min=1e-12)).max().item()
    mu_hat, mu = flat.mean(0), post.mean()
    cov_hat, cov = torch.cov(flat.T).reshape(D, D), post.covariance()
    var_ratio = torch.diagonal(cov_hat) / torch.diagonal(cov)
    # measured directions: the rows of A (for masks, the observed coordinates), in prior-std units
    rows = post.A[(post.A.abs().sum(1) > 0)]  # (M', D)
    prior_sd = torch.einsum("md,de,me->m", rows, post.prior.covariance(), rows).sqrt()  # (M',)
    mm = (rows @ (mu_hat - mu)).abs() / prior_sd
    top = int(post.weights.argmax())
    assign = r.argmax(1)
    counts = torch.bincount(assign, minlength=post.weights.numel())
    # Bures-Wasserstein between Gaussian fits: |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2)
    ev, vec = torch.linalg.eigh(cov)
    c_half = vec @ torch.diag(ev.clamp(min=0).sqrt()) @ vec.T
    mid = torch.linalg.eigvalsh(c_half @ cov_hat @ c_half).clamp(min=0).sqrt().sum()
    w2 = ((mu_hat - mu) ** 2).sum() + torch.trace(cov_hat) + torch.trace(cov) - 2 * mid
    return PosteriorDistance(
        weight_err=err.max().item(), weight_z=z,
        mean_err=((mu_hat - mu).norm() / math.sqrt(D)).item(),
        mean_err_measured=mm.max().item() if mm.numel() else 0.0,
        var_ratio_median=var_ratio.median().item(), var_ratio_min=var_ratio.min().item(), var_ratio_max=var_ratio.max().item(),
        top_mode_share=(counts[top] / n).item(), top_mode_plurality=bool(counts[top] == counts.max()),
        w2_gauss=(w2.clamp(min=0).sqrt() / math.sqrt(D)).item(),
    )
