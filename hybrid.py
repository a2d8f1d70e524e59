"""Hybrid Mamba + attention models for MQAR, and the pure-Mamba baseline.

The hypothesis this repository tests: a Mamba decoder must squeeze every key-value pair through its
fixed-size state, so recall collapses once the pairs outnumber what the state holds; giving some
decoder layers cross-attention to the encoder's output lets them read the pairs back instead of
remembering them. The models:

  Seq2Seq  Encoder: bidirectional Mamba layers, self-attention after layers N/2 and N-1.
           Decoder (--decoder hybrid): causal Mamba layers; the layers listed in `--hybrid` also
           cross-attend to the encoder's output.
           Decoder (--decoder polar): the seeds' Polar-Mem-Mamba, which attacks three ways of
           forgetting at once: polarized channels against state decay (polar.py), a cross-layer
           memory pool (mempool.py), and gated shortcut attention at the `--hybrid` layers
           against a query that lost its token. `--no-polar`, `--mem-pool-size 0` and `--no-gsa`
           switch them off one at a time; all three off is the hybrid decoder.
  MambaLM  decoder_only: the pairs and the queries in one sequence through causal Mamba layers.

Shape letters: B batch, S encoder length, L decoder length, D d_model, H heads, P head dim, V vocab.
"""
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mqar import VOCAB_SIZE
from mempool import MemoryRead, MemoryWrite, Pool, empty_pool
from polar import PolarizedMamba
from ssm import EXPAND, HEADDIM, Impl, Residual, make_mixer, mamba_block


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256
    """model width D (a multiple of 32 for mamba2, whose heads are 64 wide and E = 2 D)"""
    d_state: int = 64
    """SSM state size N per channel (mamba1) or per head (mamba2)"""
    ssm: Literal["mamba1", "mamba2"] = "mamba1"
    """mamba1: selective scan, A per channel and state; mamba2: SSD, scalar A per head (on the default
    model, mamba1 reached 95% at 128 pairs within 400 steps at lr 1e-3 and 2e-3; mamba2 only at lr 5e-4
    with the out_proj rescaling of `init_weights`, and not within 3,000 steps at 1e-3 or 2e-3: README)"""
    encoder_layers: int = 4
    """bidirectional Mamba layers in the encoder (seq2seq only)"""
    decoder_layers: int = 4
    """causal Mamba layers in the decoder (the whole model in decoder_only mode)"""
    hybrid: str = "0,2"
    """comma-separated decoder layers that also cross-attend to the encoder; '' = pure Mamba decoder (seq2seq only)"""
    head_dim: int = 64
    """attention head width P (heads = d_model / P): 64 gives one head at the CPU quick start's d_model 64, four at 256"""
    decoder: Literal["hybrid", "polar"] = "hybrid"
    """hybrid: Mamba layers, cross-attention at --hybrid; polar: Polar-Mem-Mamba (polarized channels, memory pool, gated shortcut attention at --hybrid)"""
    polar: bool = True
    """polar decoder: polarized A=0 / A=1 channels beside each Mamba mixer (polar.py)"""
    gsa: bool = True
    """polar decoder: gated shortcut attention (the query also sees the decoder's input embeddings)"""
    mem_pool_size: int = 50
    """polar decoder: memory pool slots (mempool.py); 0 = no pool"""
    mem_summary_dim: int = 64
    """polar decoder: numbers per pool entry"""
    mem_update_freq: int = 4
    """polar decoder: layers 0, f, 2f, ... write to the pool (every layer reads)"""
    dropout: float = 0.1
    """dropout on every residual branch"""
    impl: Impl = "auto"
    """SSM execution path: kernel (mamba-ssm, CUDA), reference (pure PyTorch), auto (kernel when it can run)"""
    vocab_size: int = VOCAB_SIZE
    """vocabulary size V (the task fixes it)"""

    def hybrid_layers(self) -> tuple[int, ...]:
        """`--hybrid` as layer indices, checked against `--decoder-layers`."""
        try:
            layers = tuple(int(s) for s in self.hybrid.split(",")) if self.hybrid.strip() else ()
        except ValueError:
            raise ValueError(f"--hybrid must be comma-separated layer indices like 0,2 (or '' for none), "
                             f"got {self.hybrid!r}") from None
        bad = [i for i in layers if not 0 <= i < self.decoder_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"--hybrid must list distinct decoder layers in [0, --decoder-layers - 1 = "
                             f"{self.decoder_layers - 1}], got {self.hybrid!r}")
        return tuple(sorted(layers))

    def validate(self) -> None:
        for flag, value in [("--d-model", self.d_model), ("--d-state", self.d_state),
                            ("--encoder-layers", self.encoder_layers), ("--decoder-layers", self.decoder_layers),
                            ("--head-dim", self.head_dim), ("--mem-summary-dim", self.mem_summary_dim),
                            ("--mem-update-freq", self.mem_update_freq)]:
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.ssm == "mamba2" and EXPAND * self.d_model % HEADDIM:
            raise ValueError(f"--d-model must be a multiple of {HEADDIM // EXPAND} with --ssm mamba2 "
                             f"(its heads are {HEADDIM} wide), got {self.d_model}")
        if self.d_model % self.head_dim:
            raise ValueError(f"--d-model ({self.d_model}) must be a multiple of --head-dim ({self.head_dim})")
        if self.mem_pool_size < 0:
            raise ValueError(f"--mem-pool-size must be >= 0 (0 = no pool), got {self.mem_pool_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        self.hybrid_layers()

    # The three Polar-Mem-Mamba mechanisms, each on only in the polar decoder.
    @property
    def use_polar(self) -> bool:
        return self.decoder == "polar" and self.polar

    @property
    def use_gsa(self) -> bool:
        return self.decoder == "polar" and self.gsa

    @property
    def pool_size(self) -> int:
        return self.mem_pool_size if self.decoder == "polar" else 0


@functools.cache
def flash_attn_func():
    """flash-attn's kernel where it is installed; otherwise SDPA, which has flash kernels of its own."""
    try:
        from flash_attn import flash_attn_func as fn
    except Exception:
        return None
    return fn


class Attention(nn.Module):
    """Multi-head attention from x to a context: cross-attention when the context is the encoder's
    output, self-attention when it is x. No mask: the context is always fully visible (the encoder
    is bidirectional; decoder positions attend only to the encoder), so causality is untouched.

    Queries and keys are RMS-normalized per head, with learned gains (QK-norm: Henry et al. 2020;
    Dehghani et al. 2023; the seeds' cosine cross-attention). A logit is then sqrt(P) times a cosine
    (times the gains), so recall can pick one key out of hundreds from the first steps, while with
    raw projections the logits start near zero, attention is uniform, and the key match has to
    emerge from a flat average. Measured on the README's CPU quick start (8 pairs, 600 steps, one
    64-wide head): held-out accuracy 3.9% without, 73.0% with."""

    def __init__(self, d_model: int, head_dim: int, d_query: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim = d_model // head_dim, head_dim
        self.flash = flash_attn_func()
        self.q_proj = nn.Linear(d_query or d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-5)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-5)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, context):  # (B, L, D), (B, S, D) -> (B, L, D)
        return self.attend(self.q_proj(x), context)

    def attend(self, q, context):  # (B, L, D), (B, S, D) -> (B, L, D)
        B, L, D = q.shape
        H, P = self.n_heads, self.head_dim
        k, v = self.kv_proj(context).view(B, context.shape[1], 2, H, P).unbind(2)  # (B, S, H, P) each
        q, k = self.q_norm(q.view(B, L, H, P)).to(v.dtype), self.k_norm(k).to(v.dtype)  # autocast keeps norms fp32
        if self.flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = self.flash(q, k, v)  # (B, L, H, P)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            y = y.transpose(1, 2)  # (B, H, L, P) -> (B, L, H, P)
        return self.out_proj(y.reshape(B, L, D))


class GatedShortcutAttention(Attention):
    """Cross-attention whose query also sees the decoder's input embeddings x0 (the seeds' GSA).

    A query token's identity is what cross-attention must match against the encoder's keys, and by
    a deeper layer the Mamba stack may have smeared it across positions. The shortcut hands the
    query projection the raw token again, through a learned gate g that decides, per channel and
    position, how much of it to mix in:
        g = sigmoid(W_g [x; x0])        q = W_q [x; g * x0]"""

    def __init__(self, d_model: int, head_dim: int):
        super().__init__(d_model, head_dim, d_query=2 * d_model)
        self.init_norm = nn.RMSNorm(d_model, eps=1e-5)  # x0 enters at the scale of the normed x
        self.gate = nn.Linear(2 * d_model, d_model)

    def forward(self, x, context, x0):  # (B, L, D), (B, S, D), (B, L, D) -> (B, L, D)
        x0 = self.init_norm(x0)
        g = torch.sigmoid(self.gate(torch.cat([x, x0], dim=-1)))  # (B, L, D)
        return self.attend(self.q_proj(torch.cat([x, g * x0], dim=-1)), context)


class DecoderLayer(nn.Module):
    """One decoder layer: Mamba (polarized in the polar decoder), then a memory-pool read (polar
    decoder), then, at the `--hybrid` layers, cross-attention to the encoder's output.

    Mamba runs before the cross-attention so that at layer 0 the query is built from the query
    token *and* what the causal scan has gathered, instead of attending "blind" from a bare
    embedding (the seeds' Blind Start argument)."""

    def __init__(self, cfg: ModelConfig, index: int, cross: bool):
        super().__init__()
        mixer = (PolarizedMamba(cfg.ssm, cfg.d_model, cfg.d_state, cfg.impl) if cfg.use_polar else
                 make_mixer(cfg.ssm, cfg.d_model, cfg.d_state, cfg.impl))
        self.mamba = Residual(cfg.d_model, mixer, cfg.dropout)
        self.write = (MemoryWrite(cfg.d_model, cfg.mem_summary_dim, cfg.pool_size)
                      if cfg.pool_size and index % cfg.mem_update_freq == 0 else None)
        self.read = (Residual(cfg.d_model, MemoryRead(cfg.d_model, cfg.mem_summary_dim, cfg.pool_size), cfg.dropout)
                     if cfg.pool_size else None)
        attention = GatedShortcutAttention if cfg.use_gsa else Attention
        self.cross = Residual(cfg.d_model, attention(cfg.d_model, cfg.head_dim), cfg.dropout) if cross else None
        self.shortcut = cfg.use_gsa

    def forward(self, x, memory, x0, pool: Pool | None):
        """x (B, L, D), memory (B, S, D) encoder output, x0 (B, L, D) the decoder's input
        embeddings -> (B, L, D) and the pool with this layer's writes."""
        x = self.mamba(x)
        if self.write is not None:
            pool = self.write(x, pool)
        if self.read is not None:
            x = self.read(x, pool)
        if self.cross is not None:
            x = self.cross(x, memory, x0) if self.shortcut else self.cross(x, memory)
        return x, pool


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.encoder_layers
        self.attn_after = sorted({n // 2, n - 1})
        self.layers = nn.ModuleList(
            mamba_block(cfg.ssm, cfg.d_model, cfg.d_state, cfg.impl, cfg.dropout, bidirectional=True)
            for _ in range(n))
        self.attn = nn.ModuleDict({
            str(i): Residual(cfg.d_model, Attention(cfg.d_model, cfg.head_dim), cfg.dropout)
            for i in self.attn_after})
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)

    def forward(self, x):  # (B, S, D) -> (B, S, D)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.attn_after:
                x = self.attn[str(i)](x, x)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hybrid = cfg.hybrid_layers()
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, cross=i in hybrid) for i in range(cfg.decoder_layers))
        self.summary_dim = cfg.mem_summary_dim if cfg.pool_size else None
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)

    def forward(self, x, memory=None):  # (B, L, D), (B, S, D) -> (B, L, D)
        x0 = x
        pool = empty_pool(x, self.summary_dim) if self.summary_dim else None
        for layer in self.layers:
            x, pool = layer(x, memory, x0, pool)
        return self.norm(x)


class LanguageModel(nn.Module):
    """Token embedding in, tied logits out; what sits between is the subclass's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def init_weights(self, n_layers: int):
        """Mamba's LM init (mamba-ssm `mixer_seq_simple._init_weights`): Linear biases zero except
        dt_proj's (marked `_no_reinit`); A_log, D, dt_bias and the conv keep their mixer's init.

        Every residual branch's `out_proj` is divided by sqrt(2 n_layers), mamba-ssm's
        `rescale_prenorm_residual` (after GPT-2) with two branches per layer (Mamba, and attention or
        the memory read), so the residual stream does not grow with depth at init. On the default
        model (d_model 256, 4 + 4 layers) it took Mamba2 at lr 5e-4 from no key match in 4,000
        steps to 95% at 128 pairs in 600, and Mamba1 from 4.0% to 82.8% at step 200 (README).

        One change: embeddings N(0, 1/D) instead of N(0, 0.02). The head is tied and sees a
        unit-RMS hidden state, so this starts the logits at unit variance; with 0.02 they start at
        std 0.16 and the copy of a value token into the output learns far slower (measured on the
        README's tiny run: 1.0% vs 5.8% held-out accuracy after 600 steps)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=self.cfg.d_model ** -0.5)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                p.data.div_(math.sqrt(2 * n_layers))

    def logits(self, h, last: int | None = None):  # (B, L, D) -> (B, L, V), or (B, last, V)
        """The output projection, tied to the embedding, on every position or on the last `last` only.
        A task scores few positions (MQAR's decoder-only queries are the last M of 3N+2+M), and at
        V = 8192 the head is over half a pure-Mamba model's matmul FLOPs per position (2.1M of its
        3.7-4.0M weights) and its (B, L, V) logits the largest tensor of a training step: so training
        and evaluation run it only where labels are (`mqar.Batch`)."""
        return (h if last is None else h[:, -last:]) @ self.embed.weight.T


class Seq2Seq(LanguageModel):
    """model(src, tgt): src (B, S) pairs, tgt (B, L) queries -> logits (B, L, V);
    model(src, tgt, last=K) -> the last K positions' logits (B, K, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.init_weights(cfg.encoder_layers + cfg.decoder_layers)

    def forward(self, src, tgt, last: int | None = None):
        memory = self.encoder(self.dropout(self.embed(src)))  # (B, S, D)
        return self.logits(self.decoder(self.dropout(self.embed(tgt)), memory), last)  # (B, L or last, V)


class MambaLM(LanguageModel):
    """model(tokens): tokens (B, L) -> logits (B, L, V); causal, pure Mamba.
    model(tokens, last=K) -> the last K positions' logits (B, K, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decoder = Decoder(dataclasses.replace(cfg, hybrid=""))
        self.init_weights(cfg.decoder_layers)

    def forward(self, tokens, last: int | None = None):
        return self.logits(self.decoder(self.dropout(self.embed(tokens))), last)  # (B, L or last, V)


def build_model(cfg: ModelConfig, mode: Literal["seq2seq", "decoder_only"] = "seq2seq",
                device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LanguageModel:
    """The model for `mode` with its parameters on `device` in `dtype`. From Python, as the seeds'
    API: `build_model(ModelConfig(decoder="polar"), device="cuda")(src_ids, tgt_ids)` -> logits."""
    cfg.validate()
    model = Seq2Seq(cfg) if mode == "seq2seq" else MambaLM(cfg)
    return model.to(device=device, dtype=dtype)
