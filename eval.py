"""Score trained checkpoints on fresh held-out data, and sweep MQAR's number of pairs.

    python eval.py --ckpt runs/tiny/ckpt.pt
    python eval.py --ckpt runs/a/ckpt.pt runs/b/ckpt.pt --num-pairs 32,64,128,256 --plot cliff.png
    python eval.py --ckpt runs/composite/ckpt.pt      # composite task: composite vs symmetric answers

Each model is rebuilt from its checkpoint's own config and loaded with weights_only=True on
whatever device is here. Accuracy past the trained num_pairs is the capacity cliff: a recurrent
state of fixed size cannot hold more pairs than it has room for, however it was trained.
"""
import dataclasses
import json
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

import composite
from mqar import check_num_pairs, evaluate
from ssm import Impl, check_impl
from train import TrainConfig, autocast_for, build


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate MQAR or composite-task checkpoints."""
    ckpt: tuple[Path, ...]
    """one or more checkpoints written by train.py"""
    num_pairs: str = ""
    """MQAR: comma-separated num_pairs to evaluate at, e.g. 32,64,128,256 (default: each model's trained value)"""
    eval_batches: int = 8
    """MQAR: held-out batches of 256 examples per (checkpoint, num_pairs)"""
    impl: Impl = "auto"
    """SSM execution path here, whatever the model was trained with"""
    out: Path = Path("eval.json")
    """where the JSON results go"""
    plot: Path | None = None
    """write a PNG of accuracy against num_pairs here"""

    def pairs(self) -> list[int]:
        try:
            values = [int(s) for s in self.num_pairs.split(",")] if self.num_pairs.strip() else []
        except ValueError:
            raise ValueError(f"--num-pairs must be comma-separated integers like 32,64,128, got {self.num_pairs!r}") from None
        for n in values:
            check_num_pairs(n)
        return values


def load_checkpoint(path: Path, device: torch.device, impl: Impl = "auto"):
    """(TrainConfig, model in eval mode, step) from a train.py checkpoint; a one-line ValueError otherwise."""
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt?): {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise ValueError(f"{path}: not an align-mamba checkpoint (expected the dict train.py writes)")
    cfg = TrainConfig.from_dict(ckpt["config"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, impl=impl))
    model = build(cfg, device)
    model.load_state_dict(ckpt["model"])
    return cfg, model.eval(), ckpt["step"]


# (header, row key, format) of each task's table
COLUMNS = {
    "mqar": [("checkpoint", "ckpt", "{}"), ("mode", "mode", "{}"), ("hybrid", "hybrid", "{}"),
             ("d_state", "d_state", "{}"), ("step", "step", "{}"), ("num_pairs", "num_pairs", "{}"),
             ("acc", "acc", "{:.4f}"), ("exact match", "exact", "{:.4f}")],
    "composite": [("checkpoint", "ckpt", "{}"), ("ssm", "ssm", "{}"), ("layers", "layers", "{}"),
                  ("gamma", "gamma", "{}"), ("ones conv", "ones_conv", "{}"), ("pos emb", "pos_emb", "{}"),
                  ("step", "step", "{}"), ("test acc", "acc", "{:.4f}"), ("composite", "composite", "{:.4f}"),
                  ("symmetric", "symmetric", "{:.4f}")],
}


def markdown_table(rows: list[dict], task: str) -> str:
    columns = COLUMNS[task]
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if r[k] != "" else "-" for _, k, fmt in columns) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for ckpt in dict.fromkeys(r["ckpt"] for r in rows):
        mine = [r for r in rows if r["ckpt"] == ckpt]
        ax.plot([r["num_pairs"] for r in mine], [r["acc"] for r in mine], marker="o", label=ckpt)
    for d_state in sorted({r["d_state"] for r in rows}):
        ax.axvline(d_state, color="gray", linestyle="--", linewidth=0.8)
        ax.text(d_state, 1.02, f"d_state={d_state}", fontsize=7, ha="center", color="gray")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="num_pairs", ylabel="per-query accuracy", ylim=(0, 1.08))
    ax.set_xticks(sorted({r["num_pairs"] for r in rows}), labels=sorted({r["num_pairs"] for r in rows}))
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def load_all(cfg: EvalConfig) -> list[tuple]:
    """Check the flags and load every checkpoint before any evaluation starts."""
    cfg.pairs()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_impl(cfg.impl, device)
    models = [(path, *load_checkpoint(path, device, cfg.impl)) for path in cfg.ckpt]
    tasks = {train_cfg.task for _, train_cfg, _, _ in models}
    if len(tasks) > 1:
        raise ValueError(f"--ckpt: give checkpoints of one task at a time, got {sorted(tasks)}")
    if (cfg.num_pairs.strip() or cfg.plot) and tasks != {"mqar"}:
        raise ValueError("--num-pairs and --plot apply to MQAR checkpoints only")
    return models


def main(cfg: EvalConfig, models: list[tuple]) -> list[dict]:
    sweep, rows = cfg.pairs(), []
    for path, train_cfg, model, step in models:
        device = next(model.parameters()).device
        if train_cfg.task == "composite":
            with autocast_for(device):
                result = composite.evaluate(model, composite.test_sets(train_cfg.composite, device))
            rows.append({"ckpt": str(path), "ssm": train_cfg.model.ssm, "layers": train_cfg.model.decoder_layers,
                         "step": step, **dataclasses.asdict(train_cfg.composite), **result})
            continue
        mqar = train_cfg.mqar
        for n in sweep or [mqar.num_pairs]:
            # Keep the trained number of queries where it fits; a smaller context caps it.
            task = mqar.with_pairs(n)
            with autocast_for(device):  # the precision the model trained in on this device
                result = evaluate(model, task, cfg.eval_batches, device)
            # decoder_only has no encoder to attend to, so --hybrid does not apply (hybrid.py MambaLM)
            hybrid = train_cfg.model.hybrid if task.mode == "seq2seq" else ""
            rows.append({"ckpt": str(path), "mode": task.mode, "hybrid": hybrid,
                         "ssm": train_cfg.model.ssm, "d_state": train_cfg.model.d_state, "step": step,
                         "trained_num_pairs": mqar.num_pairs, "num_pairs": n, **result})
    print(markdown_table(rows, models[0][1].task))
    cfg.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {cfg.out}")
    if cfg.plot is not None:
        plot(rows, cfg.plot)
        print(f"wrote {cfg.plot}")
    return rows


if __name__ == "__main__":
    config = tyro.cli(EvalConfig)
    try:
        loaded = load_all(config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    main(config, loaded)
