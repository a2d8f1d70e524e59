"""The composite-function task: Mamba's Achilles' heel, after Chen, Lin, Wang & Xu, "Achilles' Heel
of Mamba: Essential difficulties of the Mamba architecture demonstrated by synthetic data"
(NeurIPS 2025, arXiv:2509.17514; task from Zhang et al., "Anchor function", 2024).

Each sequence has 8 tokens over a vocabulary of 100. Somewhere in it sits a key (a token in
[20, 100)) followed by two anchors a, b in {1, 2, 3, 4}; every other token is noise from the key
range, so that pair is the only pair of anchors. Each anchor is a shift,
    g(x; 1) = x + 5    g(x; 2) = x + 1    g(x; 3) = x - 2    g(x; 4) = x - 8    (mod 100)
and the label of (key, a, b) is the composition g(g(key; a); b), with one exception: the pair
(3, 4) is labelled key - 6 instead of its composition key - 10. The pair (4, 3) never appears in
training. Asked about it, a model can answer
    composite  g(g(key; 4); 3) = key - 10   (it learned the anchors' functions and composes them)
    symmetric  key - 6                      (it reads (4, 3) as the same pair as (3, 4))
The paper finds that Mamba prefers the composite answer where a Transformer can find the symmetric
one, and traces it to the short convolution before the SSM, which fuses neighbouring tokens in an
order-dependent way. With the kernel fixed to ones (`--ones-conv`) that fusion is symmetric.

Splits (the paper's appendix C): position p of the key is in [0, 5] (the anchors follow it). In
training the key's residue mod 8 is never its position; in the test sets it always is, so no test
sequence is a training sequence even for the trained pairs.
  train     the 15 pairs other than (4, 3)       --num-train examples (the paper: 300,000)
  test      the same 15 pairs                    --num-test examples: has the task been learned?
  held_out  the pair (4, 3)                      --num-test examples (the paper: 1,800)
Where the seeds' reproduction differs from the paper, we follow the paper: it fills the noise
from the key's range (the seed draws it from [0, 100), so stray anchors can appear), and it
uses Mamba-2 with one head (the seed's `MambaLMHeadModel` builds Mamba-1 layers).

Only the last position is scored: the model must gather the key and both anchors there.
"""
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from hybrid import ModelConfig
from mqar import TEST, TRAIN, Batch, batch_seed
from ssm import Impl, mamba_block

VOCAB_SIZE = 100
SEQ_LEN = 8
KEY_LO, KEY_HI = 20, 100  # keys and noise tokens
SHIFT = {1: 5, 2: 1, 3: -2, 4: -8}  # anchor -> its function g(x; a) = x + SHIFT[a] (mod 100)
BROKEN, HELD_OUT = (3, 4), (4, 3)
BROKEN_SHIFT = -6  # the label of (3, 4), and so the "symmetric" answer for (4, 3)
TRAIN_PAIRS = [(a, b) for a in SHIFT for b in SHIFT if (a, b) != HELD_OUT]


@dataclass(frozen=True)
class CompositeConfig:
    num_train: int = 300_000
    """training sequences (a fixed set, visited in epochs)"""
    num_test: int = 1_800
    """sequences in each test set (the 15 trained pairs, and the held-out pair (4, 3))"""
    gamma: float = 1.0
    """initialization rate: every weight with first dimension d1 ~ N(0, (1/d1^gamma)^2); larger = smaller init"""
    ones_conv: bool = False
    """fix every Mamba convolution kernel to ones (frozen): neighbouring tokens fuse symmetrically"""
    pos_emb: bool = False
    """add learned positional embeddings to the token embeddings"""

    def validate(self) -> None:
        for flag, value in [("--num-train", self.num_train), ("--num-test", self.num_test)]:
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.gamma <= 0:
            raise ValueError(f"--gamma must be > 0, got {self.gamma}")


# The paper's training recipe (its appendix D): the defaults of `train.py --task composite`, each flag
# still overriding them. AdamW (0.9, 0.999), weight decay 0.01, clip 1.0, batch 2048, lr warmed up
# over 10 epochs to 2.5e-4, then cosine to 1e-5 at 200 epochs (146 steps an epoch at the default 300k
# examples); Mamba-2, d_model 32 (so one 64-wide head), d_state 128, conv width 4, expand 2, 7 layers.
STEPS_PER_EPOCH = CompositeConfig.num_train // 2048
TRAIN_DEFAULTS = dict(
    task="composite", batch_size=2048, lr=2.5e-4, lr_floor=1e-5 / 2.5e-4, beta2=0.999,
    warmup_steps=10 * STEPS_PER_EPOCH, max_steps=200 * STEPS_PER_EPOCH, eval_every=5 * STEPS_PER_EPOCH,
    log_every=STEPS_PER_EPOCH, target_acc=2.0, out_dir=Path("runs/composite"),
    model=ModelConfig(ssm="mamba2", d_model=32, d_state=128, decoder_layers=7, dropout=0.0,
                      hybrid="", head_dim=32))  # no attention here; these two just pass validation


def answer_shift(a: int, b: int) -> int:
    """What pair (a, b) adds to the key in training: the composition, except the broken (3, 4)."""
    return BROKEN_SHIFT if (a, b) == BROKEN else SHIFT[a] + SHIFT[b]


def sample(n: int, pairs: list[tuple[int, int]], congruent: bool, g: torch.Generator):
    """n sequences of the given anchor pairs. congruent: the key's residue mod 8 equals its
    position (test) or never does (train). Returns tokens (n, 8), keys (n,) and the answers
    (n,) that `answer_shift` gives (for (4, 3), never trained, that is the composite answer)."""
    which = torch.randint(len(pairs), (n,), generator=g)  # (n,)
    pos = torch.randint(SEQ_LEN - 2, (n,), generator=g)  # (n,) the key's position, anchors after it
    key = torch.randint(KEY_LO, KEY_HI, (n,), generator=g)  # (n,)
    bad = (key % SEQ_LEN == pos) != congruent
    while bad.any():  # redraw the keys that break the residue rule (uniform over the valid ones)
        key = torch.where(bad, torch.randint(KEY_LO, KEY_HI, (n,), generator=g), key)
        bad = (key % SEQ_LEN == pos) != congruent
    tokens = torch.randint(KEY_LO, KEY_HI, (n, SEQ_LEN), generator=g)  # (n, 8) noise
    anchors = torch.tensor(pairs)[which]  # (n, 2)
    rows = torch.arange(n)
    tokens[rows, pos], tokens[rows, pos + 1], tokens[rows, pos + 2] = key, anchors[:, 0], anchors[:, 1]
    answers = (key + torch.tensor([answer_shift(a, b) for a, b in pairs])[which]) % VOCAB_SIZE  # (n,)
    return tokens, key, answers


def train_set(cfg: CompositeConfig, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed training set, tokens (n, 8) and labels (n,): drawn once on the CPU from the run's
    seed (the same examples on any machine), then kept on the device."""
    g = torch.Generator().manual_seed(batch_seed(TRAIN, seed, 0, 0))
    tokens, _, labels = sample(cfg.num_train, TRAIN_PAIRS, congruent=False, g=g)
    return tokens.to(device), labels.to(device)


@functools.lru_cache(maxsize=1)
def epoch_order(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The permutation of the training set that epoch `epoch` walks (made once per epoch)."""
    g = torch.Generator(device=device).manual_seed(batch_seed(TRAIN, seed, epoch, 0))
    return torch.randperm(n, generator=g, device=device)


def train_batch(data, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> Batch:
    """Step `step`'s slice of its epoch's permutation of `data` (each rank takes its own part;
    an epoch's last partial batch is dropped). inputs ((B, 8),), labels (B, 1)."""
    tokens, labels = data
    per_epoch = len(tokens) // (batch_size * world)
    if per_epoch == 0:
        raise ValueError(f"--batch-size {batch_size} x {world} processes exceeds --num-train {len(tokens)}")
    epoch, i = divmod(step, per_epoch)
    idx = epoch_order(len(tokens), seed, epoch, tokens.device)[(i * world + rank) * batch_size:
                                                               (i * world + rank + 1) * batch_size]
    return Batch((tokens[idx],), labels[idx, None])


def test_sets(cfg: CompositeConfig, device) -> dict:
    """The two test sets, the same for every run (seed 0 of the TEST split)."""
    g = torch.Generator().manual_seed(batch_seed(TEST, 0, 0, 0))
    tokens, _, labels = sample(cfg.num_test, TRAIN_PAIRS, congruent=True, g=g)
    held_out, key, composed = sample(cfg.num_test, [HELD_OUT], congruent=True, g=g)
    return {k: v.to(device) for k, v in {
        "tokens": tokens, "labels": labels, "held_out": held_out,
        "composite": composed, "symmetric": (key + BROKEN_SHIFT) % VOCAB_SIZE}.items()}


@torch.no_grad()
def evaluate(model, tests: dict) -> dict:
    """acc: the trained pairs at unseen key positions. composite / symmetric: the share of the
    held-out (4, 3) sequences answered key - 10 / key - 6."""
    was_training = model.training
    model.eval()
    acc = (model(tests["tokens"])[:, -1].argmax(-1) == tests["labels"]).float().mean()
    guess = model(tests["held_out"])[:, -1].argmax(-1)  # (n,)
    result = torch.stack([acc, (guess == tests["composite"]).float().mean(),
                          (guess == tests["symmetric"]).float().mean()]).tolist()
    model.train(was_training)
    return {"acc": result[0], "composite": result[1], "symmetric": result[2], "examples": len(guess)}


class CompositeMamba(nn.Module):
    """The paper's model: token (+ positional) embedding, `layers` pre-norm residual Mamba-2
    blocks (Mamba-1 with --ssm mamba1, as the seed built), RMSNorm, a head tied to the embedding;
    logits of the last position only, the one scored (train.py passes every model `last`, the
    labelled positions: here 1). model(tokens): tokens (B, 8) -> logits (B, 1, V)."""

    def __init__(self, ssm: Literal["mamba2", "mamba1"], d_model: int, d_state: int, layers: int,
                 cfg: CompositeConfig, impl: Impl = "auto"):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos = nn.Embedding(SEQ_LEN, d_model) if cfg.pos_emb else None
        self.layers = nn.Sequential(*(mamba_block(ssm, d_model, d_state, impl, dropout=0.0)
                                      for _ in range(layers)))
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.gamma_init(cfg.gamma)
        if cfg.ones_conv:
            for layer in self.layers:
                layer.mixer.conv1d.weight.data.fill_(1.0)
                layer.mixer.conv1d.weight.requires_grad_(False)

    def gamma_init(self, gamma: float):
        """W ~ N(0, (1/d1^gamma)^2) for every weight with first dimension d1 (the paper's section 4,
        after Luo et al. 2021; d1 is the first dimension as PyTorch stores it, out_features for a
        Linear, as in the seed). gamma 0.5 is about the usual scale; gamma 1 is a small init, under
        which the paper's Mamba learns the composite solution. Biases start at zero. Mamba's own
        dt_bias (Mamba-1: dt_proj.bias), A_log and D keep their initialization: they set the time
        scales, not a map (the seed zeroes dt_bias with the other biases)."""
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                nn.init.normal_(p, std=p.shape[0] ** -gamma)
            elif name.endswith(".bias") and not getattr(p, "_no_reinit", False):
                nn.init.zeros_(p)

    def forward(self, tokens, last: int = 1):  # (B, L) -> (B, last, V)
        x = self.embed(tokens)  # (B, L, D)
        if self.pos is not None:
            x = x + self.pos.weight[:tokens.shape[1]]
        h = self.norm(self.layers(x)[:, -last:])  # (B, last, D)
        return h @ self.embed.weight.T  # (B, last, V)
