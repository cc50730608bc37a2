"""NT-Xent (normalised temperature-scaled cross-entropy) over two views, as one 2N x 2N product."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(r1: torch.Tensor, r2: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over the 2N views of -log(exp(s_i,p(i)/tau) / sum_{k != i} exp(s_ik/tau)).

    r1, r2: (N, D) representations of the two views of the same N samples; row i of r1
    and row i of r2 are positives, every other row of either view is a negative.
    """
    n = r1.shape[0]
    z = F.normalize(torch.cat([r1, r2], dim=0), dim=-1)  # (2N, D)
    sim = z @ z.T / tau  # (2N, 2N)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))  # k != i
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,) p(i)
    return F.cross_entropy(sim, positive)
