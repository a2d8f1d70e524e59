"""A cross-layer memory pool with learned write, read and replacement gates.

A Mamba layer forgets through its state's decay, and what one layer computed reaches a later layer
only through the residual stream. The pool (after MemMamba's note-taking memory, and the seeds'
Polar-Mem-Mamba) gives the decoder a second channel: some layers write compact summaries of tokens
into a pool of `--mem-pool-size` slots, and every layer reads from it by attention.

  write    every `--mem-update-freq`-th layer scores each token (score_proj, a learned write gate)
           and summarizes it to `--mem-summary-dim` numbers. The score is the entry's priority.
  replace  a full pool keeps the entries of highest priority: a new entry evicts the lowest one
           when it outranks it. Priorities are learned; there is no threshold anywhere.
  read     a token attends over the pool; the entry's priority is added to its attention logit, and
           a learned gate sigmoid(out_gate(x)) decides per channel how much of the read to let in.

Causality. In a decoder, what position t reads may depend on positions <= t only. Eviction makes
this subtle: an entry written from position 2 could be evicted by one written from position 9, and
a read at position 5 must not notice. So each position has its own view of the pool: the pool that
streaming writes in position order would hold once position t had written, which is the
`pool_size` highest-priority entries among those written from positions <= t (evict-the-minimum
over a stream keeps exactly the top entries of everything seen). We keep every entry ever written
(C of them) and apply that rule as an attention mask; that costs O(L C) per read, small next to
the decoder itself.

Gradients. Top-k selection has no gradient, so a priority used only to pick entries would never
learn. Adding it to the attention logit makes the read depend smoothly on it (an entry's weight is
proportional to exp(priority)), and the hard top-k becomes a truncation of that soft read. The
summaries learn through the attention values and keys as usual.

Shape letters: B batch, L sequence length, D d_model, K summary dim, C entries written so far.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Pool(NamedTuple):
    """Every entry written so far, in the order written, and the read mask they give."""
    summaries: torch.Tensor  # (B, C, K)
    priority: torch.Tensor  # (B, C)
    pos: torch.Tensor  # (C,) the position each entry was written from
    bias: torch.Tensor | None = None  # (B, L, C) read_bias, made once per write for every read after it

    def append(self, summaries, priority):  # (B, L, K), (B, L) -> Pool
        pos = torch.arange(summaries.shape[1], device=summaries.device)
        return Pool(torch.cat([self.summaries, summaries], 1), torch.cat([self.priority, priority], 1),
                    torch.cat([self.pos, pos]))

    def read_bias(self, L: int, pool_size: int):  # -> (B, L, C)
        """The additive attention mask of a read at positions 0..L-1: an entry's priority where it
        is in that position's pool (written from <= t, and among the pool_size highest), else -inf."""
        B, C = self.priority.shape
        visible = self.pos[None, :] <= torch.arange(L, device=self.pos.device)[:, None]  # (L, C)
        bias = self.priority[:, None, :].masked_fill(~visible, float("-inf"))  # (B, L, C)
        top = bias.topk(min(pool_size, C), dim=-1).indices  # (B, L, pool_size)
        kept = torch.zeros_like(bias, dtype=torch.bool).scatter_(-1, top, True) & visible
        return bias.masked_fill(~kept, float("-inf"))


def empty_pool(x, summary_dim: int) -> Pool:  # x (B, L, D) gives batch, device and dtype
    B = x.shape[0]
    return Pool(x.new_zeros(B, 0, summary_dim), x.new_zeros(B, 0), torch.zeros(0, dtype=torch.long, device=x.device))


class MemoryWrite(nn.Module):
    """The write gate: scores every token (its priority) and summarizes it into the pool."""

    def __init__(self, d_model: int, summary_dim: int, pool_size: int):
        super().__init__()
        self.pool_size = pool_size
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.score_proj = nn.Linear(d_model, 1, bias=False)  # a bias would shift every priority alike: a no-op
        self.summarize = nn.Linear(d_model, summary_dim, bias=False)

    def forward(self, x, pool: Pool) -> Pool:  # x (B, L, D)
        h = self.norm(x)
        pool = pool.append(self.summarize(h), self.score_proj(h).squeeze(-1).float())  # (B, L, K), (B, L)
        return pool._replace(bias=pool.read_bias(x.shape[1], self.pool_size))


class MemoryRead(nn.Module):
    """The read: attention from each token to its pool, through a learned output gate."""

    def __init__(self, d_model: int, summary_dim: int, pool_size: int):
        super().__init__()
        self.pool_size = pool_size
        self.q_proj = nn.Linear(d_model, summary_dim, bias=False)
        self.k_proj = nn.Linear(summary_dim, summary_dim, bias=False)
        self.v_proj = nn.Linear(summary_dim, d_model, bias=False)
        self.out_gate = nn.Linear(d_model, d_model)

    def forward(self, x, pool: Pool):  # (B, L, D) -> (B, L, D)
        q = self.q_proj(x)[:, None]  # (B, 1, L, K): one head
        bias = pool.bias.to(q.dtype)  # (B, L, C)
        k, v = self.k_proj(pool.summaries)[:, None], self.v_proj(pool.summaries)[:, None]  # (B, 1, C, K|D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None])[:, 0]  # (B, L, D)
        return torch.sigmoid(self.out_gate(x)) * y
