"""The infinite-particle limit of FKC on Gaussian data, in closed form (docs/fkc.md
"Discretisation bias").

Data N(m, s2) in one dimension; the noised marginal q_t = N(sqrt(ab) m, ab s2 + 1 - ab) has the
exact noise prediction eps(x, t) = sqrt(1 - ab) (x - sqrt(ab) m) / (ab s2 + 1 - ab), linear in x.
For the annealed target p^beta (Skreta et al. 2025, Sec. 3) every quantity of the implemented
scheme stays Gaussian as K -> infinity:

- weight at node k: log w += c_k beta (beta - 1) eps(x_k)^2, a quadratic in x_k, so the weighted
  law N(mu, v) becomes N(mu', v') with 1/v' = 1/v - 2 c_k beta (beta - 1) a_k^2 (c_k from
  ``samplers.fkc.node_coefficients``; resampling does not change the weighted law as K -> inf);
- move: the DDIM / DDPM step ``samplers.fkc.ddim_move`` is affine in x plus Gaussian noise,
  x' = A x + C + sigma z, read off the implemented function itself at x = 0, 1 with z = 0, 1.

So the weighted output law of the sampler with infinitely many particles is N(mu_S, v_S) exactly:
the bias left is the discretisation of the method, not Monte Carlo error. The target is
N(m, s2 / beta). ``infinite_k_gaussian`` does the same for any target prod_i N(m_i, s2_i)^beta_i
(products, CFG), whose rate is again a quadratic in x.
"""

from __future__ import annotations

import math

import torch

from ..samplers.fkc import alpha_bar_pairs, clamp_alpha_bar, ddim_move, direct_steps, node_coefficients, zero_snr_move


def gaussian_eps_affine(m: float, s2: float, alpha_bar) -> tuple[float, float]:
    """(a, b) with eps(x, t) = a x + b for data N(m, s2) at alpha_bar (exact noise prediction)."""
    ab = float(alpha_bar)
    var = ab * s2 + 1.0 - ab
    a = math.sqrt(1.0 - ab) / var
    return a, -a * math.sqrt(ab) * m


def gaussian_x0_affine(m: float, s2: float, alpha_bar) -> tuple[float, float]:
    """(a, b) with E[x0 | x_t = x] = a x + b (exact; finite at alpha_bar = 0)."""
    ab = float(alpha_bar)
    var = ab * s2 + 1.0 - ab
    a = math.sqrt(ab) * s2 / var
    return a, m - a * math.sqrt(ab) * m


def infinite_k_anneal(m: float, s2: float, beta: float, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
                      eta: float = 1.0, rule: str = "euler", final_alpha_bar: float = 1.0,
                      x0_form: bool = False) -> dict:
    """Weighted output law N(mean, var) of FKC annealing p^beta with K -> infinity.

    Same grid, weight rule (``rule``), initial law N(0, 1/beta) and move as ``sample_fkc``; x0_form
    moves with the experts' x0 (``combine_x0``, as the sampler does for v-prediction models).
    Returns {"mean", "var", "target_var", "normalisable"}; normalisable is False (and mean/var NaN)
    when a weight step makes the weighted law improper (1/v' <= 0), i.e. the K -> inf limit of the
    sampler does not exist.
    """
    ab_t, ab_s = alpha_bar_pairs(alphas_cumprod, timesteps, final_alpha_bar)
    coef = node_coefficients(ab_t, ab_s, rule)
    direct = direct_steps(ab_t, ab_s)
    mu, v = 0.0, 1.0 / beta
    for k in range(len(timesteps)):
        a, b = gaussian_eps_affine(m, s2, ab_t[k])
        q = float(coef[k]) * beta * (beta - 1.0)  # log w += q (a x + b)^2
        prec = 1.0 / v - 2.0 * q * a * a
        if not prec > 0:
            return {"mean": float("nan"), "var": float("nan"), "target_var": s2 / beta, "normalisable": False}
        mu = (mu / v + 2.0 * q * a * b) / prec
        v = 1.0 / prec
        pts = torch.tensor([0.0, 1.0], dtype=torch.float64)
        zero2 = torch.zeros(2, dtype=torch.float64)
        one = torch.ones(1, dtype=torch.float64)
        a0, b0 = gaussian_x0_affine(m, s2, ab_t[k])
        x0_i = a0 * pts + b0  # the expert's x0 prediction at the two points
        if direct[k]:  # zero terminal SNR: the sampler's zero_snr_move
            def move(x, noise, x0):
                return zero_snr_move(x, x0[None], [beta], ab_s[k], eta, noise)
        else:
            def move(x, noise, x0):
                e = beta * (a * x + b) if x.numel() == 2 else torch.zeros_like(x)
                x0_eff = None
                if x0_form and x.numel() == 2:
                    x0_eff = beta * x0 + (1.0 - beta) * x / clamp_alpha_bar(ab_t[k]).sqrt()
                elif x0_form:
                    x0_eff = torch.zeros_like(x)
                return ddim_move(x, e, ab_t[k], ab_s[k], eta, noise, x0_eff)
        mean_pts = move(pts, zero2, x0_i)
        C, A = float(mean_pts[0]), float(mean_pts[1] - mean_pts[0])
        sig = 0.0
        if eta > 0:  # the noise coefficient: the move at x = 0 with x0 = 0, eps = 0, noise = 1
            sig = float(move(torch.zeros(1, dtype=torch.float64), one, torch.zeros(1, dtype=torch.float64))[0])
        mu, v = A * mu + C, A * A * v + sig * sig
    return {"mean": mu, "var": v, "target_var": s2 / beta, "normalisable": True}


def infinite_k_gaussian(experts, betas, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *, eta: float = 1.0,
                        rule: str = "euler", final_alpha_bar: float = 1.0) -> dict:
    """Weighted output law N(mean, var) of FKC with K -> infinity for Gaussian experts, any target
    prod_i p_i^beta_i (annealing: one expert; products; CFG: betas (w, 1 - w)), per coordinate.

    experts: [(m_i, s2_i)] data laws N(m_i, s2_i) of the experts (isotropic experts act coordinate by
    coordinate). Each expert's eps is affine, eps_i = a_i x + b_i, so the rate
    R = (sum beta_i eps_i)^2 - sum beta_i eps_i^2 = q2 x^2 + q1 x + const is a quadratic and the weight
    at node k maps N(mu, v) to precision 1/v - 2 c_k q2 and mean (mu / v + c_k q1) / precision; the move
    is the sampler's own ``ddim_move`` on eps_eff (``zero_snr_move`` on a zero-SNR first step), affine
    plus Gaussian noise. The target is N(m*, s2*) with 1/s2* = sum beta_i / s2_i and
    m* = s2* sum beta_i m_i / s2_i (``target`` in the result). Returns {"mean", "var", "target_mean",
    "target_var", "normalisable"} (see ``infinite_k_anneal``).
    """
    betas = [float(b) for b in betas]
    if len(betas) != len(experts):
        raise ValueError(f"got {len(experts)} experts for {len(betas)} betas")
    B = sum(betas)
    prec_t = sum(b / s2 for (m, s2), b in zip(experts, betas))
    if not prec_t > 0:
        raise ValueError(f"the target prod_i N(m_i, s2_i)^beta_i is not normalisable (precision {prec_t})")
    target_var = 1.0 / prec_t
    target_mean = target_var * sum(b * m / s2 for (m, s2), b in zip(experts, betas))
    ab_t, ab_s = alpha_bar_pairs(alphas_cumprod, timesteps, final_alpha_bar)
    coef = node_coefficients(ab_t, ab_s, rule)
    direct = direct_steps(ab_t, ab_s)
    mu, v = 0.0, 1.0 / B
    pts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for k in range(len(timesteps)):
        ab = clamp_alpha_bar(ab_t[k])
        aff = [gaussian_eps_affine(m, s2, ab) for m, s2 in experts]
        E = sum(b * a for (a, _), b in zip(aff, betas))
        F = sum(b * c for (_, c), b in zip(aff, betas))
        q2 = E * E - sum(b * a * a for (a, _), b in zip(aff, betas))
        q1 = 2.0 * (E * F - sum(b * a * c for (a, c), b in zip(aff, betas)))
        c_k = float(coef[k])
        prec = 1.0 / v - 2.0 * c_k * q2
        if not prec > 0:
            return {"mean": float("nan"), "var": float("nan"), "target_mean": target_mean, "target_var": target_var,
                    "normalisable": False}
        mu, v = (mu / v + c_k * q1) / prec, 1.0 / prec
        if direct[k]:
            x0 = torch.stack([a0 * pts + b0 for a0, b0 in (gaussian_x0_affine(m, s2, ab_t[k]) for m, s2 in experts)])

            def move(x, noise, x0=x0):
                return zero_snr_move(x, x0 if x.numel() == 2 else torch.zeros(len(experts), x.numel(), dtype=torch.float64),
                                     betas, ab_s[k], eta, noise)
        else:
            def move(x, noise):
                e = E * x + F if x.numel() == 2 else torch.zeros_like(x)
                return ddim_move(x, e, ab_t[k], ab_s[k], eta, noise)
        mean_pts = move(pts, torch.zeros(2, dtype=torch.float64))
        C, A = float(mean_pts[0]), float(mean_pts[1] - mean_pts[0])
        sig = float(move(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))[0]) if eta > 0 else 0.0
        mu, v = A * mu + C, A * A * v + sig * sig
    return {"mean": mu, "var": v, "target_mean": target_mean, "target_var": target_var, "normalisable": True}
