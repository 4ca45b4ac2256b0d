"""Kronecker-factored and diagonal curvature over LoRA parameters, and per-example LoRA Jacobians (pure torch).

Laplace-LoRA (Yang et al., arXiv 2308.13111, sec. 3-4) puts a Laplace approximation on the LoRA parameters
only. Every adapted linear module holds two trainable matrices, `lora_A` (r × d_in) and `lora_B` (d_out × r);
each is one *block* of the curvature. For a block with weight W (out × in) the per-example gradient of any
scalar function of the answer logits is Σ_t g_t a_tᵀ, with a_t (in,) the block's input and g_t (out,) the
gradient at its output at token position t; forward hooks on the PEFT `lora_A` / `lora_B` Linear submodules
capture both.

Curvature (sum over the N fit examples, log-likelihood loss, C answer classes):

* GGN / Fisher: Jᵀ H_f J with H_f = diag(p) − p pᵀ the softmax Hessian, evaluated *exactly* over the C classes
  through a symmetric factorisation H_f = L Lᵀ with C−1 columns (H_f has rank ≤ C−1): one backward pass per
  column (Martens & Grosse 2015, sec. 5; Laplace Redux sec. 3). Empirical Fisher: the single column ∇_f(−log p_y).
* K-FAC: a block's curvature ≈ (Σ_n ā_n ā_nᵀ / N) ⊗ (Σ_n Σ_k ḡ_nk ḡ_nkᵀ). Across token positions we use the
  "reduce" approximation of Eschenhagen et al. (2023, sec. 3): ā_n is the mean input over the example's real
  (unpadded) tokens and ḡ_nk the sum of its output gradients, since one loss term belongs to a whole sequence.
  Factors are stored as *sums* with the count N, so shards from data-parallel workers add up exactly.
  With row-major vec(W), the block matrix is G ⊗ A.
* Diagonal: the exact diagonal Σ_n Σ_k (Σ_t g_nkt a_ntᵀ)² of the GGN / EF.
* Low rank: a factor wider than `low_rank_threshold` is kept as U diag(s) Uᵀ of rank ≤ `low_rank`, updated batch
  by batch with a thin SVD of [U √s, Xᵀ] (memory O(d·r) instead of O(d²); Laplace-LoRA sec. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

LogitsFn = Callable[[dict], torch.Tensor]
"""Maps a batch dict to answer logits (B, C) with autograd enabled."""
AllReduceFn = Callable[[torch.Tensor], None]
"""Sums a tensor in place over all data-parallel workers (e.g. `torch.distributed.all_reduce`)."""


# --- where the LoRA parameters are ---------------------------------------------------------------------------
@dataclass
class LoraSite:
    """One adapted module: its name in the model, its `lora_A` / `lora_B` Linear submodules, and which of the
    two factors carry the Laplace approximation (`factors`: "ab" both, "b" B only; the other stays at θ*)."""

    name: str
    lora_A: nn.Linear
    lora_B: nn.Linear
    factors: str = "ab"

    def blocks(self) -> dict[str, nn.Linear]:
        """Block name (`<module>.lora_A`, `<module>.lora_B`, as in PEFT's saved keys) -> Linear."""
        out = {f"{self.name}.lora_A": self.lora_A} if "a" in self.factors else {}
        return {**out, f"{self.name}.lora_B": self.lora_B}


def find_lora_sites(model: nn.Module, subset: str = "all", factors: str = "ab") -> list[LoraSite]:
    """The adapted modules of a PEFT model in module order; `subset="last_layer"` keeps only the last one;
    `factors="b"` puts the approximation on the B factors only (see :class:`LoraSite`)."""
    if factors not in ("ab", "b"):
        raise ValueError(f"laplace.factors must be 'ab' or 'b', got {factors!r}")
    sites = []
    for name, module in model.named_modules():
        lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_A, nn.ModuleDict) or not lora_A:
            continue
        adapter = _active_adapter(module, lora_A)
        sites.append(LoraSite(name, lora_A[adapter], lora_B[adapter], factors))
    if not sites:
        raise ValueError("the model has no LoRA-adapted modules (no `lora_A` submodules found)")
    if subset == "last_layer":
        return sites[-1:]
    if subset != "all":
        raise ValueError(f"laplace.subset must be 'all' or 'last_layer', got {subset!r}")
    return sites


def _active_adapter(module: nn.Module, lora_A: nn.ModuleDict) -> str:
    active = getattr(module, "active_adapters", None) or list(lora_A)
    names = [a for a in active if a in lora_A]
    if len(names) != 1:
        raise ValueError(f"expected exactly one active LoRA adapter, got {names}")
    return names[0]


def block_modules(sites: list[LoraSite]) -> dict[str, nn.Linear]:
    """All blocks of the sites, in order."""
    return {k: v for site in sites for k, v in site.blocks().items()}


def state_key(block: str) -> str:
    """PEFT saved-file key of a block's weight (`lora_state` naming), e.g. `...q_proj.lora_A.weight`."""
    return f"{block}.weight"


# --- capturing block inputs and output gradients ----------------------------------------------------------------
class BlockCapture:
    """Forward hooks storing each block's input a (B, [T,] in) and, per backward pass, its output gradient g."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "BlockCapture":
        for key, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, key: str):
        def hook(_module, inputs, output):
            self.inputs[key] = inputs[0].detach().float()
            if output.requires_grad:
                output.register_hook(lambda grad: self.grads.__setitem__(key, grad.detach().float()))
        return hook


def backprop_columns(logits_fn: LogitsFn, batch: dict, modules: dict[str, nn.Linear],
                     columns_fn: Callable[[torch.Tensor], torch.Tensor]
                     ) -> Iterator[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """One forward pass, then one backward pass per column v_k of `columns_fn(logits)` (K, B, C).

    Yields (logits (B, C) detached, {block: (a (B, [T,] in), g (B, [T,] out))}) for k = 0..K-1, where g is the
    gradient of Σ_n v_k[n]·f(x_n) at the block's output. Parameter `.grad`s are left untouched.
    """
    weights = [m.weight for m in modules.values()]
    with BlockCapture(modules) as cap:
        logits = logits_fn(batch)
    columns = columns_fn(logits.detach())
    for k in range(columns.shape[0]):
        cap.grads.clear()
        torch.autograd.grad(logits, weights, grad_outputs=columns[k].to(logits.device, logits.dtype),
                            retain_graph=k < columns.shape[0] - 1, allow_unused=True)
        yield logits.detach(), {key: (cap.inputs[key], _grad_or_zero(cap, key, m))
                                for key, m in modules.items()}


def _grad_or_zero(cap: BlockCapture, key: str, module: nn.Linear) -> torch.Tensor:
    if key in cap.grads:
        return cap.grads[key]
    a = cap.inputs[key]
    return a.new_zeros(*a.shape[:-1], module.out_features)


def ggn_columns(logits: torch.Tensor) -> torch.Tensor:
    """Columns (C−1, B, C) of L with L Lᵀ = diag(p) − p pᵀ, the softmax Hessian, for every example.

    The Hessian always has the null vector 1 (its rows sum to 0), so its C−1 other eigenpairs (w_k, v_k) give
    the exact factorisation L = [√w_k v_k]: C−1 backward passes, one for a binary answer.
    """
    p = torch.softmax(logits.double(), -1)
    hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    vals, vecs = torch.linalg.eigh(hessian)  # ascending; vals[:, 0] is the null direction
    cols = vecs[:, :, 1:] * vals[:, None, 1:].clamp_min(0).sqrt()  # (B, C, C−1)
    return cols.permute(2, 0, 1).float().contiguous()


def ef_columns(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The gradient of −log p_y w.r.t. the logits, p − onehot(y), as one column (1, B, C)."""
    p = torch.softmax(logits.float(), -1)
    return (p - nn.functional.one_hot(labels.to(p.device), p.shape[-1]).to(p.dtype))[None]


def identity_columns(logits: torch.Tensor) -> torch.Tensor:
    """Unit columns (C, B, C): backward pass k gives the Jacobian of logit k."""
    b, c = logits.shape
    return torch.eye(c, dtype=torch.float32, device=logits.device)[:, None, :].expand(c, b, c).contiguous()


def reduce_tokens(a: torch.Tensor, g: torch.Tensor, token_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC-reduce statistics: ā (B, in) = mean of a over real tokens, ḡ (B, out) = sum of g over tokens."""
    if a.dim() == 2:
        return a, g
    if token_mask is None:
        return a.mean(1), g.sum(1)
    m = token_mask.to(a.device, a.dtype)[:, :, None]
    return (a * m).sum(1) / m.sum(1).clamp_min(1.0), (g * m).sum(1)


def per_example_grad(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_t g_t a_tᵀ per example: (B, out, in)."""
    return torch.einsum("bo,bi->boi", g, a) if a.dim() == 2 else torch.einsum("bto,bti->boi", g, a)


# --- factors ---------------------------------------------------------------------------------------------------
class Factor:
    """A symmetric PSD factor Σ xxᵀ of side d: dense (d, d), or low-rank U diag(s) Uᵀ when d > threshold."""

    def __init__(self, side: int, threshold: int, rank: int):
        self.side, self.rank = side, min(rank, side)
        self.low_rank = side > threshold
        self.dense = None if self.low_rank else torch.zeros(side, side)
        self.basis = torch.zeros(side, 0)  # (d, k) columns U √s (low-rank only)

    def add_(self, x: torch.Tensor) -> None:
        """Add xᵀx for rows x (n, d) (the factor follows x to its device)."""
        if self.dense is not None:
            self.dense = self.dense.to(x.device)
            self.dense.addmm_(x.T, x)
        else:
            self.basis = truncate(torch.cat([self.basis.to(x.device), x.T], 1), self.rank)

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (k,) ≥ 0 and orthonormal eigenvectors (d, k) on the CPU; k = d for dense factors.

        The eigenvectors are made row-major (LAPACK returns them column-major): the layout an artifact stores and
        loads, so a fitted and a reloaded posterior run the same matmul kernels and predict bit for bit alike."""
        if self.dense is not None:
            vals, vecs = torch.linalg.eigh(self.dense.double().cpu())
            return vals.clamp_min(0).float(), vecs.float().contiguous()
        u, s, _ = torch.linalg.svd(self.basis.double().cpu(), full_matrices=False)
        return (s ** 2).float(), u.float().contiguous()

    def sum_(self, all_reduce: AllReduceFn, rank: int, world: int) -> None:
        """Sum this factor over workers: dense by all-reduce; low-rank by gathering every worker's U √s
        (through an all-reduce of zero-padded column blocks) and truncating the union again."""
        if self.dense is not None:
            all_reduce(self.dense)
            return
        k = self.rank
        slots = torch.zeros(self.side, k * world, device=self.basis.device)
        slots[:, rank * k: rank * k + self.basis.shape[1]] = self.basis
        all_reduce(slots)
        self.basis = truncate(slots, self.rank)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {prefix: (self.dense if self.dense is not None else self.basis).cpu()}

    def load_(self, tensor: torch.Tensor) -> None:
        if self.dense is not None:
            self.dense = tensor.clone()
        else:
            self.basis = tensor.clone()


def truncate(columns: torch.Tensor, rank: int) -> torch.Tensor:
    """Columns V (d, m) -> W (d, ≤rank) with W Wᵀ the best rank-`rank` approximation of V Vᵀ (thin SVD)."""
    if columns.shape[1] == 0:
        return columns
    u, s, _ = torch.linalg.svd(columns.double(), full_matrices=False)
    keep = min(rank, int((s > 0).sum()))
    return (u[:, :keep] * s[:keep]).float()


# --- curvature accumulation --------------------------------------------------------------------------------------
@dataclass
class BlockEigen:
    """A block's curvature in its eigenbasis: curvature = (q_out ⊗ q_in) diag(vec(values)) (q_out ⊗ q_in)ᵀ.

    q_out (out, k_out) and q_in (in, k_in) are orthonormal (None = identity, for the diagonal structure);
    `values` (k_out, k_in) ≥ 0. `complete` is False when a factor is low-rank: the curvature is then zero on
    the orthogonal complement of span(q_out) ⊗ span(q_in).
    """

    shape: tuple[int, int]
    values: torch.Tensor
    q_out: torch.Tensor | None = None
    q_in: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        return self.values.shape == torch.Size(self.shape)

    def rotate(self, delta_w: torch.Tensor) -> torch.Tensor:
        """q_outᵀ M q_in for matrices M (..., out, in) -> (..., k_out, k_in)."""
        out = delta_w if self.q_out is None else torch.einsum("ok,...oi->...ki", self.q_out, delta_w)
        return out if self.q_in is None else torch.einsum("...ki,il->...kl", out, self.q_in)

    def unrotate(self, z: torch.Tensor) -> torch.Tensor:
        """q_out Z q_inᵀ for Z (..., k_out, k_in) -> (..., out, in)."""
        out = z if self.q_out is None else torch.einsum("ok,...kl->...ol", self.q_out, z)
        return out if self.q_in is None else torch.einsum("...ol,il->...oi", out, self.q_in)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.values": self.values}
        if self.q_out is not None:
            out.update({f"{prefix}.q_out": self.q_out, f"{prefix}.q_in": self.q_in})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int]) -> "BlockEigen":
        return cls(tuple(shape), tensors[f"{prefix}.values"], tensors.get(f"{prefix}.q_out"),
                   tensors.get(f"{prefix}.q_in"))


class LoraCurvature:
    """Accumulates the GGN / EF curvature of the LoRA blocks of `sites` over batches (K-FAC or diagonal).

    Args:
        sites: the adapted modules (see :func:`find_lora_sites`).
        structure: "kfac" | "diag".  hessian: "ggn" | "ef".
        low_rank_threshold, low_rank: factors wider than the threshold are kept at rank `low_rank`.
    """

    def __init__(self, sites: list[LoraSite], structure: str = "kfac", hessian: str = "ggn",
                 low_rank_threshold: int = 1024, low_rank: int = 64):
        if structure not in ("kfac", "diag") or hessian not in ("ggn", "ef"):
            raise ValueError(f"laplace.structure/hessian: got {structure!r}/{hessian!r}")
        self.modules = block_modules(sites)
        self.structure, self.hessian = structure, hessian
        self.n_data, self.log_lik = 0, 0.0
        self.shapes = {k: (m.out_features, m.in_features) for k, m in self.modules.items()}
        self.factors: dict[str, tuple[Factor, Factor]] = {}
        self.diag: dict[str, torch.Tensor] = {}
        for key, (out_f, in_f) in self.shapes.items():
            if structure == "kfac":
                self.factors[key] = (Factor(out_f, low_rank_threshold, low_rank),
                                     Factor(in_f, low_rank_threshold, low_rank))
            else:
                self.diag[key] = torch.zeros(out_f, in_f)

    def accumulate(self, logits_fn: LogitsFn, batch: dict) -> None:
        """Add one batch (needs `labels` (B,); `attention_mask` (B, T) marks real tokens when present)."""
        labels = batch["labels"]
        columns = ggn_columns if self.hessian == "ggn" else (lambda f: ef_columns(f, labels))
        mask = batch.get("attention_mask")
        for k, (logits, captured) in enumerate(backprop_columns(logits_fn, batch, self.modules, columns)):
            if k == 0:
                self._count(logits, labels)
            for key, (a, g) in captured.items():
                self._add_block(key, a, g, mask, add_inputs=k == 0)

    def _count(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.n_data += len(labels)
        self.log_lik += -nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="sum").item()

    def _add_block(self, key: str, a: torch.Tensor, g: torch.Tensor, mask, add_inputs: bool) -> None:
        if self.structure == "diag":
            self.diag[key] = self.diag[key].to(a.device) + per_example_grad(*_masked(a, g, mask)).pow(2).sum(0)
            return
        a_bar, g_bar = reduce_tokens(a, g, mask)
        factor_out, factor_in = self.factors[key]
        factor_out.add_(g_bar)
        if add_inputs:
            factor_in.add_(a_bar)

    def sum_(self, all_reduce: AllReduceFn, rank: int = 0, world: int = 1) -> None:
        """Sum factors, diagonals, N and log-likelihood over data-parallel workers (in place)."""
        for factor_out, factor_in in self.factors.values():
            factor_out.sum_(all_reduce, rank, world)
            factor_in.sum_(all_reduce, rank, world)
        for h in self.diag.values():
            all_reduce(h)
        device = next(iter(self.diag.values())).device if self.diag else self.factors_device()
        totals = torch.tensor([float(self.n_data), self.log_lik], dtype=torch.float64, device=device)
        all_reduce(totals)
        self.n_data, self.log_lik = int(round(totals[0].item())), totals[1].item()

    def factors_device(self) -> torch.device:
        factor = next(iter(self.factors.values()))[0]
        return (factor.dense if factor.dense is not None else factor.basis).device

    def eigen(self) -> dict[str, BlockEigen]:
        """Eigen-structure of every block's curvature (K-FAC: A-side eigenvalues divided by N)."""
        if self.n_data == 0:
            raise ValueError("no data was accumulated into the curvature")
        if self.structure == "diag":
            return {k: BlockEigen(self.shapes[k], h.cpu().clone()) for k, h in self.diag.items()}
        out = {}
        for key, (factor_out, factor_in) in self.factors.items():
            val_out, q_out = factor_out.eig()
            val_in, q_in = factor_in.eig()
            out[key] = BlockEigen(self.shapes[key], torch.outer(val_out, val_in / self.n_data), q_out, q_in)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything accumulated, as named tensors (for checkpoints between workers and the driver)."""
        out = {"n_data": torch.tensor([self.n_data], dtype=torch.float64),
               "log_lik": torch.tensor([self.log_lik], dtype=torch.float64)}
        for key, (factor_out, factor_in) in self.factors.items():
            out.update(factor_out.tensors(f"{key}.G"))
            out.update(factor_in.tensors(f"{key}.A"))
        out.update({f"{k}.diag": h.cpu() for k, h in self.diag.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (for a curvature built with the same sites and settings)."""
        self.n_data, self.log_lik = int(tensors["n_data"].item()), float(tensors["log_lik"].item())
        for key, (factor_out, factor_in) in self.factors.items():
            factor_out.load_(tensors[f"{key}.G"])
            factor_in.load_(tensors[f"{key}.A"])
        for key in self.diag:
            self.diag[key] = tensors[f"{key}.diag"].clone()


def _masked(a: torch.Tensor, g: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero padded positions (they carry no gradient; this only guards against stray values)."""
    if a.dim() == 2 or mask is None:
        return a, g
    m = mask.to(a.device, a.dtype)[:, :, None]
    return a * m, g * m
