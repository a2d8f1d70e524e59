"""Capacity cliff [seed 01_proof_mqar_cliff]: pure Mamba (decoder_only, d_state 64) against the
hybrid `--hybrid 0,2` (seq2seq) as the number of pairs grows.

    python experiments/capacity_cliff.py --deadline-s 540                   # on the GPU, resumable
    python experiments/capacity_cliff.py --report-only

The seed expects pure Mamba near 0% beyond d_state and the hybrid near 95% at 128 pairs. It names
Mamba-2 for both; pure Mamba-1 is a third model, the other mixer's capacity beside it. (Pure Mamba-2
learned recall at 3.2e-3 and 1e-2, at no rate tried from 1e-4 to 1e-3: runner.py LRS, README.)
"""
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import MQARArgs, cell, plot_vs_pairs, run_mqar, write_report  # noqa: E402

EXPERIMENT = "capacity_cliff"
PAIRS = [16, 32, 64, 128, 256, 512]
# Mamba-2 as the seed specifies, on both sides, so that only the cross-attention differs; and pure
# Mamba-1 (not in the seed), last: each seed's runs go in this order, the seed's two models first.
MODELS = {"mamba2": ["--mode", "decoder_only", "--ssm", "mamba2", "--d-state", "64"],
          "hybrid": ["--hybrid", "0,2", "--ssm", "mamba2", "--d-state", "64"],
          "mamba1": ["--mode", "decoder_only", "--ssm", "mamba1", "--d-state", "64"]}
EXPECTED = {"mamba2": "~0% beyond 64", "hybrid": "~95% at 128", "mamba1": "(not in the seed)"}


def main(args: MQARArgs) -> None:
    configs = {f"{m}_N{n}": [*flags, "--num-pairs", str(n)] for m, flags in MODELS.items() for n in PAIRS}
    summary = run_mqar(EXPERIMENT, configs, args)
    lines = ["| model | " + " | ".join(f"N={n}" for n in PAIRS) + " | seed expects |", "|---" * (len(PAIRS) + 2) + "|"]
    for m in MODELS:
        lines.append(f"| {m} | " + " | ".join(cell(summary, f"{m}_N{n}") for n in PAIRS) + f" | {EXPECTED[m]} |")
    write_report(EXPERIMENT, summary, "\n".join(lines))
    plot_vs_pairs(EXPERIMENT, "cliff.png", summary, {m: m for m in MODELS}, PAIRS, {m: 64 for m in MODELS})


if __name__ == "__main__":
    main(tyro.cli(MQARArgs))
