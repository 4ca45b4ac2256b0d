"""K-FAC / diagonal curvature over LoRA blocks: exactness against laplace-torch, the softmax-Hessian factorisation,
low-rank factors, and summing factors over 2 torch.distributed (gloo) processes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rayblora.posteriors.laplace import glm
from rayblora.posteriors.laplace.kfac import (BlockEigen, Factor, LoraCurvature, block_modules, find_lora_sites,
                                      ggn_columns, per_example_grad)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def lora_mlp(seed: int = 0):
    """A 3-class MLP whose only trainable parameters are PEFT LoRA blocks (random, non-zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(TwoLayer(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.5)
    return model.eval()


def mlp_data(n: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def mlp_curvature(model, x, y, structure="kfac", hessian="ggn", batch=5, threshold=1024, rank=64):
    curv = LoraCurvature(find_lora_sites(model), structure, hessian, threshold, rank)
    for i in range(0, len(y), batch):
        curv.accumulate(lambda b: model(b["x"]), {"x": x[i:i + batch], "labels": y[i:i + batch]})
    return curv


def test_ggn_columns_factorise_the_softmax_hessian():
    logits = torch.randn(4, 5)
    logits[0, 3:] = float("-inf")  # an example with 3 valid choices
    p = torch.softmax(logits, -1)
    cols = ggn_columns(logits)  # (C−1, B, C): one backward pass fewer than classes
    assert cols.shape == (4, 4, 5) and torch.isfinite(cols).all()
    recon = torch.einsum("kbc,kbd->bcd", cols, cols)
    assert torch.allclose(recon, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], atol=1e-6)


@pytest.mark.parametrize("structure,hessian", [("kfac", "ggn"), ("diag", "ggn"), ("kfac", "ef")])
def test_curvature_matches_laplace_torch(structure, hessian):
    """Oracle: the same Kronecker factors / diagonal as laplace-torch (curvlinops backend), 4 batches vs 1."""
    laplace = pytest.importorskip("laplace")
    from torch.utils.data import DataLoader, TensorDataset

    model, (x, y) = lora_mlp(), mlp_data()
    curv = mlp_curvature(model, x, y, structure, hessian)
    backend = laplace.curvature.CurvlinopsEF if hessian == "ef" else laplace.curvature.CurvlinopsGGN
    la = laplace.Laplace(model, "classification", subset_of_weights="all", backend=backend,
                         hessian_structure="kron" if structure == "kfac" else "diag")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=len(y)))
    assert curv.n_data == 20 and math.isclose(curv.log_lik, float(la.log_likelihood), rel_tol=1e-5)
    if structure == "diag":
        mine = torch.cat([h.reshape(-1) for h in curv.diag.values()])
        assert torch.allclose(mine, la.H, rtol=1e-4, atol=1e-6)
        return
    for (key, (g_factor, a_factor)), theirs in zip(curv.factors.items(), la.H_facs.kfacs):
        mine = torch.kron(g_factor.dense, a_factor.dense / curv.n_data)
        assert torch.allclose(mine, torch.kron(theirs[0], theirs[1]), rtol=1e-4, atol=1e-5), key


def test_diagonal_equals_sum_of_squared_per_example_gradients():
    model, (x, y) = lora_mlp(), mlp_data(8)
    curv = mlp_curvature(model, x, y, "diag", "ef", batch=8)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(8):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for (n, p), grad in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            expected[n] += grad ** 2
    for key, h in curv.diag.items():  # parameter names carry PEFT's adapter name, block names do not
        assert torch.allclose(h, expected[f"{key}.default.weight"], rtol=1e-4, atol=1e-7)


def test_reduce_tokens_ignores_padding():
    """Left padding changes neither the K-FAC factors nor the Jacobian (per-example gradients)."""
    a = torch.randn(2, 4, 3)
    g = torch.randn(2, 4, 5)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    g = g * mask[:, :, None]
    full = per_example_grad(a, g)
    assert torch.allclose(full[0], per_example_grad(a[:1, 2:], g[:1, 2:])[0], atol=1e-6)


def test_low_rank_factor_is_exact_for_low_rank_data_and_truncates_otherwise():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 3, generator=g))[0]
    rows = [torch.randn(7, 3, generator=g) @ basis.T for _ in range(5)]  # data in a 3-dim subspace
    dense, low = Factor(40, threshold=1024, rank=8), Factor(40, threshold=16, rank=3)
    for x in rows:
        dense.add_(x)
        low.add_(x)
    assert low.low_rank and low.basis.shape == (40, 3)
    assert torch.allclose(low.basis @ low.basis.T, dense.dense, atol=1e-4)
    full_rank = Factor(40, threshold=16, rank=4)
    for x in [torch.randn(10, 40, generator=g) for _ in range(3)]:
        full_rank.add_(x)
    assert full_rank.basis.shape == (40, 4)  # memory O(d·r), never (d, d)
    vals, vecs = full_rank.eig()
    assert (vals > 0).all() and torch.allclose(vecs.T @ vecs, torch.eye(4), atol=1e-5)


def test_low_rank_functional_variance_equals_explicit_covariance():
    """J Σ Jᵀ from the eigenbases (with the complement of a low-rank factor) equals the dense computation."""
    g = torch.Generator().manual_seed(1)
    q_out = torch.linalg.qr(torch.randn(5, 2, generator=g))[0]
    q_in = torch.linalg.qr(torch.randn(7, 3, generator=g))[0]
    eigen = BlockEigen((5, 7), torch.rand(2, 3, generator=g) * 4, q_out, q_in)
    delta = 0.3
    kron = torch.kron(q_out, q_in)
    precision = kron @ torch.diag(eigen.values.reshape(-1)) @ kron.T + delta * torch.eye(35)
    a, grads = torch.randn(4, 6, 7, generator=g), torch.randn(3, 4, 6, 5, generator=g)  # C=3, B=4, T=6
    jac = torch.stack([per_example_grad(a, grads[c]) for c in range(3)], 1).reshape(4, 3, 35)
    expected = jac @ torch.linalg.inv(precision) @ jac.transpose(1, 2)
    rotated = torch.stack([glm.rotated_grad(eigen, a, grads[c]) for c in range(3)], 1)
    batch = glm.GLMBatch(torch.zeros(4, 3), {"b": glm.BlockJacobians(
        rotated, glm.residual_gram(a, grads.permute(1, 0, 2, 3), rotated))})
    got = glm.functional_covariance(batch, {"b": eigen}, {"b": delta})
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    samples = torch.stack([glm.weight_noise(eigen, torch.randn(5, 7, generator=g), delta).reshape(-1)
                           for _ in range(20000)])
    covariance = torch.linalg.inv(precision)
    error = torch.linalg.norm(samples.T @ samples / len(samples) - covariance) / torch.linalg.norm(covariance)
    assert error < 0.08  # Monte Carlo error of 20 000 draws is ≈ 0.04; a 20 % wrong δ gives ≈ 0.2


def _gloo_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, (x, y) = lora_mlp(), mlp_data(24)
    for structure, threshold in (("kfac", 1024), ("kfac", 4), ("diag", 1024)):
        curv = LoraCurvature(find_lora_sites(model), structure, "ggn", threshold, low_rank=16)
        for i in range(rank * 4, 24, world * 4):
            curv.accumulate(lambda b: model(b["x"]), {"x": x[i:i + 4], "labels": y[i:i + 4]})
        curv.sum_(dist.all_reduce, rank, world)
        if rank == 0:
            results[f"{structure}-{threshold}"] = {k: v.clone() for k, v in curv.state_tensors().items()}
    dist.destroy_process_group()


def test_factors_summed_over_two_gloo_workers_equal_one_worker(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    model, (x, y) = lora_mlp(), mlp_data(24)
    for structure, threshold in (("kfac", 1024), ("kfac", 4), ("diag", 1024)):
        single = mlp_curvature(model, x, y, structure, batch=4, threshold=threshold, rank=16)
        summed = LoraCurvature(find_lora_sites(model), structure, "ggn", threshold, 16)
        summed.load_state_tensors(dict(results[f"{structure}-{threshold}"]))
        assert summed.n_data == 24 and math.isclose(summed.log_lik, single.log_lik, rel_tol=1e-6)
        for key, e_single in single.eigen().items():
            e_summed = summed.eigen()[key]
            assert torch.allclose(e_summed.values, e_single.values, rtol=1e-4, atol=1e-5), (structure, key)
            if e_single.q_out is not None:  # the same curvature block, whatever the eigenvector signs
                _same_kron(e_single, e_summed)


def _same_kron(a: BlockEigen, b: BlockEigen) -> None:
    def dense(e: BlockEigen) -> torch.Tensor:
        kron = torch.kron(e.q_out, e.q_in)
        return kron @ torch.diag(e.values.reshape(-1)) @ kron.T

    assert torch.allclose(dense(a), dense(b), rtol=1e-4, atol=1e-4)


def test_last_layer_subset_and_block_names():
    model = lora_mlp()
    sites = find_lora_sites(model, "last_layer")
    assert [s.name for s in sites] == ["base_model.model.fc2"]
    assert list(block_modules(sites)) == ["base_model.model.fc2.lora_A", "base_model.model.fc2.lora_B"]
    with pytest.raises(ValueError, match="subset"):
        find_lora_sites(model, "first")
    with pytest.raises(ValueError, match="no LoRA"):
        find_lora_sites(TwoLayer())
