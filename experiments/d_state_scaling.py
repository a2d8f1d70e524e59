"""d_state scaling [seed 04_d_state_scaling]: pure Mamba-2 (decoder_only) at d_state 16-128 across
num_pairs (8 to 512, and on to 16 x d_state: `pairs`). Capacity is the largest num_pairs with
accuracy still >= 50%; the question is whether it grows as O(d_state).

    python experiments/d_state_scaling.py --deadline-s 540                  # on the GPU, resumable
    python experiments/d_state_scaling.py --report-only

d_state 64 at 16-512 pairs is the capacity cliff's pure Mamba-2, with the very same flags, so those
cells are read from the cliff's results (experiments/capacity_cliff.py runs them), not trained twice.
"""
import dataclasses
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capacity_cliff  # noqa: E402
from runner import MQARArgs, cell, lrs_missing, plot_vs_pairs, run_mqar, write_report  # noqa: E402

EXPERIMENT = "d_state_scaling"
D_STATES = [16, 32, 64, 128]


def pairs(d_state: int) -> list[int]:
    """num_pairs doubling from 8, to 512 at every d_state and on to 16 x d_state. A row whose last N
    is still at >= 50% only bounds its capacity from below: d_state 64 recalled 87% at 512 pairs.
    Under O(d_state) its 50% point moves with the state: d_state 16 and 32 crossed it between 8 and
    16 x d_state (128-256 and 256-512 pairs), so d_state 64 and 128 run on to 1,024 and 2,048."""
    return [2**k for k in range(3, max(512, 16 * d_state).bit_length())]  # 8, 16, ..., the end


PAIRS = pairs(max(D_STATES))  # the table's columns


def flags(d_state: int, num_pairs: int) -> list[str]:
    return ["--mode", "decoder_only", "--ssm", "mamba2", "--d-state", str(d_state), "--num-pairs", str(num_pairs)]


def capacity(summary: dict, d: int) -> str:
    """The last N at >= 50%, once every cell of the row has all its learning rates: a cell's best over
    part of the grid may still rise past 50% (d_state 128 at 2,048 pairs had one rate of two)."""
    grid = pairs(d)
    cells = {n: summary.get(f"d{d}_N{n}") for n in grid}
    done = [n for n, s in cells.items() if s and not lrs_missing(s)]
    if len(done) < len(grid):
        return f"incomplete ({len(done)} of {len(grid)})"
    above = [n for n in grid if cells[n]["mean"] >= 0.5]
    if not above:
        return f"< {grid[0]}"
    return f">= {grid[-1]} (the grid's end)" if above[-1] == grid[-1] else str(above[-1])


def main(args: MQARArgs) -> None:
    shared = [n for n in PAIRS if n in capacity_cliff.PAIRS]  # d_state 64 at these: the cliff's runs
    configs = {f"d{d}_N{n}": flags(d, n) for d in D_STATES for n in pairs(d) if not (d == 64 and n in shared)}
    summary = run_mqar(EXPERIMENT, configs, args)
    cliff = run_mqar(capacity_cliff.EXPERIMENT, {f"mamba2_N{n}": flags(64, n) for n in shared},
                     dataclasses.replace(args, report_only=True))
    summary.update({f"d64_N{n}": cliff[f"mamba2_N{n}"] for n in shared if f"mamba2_N{n}" in cliff})
    lines = ["| d_state | " + " | ".join(f"N={n}" for n in PAIRS) + " | capacity (last N >= 50%) |",
             "|---" * (len(PAIRS) + 2) + "|"]
    for d in D_STATES:
        lines.append(f"| {d} | " + " | ".join(cell(summary, f"d{d}_N{n}") if n in pairs(d) else "-" for n in PAIRS)
                     + f" | {capacity(summary, d)} |")
    write_report(EXPERIMENT, summary, "\n".join(lines))
    plot_vs_pairs(EXPERIMENT, "capacity.png", summary, {f"d_state {d}": f"d{d}" for d in D_STATES}, PAIRS,
                  {f"d_state {d}": d for d in D_STATES})


if __name__ == "__main__":
    main(tyro.cli(MQARArgs))
