"""Polarized channels: a Mamba mixer fused with one memoryless and one never-forgetting path.

Wang et al., "Understanding and Mitigating Bottlenecks of State Space Models through the Lens of
Recency and Over-smoothing" (ICLR 2025, arXiv:2501.00658): a selective SSM's transition exp(dt * A)
lies in (0, 1), so a token's influence decays with distance (recency, their Thm 3.1), while deep
stacks blur neighbouring positions together (over-smoothing). Their remedy, polarization, reserves
state channels whose transition is pinned to the two ends of that interval:

    A = 0   h_t = B x_t                 sees the current token only: nothing to smooth over
    A = 1   h_t = h_{t-1} + B x_t       a running sum: nothing ever decays

The paper pins channels inside the SSM; the seeds' block (used here) runs the two as separate
projections beside the mixer and fuses all three:

    y = fusion([mixer(x), zero_proj(x), running_mean(one_proj(x))])

Every path is causal, so the block is. The Mamba mixer keeps both execution paths (reference and
kernel); the two fixed-transition paths are plain PyTorch on either.

Shape letters: B batch, L sequence length, D d_model.
"""
import torch
import torch.nn as nn

from ssm import Impl, make_mixer


def running_mean(u):  # (B, L, D) -> (B, L, D)
    """The A = 1 path, scaled by 1/t.

    The raw running sum grows with t (linearly for a component with nonzero mean), so its scale
    would depend on the sequence length: a model trained at one --num-pairs would meet other
    magnitudes when eval.py sweeps others, and the fusion weights would have to undo a ramp. Dividing
    by t keeps it O(1) at every length while still weighting every past token equally, which is the
    point of A = 1 (no recency). The sum runs in fp32: in bf16 it would lose the early tokens."""
    t = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=torch.float32)
    return (u.float().cumsum(dim=1) / t[:, None]).to(u.dtype)


class PolarizedMamba(nn.Module):
    """A Mamba mixer plus an A = 0 and an A = 1 path, fused by one linear map."""

    def __init__(self, ssm, d_model: int, d_state: int, impl: Impl):
        super().__init__()
        self.mixer = make_mixer(ssm, d_model, d_state, impl)
        self.zero_proj = nn.Linear(d_model, d_model, bias=False)  # A = 0
        self.one_proj = nn.Linear(d_model, d_model, bias=False)  # A = 1
        self.fusion = nn.Linear(3 * d_model, d_model, bias=False)

    def forward(self, x):  # (B, L, D) -> (B, L, D)
        paths = [self.mixer(x), self.zero_proj(x), running_mean(self.one_proj(x))]  # 3 x (B, L, D)
        return self.fusion(torch.cat(paths, dim=-1))
