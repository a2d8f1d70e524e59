"""The Polar-Mem-Mamba decoder and each of its three mechanisms switched off, at 128 and 256 pairs.

    python experiments/polar_ablation.py --deadline-s 540                  # on the GPU, resumable
    python experiments/polar_ablation.py --report-only
"""
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import MQARArgs, cell, plot_bars, run_mqar, write_report  # noqa: E402

EXPERIMENT = "polar_ablation"
PAIRS = [128, 256]
VARIANTS = {"polar": [], "no-polar": ["--no-polar"], "no-pool": ["--mem-pool-size", "0"], "no-gsa": ["--no-gsa"]}


def main(args: MQARArgs) -> None:
    configs = {f"{v}_N{n}": ["--decoder", "polar", "--hybrid", "0,2", "--num-pairs", str(n), *flags]
               for v, flags in VARIANTS.items() for n in PAIRS}
    summary = run_mqar(EXPERIMENT, configs, args)
    lines = ["| decoder | " + " | ".join(f"N={n}" for n in PAIRS) + " |", "|---" * (len(PAIRS) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(cell(summary, f"{v}_N{n}") for n in PAIRS) + " |" for v in VARIANTS]
    write_report(EXPERIMENT, summary, "\n".join(lines))
    plot_bars(EXPERIMENT, "ablation.png", summary, {f"{v}\nN={n}": f"{v}_N{n}" for n in PAIRS for v in VARIANTS})


if __name__ == "__main__":
    main(tyro.cli(MQARArgs))
