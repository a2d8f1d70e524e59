"""Hybrid Mamba + attention models for MQAR, and the pure-Mamba baseline.

The hypothesis this repository tests: a Mamba decoder must squeeze every key-value pair through its
fixed-size state, so recall collapses once the pairs outnumber what the state holds; giving some
decoder layers cross-attention to the encoder's output lets them read the pairs back instead of
remembering them. The models:

  Seq2Seq  Encoder: bidirectional Mamba layers, self-attention after layers N/2 and N-1.
           Decoder: causal Mamba layers; the layers listed in `--hybrid` are HybridBlocks.
  MambaLM  decoder_only: the pairs and the queries in one sequence through causal Mamba layers.

HybridBlock runs its Mamba layer first and cross-attends after: at layer 0 the attention query is
then built from the query token *and* what the causal scan has gathered, instead of attending
"blind" from a bare embedding (the seeds' Blind Start argument).

Shape letters: B batch, S encoder length, L decoder length, D d_model, H heads, P head dim, V vocab.
"""
import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mqar import VOCAB_SIZE
from ssm import HEADDIM, EXPAND, Impl, Residual, mamba_block


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256
    """model width D (a multiple of 32 for mamba2, whose heads are 64 wide and E = 2 D)"""
    d_state: int = 64
    """SSM state size N per channel (mamba1) or per head (mamba2)"""
    ssm: Literal["mamba2", "mamba1"] = "mamba2"
    """mamba2: SSD, scalar A per head; mamba1: selective scan, A per channel and state"""
    encoder_layers: int = 4
    """bidirectional Mamba layers in the encoder (seq2seq only)"""
    decoder_layers: int = 4
    """causal Mamba layers in the decoder (the whole model in decoder_only mode)"""
    hybrid: str = "0,2"
    """comma-separated decoder layers that also cross-attend to the encoder; '' = pure Mamba decoder (seq2seq only)"""
    n_heads: int = 4
    """attention heads"""
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
                            ("--n-heads", self.n_heads)]:
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.ssm == "mamba2" and EXPAND * self.d_model % HEADDIM:
            raise ValueError(f"--d-model must be a multiple of {HEADDIM // EXPAND} with --ssm mamba2 "
                             f"(its heads are {HEADDIM} wide), got {self.d_model}")
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model ({self.d_model}) must be divisible by --n-heads ({self.n_heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        self.hybrid_layers()


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
    is bidirectional; decoder positions attend only to the encoder), so causality is untouched."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.flash = flash_attn_func()
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, context):  # (B, L, D), (B, S, D) -> (B, L, D)
        B, L, D = x.shape
        H, P = self.n_heads, D // self.n_heads
        q = self.q_proj(x).view(B, L, H, P)
        k, v = self.kv_proj(context).view(B, context.shape[1], 2, H, P).unbind(2)  # (B, S, H, P) each
        if self.flash is not None and x.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = self.flash(q, k, v)  # (B, L, H, P)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            y = y.transpose(1, 2)  # (B, H, L, P) -> (B, L, H, P)
        return self.out_proj(y.reshape(B, L, D))


class HybridBlock(nn.Module):
    """Mamba first (a contextual query), then cross-attention to the encoder's output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mamba = mamba_block(cfg.ssm, cfg.d_model, cfg.d_state, cfg.impl, cfg.dropout)
        self.cross = Residual(cfg.d_model, Attention(cfg.d_model, cfg.n_heads), cfg.dropout)

    def forward(self, x, memory):  # (B, L, D), (B, S, D) -> (B, L, D)
        return self.cross(self.mamba(x), memory)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.encoder_layers
        self.attn_after = sorted({n // 2, n - 1})
        self.layers = nn.ModuleList(
            mamba_block(cfg.ssm, cfg.d_model, cfg.d_state, cfg.impl, cfg.dropout, bidirectional=True)
            for _ in range(n))
        self.attn = nn.ModuleDict({
            str(i): Residual(cfg.d_model, Attention(cfg.d_model, cfg.n_heads), cfg.dropout)
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
        self.hybrid = cfg.hybrid_layers()
        self.layers = nn.ModuleList(
            HybridBlock(cfg) if i in self.hybrid else
            mamba_block(cfg.ssm, cfg.d_model, cfg.d_state, cfg.impl, cfg.dropout)
            for i in range(cfg.decoder_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)

    def forward(self, x, memory=None):  # (B, L, D), (B, S, D) -> (B, L, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, memory) if i in self.hybrid else layer(x)
        return self.norm(x)


class LanguageModel(nn.Module):
    """Token embedding in, tied logits out; what sits between is the subclass's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def init_weights(self):
        """Mamba's LM init (mamba-ssm `mixer_seq_simple._init_weights`): Linear biases zero except
        dt_proj's (marked `_no_reinit`); A_log, D, dt_bias and the conv keep their mixer's init.

        One change: embeddings N(0, 1/D) instead of N(0, 0.02). The head is tied and sees a
        unit-RMS hidden state, so this starts the logits at unit variance; with 0.02 they start at
        std 0.16 and the copy of a value token into the output learns far slower (measured on the
        README's tiny run: 1.0% vs 5.8% held-out accuracy after 600 steps)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=self.cfg.d_model ** -0.5)

    def logits(self, h):  # (B, L, D) -> (B, L, V), output projection tied to the embedding
        return h @ self.embed.weight.T


class Seq2Seq(LanguageModel):
    """model(src, tgt): src (B, S) pairs, tgt (B, L) queries -> logits (B, L, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.init_weights()

    def forward(self, src, tgt):
        memory = self.encoder(self.dropout(self.embed(src)))  # (B, S, D)
        return self.logits(self.decoder(self.dropout(self.embed(tgt)), memory))  # (B, L, V)


class MambaLM(LanguageModel):
    """model(tokens): tokens (B, L) -> logits (B, L, V); causal, pure Mamba."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decoder = Decoder(dataclasses.replace(cfg, hybrid=""))
        self.init_weights()

    def forward(self, tokens):
        return self.logits(self.decoder(self.dropout(self.embed(tokens))))


def build_model(cfg: ModelConfig, mode: Literal["seq2seq", "decoder_only"]) -> LanguageModel:
    return Seq2Seq(cfg) if mode == "seq2seq" else MambaLM(cfg)
