"""One-class neural network (OC-NN, Chalapathy et al. 2018; seed 004) on frozen latent codes.

A small network y(z) = w^T g(V z) on the encoder's latent codes z = E(x) (standardised by
the training codes' mean and std), trained with the OC-NN objective

    1/2 ||w||^2 + 1/2 ||V||_F^2 + (1 / nu) * mean(max(0, r - y(z))) - r

where r is not learned by gradient: after every update it is set to the nu-quantile of
y over the training codes (the closed-form optimum for fixed w, V), so that a share nu of
the training normals lies outside the boundary. The anomaly score is r - y(z): positive
outside the boundary. The encoder is frozen (the codes are computed once, detached).

What it can and cannot do: the objective is a one-class SVM on learned features g(V z),
i.e. a hyperplane separating the training codes from the origin of the hidden space.
The weight penalty shrinks V towards small values, where g is nearly linear, so in
practice the boundary is close to a hyperplane in z: codes beyond the training codes
on one side score high, codes equally far on the other side do not. That is why it is an
*extra* score beside the GAN's, not a replacement (benchmarks/ocnn_mnist.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class OCNN(nn.Module):
    # Buffers, declared for type checkers (nn.Module's __getattr__ types them Tensor | Module).
    mean: torch.Tensor  # (in_dim,) of the training codes
    std: torch.Tensor  # (in_dim,)
    r: torch.Tensor  # () the boundary

    def __init__(self, in_dim: int, hidden: int = 32, nu: float = 0.1) -> None:
        super().__init__()
        self.nu = nu
        self.V = nn.Linear(in_dim, hidden, bias=False)  # (hidden, in_dim)
        self.w = nn.Linear(hidden, 1, bias=False)  # (1, hidden)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.register_buffer("r", torch.tensor(0.0))

    def output(self, z: torch.Tensor) -> torch.Tensor:
        """y(z) (N,) for latent codes z (N, in_dim)."""
        h = torch.sigmoid(self.V((z - self.mean) / self.std))  # (N, hidden)
        return self.w(h).squeeze(1)

    def score(self, z: torch.Tensor) -> torch.Tensor:
        """r - y(z) (N,): above 0 outside the learned boundary."""
        return self.r - self.output(z)


def ocnn_loss(model: OCNN, y: torch.Tensor, r: torch.Tensor, nu: float) -> torch.Tensor:
    """The OC-NN objective for outputs y (N,) and the current r."""
    reg = 0.5 * model.w.weight.pow(2).sum() + 0.5 * model.V.weight.pow(2).sum()
    return reg + (1.0 / nu) * torch.relu(r - y).mean() - r


@dataclass
class OCNNFit:
    model: OCNN
    losses: list[float]  # objective after each update (with the updated r)
    outside: float  # share of the training codes with score > 0 at the end (about nu)


def fit_ocnn(
    z: torch.Tensor, nu: float = 0.1, hidden: int = 32, steps: int = 1000, lr: float = 1e-3, seed: int = 0
) -> OCNNFit:
    """Train an OC-NN on frozen latent codes z (N, in_dim)."""
    if not 0.0 < nu < 1.0:
        raise ValueError(f"nu must be in (0, 1), got {nu}")
    z = z.detach().float()
    torch.manual_seed(seed)
    model = OCNN(z.shape[1], hidden, nu)
    model.mean.copy_(z.mean(0))
    model.std.copy_(z.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(list(model.V.parameters()) + list(model.w.parameters()), lr=lr)
    with torch.no_grad():
        model.r.fill_(torch.quantile(model.output(z), nu))
    losses = []
    for _ in range(steps):
        y = model.output(z)
        loss = ocnn_loss(model, y, model.r, nu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            y = model.output(z)
            model.r.fill_(torch.quantile(y, nu))
            losses.append(float(ocnn_loss(model, y, model.r, nu)))
    with torch.no_grad():
        outside = float((model.score(z) > 0).float().mean())
    return OCNNFit(model=model.eval(), losses=losses, outside=outside)
