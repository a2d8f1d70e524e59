"""d_state scaling [seed 04_d_state_scaling]: pure Mamba (decoder_only) at d_state 16-128 across
num_pairs. Capacity is the largest num_pairs with accuracy still >= 50%; the question is whether it
grows as O(d_state). The seed names Mamba-2, which did not learn recall even at 8 pairs here (README,
the pure-Mamba pilot), so this asks it of Mamba-1, whose state is d_state numbers per channel.

    python experiments/d_state_scaling.py --parallel 8 --deadline-s 540    # on the GPU, resumable
    python experiments/d_state_scaling.py --report-only
"""
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import MQARArgs, cell, run_mqar, write_report  # noqa: E402

EXPERIMENT = "d_state_scaling"
D_STATES = [16, 32, 64, 128]
PAIRS = [8, 16, 32, 64, 128, 256, 512]


def capacity(summary: dict, d: int) -> str:
    done = [n for n in PAIRS if f"d{d}_N{n}" in summary]
    if len(done) < len(PAIRS):
        return f"incomplete ({len(done)} of {len(PAIRS)})"
    above = [n for n in PAIRS if summary[f"d{d}_N{n}"]["mean"] >= 0.5]
    return str(max(above)) if above else f"< {PAIRS[0]}"


def main(args: MQARArgs) -> None:
    configs = {f"d{d}_N{n}": ["--mode", "decoder_only", "--ssm", "mamba1", "--d-state", str(d), "--num-pairs", str(n)]
               for d in D_STATES for n in PAIRS}
    summary = run_mqar(EXPERIMENT, configs, args)
    lines = ["| d_state | " + " | ".join(f"N={n}" for n in PAIRS) + " | capacity (last N >= 50%) |",
             "|---" * (len(PAIRS) + 2) + "|"]
    for d in D_STATES:
        lines.append(f"| {d} | " + " | ".join(cell(summary, f"d{d}_N{n}") for n in PAIRS) + f" | {capacity(summary, d)} |")
    write_report(EXPERIMENT, summary, "\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(MQARArgs))
