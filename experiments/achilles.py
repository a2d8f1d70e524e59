"""Mamba's Achilles' heel on the composite-function task (composite.py): the best model, the two
ablations, and the phase diagram over depth and initialization rate, each with several seeds.

    python experiments/achilles.py --deadline-s 540                   # on the GPU, resumable
    python experiments/achilles.py --report-only                       # tables and heatmap from results/

Runs go in priority order (the best model, then its ablations, then the phase diagram cells,
shallow first), so a partial slice of device time finishes whole groups. Every run is
`train.py --task composite` with the paper's defaults (composite.py TRAIN_DEFAULTS)
plus the flags below; --epochs shortens them all alike (say so when you report).
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from composite import STEPS_PER_EPOCH  # noqa: E402
from runner import PARALLEL, load_results, mean_std, pyplot, run_grid, save_figure, write_report  # noqa: E402

EXPERIMENT = "achilles"
LAYERS = [2, 3, 4, 5, 6, 7]
GAMMAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0]
BEST = (7, 1.0)


@dataclass(frozen=True)
class Args:
    parallel: int = PARALLEL
    """runs at once on each GPU (runner.PARALLEL says why not more)"""
    deadline_s: float = 540
    """stop starting runs and checkpoint the running ones after this many seconds"""
    seeds: int = 3
    """seeds per configuration"""
    epochs: int = 200
    """training epochs of every run (the paper: 200)"""
    groups: str = "best,ablations,phase"
    """which groups to run, in this order"""
    exec_flags: str = "--impl reference --compile"
    """train.py flags for every run that choose how it executes, not what it measures (README: the
    compiled reference path ran 47.7 steps/s on an H100, eager 13.2; the Triton kernels' autotuning
    did not finish within 80 s)"""
    report_only: bool = False
    """only aggregate what results/ holds for this grid"""


def cell(layers: int, gamma: float) -> str:
    """A phase-diagram cell's name, as its runs (`<cell>_s<seed>`) and the summary know it."""
    return f"L{layers}_G{gamma}"


def grid(args: Args) -> dict[str, list[str]]:
    epochs = ["--max-steps", str(args.epochs * STEPS_PER_EPOCH)]
    runs = {}
    for group in args.groups.split(","):
        configs = {"best": [("L7_G1.0", BEST, [])],
                   "ablations": [("L7_G1.0_ones-conv", BEST, ["--ones-conv"]),
                                 ("L7_G1.0_pos-emb", BEST, ["--pos-emb"])],
                   "phase": [(cell(n, g), (n, g), []) for n in LAYERS for g in GAMMAS if (n, g) != BEST]}[group]
        for seed in range(args.seeds):
            for name, (layers, gamma), extra in configs:
                runs[f"{name}_s{seed}"] = ["--task", "composite", "--decoder-layers", str(layers), "--gamma", str(gamma),
                                           "--seed", str(seed), *epochs, *extra]
    return runs


def summarize(results: list[dict]) -> dict[str, dict]:
    """Configuration name -> mean and std over seeds of test acc, composite and symmetric accuracy."""
    by_config: dict[str, list[dict]] = {}
    for r in results:
        by_config.setdefault(r["name"].rsplit("_s", 1)[0], []).append(r["eval"][0])
    out = {}
    for config, rows in by_config.items():
        out[config] = {"seeds": len(rows), "epochs": sorted({round(row["step"] / STEPS_PER_EPOCH) for row in rows})}
        for key in ("acc", "composite", "symmetric"):
            out[config][key] = mean_std([row[key] for row in rows])
    return out


def pm(mean_std) -> str:
    return f"{100 * mean_std[0]:.1f} ± {100 * mean_std[1]:.1f}"


def report(summary: dict[str, dict]) -> str:
    lines = ["| model | seeds | epochs | test acc (%) | composite (%) | symmetric (%) | seeds' report |",
             "|---|---|---|---|---|---|---|"]
    for name, label in [("L7_G1.0", "7 layers, gamma 1.0"), ("L7_G1.0_ones-conv", "  + conv fixed to ones"),
                        ("L7_G1.0_pos-emb", "  + positional embedding")]:
        if name in summary:
            s = summary[name]
            seed = "86.0 / 0.17" if name == "L7_G1.0" else ""
            lines.append(f"| {label} | {s['seeds']} | {s['epochs']} | {pm(s['acc'])} | {pm(s['composite'])} | {pm(s['symmetric'])} | {seed} |")
    return "\n".join(lines)


def phase_tables(results: list[dict]) -> str:
    """Each seed's phase diagram, cell by cell: the final checkpoint's composite and symmetric accuracy
    (%) on the held-out pair (4, 3). The heatmap shows means; these show how far the seeds differ."""
    scores = {r["name"]: r["eval"][0] for r in results}
    seeds = sorted({int(name.rsplit("_s", 1)[1]) for name in scores})
    lines = []
    for seed in seeds:
        cells = {(n, g): scores.get(f"{cell(n, g)}_s{seed}") for n in LAYERS for g in GAMMAS}
        done = sum(score is not None for score in cells.values())
        lines += ["", f"Phase diagram, seed {seed}, {done} of {len(cells)} cells: composite / symmetric (%) on (4, 3)", "",
                  "| layers | | " + " | ".join(map(str, GAMMAS)) + " |", "|---|---|" + "---|" * len(GAMMAS)]
        for n in LAYERS:
            for key in ("composite", "symmetric"):
                row = ["–" if cells[n, g] is None else f"{100 * cells[n, g][key]:.1f}" for g in GAMMAS]
                lines.append(f"| {n if key == 'composite' else ''} | {key} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def heatmap(summary: dict[str, dict]) -> None:
    import numpy as np
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 3.6))
    for ax, key in zip(axes, ["composite", "symmetric"]):
        grid = np.full((len(LAYERS), len(GAMMAS)), np.nan)
        for i, n in enumerate(LAYERS):
            for j, g in enumerate(GAMMAS):
                if cell(n, g) in summary:
                    grid[i, j] = summary[cell(n, g)][key][0]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i in range(len(LAYERS)):
            for j in range(len(GAMMAS)):
                text = "–" if np.isnan(grid[i, j]) else f"{100 * grid[i, j]:.0f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w" if not grid[i, j] > 0.6 else "k")
        ax.set_xticks(range(len(GAMMAS)), [str(g) for g in GAMMAS], fontsize=7)
        ax.set_yticks(range(len(LAYERS)), [str(n) for n in LAYERS])
        ax.set(xlabel="gamma (initialization rate)", ylabel="layers", title=f"{key} accuracy on (4, 3), mean over seeds")
        fig.colorbar(image, ax=ax)
    save_figure(fig, EXPERIMENT, "phase.png")


def main(args: Args) -> None:
    runs = grid(args)
    done = (load_results(EXPERIMENT, runs) if args.report_only
            else run_grid(EXPERIMENT, runs, args.parallel, args.deadline_s, args.exec_flags.split()))
    results = list(done.values())
    if not results:
        print("no results yet")
        return
    summary = summarize(results)
    write_report(EXPERIMENT, summary, report(summary) + "\n" + phase_tables(results))
    heatmap(summary)


if __name__ == "__main__":
    main(tyro.cli(Args))
