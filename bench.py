"""
Benchmarks: does PMD's memory make the memory-free student learn faster and better, and where does the time go.

    python bench.py                  # every variant (VARIANTS) x 5 seeds: a table, the paper's claims as paired
                                     # differences, out/bench/bench.json, out/bench/curves.png
    python bench.py --difficulty     # GRPO, SDPO, rft and PMD at plan_len 1..4: out/bench/difficulty.json and .png
    python bench.py --sweep          # the tuning behind config.TUNED: every method over the same grid, on 2 seeds
                                     # the benchmark does not use
    python bench.py --speed          # sampling speedup, and the per-phase time of one step
    python bench.py --pressure       # co-evolution against exploration pressure (RL families at a fixed budget)
    python bench.py --lucky          # insight over experience against the lucky-pass rate (answer_len 3, 2, 1)
    python bench.py --budget         # the highest-pressure point at twice the budget: PMD against a frozen policy

Bench options: --seeds=1337,1,2,3,4  --variants=...  --workers=2  --bench_dir=out/bench  --knob=plan_len:1,2,3,4
(--difficulty's setting and values); an option the mode does not read (READS) is an error. Every other --key=value
is a train.py setting for every run. Each run lives in bench_dir/runs/<name>, and a finished run with the same
arguments is reused: an interrupted benchmark continues.
Each seed's runs use a family table of their own (--task_seed=<seed>), so the spread over seeds is a spread over
tables too; --task_seed=N fixes one table for every run.
"""
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import config
import train
from config import CONFIG_KEYS, TUNED, configure, parse_args, pick_device
from model import encode, generate
from pmd import step
from report import mean_lag
from verify import trace
from warmup import warmup, warmup_path

# the variants: train.py arguments on top of the run's own, from the same warm-up; the co-evolution and memory-level
# variants are the paper's, as it defines them
VARIANTS = {
    "grpo": ["--method=grpo"],
    "sdpo": ["--method=sdpo"],
    "rft": ["--method=rft"],  # the replay control: supervised on the memory's verified successes, no teacher
    "pmd-transient": ["--method=pmd", "--transient=true"],  # a memory of the current batch only, dropped after the step
    "pmd": ["--method=pmd"],
    # evolving memory + frozen policy: the policy never trains, its rollouts feed the memory; scored with the memory
    "frozen-policy": ["--method=pmd", "--policy_frozen=true"],
    # frozen memory + evolving policy: frozen-policy's final memory (same seed), never updated, teaches the policy
    "frozen-memory": ["--method=pmd", "--memory_steps=0",
                      "--memory_init={runs}/frozen-policy{tag}-s{seed}/memory.json"],
    # the memory levels, cumulative: experience only, then + insight (+ pattern is pmd)
    "experience-only": ["--method=pmd", "--memory_levels=experience"],
    "experience+insight": ["--method=pmd", "--memory_levels=experience,insight"],
    # PMD whose insights the teacher's weights write (reflection taught in warm-up) instead of the counting rule
    "pmd-reflect": ["--method=pmd", "--reflect=model"],
}
DEPENDS = {"frozen-memory": "frozen-policy"}  # a variant that starts from another's final memory, run after it
WITH_MEMORY = ("frozen-policy",)  # scored by the policy reading its memory (the teacher's accuracy): it never trains
NO_LAG = WITH_MEMORY + ("pmd-transient",)  # no internalisation lag: a policy never trained, a memory gone every step
METHODS = ("grpo", "sdpo", "rft", "pmd")
SWEEP = dict(lr=(1e-4, 3e-4, 1e-3), replay_weight=(0.1, 1.0), updates=(1, 4))  # the same grid for every method
SWEEP_SEEDS = "101,102"
EVERY = ["--eval_interval=10"]  # curves at every 640 rollouts (train.py's default evaluates half as often)
BENCH = dict(  # bench.py's own options, --key=value; each comment starts with what is allowed, checked before any work
    seeds="1337,1,2,3,4",  # distinct ints in [0, 4294967295], comma-separated
    variants=",".join(VARIANTS),  # names in VARIANTS, comma-separated
    workers=2,  # [1, inf): runs at once, the cores split between them
    bench_dir="out/bench",  # a writable directory
    knob="plan_len:1,2,3,4",  # a train.py setting and its values: --difficulty's knob
)
RUNS = ("seeds", "workers", "bench_dir")
READS = dict(bench=(*RUNS, "variants"), difficulty=(*RUNS, "knob"), sweep=RUNS[1:], speed=("bench_dir",), pressure=RUNS,
             lucky=RUNS, budget=RUNS)  # the options each mode reads: another one given is an error, not ignored
SETS = dict(heldout="new inputs", unseen="unseen families")  # the two evaluation sets, as tables name them
# where PMD's mechanisms matter, each along the knob that controls it (fixed before any of these runs; bench.TUNED)
PRESSURE = [(), ("--plan_len=3", "--families_per_group=2"), ("--plan_len=3",),  # RL families at a fixed budget
            ("--plan_len=3", "--families_per_group=8")]
PRESSURE_VARIANTS = ("pmd", "frozen-policy", "frozen-memory", "rft", "sdpo")
LUCKY = [("--answer_len=3",), (), ("--answer_len=1",)]  # how often a wrong plan passes by coincidence
LUCKY_VARIANTS = ("experience-only", "experience+insight", "pmd")
BUDGET = [("--plan_len=3", "--families_per_group=8", "--steps=400")]  # the highest pressure, twice the rollouts
BUDGET_VARIANTS = ("pmd", "frozen-policy")
SWEEP_SEEDS_3 = "1337,1,2"  # the seeds of --pressure, --lucky and --budget unless --seeds is given


def method_of(variant):
    return next(a.split("=")[1] for a in VARIANTS[variant] if a.startswith("--method="))


def tuned_of(args):
    """The lr, replay_weight and updates a run used (a user's override wins over TUNED)."""
    return {k: v for k, v in vars(parse_args(args)).items() if k in TUNED["pmd"]}


def tuned_args(variant):
    return [f"--{k}={v}" for k, v in TUNED[method_of(variant)].items()]


# -----------------------------------------------------------------------------
# running train.py

RECORD_VERSION = 2  # done.json's format: a record of another version is rerun


def finished(name, args, bench_dir):
    """bench_dir/runs/name's record if it holds a finished run with these arguments, else None."""
    d = os.path.join(bench_dir, "runs", name)
    try:
        with open(os.path.join(d, "done.json")) as f:
            done = json.load(f)
        if done["args"] == [*args, f"--out_dir={d}"] and done["version"] == RECORD_VERSION and done["metrics"]:
            return done
    except (OSError, ValueError, KeyError, TypeError):  # not run yet, or a record this run cannot use: run it
        return None


def run_one(name, args, bench_dir, threads):
    """python train.py args in bench_dir/runs/name, unless a finished run with these arguments is there.
    Returns the run's record: its arguments, its wall time and every evaluation of metrics.jsonl."""
    done = finished(name, args, bench_dir)
    if done:
        return done
    d = os.path.join(bench_dir, "runs", name)
    os.makedirs(d, exist_ok=True)
    args = args + [f"--out_dir={d}"]
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(os.path.join(d, "log.txt"), "w") as log:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
        p = subprocess.run([sys.executable, script, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    if p.returncode:
        tail = open(os.path.join(d, "log.txt")).read().strip().splitlines()[-1:]
        why = tail[0] if tail else "no output"
        raise ValueError(f"run {name} failed (exit {p.returncode}): {why}; log: {d}/log.txt")
    metrics = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    done = dict(version=RECORD_VERSION, args=args, wall_s=round(time.time() - t0, 1), metrics=metrics)
    tmp = os.path.join(d, "done.json.tmp")
    with open(tmp, "w") as f:
        json.dump(done, f)
    os.replace(tmp, os.path.join(d, "done.json"))
    return done


def run_all(jobs, bench_dir, workers):
    """jobs: (name, train.py args). Every run's arguments are checked before any work; the warm-ups that the runs
    still to do need are trained first, one at a time on all cores; then the runs go in parallel."""
    configs = [configure(args) for _, args in jobs]
    os.makedirs(bench_dir, exist_ok=True)
    warmups = {}  # cache path -> (config, task): runs that share a warm-up share its path
    for (name, args), c in zip(jobs, configs):
        if not finished(name, args, bench_dir):
            task = train.make_task(c)
            warmups.setdefault(warmup_path(c, task), (c, task))
    for c, task in warmups.values():
        warmup(c, task, pick_device(c))
    threads = max(1, (os.cpu_count() or 1) // workers)
    results, t0 = {}, time.time()

    def one(job):
        name, args = job
        results[name] = run_one(name, args, bench_dir, threads)
        end = results[name]["metrics"][-1]
        print(f"[{len(results)}/{len(jobs)}] {name:<30} new inputs {end['heldout_acc']:.3f}  unseen families "
              f"{fmt(end.get('unseen_acc'))}  teacher {end['teacher_acc']:.3f}  ({results[name]['wall_s']:.0f} s; "
              f"{time.time() - t0:.0f} s so far)", flush=True)

    print(f"{len(jobs)} runs, {workers} at a time, {threads} thread(s) each; logs in {bench_dir}/runs/<name>/log.txt",
          flush=True)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, jobs))  # list(): re-raises a failed run's error here
    return results


# -----------------------------------------------------------------------------
# summarising


def fmt(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


def rollouts_to(metrics, level=0.8):
    return next((r["rollouts"] for r in metrics if r["heldout_acc"] >= level), None)


def mean_std(xs, f="{:.3f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f.format(statistics.mean(xs)) + (" ± " + f.format(statistics.stdev(xs)) if len(xs) > 1 else "")


def record(variant, seed, res):
    """One run's summary: its final evaluation (both sets, pass@k), the rollouts it took to 80 %, its curve. A frozen
    policy is scored reading its memory, as the paper scores it: its memory-free accuracy never moves."""
    if variant in WITH_MEMORY:
        scored = lambda m: {**{k: v for k, v in m.items() if "_pass@" not in k}, "heldout_acc": m["teacher_acc"],
                            "unseen_acc": m.get("teacher_unseen_acc")}
        res = dict(res, metrics=[scored(m) for m in res["metrics"]])
    ms = res["metrics"]
    return dict(ms[-1], method=variant, seed=seed, rollouts_to_80=rollouts_to(ms), wall_s=res["wall_s"],
                start_pass1=ms[0].get("heldout_pass@1"), settings=tuned_of(res["args"]), lag=mean_lag(ms)[0],
                curve=[[r["rollouts"], r["heldout_acc"], r.get("unseen_acc"), r["teacher_acc"]] for r in ms])


def md(cells):
    """One row of a markdown table."""
    return "| " + " | ".join(map(str, cells)) + " |"


def table(records, variants):
    head = ["method", "lr, replay w., updates", "new inputs", "unseen families", "pass@16 new inputs", "pass@16 unseen",
            "rollouts to 80 %", "teacher (new inputs)", "internalisation lag (steps)", "wall per run (s)"]
    rows = [md(head), md(["---"] * len(head))]
    for v in variants:
        rs = [r for r in records if r["method"] == v]
        col = lambda key, f="{:.3f}": mean_std([r.get(key) for r in rs], f)
        reached = [r["rollouts_to_80"] for r in rs if r["rollouts_to_80"] is not None]
        some = "" if len(reached) == len(rs) else f" ({len(reached)} of {len(rs)} seeds)"
        to80 = mean_std(reached, "{:.0f}") + some if reached else "not reached"
        s = rs[0]["settings"]
        lag = col("lag", "{:.0f}") if method_of(v) == "pmd" and v not in NO_LAG else "-"
        settings = f"{s['lr']:g}, {s['replay_weight']:g}, {s['updates']}"
        rows.append(md([v, settings, col("heldout_acc"), col("unseen_acc"), col("heldout_pass@16"),
                        col("unseen_pass@16"), to80, col("teacher_acc"), lag, col("wall_s", "{:.0f}")]))
    return "\n".join(rows)


# the paper's claims: (lower, higher, by at least): higher's accuracy minus lower's, on the same seeds, is at least
# that; by None: higher is not below lower by more than two standard errors (the model's reflection against counting)
CLAIMS = [("grpo", "sdpo", 0.0), ("sdpo", "pmd", 0.0), ("sdpo", "pmd-transient", 0.0), ("pmd-transient", "pmd", 0.0),
          ("frozen-policy", "pmd", 0.10), ("frozen-memory", "pmd", 0.10),
          ("experience-only", "experience+insight", 0.0), ("experience+insight", "pmd", 0.0), ("rft", "pmd", 0.0),
          ("pmd", "pmd-reflect", None)]


def claims_table(records, variants):
    """Each claim of CLAIMS whose two variants ran: the paired difference on both sets, mean ± SE over seeds."""
    acc = {(r["method"], r["seed"], key): r.get(f"{key}_acc") for r in records for key in SETS}
    rows = []
    for lo, hi, by in CLAIMS:
        if lo not in variants or hi not in variants:
            continue
        cells = []
        for key in SETS:
            d = [acc[hi, s, key] - acc[lo, s, key] for (m, s, k) in acc
                 if m == hi and k == key and acc.get((lo, s, key)) is not None and acc[hi, s, key] is not None]
            if len(d) < 2:
                cells.append("-")
                continue
            mean, se = statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5
            holds = mean + 2 * se >= 0 if by is None else mean - by > 2 * se
            cells.append(f"{mean:+.3f} ± {se:.3f} ({'holds' if holds else 'does not hold'})")
        claim = f"{hi} within 2 SE of {lo} or above" if by is None else f"{lo} < {hi}" + (f" by {by:.0%}" if by else "")
        rows.append(f"| {claim} | " + " | ".join(cells) + " |")
    head = "| claim | " + " | ".join(f"{name}: difference" for name in SETS.values()) + " |\n|---|" + "---|" * len(SETS)
    return head + "\n" + "\n".join(rows) if rows else ""


def reflection_table(results, seeds, model="pmd-reflect", count="pmd"):
    """The model's own reflection per seed: its fidelity on the probe after warm-up and at the end, the share of its
    verdicts in RL that were wrong (and so reached the memory), families with a wrong strategy, wall time."""
    head = ["seed", "agree after warm-up", "missed after warm-up", "agree at the end", "missed at the end",
            "wrong verdicts in RL", "families with a wrong strategy (model / count)", "wall s (model / count)"]
    rows = [md(head), md(["---"] * len(head))]
    for seed in seeds:
        m, c = results.get(f"{model}-s{seed}"), results.get(f"{count}-s{seed}")
        if not m:
            continue
        first, end, rl = m["metrics"][0], m["metrics"][-1], [r for r in m["metrics"] if r.get("rl_reflect_written")]
        wrong = sum((r["rl_reflect_flipped"] + r["rl_reflect_invented"]) * r["rl_reflect_written"] for r in rl)
        written = sum(r["rl_reflect_written"] for r in rl)
        bad = lambda res: fmt(res and res["metrics"][-1]["mem_confirmed"] - res["metrics"][-1]["mem_confirmed_right"],
                              "{}")
        rows.append(md([seed, fmt(first.get("reflect_agree")), fmt(first.get("reflect_missed")),
                        fmt(end.get("reflect_agree")), fmt(end.get("reflect_missed")),
                        f"{fmt(wrong / written if written else None)} of {written}", f"{bad(m)} / {bad(c)}",
                        f"{m['wall_s']:.0f} / {fmt(c and c['wall_s'], '{:.0f}')}"]))
    return "\n".join(rows)


def pyplot(path):
    """matplotlib.pyplot, or None with a note that path is not written: plots are optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path} (pip install matplotlib)")
        return None
    return plt


def setting(point):
    """A point's name in tables and plots: its train.py arguments without dashes, or 'default'."""
    return " ".join(a[2:] for a in point) or "default"


def label(v):
    """A variant's name in a legend, saying where its score is the policy reading its memory."""
    return f"{v} (reading its memory)" if v in WITH_MEMORY else v


def plot(records, variants, path):
    """Greedy accuracy against rollouts (memory-free but where the legend says), mean and std band over seeds: one panel
    per evaluation set."""
    plt = pyplot(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (col, name) in zip(axes, ((1, SETS["heldout"]), (2, SETS["unseen"]))):
        for v in variants:
            curves = [r["curve"] for r in records if r["method"] == v]
            n = min(map(len, curves))
            x = [curves[0][i][0] for i in range(n)]
            accs = [[c[i][col] or 0.0 for c in curves] for i in range(n)]
            mean = [statistics.mean(a) for a in accs]
            std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            line, = ax.plot(x, mean, label=label(v), lw=2 if v in METHODS else 1)
            lo, hi = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        ax.axhline(0.8, color="grey", ls=":", lw=1)
        ax.set(xlabel="rollouts", title=f"{name} (greedy), mean ± std over seeds", ylim=(0, 1))
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def save_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# -----------------------------------------------------------------------------
# the benchmark, the difficulty sweep and the tuning sweep


def variant_list(opts):
    variants = [v for v in opts["variants"].split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants={opts['variants']!r} is not allowed: names in {list(VARIANTS)}, comma-separated")
    return variants


def family_table(seed, common):
    """The family table a seed's runs use: a table of its own (task_seed = seed), so that spread over seeds is spread
    over tables too and no result belongs to one table; a --task_seed among the common arguments fixes one for all."""
    return [] if any(a.startswith("--task_seed=") for a in common) else [f"--task_seed={seed}"]


def job(variant, seed, common, point=(), runs=""):
    """(name, train.py args) of one run at a point (train.py arguments on top of the default setting); the name keys
    the run directory, so runs that share arguments share it. runs: the directory of the runs (frozen-memory reads
    another run's memory there)."""
    tag = "".join(f"-{a[2:].replace('=', '')}" for a in point)
    own = [a.format(runs=runs, seed=seed, tag=tag) for a in VARIANTS[variant]]
    args = [*own, *tuned_args(variant), *point, f"--seed={seed}", *family_table(seed, common), *EVERY, *common]
    return f"{variant}{tag}-s{seed}", args


def run_points(opts, common, variants, points):
    """Every variant on every seed at every point; a variant that starts from another's final memory (DEPENDS) runs
    after it. Returns records with their point, and the runs' records by name."""
    seeds, runs = [int(s) for s in opts["seeds"].split(",")], os.path.join(opts["bench_dir"], "runs")
    needed = [DEPENDS[v] for v in variants if v in DEPENDS and DEPENDS[v] not in variants]  # run, not reported
    results, every = {}, []
    for later in (False, True):  # the variants that read another's final memory, once it is there
        jobs = [job(v, s, common, p, runs) for p in points for v in variants + needed for s in seeds
                if (v in DEPENDS) == later]
        if jobs:
            results.update(run_all(jobs, opts["bench_dir"], opts["workers"]))
        every += jobs
    check_starts(every, results)
    return [dict(record(v, s, results[job(v, s, common, p)[0]]), point=list(p)) for p in points for v in variants
            for s in seeds], results


def check_starts(jobs, results):
    """Runs that share a warm-up start from one model, so their step-0 pass@k agree. A finished record that disagrees
    started from another warm-up (another machine's or another cache's) and breaks the pairing: a warning names it."""
    first = {}
    for name, args in jobs:
        c = configure(args)
        start = {k: v for k, v in results[name]["metrics"][0].items() if "_pass@" in k}
        other, seen = first.setdefault(warmup_path(c, train.make_task(c)), (name, start))
        if start != seen:
            print(f"warning: {name} and {other} share a warm-up but start apart (step-0 pass@k): one was measured from "
                  "another warm-up; delete the stale runs' directories to rerun them", file=sys.stderr)


def bench(opts, common):
    variants, t0 = variant_list(opts), time.time()
    records, results = run_points(opts, common, variants, [()])
    save_json(records, os.path.join(opts["bench_dir"], "bench.json"))
    print(f"\nfinal memory-free accuracy (greedy) at {records[0]['rollouts']} rollouts, "
          f"{len(opts['seeds'].split(','))} seed(s): python bench.py {' '.join(sys.argv[1:])}\n")
    print(table(records, variants))
    claims = claims_table(records, variants)
    if claims:
        print("\nthe paper's claims, as differences on the same seeds (mean ± standard error over seeds; 'holds' when "
              f"the mean is beyond two standard errors in the claimed direction):\n\n{claims}")
    if set(variants) & set(WITH_MEMORY):
        print(f"\n{', '.join(v for v in variants if v in WITH_MEMORY)}: the policy never trains; its accuracy is the "
              "policy reading its memory")
    if "pmd-reflect" in variants:
        print("\npmd-reflect: the teacher's weights write the insights' verdicts; their fidelity against the counting "
              f"rule\n\n{reflection_table(results, [int(s) for s in opts['seeds'].split(',')])}")
    print(f"\nwrote {opts['bench_dir']}/bench.json; benchmark wall time {(time.time() - t0) / 60:.1f} min")
    plot(records, variants, os.path.join(opts["bench_dir"], "curves.png"))


def along(opts, common, name, variants, points, xs=None, xlabel="", diffs=(), log=False, xfmt="{:.3f}"):
    """Every variant at every point (train.py arguments on top of the default setting), on opts' seeds: name.json, a
    table per evaluation set (a row per point: its x, each variant's final accuracy, each paired difference) and
    name.png. xs(records): each point's x (None: no x, no plot). Returns the records."""
    t0 = time.time()
    records, _ = run_points(opts, common, list(variants), points)
    save_json(records, os.path.join(opts["bench_dir"], f"{name}.json"))
    x = list(xs(records)) if xs else []
    reads = "".join(f"; {v} reads its memory" for v in variants if v in WITH_MEMORY)
    print(f"\nfinal accuracy (greedy{reads}), mean ± std over seeds {opts['seeds']}: python bench.py "
          f"{' '.join(sys.argv[1:])}")
    head = ["setting", *([xlabel] if x else []), *variants, *(f"{a} - {b}" for a, b in diffs)]
    for key, set_name in SETS.items():
        print(f"\n{set_name}:\n\n{md(head)}\n{md(['---'] * len(head))}")
        for i, p in enumerate(points):
            acc = lambda v: [r.get(f"{key}_acc") for r in records if r["method"] == v and r["point"] == list(p)]
            ds = [paired(records, a, b, key, p) for a, b in diffs]
            xcell = [xfmt.format(x[i])] if x else []
            print(md([setting(p), *xcell, *(mean_std(acc(v)) for v in variants),
                      *("-" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}" for d in ds)]))
    print(f"\nwall time {(time.time() - t0) / 60:.1f} min; wrote {opts['bench_dir']}/{name}.json")
    if x:
        plot_points(records, points, variants, x, xlabel, diffs, os.path.join(opts["bench_dir"], f"{name}.png"), log)
    return records


def difficulty(opts, common):
    """Every method at every value of the knob, on the benchmark's seeds (the default value's runs are the benchmark's
    own); x: the initial success rate, the warm-up policy's pass@1 (sampled) on new inputs, mean over seeds."""
    knob, values = knob_values(opts["knob"])
    points = [() if val == getattr(config, knob) else (f"--{knob}={val}",) for val in values]
    start = lambda records: [max(statistics.mean(r["start_pass1"] for r in records if r["point"] == list(p)), 1e-4)
                             for p in points]
    along(opts, common, "difficulty", METHODS, points, start, "initial success rate (0 at 1e-4)", log=True)


def knob_values(spec):
    """'plan_len:1,2,3,4' -> ('plan_len', [1, 2, 3, 4]), each value checked as a train.py setting."""
    knob, _, vals = spec.partition(":")
    if knob not in CONFIG_KEYS or not vals:
        raise ValueError(f"knob={spec!r} is not allowed: a train.py setting and its values, like plan_len:1,2,3,4")
    values = [vars(parse_args([f"--{knob}={v}"]))[knob] for v in vals.split(",")]
    return knob, values


def paired(records, hi, lo, key, point):
    """hi minus lo on the same seeds at a point: (mean, standard error), or None with fewer than 2 seeds."""
    acc = {(r["method"], r["seed"]): r.get(f"{key}_acc") for r in records if r["point"] == list(point)}
    d = [acc[hi, s] - acc[lo, s] for (m, s) in acc if m == hi and acc.get((lo, s)) is not None]
    return (statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5) if len(d) > 1 else None


def coverage(records, point):
    """The share of RL families whose right strategy the frozen policy's final memory confirms, mean over seeds."""
    c = parse_args(list(point))
    rs = [r for r in records if r["method"] == "frozen-policy" and r["point"] == list(point)]
    return statistics.mean(r["mem_confirmed_right"] / (c.n_groups * c.families_per_group) for r in rs)


def pressure(opts, common):
    """Exploration pressure: RL families at a fixed rollout budget (PRESSURE), against the frozen policy's coverage;
    PMD minus each frozen variant, paired over seeds, at every point."""
    along(opts, common, "pressure", PRESSURE_VARIANTS, PRESSURE, lambda rs: [coverage(rs, p) for p in PRESSURE],
          "frozen policy's memory: families confirmed right", [("pmd", "frozen-policy"), ("pmd", "frozen-memory")],
          xfmt="{:.2f}")


def lucky_rate(point):
    """The share of (training input, wrong plan) pairs of the RL families that pass by coincidence."""
    c = parse_args(list(point))
    task = train.make_task(c)
    plans = list(itertools.product(task.ops, repeat=c.plan_len))
    hits = [task.verify(p, trace(q, p.prompt.split(":", 1)[1][:-1]))[0]
            for p in task.train for q in plans if q != task.families[p.family]]
    return sum(hits) / len(hits)


def lucky(opts, common):
    """Lucky passes: answer_len 3, 2, 1 (LUCKY) with the memory levels cumulated, against the lucky-pass rate of the
    seeds' tables; then the headroom table's teacher with experience against with insight at each setting."""
    seeds = opts["seeds"].split(",")
    rates = [statistics.mean(lucky_rate((*p, f"--task_seed={s}")) for s in seeds) for p in LUCKY]
    along(opts, common, "lucky", LUCKY_VARIANTS, LUCKY, lambda _: rates, "lucky-pass rate",
          [("experience+insight", "experience-only"), ("pmd", "experience+insight")], log=True, xfmt="{:.4f}")
    heads = []
    for p in LUCKY:
        rows = []
        for s in seeds:
            c, task, device, _, _ = train.setup([*p, f"--seed={s}", *family_table(s, common), *common,
                                                 f"--out_dir={tempfile.mkdtemp()}"])
            rows.append(train.headroom(warmup(c, task, device).eval(), task, c)["heldout"])
        heads.append([mean_std([r[k] for r in rows]) for k in ("teacher+experience", "teacher+insight")])
    print("\nheadroom after warm-up on new inputs, mean ± std over seeds:\n\n"
          + md(["setting", "teacher+experience", "teacher+insight"]) + "\n" + md(["---"] * 3))
    for p, head in zip(LUCKY, heads):
        print(md([setting(p), *head]))


def budget(opts, common):
    """The highest-pressure point at twice the default budget (BUDGET): PMD against the frozen policy as training
    goes on, from the runs' curves."""
    records, _ = run_points(opts, common, list(BUDGET_VARIANTS), BUDGET)
    save_json(records, os.path.join(opts["bench_dir"], "budget.json"))
    print(f"\nPMD minus the frozen policy reading its memory, paired over seeds, against rollouts: "
          f"python bench.py {' '.join(sys.argv[1:])}\n")
    print(md(["rollouts", *(f"{v}: {name}" for v in BUDGET_VARIANTS for name in SETS.values()),
              *(f"pmd - frozen-policy: {name}" for name in SETS.values())]))
    print(md(["---"] * (1 + 3 * len(SETS))))
    curves = {v: [r["curve"] for r in records if r["method"] == v] for v in BUDGET_VARIANTS}
    for i in range(0, min(map(len, curves["pmd"])), 4):
        cells = [curves["pmd"][0][i][0]]
        for v in BUDGET_VARIANTS:
            cells += [mean_std([c[i][col] for c in curves[v]]) for col in (1, 2)]
        for col in (1, 2):
            d = [a[i][col] - b[i][col] for a, b in zip(curves["pmd"], curves["frozen-policy"])]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None
            cells.append("-" if se is None else f"{statistics.mean(d):+.3f} ± {se:.3f}")
        print(md(cells))
    plot(records, list(BUDGET_VARIANTS), os.path.join(opts["bench_dir"], "budget.png"))


def plot_points(records, points, variants, xs, xlabel, diffs, path, log=False):
    """Each variant's final accuracy against x (one panel per evaluation set), and the paired differences."""
    plt = pyplot(path)
    if plt is None:
        return
    panels = 2 + bool(diffs)  # the differences' panel only where there are differences
    fig, axes = plt.subplots(1, panels, figsize=(5.7 * panels, 4.5))
    order = sorted(range(len(points)), key=lambda i: xs[i])
    x = [xs[i] for i in order]
    ls = "none" if len(set(x)) < len(x) else "-"  # two settings at one x: a line between them would mean nothing
    for ax, (key, name) in zip(axes, SETS.items()):
        for v in variants:
            accs = [[r.get(f"{key}_acc") or 0.0 for r in records if r["method"] == v and r["point"] == list(points[i])]
                    for i in order]
            ax.errorbar(x, [statistics.mean(a) for a in accs], [statistics.stdev(a) if len(a) > 1 else 0 for a in accs],
                        label=label(v), marker="o", capsize=3, ls=ls)
        ax.set(xlabel=xlabel, ylabel="final accuracy, mean ± std over seeds", title=name, ylim=(0, 1.02),
               xscale="log" if log else "linear")
    for n, i in enumerate(order):  # each point's setting along the first panel's floor, side by side at one x
        shift = 8 * sum(xs[j] == xs[i] for j in order[:n])
        axes[0].annotate(setting(points[i]), (xs[i], 0.02), xytext=(shift, 0),
                         textcoords="offset points", rotation=90, fontsize=6, color="grey", ha="center", va="bottom")
    for a, b in diffs:
        for key, name in SETS.items():
            d = [paired(records, a, b, key, points[i]) or (0.0, 0.0) for i in order]
            axes[2].errorbar(x, [m for m, _ in d], [2 * se for _, se in d], label=f"{a} - {b}: {name}", marker="o",
                             capsize=3, ls=ls)
    if diffs:
        axes[2].axhline(0, color="grey", lw=1)
        axes[2].set(xlabel=xlabel, ylabel="paired difference, ± 2 standard errors", xscale="log" if log else "linear",
                    title="differences")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def sweep_points():
    """The SWEEP grid's points, each as train.py arguments."""
    return [(f"--lr={lr:g}", f"--replay_weight={w:g}", f"--updates={u}")
            for u in SWEEP["updates"] for lr in SWEEP["lr"] for w in SWEEP["replay_weight"]]


def sweep(opts, common):
    """Every method at every point of the SWEEP grid, on seeds the benchmark does not use (SWEEP_SEEDS); TUNED is
    each method's best on new inputs."""
    points = sweep_points()
    records = along(dict(opts, seeds=SWEEP_SEEDS), common, "sweep", METHODS, points)
    mean = lambda m, p: statistics.mean(r["heldout_acc"] for r in records if r["method"] == m and r["point"] == list(p))
    best = {m: tuned_of(list(max(points, key=lambda p: mean(m, p)))) for m in METHODS}
    said = lambda rows: "; ".join(f"{m} lr {t['lr']:g} replay_weight {t['replay_weight']:g} updates {t['updates']}"
                                  for m, t in rows.items())
    print(f"\nbest: {said(best)}\nbench.py uses (TUNED): {said(TUNED)}")


# -----------------------------------------------------------------------------
# speed


def timed(fn, repeats):
    """Median wall time of fn() over repeats calls, after one call that warms caches up; and fn's last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def speed_sampling(run, repeats):
    """Tokens per second of one step's sampling (prompts_per_step x group_size rows), KV cache against recomputation."""
    c, model = run.c, run.model
    prompts = [encode(p.prompt) for p in run.task.train[: c.prompts_per_step]]
    model.eval()
    res = {}
    for use_cache in (True, False):
        gen = torch.Generator(run.device).manual_seed(0)
        sample = lambda: generate(model, prompts, c.group_size, run.task.max_completion, c.temperature, gen, use_cache)
        t, (comps, _) = timed(sample, repeats)
        res[use_cache] = (sum(map(len, comps)) / t, t)
    model.train()
    print(f"sampling, {len(prompts)} prompts x {c.group_size} samples, up to {run.task.max_completion} tokens each:")
    print(f"  KV cache       {res[True][0]:9.0f} tokens/s  ({res[True][1] * 1e3:.0f} ms per step)")
    print(f"  recomputation  {res[False][0]:9.0f} tokens/s  ({res[False][1] * 1e3:.0f} ms per step)")
    print(f"sampling speedup: {res[True][0] / res[False][0]:.1f}x (KV cache over full recomputation)")
    return dict(cache_tok_s=res[True][0], recompute_tok_s=res[False][0], speedup=res[True][0] / res[False][0])


class Clock:
    """Wall time per phase of a step (pmd.step calls run.clock): clock(phase) charges the time since its previous call
    to phase. On a GPU it first waits for the queued kernels, so that each phase is charged with its own work."""

    def __init__(self, times, device):
        self.times, self.sync, self.last = times, str(device).startswith("cuda"), time.perf_counter()

    def __call__(self, phase):
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self.last
        self.last = now


def speed_step(run, steps):
    """Per-phase wall time of pmd.step, over steps steps after 2 that are not timed."""
    for _ in range(2):
        step(run, run.rng.sample(run.task.train, run.c.prompts_per_step))
    times = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0, run.clock = time.perf_counter(), Clock(times, run.device)
    for _ in range(steps):
        step(run, run.rng.sample(run.task.train, run.c.prompts_per_step))
    total = (time.perf_counter() - t0) / steps
    print(f"\none training step ({run.c.method}, {run.c.prompts_per_step * run.c.group_size} rollouts + {run.c.replay} "
          f"replay examples), mean over {steps} steps: {total * 1e3:.0f} ms")
    for k in ("rollout", "verify", "reflect", "memory", "teacher", "student", "optimizer"):
        if k == "reflect" and k not in times:  # reflect=count: the rule's verdicts are part of the memory update
            continue
        ms = times.get(k, 0.0) / steps * 1e3
        what = dict(rollout="sampling (KV cache)", verify="verifier",
                    reflect="the teacher's weights write the verdicts (reflect=model)",
                    memory="memory update + render", teacher="teacher forward", student="student forward + backward",
                    optimizer="clip, AdamW, EMA teacher")[k]
        print(f"  {k:<10} {ms:8.1f} ms  {ms / (total * 1e3) * 100:5.1f} %   {what}")
    out = dict(step_ms=total * 1e3, phases_ms={k: v / steps * 1e3 for k, v in times.items()})
    if torch.cuda.is_available():
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"  peak GPU memory {out['peak_mem_gb']:.2f} GiB")
    return out


def speed(opts, common):
    """bench.py --speed: the default config unless settings say otherwise; the cached warm-up (trained if missing)."""
    with tempfile.TemporaryDirectory() as d:
        c, task, device, _, _ = train.setup(common + [f"--out_dir={d}"])
        print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
        run = train.start(c, task, device)
        print()
        out = dict(device=device, sampling=speed_sampling(run, repeats=5))
        steps = int(os.environ.get("BENCH_SPEED_STEPS", 20))
        out["step"] = speed_step(run, steps)
    path = os.path.join(opts["bench_dir"], "speed.json")
    os.makedirs(opts["bench_dir"], exist_ok=True)
    save_json(out, path)
    print(f"wrote {path}")


def main(argv):
    modes = dict(bench=bench, sweep=sweep, difficulty=difficulty, speed=speed, pressure=pressure, lucky=lucky,
                 budget=budget)
    mode, opts, given, common = "bench", dict(BENCH), [], []
    for a in argv:
        if a.startswith("--") and a[2:] in modes:
            mode = a[2:]
        elif a in ("-h", "--help"):
            print(__doc__)
            return
        elif a.startswith("--") and a[2:].split("=")[0] in BENCH:
            key, val = a[2:].split("=", 1)
            try:
                opts[key] = type(BENCH[key])(val)
            except ValueError:
                raise ValueError(f"bench option {key!r} expects {type(BENCH[key]).__name__}, got {val!r}") from None
            given.append(key)
        else:
            common.append(a)
    for key in given:  # an option the mode would ignore is an error: the user meant something by it
        if key not in READS[mode]:
            reads = ", ".join(READS[mode]) or "none"
            raise ValueError(f"bench option {key!r} is not read by --{mode}: it reads {reads}")
    if mode in ("pressure", "lucky", "budget") and "seeds" not in given:
        opts["seeds"] = SWEEP_SEEDS_3
    check_options(opts)
    configure(common)  # a bad setting fails now; run_all checks every run's own arguments before any run starts
    modes[mode](opts, common)


def check_options(opts):
    """bench.py's own options (BENCH), before any work."""
    seeds = opts["seeds"].split(",")
    if not all(s.isdigit() and int(s) <= 4294967295 for s in seeds) or len(set(map(int, seeds))) < len(seeds):
        raise ValueError(f"seeds={opts['seeds']!r} is not allowed: distinct ints in [0, 4294967295], comma-separated")
    variant_list(opts)
    if opts["workers"] < 1:
        raise ValueError(f"workers={opts['workers']} is not allowed: [1, inf)")
    if not opts["bench_dir"]:
        raise ValueError("bench_dir is empty: a directory is needed")
    knob_values(opts["knob"])


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
