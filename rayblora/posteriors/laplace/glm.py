"""The linearised (GLM) Laplace predictive and the Laplace evidence over LoRA blocks (pure torch).

Posterior precision of block b with prior precision δ_b (Laplace-LoRA, arXiv 2308.13111, sec. 3):
P_b = curvature_b + δ_b I, diagonal in the block's eigenbasis (:class:`~rayblora.posteriors.laplace.kfac.BlockEigen`)
with eigenvalues Λ_b + δ_b, and δ_b on the complement where a low-rank factor leaves one.

* GLM predictive (sec. 3.2): f(x) ~ N(f_θ*(x), J Σ Jᵀ) over the C answer logits. With Ĵ = q_outᵀ J q_in, the
  rotated per-example Jacobian, (J Σ Jᵀ)_cd = Σ_b Σ_kl Ĵ_bc,kl Ĵ_bd,kl / (Λ_b,kl + δ_b) + R_b,cd / δ_b, where
  R_b = ⟨J_c, J_d⟩ − ⟨Ĵ_c, Ĵ_d⟩ is the part outside the kept eigenspace. Σ is never formed, and Ĵ and R do not
  depend on δ, so a new δ needs no new forward or backward pass.
* Links: a shift-invariant probit (:func:`probit_probs`: MacKay 1992 on logit contrasts); Monte Carlo over f.
* Evidence (sec. 3.1): log p(D) ≈ log p(D | θ*) − ½ Σ_b [Σ_kl log(1 + Λ_b,kl / δ_b) + δ_b ‖θ*_b‖²].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rayblora.posteriors.laplace.kfac import (BlockEigen, LogitsFn, backprop_columns, identity_columns)


@dataclass
class BlockJacobians:
    """Rotated Jacobians of one block for B examples: `rotated` (B, C, k_out, k_in) and, for a block with a
    low-rank factor, `residual` (B, C, C) = ⟨J_c, J_d⟩ − ⟨Ĵ_c, Ĵ_d⟩ (else None)."""

    rotated: torch.Tensor
    residual: torch.Tensor | None = None


@dataclass
class GLMBatch:
    """What the GLM predictive needs of one batch under one MAP adapter: f_mu (B, C) and per-block Jacobians."""

    f_mu: torch.Tensor
    blocks: dict[str, BlockJacobians]


def _with_tokens(t: torch.Tensor) -> torch.Tensor:
    return t[:, None] if t.dim() == 2 else t


def rotated_grad(eigen: BlockEigen, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """q_outᵀ (Σ_t g_t a_tᵀ) q_in per example, (B, k_out, k_in), projecting before the token sum."""
    a, g = _with_tokens(a), _with_tokens(g)
    if eigen.q_out is not None:
        a, g = a @ eigen.q_in.to(a.device), g @ eigen.q_out.to(g.device)
    return torch.einsum("btk,btl->bkl", g, a).cpu()


def residual_gram(a: torch.Tensor, grads: torch.Tensor, rotated: torch.Tensor) -> torch.Tensor:
    """⟨J_c, J_d⟩ − ⟨Ĵ_c, Ĵ_d⟩ (B, C, C) from inputs a (B, T, in) and output gradients (B, C, T, out)."""
    a = _with_tokens(a)
    gram_a = torch.einsum("bti,bsi->bts", a, a)
    full = torch.einsum("bcto,bdso,bts->bcd", grads, grads, gram_a)
    return full - torch.einsum("bckl,bdkl->bcd", rotated, rotated)


def batch_jacobians(logits_fn: LogitsFn, batch: dict, modules: dict, eigens: dict[str, BlockEigen]) -> GLMBatch:
    """f_mu and the rotated Jacobians of every block on one batch: one forward and C backward passes."""
    rotated: dict[str, list] = {k: [] for k in modules}
    grads: dict[str, list] = {k: [] for k in modules if not eigens[k].complete}
    inputs: dict[str, torch.Tensor] = {}
    f_mu = None
    for f_mu, captured in backprop_columns(logits_fn, batch, modules, identity_columns):
        for key, (a, g) in captured.items():
            rotated[key].append(rotated_grad(eigens[key], a, g))
            if key in grads:
                grads[key].append(_with_tokens(g))
                inputs[key] = a
    blocks = {}
    for key, parts in rotated.items():
        rot = torch.stack(parts, 1)
        res = residual_gram(inputs[key], torch.stack(grads[key], 1), rot.to(inputs[key].device)).cpu() \
            if key in grads else None
        blocks[key] = BlockJacobians(rot, res)
    return GLMBatch(f_mu.cpu(), blocks)


def functional_covariance(batch: GLMBatch, eigens: dict[str, BlockEigen], prior: dict[str, float]) -> torch.Tensor:
    """J Σ Jᵀ (B, C, C) for prior precisions `prior` (block -> δ_b)."""
    total = None
    for key, jac in batch.blocks.items():
        delta = prior[key]
        scaled = jac.rotated / (eigens[key].values + delta)
        part = torch.einsum("bckl,bdkl->bcd", scaled, jac.rotated)
        if jac.residual is not None:
            part = part + jac.residual / delta
        total = part if total is None else total + part
    return total


def probit_probs(f_mu: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
    """Shift-invariant probit approximation of E softmax(f), f ~ N(f_mu (B, C), f_var (B, C, C)).

    softmax depends only on differences of logits, and LLM answer logits carry a large common offset, so the
    approximation is built on them: with d_c = f_c − mean_{c'≠c} f_c', κ_c = (1 + π/8 Var d_c)^(-1/2) and
    p = softmax(κ ⊙ (f_mu − mean f_mu)). For C = 2 this is MacKay's (1992) probit of the logit difference
    σ(μ_d / sqrt(1 + π/8 Var d)), which never changes the argmax; adding any random offset common to every
    class (a shared direction of f_var) changes nothing. (Scaling raw logits, κ_c from Var f_c, is neither.)
    −inf logits (invalid choices) keep probability 0 and are left out of the means."""
    valid = torch.isfinite(f_mu)
    n_valid = valid.sum(-1, keepdim=True).clamp_min(1)
    mu = torch.where(valid, f_mu, torch.zeros_like(f_mu))
    # contrast rows w_c = e_c − (1 − e_c) ⊙ valid / (n_valid − 1): d_c = w_c · f
    others = valid.float() / (n_valid - 1).clamp_min(1)
    eye = torch.eye(f_mu.shape[-1], dtype=f_var.dtype, device=f_var.device)
    contrast = eye - (1 - eye) * others[..., None, :].to(f_var.dtype)
    var_d = torch.einsum("bcd,bde,bce->bc", contrast, f_var, contrast).clamp_min(0)
    kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * var_d)
    centred = mu - (mu * valid).sum(-1, keepdim=True) / n_valid
    return torch.softmax(torch.where(valid, kappa * centred, f_mu), -1)


def sample_logits(f_mu: torch.Tensor, f_var: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples (n, B, C) of f ~ N(f_mu, f_var) (−inf logits of invalid choices stay −inf)."""
    vals, vecs = torch.linalg.eigh(f_var.double())
    root = (vecs * vals.clamp_min(0).sqrt()[:, None, :]).float()  # (B, C, C), root rootᵀ = f_var
    z = torch.randn(n, *f_mu.shape, generator=generator)
    return f_mu[None] + torch.einsum("bcd,nbd->nbc", root, z)


def weight_noise(eigen: BlockEigen, z: torch.Tensor, delta: float) -> torch.Tensor:
    """Σ_b^(1/2) z for a standard normal z (out, in): a draw of θ_b − θ*_b under the block's posterior."""
    z_rot = eigen.rotate(z)
    noise = eigen.unrotate(z_rot / (eigen.values + delta).sqrt())
    if not eigen.complete:
        noise = noise + (z - eigen.unrotate(z_rot)) / math.sqrt(delta)
    return noise


# --- evidence ----------------------------------------------------------------------------------------------------
def log_marginal_likelihood(log_lik: float, eigens: dict[str, BlockEigen], theta_sq: dict[str, float],
                            prior: dict[str, torch.Tensor]) -> torch.Tensor:
    """Laplace evidence (differentiable in the δ tensors of `prior`)."""
    log_det_ratio, scatter = 0.0, 0.0
    for key, eigen in eigens.items():
        delta = prior[key]
        log_det_ratio = log_det_ratio + torch.log1p(eigen.values.double() / delta).sum()
        scatter = scatter + delta * theta_sq[key]
    return log_lik - 0.5 * (log_det_ratio + scatter)


def block_prior(values: torch.Tensor, groups: dict[str, int]) -> dict[str, torch.Tensor]:
    """Prior precision per block from one value per group: `groups` maps block -> index into `values`."""
    return {key: values[i] for key, i in groups.items()}


def optimise_prior(log_lik: float, eigens: dict[str, BlockEigen], theta_sq: dict[str, float],
                   groups: dict[str, int], init: float, steps: int = 100) -> tuple[torch.Tensor, float]:
    """Maximise the evidence over log δ (one δ per group) with L-BFGS; returns (δ (G,), evidence)."""
    n_groups = max(groups.values()) + 1
    log_delta = torch.full((n_groups,), math.log(init), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_delta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = -log_marginal_likelihood(log_lik, eigens, theta_sq, block_prior(log_delta.exp(), groups))
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        delta = log_delta.exp().clamp(1e-8, 1e8)
        value = log_marginal_likelihood(log_lik, eigens, theta_sq, block_prior(delta, groups))
    return delta.float(), float(value)
