"""Time one training step under each execution path, as nanoGPT's bench.py does for its model.

    python bench.py --num-pairs 128 --hybrid 0,2         # the default model, on one GPU
    python bench.py --task composite --paths reference-compiled --profile   # the composite task's step

Takes train.py's flags (its --impl and --compile are set per path here), from the composite task's
defaults after --task composite, as train.py does. For each path it builds the same model from the
same seed, runs warm-up steps (compilation, Triton autotuning), then times `--steps` steps with
CUDA events and reports the median, tokens/s, peak memory, an estimated MFU, and the speed
relative to reference-eager (or to the first path that ran, where reference-eager ran out of
memory). The step is train.py's own `train_step`, data generation included. After warm-up, a
recompile is an error. --profile adds each path's costliest GPU kernels.
"""
import dataclasses
import gc
import statistics
from dataclasses import dataclass, field

import torch
import tyro

import composite
from mqar import TRAIN, make_batch
from ssm import check_impl
from train import TrainConfig, autocast_for, build, configure_optimizer, default_for, train_step

PATHS = {"reference-eager": ("reference", False), "reference-compiled": ("reference", True),
         "kernel-eager": ("kernel", False), "kernel-compiled": ("kernel", True)}


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark the training step of a train.py config under each execution path."""
    train: tyro.conf.OmitArgPrefixes[TrainConfig] = field(default_factory=TrainConfig)
    paths: str = ",".join(PATHS)
    """comma-separated paths to time, from: reference-eager, reference-compiled, kernel-eager, kernel-compiled"""
    warmup: int = 30
    """untimed steps first (compilation and autotuning happen here)"""
    steps: int = 100
    """timed steps; the table shows their median"""
    peak_tflops: float = 989.0
    """the GPU's dense BF16 peak for MFU (H100 SXM: 989; H200 is the same chip)"""
    profile: bool = False
    """after timing, print each path's costliest GPU kernels over 10 more steps (torch.profiler)"""


def step_flops(model, tokens: int, labelled: int) -> float:
    """6 x parameters x tokens for forward + backward (Kaplan et al. 2020), where the tied embedding
    counts only as the output head, applied at the labelled positions (train_step runs it there only).
    Attention scores and the scan are left out, so this undercounts a little."""
    n = sum(p.numel() for p in model.parameters())
    V, D = model.embed.weight.shape
    return 6 * (n - V * D) * tokens + 6 * V * D * labelled


def batches(cfg: TrainConfig, device):
    """step -> the training batch train.py draws at that step (MQAR: at the full --num-pairs, the
    curriculum's last rung)."""
    if cfg.task == "mqar":
        return lambda i: make_batch(cfg.mqar, cfg.batch_size, TRAIN, cfg.seed, i, 0, device)
    data = composite.train_set(cfg.composite, cfg.seed, device)
    return lambda i: composite.train_batch(data, cfg.batch_size, i, cfg.seed)


def bench_path(cfg: TrainConfig, impl: str, compile: bool, warmup: int, steps: int, profile: bool) -> dict:
    device = torch.device("cuda")
    check_impl(impl, device)
    torch.manual_seed(cfg.seed)
    raw = build(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, impl=impl)), device)
    model = torch.compile(raw) if compile else raw
    optimizer = configure_optimizer(raw, cfg, device)
    autocast = autocast_for(device)
    batch = batches(cfg, device)
    for i in range(warmup):
        train_step(model, optimizer, batch(i), autocast, cfg.grad_clip)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(warmup, warmup + steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            train_step(model, optimizer, batch(i), autocast, cfg.grad_clip)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    if profile:  # where the step's GPU time goes, kernel by kernel (Inductor's fused kernels by name)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(warmup + steps, warmup + steps + 10):
                train_step(model, optimizer, batch(i), autocast, cfg.grad_clip)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15), flush=True)
    inputs, labels = batch(0)
    tokens = cfg.batch_size * sum(x.shape[1] for x in inputs)
    ms = statistics.median(times)
    return {"ms": ms, "tokens": tokens, "flops": step_flops(raw, tokens, labels.numel()),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(cfg: BenchConfig) -> list[dict]:
    paths = cfg.paths.split(",")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"--paths takes names from {', '.join(PATHS)}; got {', '.join(unknown)}")
    if not torch.cuda.is_available():
        raise ValueError("bench.py times CUDA steps: it needs a GPU")
    cfg.train.validate()
    torch.set_float32_matmul_precision("high")
    rows = []
    for name in paths:
        impl, compile = PATHS[name]
        try:
            r = bench_path(cfg.train, impl, compile, cfg.warmup, cfg.steps, cfg.profile)
        except torch.OutOfMemoryError:  # e.g. Mamba1's reference scan, which keeps (B, L, E, N) states
            print(f"{name}: out of memory", flush=True)
            rows.append({"path": name, "ms": None})
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rows.append({"path": name, **r})
        print(f"{name}: {r['ms']:.2f} ms/step", flush=True)
    timed = [r for r in rows if r["ms"] is not None]
    base = next((r for r in timed if r["path"] == "reference-eager"), timed[0] if timed else None)
    t, m = cfg.train, cfg.train.model
    task = (f"{t.mqar.mode}, num_pairs {t.mqar.num_pairs}, decoder {m.decoder}" if t.task == "mqar"
            else f"composite, {m.decoder_layers} layers, gamma {t.composite.gamma}")
    print(f"{torch.cuda.get_device_name()}, {task}, batch {t.batch_size}, d_model {m.d_model}, d_state {m.d_state}, "
          f"{m.ssm}, median of {cfg.steps} steps after {cfg.warmup} warm-up\n")
    print(f"| path | ms/step | tokens/s | peak memory (GiB) | MFU | speed vs {base['path'] if base else '-'} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["ms"] is None:
            print(f"| {r['path']} | out of memory | | | | |")
            continue
        mfu = r["flops"] / (r["ms"] / 1e3) / (cfg.peak_tflops * 1e12)
        print(f"| {r['path']} | {r['ms']:.2f} | {r['tokens'] / r['ms'] * 1e3:,.0f} | {r['peak_gib']:.2f} "
              f"| {mfu:.1%} | {base['ms'] / r['ms']:.2f}x |")
    return rows


if __name__ == "__main__":
    config = tyro.cli(BenchConfig, default=BenchConfig(train=default_for(None)))
    try:
        main(config)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
