"""Run a grid of train.py configurations side by side on one machine, resumably.

Every experiment script hands `run_grid` a dict {run name: train.py flags}. A run whose result
file holds the same flags is skipped; a run with a checkpoint but no result continues with
--resume if it was started with the same flags (its checkpoint in runs/, or one committed under
results/<experiment>/partial/<run>/); the rest start fresh. A few runs share each GPU at once
(PARALLEL says why not more), spread over every GPU the runner sees. When --deadline-s is
near, running jobs are stopped with SIGTERM (train.py checkpoints at its next log line and exits)
so that a 30-minute device slice ends cleanly; the next call picks up where this one stopped.

Layout: runs/<experiment>/<run>/{flags.json,ckpt.pt,log.jsonl,train.log}, results/<experiment>/runs/<run>.json
(the run's flags, its log and eval.py's scores), aggregated by the experiment script, and
results/<experiment>/partial/<run>/ (an unfinished run's folder, committed).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hybrid import ModelConfig  # noqa: E402
from mqar import MQARConfig  # noqa: E402


def result_path(experiment: str, name: str) -> Path:
    return ROOT / "results" / experiment / "runs" / f"{name}.json"


def run_path(experiment: str, name: str) -> Path:
    return ROOT / "runs" / experiment / name


def partial_path(experiment: str, name: str) -> Path:
    """An unfinished run's folder committed to git (small checkpoints only), for a machine without runs/."""
    return ROOT / "results" / experiment / "partial" / name


def write_result(experiment: str, name: str, flags: list[str], exec_flags: list[str], run_dir: Path) -> dict:
    """The run's flags, its training log and eval.py's scores of its final checkpoint, in one file;
    returns what it wrote."""
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    path = result_path(experiment, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = json.loads((run_dir / "eval.json").read_text())
    result = {"name": name, "flags": flags, "exec_flags": exec_flags, "eval": scores, "log": log}
    path.write_text(json.dumps(result, indent=1))
    return result


# Mamba-2's Triton kernels autotune in every new process (minutes when a dozen start at once on one
# GPU). With this, Triton keeps the winners on disk; their keys are chunk, head and state sizes, not
# batch or length (mamba_ssm/ops/triton/ssd_*.py, key=['chunk_size', 'hdim', 'dstate']), so one
# run's autotuning serves the later runs of the same shape.
CHILD_ENV = {**os.environ, "TRITON_CACHE_AUTOTUNING": "1"}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, by the names CUDA_VISIBLE_DEVICES gives them (so that a run given
    one of them sees only it); none on a CPU machine."""
    import torch
    count = torch.cuda.device_count()  # CUDA counts the visible ones up to the first it cannot use
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:count] if visible and count else [str(i) for i in range(count)]


def load_results(experiment: str, grid: dict[str, list[str]]) -> dict[str, dict]:
    """The results of `grid`'s runs: name -> result, for each result file made with exactly the
    run's flags now (a changed budget or grid makes old results stale, not silently reused)."""
    results = {}
    for name, flags in grid.items():
        path = result_path(experiment, name)
        if path.exists() and (result := json.loads(path.read_text()))["flags"] == flags:
            results[name] = result
    return results


def stamped(run_dir: Path, flags: list[str]) -> bool:
    """Was the run in run_dir started with these very flags?"""
    stamp = run_dir / "flags.json"
    return stamp.exists() and json.loads(stamp.read_text()) == flags


def prepare(experiment: str, name: str, flags: list[str]) -> list[str]:
    """["--resume"] if the run has a checkpoint started with these very flags; else an emptied run dir
    (train.py checks that a resumed run has the same model, not the same budget or learning rate).
    The checkpoint is the run's own in runs/, else one committed under results/<experiment>/partial/,
    copied into runs/ first: a fresh checkout, or a fresh device machine, has no runs/ (git-ignored)."""
    run_dir, partial = run_path(experiment, name), partial_path(experiment, name)

    def resumable(d: Path) -> bool:
        return (d / "ckpt.pt").exists() and stamped(d, flags)

    if not resumable(run_dir) and resumable(partial):
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(partial, run_dir)
    if resumable(run_dir):
        return ["--resume"]
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "flags.json").write_text(json.dumps(flags))
    return []


def start_process(cmd: list[str], gpu: str, log) -> subprocess.Popen:
    """cmd in the repository's root, its output to log, seeing only `gpu` (if one is named)."""
    env = {**CHILD_ENV, "CUDA_VISIBLE_DEVICES": gpu} if gpu else CHILD_ENV
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_grid(experiment: str, grid: dict[str, list[str]], parallel: int, deadline_s: float,
             exec_flags: list[str]) -> dict[str, dict]:
    """Train, then score, every run of `grid` not done yet, `parallel` at a time on each visible GPU,
    with the execution flags `exec_flags` (a path, e.g. --no-compile, which does not change what a
    run measures) added; returns the results of the runs done.

    Each run is two processes in turn, train.py then eval.py, on one GPU, and none blocks the others.
    A new run goes to the GPU with the fewest of this grid's runs. The first run starts alone; the
    rest follow once it has logged its first steps (its autotuning is then on disk)."""
    start = time.monotonic()
    gpus = visible_gpus() or [""]  # "": a CPU machine, the run's environment unchanged
    # A run trained and scored in an earlier call may have lost its result file: the device's copy of
    # the repository is refreshed from the local checkout before each call, which drops result files
    # not fetched yet, while runs/ (ignored by git) stays. Such a run is written again from its
    # eval.json, not resumed: a run that stopped early at --target-acc would train on past its stop.
    done = load_results(experiment, grid)
    for name, flags in grid.items():
        run_dir = run_path(experiment, name)
        if name not in done and (run_dir / "eval.json").exists() and stamped(run_dir, flags):
            done[name] = write_result(experiment, name, flags, exec_flags, run_dir)
    todo = [name for name in grid if name not in done]
    running: dict[str, tuple[subprocess.Popen, Path, object, str]] = {}  # name -> process, its dir, its log file, its GPU
    scoring: set[str] = set()  # runs whose process is eval.py
    terminated: set[str] = set()  # runs sent SIGTERM at the deadline
    warm = False  # has a run of this call logged training steps, or ended, yet
    print(f"{experiment}: {len(grid) - len(todo)} of {len(grid)} runs done, {len(todo)} to go", flush=True)
    while todo or running:
        late = time.monotonic() - start > deadline_s
        warm = warm or any("| loss" in (d / "train.log").read_text() for _, d, _, _ in running.values())
        while todo and len(running) < parallel * len(gpus) and not late and (warm or not running):
            name = todo.pop(0)
            run_dir = run_path(experiment, name)
            resume = prepare(experiment, name, grid[name])
            cmd = [sys.executable, "train.py", *grid[name], *exec_flags, "--out-dir", str(run_dir), *resume]
            log = open(run_dir / "train.log", "a")
            gpu = min(gpus, key=lambda g: sum(g == run[3] for run in running.values()))
            running[name] = (start_process(cmd, gpu, log), run_dir, log, gpu)
            print(f"  start {name}{' (resumed)' if resume else ''}{f' on GPU {gpu}' if gpu else ''}", flush=True)
        for name, (proc, run_dir, log, gpu) in list(running.items()):
            if late and proc.poll() is None and name not in scoring and name not in terminated:
                proc.terminate()  # SIGTERM: train.py checkpoints at its next log line, the resume point
                terminated.add(name)  # once: a second SIGTERM, after train.py restores the default handler, kills it
            if proc.poll() is None:
                continue
            warm = True
            if proc.returncode == 0 and name not in scoring:  # trained: score the final checkpoint
                scoring.add(name)
                cmd = [sys.executable, "eval.py", "--ckpt", str(run_dir / "ckpt.pt"), "--out", str(run_dir / "eval.json")]
                running[name] = (start_process(cmd, gpu, log), run_dir, log, gpu)
                continue
            del running[name]
            log.close()
            if proc.returncode == 0:
                write_result(experiment, name, grid[name], exec_flags, run_dir)
                print(f"  done  {name} ({time.monotonic() - start:.0f} s into this call)", flush=True)
            else:  # stopped at the deadline (resumes next time), or failed: see its train.log
                print(f"  stopped {name} (exit {proc.returncode}, {run_dir / 'train.log'})", flush=True)
        if late and not running:
            break
        time.sleep(2)
    done = load_results(experiment, grid)
    missing = [name for name in grid if name not in done]
    print(f"{experiment}: {len(done)} of {len(grid)} done; missing: {' '.join(missing[:8]) or 'none'}"
          f"{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}")
    return done


# ---- MQAR experiments: a learning-rate grid and seeds per configuration, the best lr reported

# Each model's learning-rate pair, by (mixer, --mode), brackets where it learned (README):
#   Mamba-1, pure or hybrid: 1e-3 and 2e-3 (sweep 2, the pure-Mamba pilot);
#   Mamba-2 with cross-attention: 5e-4 (sweep 2, the cliff's first slice, where 1e-3 never learned);
#   pure Mamba-2: flat at every rate from 1e-4 to 1e-3 (the pilot), so the next two of Zoology's grid
#   for it, np.logspace(-3, -1.5, 4) (HazyResearch/zoology, paper_configs/arxiv24_based_figure2/configs.py).
LRS = {("mamba1", "seq2seq"): (1e-3, 2e-3), ("mamba1", "decoder_only"): (1e-3, 2e-3),
       ("mamba2", "seq2seq"): (2.5e-4, 5e-4), ("mamba2", "decoder_only"): (3.2e-3, 1e-2)}


def flag(flags: list[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def default_lrs(flags: list[str]) -> tuple[float, ...]:
    return LRS[flag(flags, "--ssm", ModelConfig.ssm), flag(flags, "--mode", MQARConfig.mode)]


def mqar_grid(configs: dict[str, list[str]], lrs: tuple[float, ...], seeds: int, steps: int,
              controls: tuple[str, ...] = ()) -> dict:
    """{config}_lr{lr}_s{seed} -> train.py flags, over `lrs` or else the config's pair (LRS).
    Every run gets the same step budget; --target-acc 0.99 ends the ones that have learned early,
    so the budget goes to those still flat. Seed-major order: a partial slice of device time
    covers every (config, lr) once before any twice; `controls`, configs whose outcome is known by
    construction, go after every seed of the others."""
    grid = {f"{config}_lr{lr:g}_s{seed}": [*flags, "--lr", str(lr), "--seed", str(seed), "--max-steps", str(steps),
                                           "--eval-every", "250"]
            for seed in range(seeds) for config, flags in configs.items() for lr in lrs or default_lrs(flags)}
    return dict(sorted(grid.items(), key=lambda run: split_name(run[0])[0] in controls))  # stable: seed-major kept


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def split_name(name: str) -> tuple[str, str, str]:
    """{config}_lr{lr}_s{seed} (mqar_grid's run names) -> (config, lr, seed)."""
    run, seed = name.rsplit("_s", 1)
    config, lr = run.rsplit("_lr", 1)
    return config, lr, seed


def lrs_missing(s: dict) -> bool:
    """Is a config's summary (best_lr's) a best over part of its learning rates? Then it is not yet
    the protocol's number: tables mark it, plots draw it hollow, capacities wait for it."""
    return s["lrs_run"] < s["lrs"]


def best_lr(results: list[dict]) -> dict[str, dict]:
    """Config -> the lr whose mean accuracy over seeds is highest, that mean and std (Zoology's
    protocol: each architecture gets its best learning rate), how many lrs it was chosen among, and
    the mean step its runs stopped at: where every config reaches the 99% stop, how soon is what
    tells them apart.

    The rates are compared on the seeds all of them have run: part-way through a seed-major grid one
    lr can hold a seed more than another, and means over different seeds are not comparable (one bad
    seed would hand the choice to a rate that has not run it yet). The chosen lr's mean is over all
    its seeds."""
    by_run: dict[str, dict[str, dict[str, dict]]] = {}  # config -> lr -> seed -> eval
    for r in results:
        config, lr, seed = split_name(r["name"])
        by_run.setdefault(config, {}).setdefault(lr, {})[seed] = r["eval"][0]
    out = {}
    for config, by_lr in by_run.items():
        seeds = [set(by_seed) for by_seed in by_lr.values()]
        shared = set.intersection(*seeds) or set.union(*seeds)  # no seed in common: compare over all
        lr = max(by_lr, key=lambda lr: statistics.mean(e["acc"] for seed, e in by_lr[lr].items() if seed in shared))
        evals = list(by_lr[lr].values())
        mean, std = mean_std([e["acc"] for e in evals])
        out[config] = {"lr": float(lr), "seeds": len(evals), "mean": mean, "std": std, "lrs_run": len(by_lr),
                       "steps": statistics.mean(e["step"] for e in evals)}
    return out


def write_report(experiment: str, summary: dict, table: str) -> None:
    out = ROOT / "results" / experiment
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}")


def pyplot():
    """matplotlib's pyplot, drawing to files only (there is no display on the device or in CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, experiment: str, name: str) -> None:
    path = ROOT / "results" / experiment / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_vs_pairs(experiment: str, name: str, summary: dict, series: dict[str, str], pairs: list[int],
                  d_states: dict[str, int]) -> None:
    """Accuracy against num_pairs, one line per series (label -> config prefix, whose cells are
    summary["{prefix}_N{n}"]): each config's best lr, mean ± std over seeds, a hollow point where not
    all its lrs have run yet; a dashed line at N = d_state (d_states: label -> d_state)."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    one_d_state = len(set(d_states.values())) == 1
    any_partial = False
    for label, prefix in series.items():
        done = [(n, summary[f"{prefix}_N{n}"]) for n in pairs if f"{prefix}_N{n}" in summary]
        line, *_ = ax.errorbar([n for n, _ in done], [s["mean"] for _, s in done], [s["std"] for _, s in done],
                               marker="o", capsize=3, label=label)
        partial = [(n, s["mean"]) for n, s in done if lrs_missing(s)]
        ax.plot([n for n, _ in partial], [a for _, a in partial], "o", color=line.get_color(), markerfacecolor="white", zorder=3)
        any_partial |= bool(partial)
        ax.axvline(d_states[label], linestyle="--", linewidth=0.8, color="gray" if one_d_state else line.get_color())
    if any_partial:  # the legend names only what the plot shows
        ax.plot([], [], "o", color="gray", markerfacecolor="white", label="not all lrs run yet")
    ax.plot([], [], "--", color="gray", linewidth=0.8, label="N = d_state")
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(n) for n in pairs])  # the whole grid, so a missing point shows as missing
    ax.set_xlim(pairs[0] / 1.3, pairs[-1] * 1.3)
    ax.set(xlabel="num_pairs", ylabel="per-query accuracy (best lr, mean ± std)", ylim=(0, 1.05))
    ax.legend()
    save_figure(fig, experiment, name)


def plot_bars(experiment: str, name: str, summary: dict, bars: dict[str, str],
              expected: dict[str, tuple[float, float]] | None = None) -> None:
    """One bar per config (label -> config): its best lr's accuracy, mean ± std over seeds, hatched
    while not all its lrs have run; over it, where given, the range the seed expects (low, high)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    expected = expected or {}
    fig, ax = pyplot().subplots(figsize=(max(6, 1.2 * len(bars)), 4))
    any_partial = False
    for x, config in enumerate(bars.values()):
        if s := summary.get(config):
            partial = lrs_missing(s)
            any_partial |= partial
            ax.bar(x, s["mean"], yerr=s["std"], capsize=4, color="C0", hatch="//" if partial else None)
            ax.annotate(f"{100 * s['mean']:.1f}%\n{s['seeds']} seed{'s' * (s['seeds'] > 1)}\nstep {s['steps']:,.0f}",
                        (x, s["mean"] + s["std"]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
        if config in expected:
            low, high = expected[config]
            ax.plot([x - 0.4, x + 0.4], [(low + high) / 2] * 2, color="C3", linewidth=2)
            ax.fill_between([x - 0.4, x + 0.4], low, high, color="C3", alpha=0.3)
    ax.set_xticks(range(len(bars)), list(bars))
    ax.set(ylabel="per-query accuracy (best lr, mean ± std)", ylim=(0, 1.25))  # room for three lines over a full bar
    handles = [Patch(color="C0", label="measured")]  # the legend names only what the plot shows
    handles += [Patch(facecolor="C0", hatch="//", label="not all lrs run yet")] if any_partial else []
    handles += [Line2D([], [], color="C3", linewidth=2, label="seed expects")] if expected else []
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    save_figure(fig, experiment, name)


# Runs at once on one GPU. Without MPS, processes sharing a GPU take turns on it (NVIDIA, "When to
# Use MPS", docs.nvidia.com/deploy/mps/), so side by side they share one GPU's time rather than add
# to it. On an H100 (README, Device cost), with three runs side by side a 128-pair pure Mamba-2 run
# kept ~80% of its speed alone and a composite run ~45%; with fifteen, ~17% and ~7%. Each run then
# takes ~5x longer, and a run unfinished when the session's device time ends loses its checkpoint
# with the machine.
PARALLEL = 3


@dataclass(frozen=True)
class MQARArgs:
    parallel: int = PARALLEL
    """runs at once on each GPU (runner.PARALLEL says why not more)"""
    deadline_s: float = 540
    """stop starting runs and checkpoint the running ones after this many seconds"""
    seeds: int = 3
    """seeds per (configuration, lr)"""
    lrs: tuple[float, ...] = ()
    """the learning-rate grid; each configuration reports its best (default: its own pair, LRS)"""
    steps: int = 10_000
    """the step budget of every run (runs stop early at 99% held-out accuracy): in the pure-Mamba
    pilot (README), Mamba-1 first left the copying plateau at step ~1,750 (lr 2e-3) and ~3,000 (1e-3)"""
    exec_flags: str = "--no-compile"
    """train.py flags for every run that choose how it executes, not what it measures (results made
    with other execution flags still count); eager kernels: bench.py measured compile slower at batch 64"""
    report_only: bool = False
    """only aggregate what results/ holds for this grid"""


def run_mqar(experiment: str, configs: dict[str, list[str]], args: MQARArgs,
             controls: tuple[str, ...] = ()) -> dict[str, dict]:
    """Run what is missing of the grid (unless --report-only), then each config's best-lr summary,
    with how many of its learning rates have a result ("lrs_run" of "lrs"): a best over part of
    the grid is not yet the protocol's number."""
    grid = mqar_grid(configs, args.lrs, args.seeds, args.steps, controls)
    results = (load_results(experiment, grid) if args.report_only
               else run_grid(experiment, grid, args.parallel, args.deadline_s, args.exec_flags.split()))
    summary = best_lr(list(results.values()))
    for config, s in summary.items():
        s["lrs"] = len(args.lrs or default_lrs(configs[config]))  # as mqar_grid chose them
    return summary


def cell(summary: dict, config: str) -> str:
    s = summary.get(config)
    if s is None:
        return "not run"
    partial = f"; {s['lrs_run']} of {s['lrs']} lrs" if lrs_missing(s) else ""
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (lr {s['lr']:g}, {s['seeds']} seeds, step {s['steps']:,.0f}{partial})"
