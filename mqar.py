"""Multi-Query Associative Recall (MQAR), the task that measures how much a model can remember.

MQAR (Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models", 2023):
a context lists N key-value pairs, then M of the keys come back as queries and the model must
answer each with its value. A recurrent model has to store all N pairs in a fixed-size state
before it knows which will be asked, so accuracy falls off a cliff once N outgrows the state;
attention reads the pairs back directly and does not.

Two layouts of one example (N pairs, M queries):
  seq2seq       encoder [BOS, k1, :, v1, ..., kN, :, vN, EOS]    (B, 3N+2)
                decoder [BOS, q1, ..., qM]                       (B, M+1)
  decoder_only  [BOS, k1, :, v1, ..., kN, :, vN, EOS, q1, ..., qM]  (B, 3N+2+M)
The label at the position of query q is q's value; every other position is IGNORE.

Batches are made on the training device from a generator seeded by (split, seed, step, rank),
so any batch can be made again and no test batch ever comes from a training seed.
"""
import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.distributed

# The vocabulary, named once. Tokens 4-9 are reserved specials.
PAD, BOS, EOS, SEP = 0, 1, 2, 3
KEY_LO, KEY_HI = 10, 4096  # keys are tokens in [KEY_LO, KEY_HI)
VAL_LO, VAL_HI = 4096, 8192  # values are tokens in [VAL_LO, VAL_HI)
VOCAB_SIZE = 8192
NUM_KEYS = KEY_HI - KEY_LO
IGNORE = -100  # label of a position that is not scored (F.cross_entropy's ignore_index)
CURRICULUM_ACC = 0.9  # training accuracy at which the curriculum moves to twice the pairs (--min-pairs)

TRAIN, TEST = 0, 1  # the split is the low bit of every generator seed


@dataclass(frozen=True)
class MQARConfig:
    num_pairs: int = 128
    """key-value pairs in each example's context (N)"""
    num_queries: int | None = None
    """distinct keys asked back per example, M <= N (default: min(16, num-pairs))"""
    mode: Literal["seq2seq", "decoder_only"] = "seq2seq"
    """seq2seq: pairs in the encoder, queries in the decoder; decoder_only: one sequence, pure Mamba"""
    min_pairs: int = 8
    """curriculum: training starts at min-pairs pairs and doubles them whenever training accuracy
    over a --log-every interval reaches 90%, up to --num-pairs (evaluation is always at --num-pairs);
    --min-pairs equal to --num-pairs trains at one size throughout"""

    @property
    def queries(self) -> int:
        """M: --num-queries, or its default resolved against --num-pairs."""
        return min(16, self.num_pairs) if self.num_queries is None else self.num_queries

    def with_pairs(self, n: int) -> "MQARConfig":
        """The same task at n pairs, asking at most n queries."""
        return dataclasses.replace(self, num_pairs=n, num_queries=min(self.queries, n))

    def train_sizes(self) -> tuple[int, ...]:
        """The curriculum's context sizes: min-pairs doubling, then num-pairs.

        Why a curriculum: recall is learned in a jump after a flat stretch that grows steeply with
        the number of pairs (the README measures it): at init attention spreads over all 3N+2
        positions, so the gradient towards the one matching key is diluted N-fold. Short contexts
        find the key-matching circuit fast and attention carries it to long ones (the CPU quick
        start, trained at 8 pairs, scores 68% at 128). Zoology likewise trains MQAR on a mix of 4
        to 64 pairs (HazyResearch/zoology, zoology/experiments/mqar_example_configs/original_mqar_configs.py)."""
        sizes, n = [], min(self.min_pairs, self.num_pairs)
        while n < self.num_pairs:
            sizes.append(n)
            n *= 2
        return (*sizes, self.num_pairs)

    def validate(self) -> None:
        check_num_pairs(self.num_pairs)
        if self.min_pairs < 1:
            raise ValueError(f"--min-pairs must be >= 1, got {self.min_pairs}")
        if not 1 <= self.queries <= self.num_pairs:
            raise ValueError(
                f"--num-queries must be in [1, --num-pairs={self.num_pairs}] (queries are distinct "
                f"keys of the example), got {self.queries}")


def check_num_pairs(num_pairs: int) -> None:
    if not 1 <= num_pairs <= NUM_KEYS:
        raise ValueError(f"--num-pairs must be in [1, {NUM_KEYS}] (keys are distinct tokens in "
                         f"[{KEY_LO}, {KEY_HI})), got {num_pairs}")


class Batch(NamedTuple):
    inputs: tuple  # what the model is called with: (src, tgt) for seq2seq, (tokens,) for decoder_only
    labels: torch.Tensor  # (B, K) targets of the model's last K positions (model(..., last=K)): IGNORE where unscored


def batch_seed(split: int, seed: int, step: int, rank: int) -> int:
    """The generator seed of one batch. The low bit is the split, so train and test never share one."""
    return (((seed * 1_000_003 + step) * 1_009 + rank) * 2 + split) % 2**62


def make_batch(cfg: MQARConfig, batch_size: int, split: int, seed: int, step: int, rank: int = 0,
               device: torch.device | str = "cpu") -> Batch:
    g = torch.Generator(device=device)
    g.manual_seed(batch_seed(split, seed, step, rank))
    B, N, M = batch_size, cfg.num_pairs, cfg.queries

    # Distinct keys: the first N of a random permutation of all keys (one argsort per example).
    keys = torch.rand(B, NUM_KEYS, generator=g, device=device).argsort(dim=1)[:, :N] + KEY_LO  # (B, N)
    values = torch.randint(VAL_LO, VAL_HI, (B, N), generator=g, device=device)  # (B, N)
    # Queries: M distinct pairs of the example, in random order.
    asked = torch.rand(B, N, generator=g, device=device).argsort(dim=1)[:, :M]  # (B, M)
    q_keys, q_values = keys.gather(1, asked), values.gather(1, asked)  # (B, M)

    sep = torch.full_like(keys, SEP)
    pairs = torch.stack([keys, sep, values], dim=2).view(B, 3 * N)  # (B, 3N) k1 : v1 k2 : v2 ...
    bos = torch.full((B, 1), BOS, dtype=torch.long, device=device)
    eos = torch.full((B, 1), EOS, dtype=torch.long, device=device)
    src = torch.cat([bos, pairs, eos], dim=1)  # (B, 3N+2)

    if cfg.mode == "seq2seq":
        tgt = torch.cat([bos, q_keys], dim=1)  # (B, M+1)
        labels = torch.cat([torch.full_like(bos, IGNORE), q_values], dim=1)  # (B, M+1)
        return Batch((src, tgt), labels)
    tokens = torch.cat([src, q_keys], dim=1)  # (B, 3N+2+M)
    return Batch((tokens,), q_values)  # labels of the last M positions only: the context is not scored


EVAL_BATCH = 256  # fixed, so the test set is the same whatever the training batch size


@torch.no_grad()
def evaluate(model, cfg: MQARConfig, batches: int, device, rank: int = 0, world: int = 1) -> dict:
    """Per-query accuracy and per-example exact match on `batches` held-out batches.

    The test set is batches 0..batches-1 of the TEST split (seed 0): the same for every run, and
    never a training batch. It is drawn on the CPU and moved, because CPU and CUDA generators give
    different numbers for one seed: so a checkpoint scores on the same examples on either machine.
    Under DDP rank r scores batches r, r+world, ... and the counts are summed.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, device=device)  # correct queries, queries, exact examples, examples
    for i in range(rank, batches, world):
        src = make_batch(cfg, EVAL_BATCH, TEST, seed=0, step=i)
        batch = Batch(tuple(x.to(device) for x in src.inputs), src.labels.to(device))
        asked = batch.labels != IGNORE  # (B, K)
        hit = (model(*batch.inputs, last=batch.labels.shape[1]).argmax(-1) == batch.labels) | ~asked  # (B, K)
        counts += torch.stack([(hit & asked).sum(), asked.sum(), hit.all(dim=1).sum(),
                               torch.tensor(len(hit), device=device)]).float()
    if world > 1:
        torch.distributed.all_reduce(counts)
    model.train(was_training)
    correct, queries, exact, examples = counts.tolist()
    return {"acc": correct / queries, "exact": exact / examples, "examples": int(examples)}
