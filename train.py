"""Train a Mamba or hybrid model on MQAR, or a Mamba on the composite-function task.

    python train.py --num-pairs 8 --d-model 64 --d-state 16 --max-steps 600     # CPU, minutes
    torchrun --nproc_per_node=2 train.py --num-pairs 128 --hybrid 0,2            # DDP (NCCL, or gloo on CPU)
    python train.py --task composite --decoder-layers 7 --gamma 1.0             # the paper's defaults

A straight script in the nanoGPT mould: config, DDP from torchrun's environment, model, optimizer,
warm-up + cosine LR, the MQAR pairs curriculum (mqar.py), the loop, periodic held-out evaluation,
atomic checkpoints, and a clean stop on SIGTERM (checkpointed, exit status 1: continue with --resume).
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP

import composite
from composite import CompositeConfig, CompositeMamba
from hybrid import ModelConfig, build_model
from mqar import CURRICULUM_ACC, IGNORE, TRAIN, MQARConfig, evaluate, make_batch
from ssm import check_impl


@dataclass(frozen=True)
class TrainConfig:
    """Train a model on multi-query associative recall (MQAR) or on the composite-function task."""
    task: Literal["mqar", "composite"] = "mqar"
    """mqar: associative recall (mqar.py); composite: Mamba's Achilles' heel (composite.py), whose
    defaults become the paper's: d-model 32, d-state 128, 7 layers, batch 2048, 200 epochs"""
    mqar: tyro.conf.OmitArgPrefixes[MQARConfig] = field(default_factory=MQARConfig)
    composite: tyro.conf.OmitArgPrefixes[CompositeConfig] = field(default_factory=CompositeConfig)
    model: tyro.conf.OmitArgPrefixes[ModelConfig] = field(default_factory=ModelConfig)
    batch_size: int = 64
    """examples per process per step (the global batch is this times the number of processes)"""
    lr: float = 2e-3
    """peak learning rate"""
    warmup_steps: int = 50
    """linear warm-up steps, then cosine decay to lr x lr-floor at max-steps"""
    lr_floor: float = 0.1
    """the cosine's end as a fraction of --lr"""
    beta2: float = 0.95
    """AdamW's second-moment decay (beta1 is 0.9)"""
    max_steps: int = 20000
    """optimizer steps"""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on A_log, D, dt_bias, norms, biases)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this"""
    eval_every: int = 200
    """steps between held-out evaluations (and checkpoints)"""
    eval_batches: int = 4
    """held-out batches of 256 examples per evaluation"""
    target_acc: float = 0.99
    """stop early once held-out accuracy reaches this (above 1: never)"""
    log_every: int = 50
    """steps between progress lines (the only host syncs of the loop)"""
    seed: int = 0
    """seeds the model init, dropout and the training batches"""
    out_dir: Path = Path("runs/mqar")
    """where ckpt.pt and log.jsonl go"""
    compile: bool = torch.cuda.is_available()
    """torch.compile the model (default: on where CUDA is)"""
    resume: bool = False
    """continue the run in out-dir from its ckpt.pt (same model and task flags)"""

    def validate(self) -> None:
        self.mqar.validate() if self.task == "mqar" else self.composite.validate()
        self.model.validate()
        for flag, value in [("--batch-size", self.batch_size), ("--max-steps", self.max_steps),
                            ("--eval-every", self.eval_every), ("--eval-batches", self.eval_batches),
                            ("--log-every", self.log_every)]:
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"--lr must be > 0 and --warmup-steps >= 0, got {self.lr}, {self.warmup_steps}")
        if not (0 <= self.lr_floor <= 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--lr-floor must be in [0, 1] and --beta2 in [0, 1), got {self.lr_floor}, {self.beta2}")

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        """Rebuild from `dataclasses.asdict` output, as stored in a checkpoint."""
        return TrainConfig(**{**d, "mqar": MQARConfig(**d["mqar"]), "composite": CompositeConfig(**d["composite"]),
                              "model": ModelConfig(**d["model"]), "out_dir": Path(d["out_dir"])})

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "out_dir": str(self.out_dir)}


def default_for(args: list[str] | None) -> TrainConfig:
    """The flags' starting point: the paper's recipe (composite.TRAIN_DEFAULTS) when `args` (None:
    the command line) say `--task composite`, else TrainConfig's own defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="mqar")
    is_composite = pre.parse_known_args(args)[0].task == "composite"
    return TrainConfig(**composite.TRAIN_DEFAULTS) if is_composite else TrainConfig()


def parse_args(args: list[str] | None = None) -> TrainConfig:
    """tyro over TrainConfig, from `default_for(args)`."""
    return tyro.cli(TrainConfig, args=args, default=default_for(args))


def build(cfg: TrainConfig, device) -> torch.nn.Module:
    """The model that --task and the model flags describe (the composite task reads --d-model,
    --d-state, --decoder-layers, --ssm and --impl), with fp32 parameters on `device`."""
    if cfg.task == "mqar":
        return build_model(cfg.model, cfg.mqar.mode, device)
    m = cfg.model
    return CompositeMamba(m.ssm, m.d_model, m.d_state, m.decoder_layers, cfg.composite, m.impl).to(device)


def get_lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * cosine)


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with decay on 2-D+ weights only; the SSM's A_log, D and dt_bias are marked exempt
    (`_no_weight_decay`, as in mamba-ssm): decaying A_log would drag every decay rate to one value."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    ids = {id(p) for p in decay}
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=device.type == "cuda")


def train_step(model, optimizer, batch, autocast, grad_clip: float):
    """One optimizer step: forward under autocast, fp32 loss, backward, clip, AdamW. Returns the
    loss and logits as device tensors (reading them is the caller's host sync, not ours)."""
    with autocast:
        logits = model(*batch.inputs, last=batch.labels.shape[1])  # (B, K, V): the labelled positions
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


def autocast_for(device: torch.device):
    """BF16 autocast on CUDA (the parameters stay fp32); none on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def save_checkpoint(path: Path, **state) -> None:
    """Write then rename: a run killed mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class Stopped(Exception):
    """SIGTERM ended the run before --max-steps; its checkpoint holds the step it stopped at."""


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)}


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the last held-out evaluation."""
    # ---- processes and device: one process per GPU under torchrun, else a single process
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves
    else:
        device = torch.device("cpu")
    check_impl(cfg.model.impl, device)
    master = rank == 0
    autocast = autocast_for(device)

    # ---- the task's data, model, optimizer, and the state of a run being resumed
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = build(cfg, device)  # fp32 master weights
    rungs = [cfg.mqar.with_pairs(n) for n in cfg.mqar.train_sizes()] if cfg.task == "mqar" else []
    level = 0  # the curriculum's rung: MQAR training batches are rungs[level]
    if cfg.task == "mqar":
        def next_batch(step):
            return make_batch(rungs[level], cfg.batch_size, TRAIN, cfg.seed, step, rank, device)

        def score(model):
            return evaluate(model, cfg.mqar, cfg.eval_batches, device, rank, world)
    else:
        data, tests = composite.train_set(cfg.composite, cfg.seed, device), composite.test_sets(cfg.composite, device)

        def next_batch(step):
            return composite.train_batch(data, cfg.batch_size, step, cfg.seed, rank, world)

        def score(model):
            return composite.evaluate(model, tests)
    optimizer = configure_optimizer(raw_model, cfg, device)
    ckpt_path, log_path = cfg.out_dir / "ckpt.pt", cfg.out_dir / "log.jsonl"
    step, rng = 0, None
    if cfg.resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = TrainConfig.from_dict(ckpt["config"])
        if (saved.model, saved.task, saved.mqar, saved.composite) != (cfg.model, cfg.task, cfg.mqar, cfg.composite):
            raise ValueError(f"--resume: {ckpt_path} was trained with other model/task flags: "
                             f"{saved.model}, {saved.task}, {saved.mqar}, {saved.composite}")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, level = ckpt["step"], ckpt.get("level", 0)
        rng = ckpt["rng"][rank] if len(ckpt["rng"]) == world else None
    if rng is None:
        torch.manual_seed(cfg.seed * 1009 + rank + step)  # dropout differs across ranks
    else:
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    # One static graph per curriculum rung, compiled when the rung first comes up (~20 s alone on an
    # H100, README), each specialized to its lengths; Dynamo's default would make the second shape dynamic.
    model = torch.compile(raw_model, dynamic=False) if cfg.compile else raw_model
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model
    if master:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{cfg.mqar.mode if cfg.task == 'mqar' else 'composite'} model, {n_params / 1e6:.2f}M parameters, {world} process(es) on {device.type}, "
              f"compile={cfg.compile}, impl={cfg.model.impl}", flush=True)

    def checkpoint(step):
        states = [None] * world
        if distributed:
            dist.all_gather_object(states, rng_state(device))
        else:
            states = [rng_state(device)]
        if master:
            save_checkpoint(ckpt_path, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                            config=cfg.as_dict(), step=step, level=level, rng=states)

    # A stop request (SIGTERM: the experiment runner's deadline, a scheduler's preemption) ends the run
    # at the next log line, checkpointed there, so that a resumed run loses at most --log-every steps
    # rather than all those since the last evaluation. Every rank sees the request in the log line's
    # all-reduce and stops at the same step.
    stop_requested = threading.Event()
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
    stopping, stopped = False, False  # a log line has seen the request; the loop ended on it

    # ---- the loop
    tokens = 0  # since the last log line; shapes are known on the host, so counting costs no sync
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device)
    queries_sum = torch.zeros((), device=device)
    t_log, t_start, step_log = time.perf_counter(), time.perf_counter(), step
    result = {}
    while step < cfg.max_steps:
        lr = get_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next_batch(step)
        loss, logits = train_step(ddp_model, optimizer, batch, autocast, cfg.grad_clip)
        step += 1
        tokens += world * sum(x.numel() for x in batch.inputs)

        with torch.no_grad():  # running sums on the device: no host sync until the log line
            asked = batch.labels != IGNORE
            loss_sum += loss
            correct_sum += ((logits.argmax(-1) == batch.labels) & asked).sum()  # a mask, not indexing: no sync
            queries_sum += asked.sum()
        if step % cfg.log_every == 0:
            sums = torch.stack([loss_sum, correct_sum, queries_sum,
                                torch.tensor(float(stop_requested.is_set()), device=device)])
            if distributed:
                dist.all_reduce(sums)  # every rank must take the same curriculum step, and stop at the same step
            loss_total, correct, queries, stop_votes = sums.tolist()  # one host sync for the log line
            loss_avg, train_acc, stopping = loss_total / ((step - step_log) * world), correct / queries, stop_votes > 0
            dt = time.perf_counter() - t_log
            if master:
                pairs = f" | {rungs[level].num_pairs} pairs" if rungs else ""
                print(f"step {step:6d} | loss {loss_avg:.4f} | train acc {train_acc:.3f}{pairs} | lr {lr:.2e}"
                      f" | {(step - step_log) / dt:.2f} steps/s | {tokens / dt:,.0f} tok/s", flush=True)
            if train_acc >= CURRICULUM_ACC and level < len(rungs) - 1:
                level += 1
            loss_sum.zero_(), correct_sum.zero_(), queries_sum.zero_()
            t_log, step_log, tokens = time.perf_counter(), step, 0

        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            with autocast:
                scores = score(model)
            result = {"step": step, "lr": lr, "elapsed_s": round(time.perf_counter() - t_start, 2),
                      **({"train_pairs": rungs[level].num_pairs} if rungs else {}), **scores}
            checkpoint(step)
            if master:
                print(f"eval step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()
                                                         if isinstance(v, float)), flush=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps(result) + "\n")
            if result["acc"] >= cfg.target_acc:
                if master:
                    print(f"reached --target-acc {cfg.target_acc} at step {step}", flush=True)
                break
            t_log = time.perf_counter()  # evaluation time is not training throughput
        if stopping and step < cfg.max_steps:
            if step % cfg.eval_every:  # else the evaluation above has just checkpointed this very step
                checkpoint(step)
            stopped = True
            break

    signal.signal(signal.SIGTERM, previous_handler)
    if distributed:
        dist.destroy_process_group()
    if stopped:
        raise Stopped(f"SIGTERM: stopped at step {step}, checkpointed to {ckpt_path}; continue with --resume")
    return result


if __name__ == "__main__":
    config = parse_args()
    try:
        config.validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        train(config)
    except Stopped as e:
        raise SystemExit(str(e))  # exit status 1: the run is not finished
