"""Blind Start [seed 02_mechanism_ablation]: where cross-attention sits in the decoder, at 128 pairs.
All four decoders are 17 layers deep, so that layer 16 exists for `--hybrid 8,16`.

    python experiments/blind_start.py --deadline-s 540                  # on the GPU, resumable
    python experiments/blind_start.py --report-only

The seed expects ~0% (no cross-attention), 85-90% (layer 0), ~95% (layers 0 and 2), ~0% (8 and 16).
"""
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import MQARArgs, cell, plot_bars, run_mqar, write_report  # noqa: E402

EXPERIMENT = "blind_start"
# Table order. The no-cross-attention control runs after every seed of the others: a decoder that
# cannot see the keys cannot beat chance, and never stopping early at 99% it costs the whole step
# budget (~1,100 s on an H200), so it goes after the runs whose outcome is open.
HYBRID = {"0,2": "0,2", "0": "0", "8,16": "8,16", "none": ""}
EXPECTED = {"0,2": (0.95, 0.95), "0": (0.85, 0.90), "8,16": (0.0, 0.0), "none": (0.0, 0.0)}  # accuracy, low-high
# The learning-rate pair: Mamba-1's (runner.LRS, from the 4+4-layer pilot) one step down. In this
# 17+4-layer model, 2e-3 left no decoder off the loss-ln(4096) plateau (0,2 through all 10,000 steps,
# 0 and 8,16 through 7,750), while 1e-3 took 0,2 and 8,16 to 99% within 500 steps (README); those
# 2e-3 runs are kept in results/blind_start/lr2e-3/.
LRS = (5e-4, 1e-3)
# One run per GPU: a run that does not learn early needs its whole 10,000 steps within one session
# (its ~190 MB checkpoint cannot come back from the device), which two per GPU, at 5.3 steps/s each,
# did not reach; one per GPU, at 6.6-6.9 beside two lighter runs, just did (README, Device cost).
PARALLEL = 1


def main(args: MQARArgs) -> None:
    configs = {f"hybrid_{k}": [f"--hybrid={v}", "--decoder-layers", "17", "--num-pairs", "128"] for k, v in HYBRID.items()}
    summary = run_mqar(EXPERIMENT, configs, args, controls=("hybrid_none",))
    lines = ["| --hybrid | accuracy (%) | seed expects |", "|---|---|---|"]
    lines += [f"| {v or '(empty)'} | {cell(summary, f'hybrid_{k}')} | {expected(k)} |" for k, v in HYBRID.items()]
    write_report(EXPERIMENT, summary, "\n".join(lines))
    plot_bars(EXPERIMENT, "blind_start.png", summary,
              {f"--hybrid {v}" if v else "none": f"hybrid_{k}" for k, v in HYBRID.items()},
              {f"hybrid_{k}": r for k, r in EXPECTED.items()})


def expected(k: str) -> str:
    low, high = EXPECTED[k]
    return f"~{100 * low:.0f}%" if low == high else f"{100 * low:.0f}-{100 * high:.0f}%"


if __name__ == "__main__":
    main(tyro.cli(MQARArgs, default=MQARArgs(lrs=LRS, parallel=PARALLEL)))
