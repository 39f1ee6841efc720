"""
Benchmarks: does PMD's memory make the memory-free student learn faster and better, and where does the time go.

    python bench.py                  # GRPO, SDPO, PMD and the PMD ablations, 3 seeds each, one shared warm-up:
                                     # a markdown table, out/bench/bench.json, out/bench/curves.png
    python bench.py --sweep          # the learning-rate sweep behind LR below (2 seeds the benchmark does not use)
    python bench.py --n_ops=8 --warmup_steps=2400 --variants=grpo,sdpo,pmd,frozen-memory,frozen-policy --bench_dir=out/bench-ops8
                                     # any train.py setting applies to every run (here: a harder task, a longer warm-up)
    python bench.py --speed          # sampling speedup, per-phase time of one step, memory cost at 100x its size

Bench options: --seeds=1337,1,2  --variants=...  --workers=2 (runs in parallel, the cores split between them)
--bench_dir=out/bench. Every other --key=value is a train.py setting. Each run lives in bench_dir/runs/<name>;
a finished run with the same arguments is reused, so an interrupted benchmark continues where it stopped.
"""
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import train
from memory import Memory
from model import encode, generate
from pmd import Clock, Rollout
from verify import OPS, Problem

# the variants: train.py arguments on top of the run's own; every one starts from the same warm-up checkpoint
VARIANTS = {
    "grpo": ["--method=grpo"],
    "sdpo": ["--method=sdpo"],
    "pmd": ["--method=pmd"],
    # frozen memory: the memory keeps what the first 20 steps put in it (10 % of the budget), then stops learning
    "frozen-memory": ["--method=pmd", "--memory_steps=20"],
    # frozen policy: the memory keeps learning, but from a frozen copy of the initial policy's rollouts
    "frozen-policy": ["--method=pmd", "--memory_from=initial"],
    "no-experience": ["--method=pmd", "--memory_levels=insight,pattern"],
    "no-insight": ["--method=pmd", "--memory_levels=experience,pattern"],
    "no-pattern": ["--method=pmd", "--memory_levels=experience,insight"],
}
# learning rate of each method, the best of `python bench.py --sweep` (mean over its 2 seeds); ablations use PMD's
LR = dict(grpo=3e-4, sdpo=3e-4, pmd=3e-4)
SWEEP_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
EVERY = ["--eval_interval=10"]  # curves at every 640 rollouts (train.py's default evaluates half as often)
SWEEP_SEEDS = (101, 102)
BENCH = dict(seeds="1337,1,2", variants=",".join(VARIANTS), workers=2, bench_dir="out/bench")


def method_of(variant):
    return next(a.split("=")[1] for a in VARIANTS[variant] if a.startswith("--method="))


# -----------------------------------------------------------------------------
# running train.py


def run_one(name, args, bench_dir, threads):
    """python train.py args in bench_dir/runs/name, unless a finished run with these arguments is there.
    Returns the run's record: its evaluations and its wall time."""
    d = os.path.join(bench_dir, "runs", name)
    os.makedirs(d, exist_ok=True)
    args = args + [f"--out_dir={d}"]
    done_path = os.path.join(d, "done.json")
    try:
        with open(done_path) as f:
            done = json.load(f)
        if done["args"] == args:
            return done
    except (OSError, ValueError, KeyError, TypeError):  # not run yet, or a record this run cannot use: run it
        pass
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(os.path.join(d, "log.txt"), "w") as log:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
        p = subprocess.run([sys.executable, script, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    if p.returncode:
        tail = open(os.path.join(d, "log.txt")).read().strip().splitlines()[-1:]
        raise ValueError(f"run {name} failed (exit {p.returncode}): {tail[0] if tail else 'no output'}; log: {d}/log.txt")
    curve = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    done = dict(args=args, wall_s=round(time.time() - t0, 1), curve=[[r["rollouts"], r["heldout_acc"], r["teacher_acc"]] for r in curve])
    tmp = done_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(done, f)
    os.replace(tmp, done_path)
    return done


def run_all(jobs, bench_dir, workers, common):
    """jobs: (name, train.py args). The shared warm-up is trained first (all cores), then the runs go in parallel."""
    c, task, device, _, _ = train.setup(common + [f"--out_dir={tempfile.mkdtemp()}"])
    train.warmup(c, task, device)
    threads = max(1, (os.cpu_count() or 1) // workers)
    results, t0 = {}, time.time()

    def one(job):
        name, args = job
        results[name] = run_one(name, args, bench_dir, threads)
        final = results[name]["curve"][-1]
        print(f"[{len(results)}/{len(jobs)}] {name:<26} held-out {final[1]:.3f}  teacher {final[2]:.3f}  "
              f"({results[name]['wall_s']:.0f} s; {time.time() - t0:.0f} s so far)", flush=True)

    print(f"{len(jobs)} runs, {workers} at a time, {threads} thread(s) each; logs in {bench_dir}/runs/<name>/log.txt", flush=True)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, jobs))  # list(): re-raises a failed run's error here
    return results


# -----------------------------------------------------------------------------
# summarising


def rollouts_to(curve, level=0.8):
    return next((r for r, acc, _ in curve if acc >= level), None)


def mean_std(xs, fmt="{:.3f}"):
    if not xs:
        return "-"
    return fmt.format(statistics.mean(xs)) + (" ± " + fmt.format(statistics.stdev(xs)) if len(xs) > 1 else "")


def table(records, variants):
    rows = ["| method | lr | held-out acc (mean ± std) | rollouts to 80 % | teacher acc | wall per run (s) |",
            "|---|---|---|---|---|---|"]
    for v in variants:
        rs = [r for r in records if r["method"] == v]
        reached = [r["rollouts_to_80"] for r in rs if r["rollouts_to_80"] is not None]
        to80 = "not reached" if not reached else mean_std(reached, "{:.0f}") + ("" if len(reached) == len(rs) else f" ({len(reached)} of {len(rs)} seeds)")
        rows.append(f"| {v} | {rs[0]['lr']:g} | {mean_std([r['heldout_acc'] for r in rs])} | {to80} | "
                    f"{mean_std([r['teacher_acc'] for r in rs])} | {mean_std([r['wall_s'] for r in rs], '{:.0f}')} |")
    return "\n".join(rows)


def plot(records, variants, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path} (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for v in variants:
        curves = [r["curve"] for r in records if r["method"] == v]
        n = min(map(len, curves))
        x = [curves[0][i][0] for i in range(n)]
        accs = [[c[i][1] for c in curves] for i in range(n)]
        mean = [statistics.mean(a) for a in accs]
        std = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
        line, = ax.plot(x, mean, label=v, lw=2 if v in ("pmd", "sdpo", "grpo") else 1)
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.15)
    ax.axhline(0.8, color="grey", ls=":", lw=1)
    ax.set(xlabel="rollouts", ylabel="memory-free held-out accuracy (greedy)", ylim=(0, 1), title="mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# the benchmark and the sweep


def bench(opts, common):
    variants = [v for v in opts["variants"].split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in opts["seeds"].split(",")]
    lr = lambda v: LR[method_of(v)]
    jobs = [(f"{v}-s{s}", [*VARIANTS[v], f"--lr={lr(v)}", f"--seed={s}", *EVERY, *common]) for v in variants for s in seeds]
    t0 = time.time()
    results = run_all(jobs, opts["bench_dir"], opts["workers"], common)
    user_lr = next((a.split("=")[1] for a in common if a.startswith("--lr=")), None)  # a --lr= of the user's overrides LR
    records = []
    for v in variants:
        for s in seeds:
            res = results[f"{v}-s{s}"]
            final = res["curve"][-1]
            records.append(dict(method=v, seed=s, heldout_acc=final[1], rollouts_to_80=rollouts_to(res["curve"]), teacher_acc=final[2],
                                lr=float(user_lr or lr(v)), wall_s=res["wall_s"], rollouts=final[0], curve=res["curve"]))
    with open(os.path.join(opts["bench_dir"], "bench.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"\nfinal memory-free held-out accuracy at {records[0]['rollouts']} rollouts, {len(seeds)} seed(s): "
          f"python bench.py {' '.join(sys.argv[1:])}\n")
    print(table(records, variants))
    print(f"\nwrote {opts['bench_dir']}/bench.json; benchmark wall time {(time.time() - t0) / 60:.1f} min")
    plot(records, variants, os.path.join(opts["bench_dir"], "curves.png"))


def sweep(opts, common):
    """Every method at every learning rate of SWEEP_LRS, on seeds the benchmark does not use."""
    jobs = [(f"{m}-lr{lr:g}-s{s}", [f"--method={m}", f"--lr={lr}", f"--seed={s}", *EVERY, *common]) for m in LR for lr in SWEEP_LRS for s in SWEEP_SEEDS]
    results = run_all(jobs, opts["bench_dir"], opts["workers"], common)
    rows = ["| method | " + " | ".join(f"lr {lr:g}" for lr in SWEEP_LRS) + " |", "|---|" + "---|" * len(SWEEP_LRS)]
    summary = {}
    for m in LR:
        accs = {lr: [results[f"{m}-lr{lr:g}-s{s}"]["curve"][-1][1] for s in SWEEP_SEEDS] for lr in SWEEP_LRS}
        summary[m] = {f"{lr:g}": a for lr, a in accs.items()}
        rows.append(f"| {m} | " + " | ".join(mean_std(accs[lr]) for lr in SWEEP_LRS) + " |")
        best = max(SWEEP_LRS, key=lambda lr: statistics.mean(accs[lr]))
        summary[m]["best"] = best
    print(f"\nfinal held-out accuracy, mean ± std over seeds {SWEEP_SEEDS}: python bench.py {' '.join(sys.argv[1:])}\n")
    print("\n".join(rows))
    print("\nbest: " + ", ".join(f"{m} {summary[m]['best']:g}" for m in LR) + f"   (bench.py uses: {', '.join(f'{m} {v:g}' for m, v in LR.items())})")
    with open(os.path.join(opts["bench_dir"], "sweep.json"), "w") as f:
        json.dump(summary, f, indent=1)


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
        sample = lambda: generate(model, prompts, c.group_size, run.task.max_completion, c.temperature, torch.Generator(run.device).manual_seed(0), use_cache)
        t, (comps, _) = timed(sample, repeats)
        res[use_cache] = (sum(map(len, comps)) / t, t)
    model.train()
    print(f"sampling, {len(prompts)} prompts x {c.group_size} samples, up to {run.task.max_completion} tokens each:")
    print(f"  KV cache       {res[True][0]:9.0f} tokens/s  ({res[True][1] * 1e3:.0f} ms per step)")
    print(f"  recomputation  {res[False][0]:9.0f} tokens/s  ({res[False][1] * 1e3:.0f} ms per step)")
    print(f"sampling speedup: {res[True][0] / res[False][0]:.1f}x (KV cache over full recomputation)")
    return dict(cache_tok_s=res[True][0], recompute_tok_s=res[False][0], speedup=res[True][0] / res[False][0])


def speed_step(run, steps):
    """Per-phase wall time of train_step, over steps steps after 2 that are not timed."""
    for _ in range(2):
        train.train_step(run, run.rng.sample(run.task.train, run.c.prompts_per_step))
    times = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        train.train_step(run, run.rng.sample(run.task.train, run.c.prompts_per_step), Clock(times, run.device))
    total = (time.perf_counter() - t0) / steps
    print(f"\none training step ({run.c.method}, {run.c.prompts_per_step * run.c.group_size} rollouts + {run.c.replay} replay examples), "
          f"mean over {steps} steps: {total * 1e3:.0f} ms")
    for k in ("rollout", "verify", "memory", "teacher", "student", "optimizer"):
        ms = times.get(k, 0.0) / steps * 1e3
        what = dict(rollout="sampling (KV cache)", verify="verifier", memory="memory update + render", teacher="teacher forward",
                    student="student forward + backward", optimizer="clip, AdamW, EMA teacher")[k]
        print(f"  {k:<10} {ms:8.1f} ms  {ms / (total * 1e3) * 100:5.1f} %   {what}")
    out = dict(step_ms=total * 1e3, phases_ms={k: v / steps * 1e3 for k, v in times.items()})
    if torch.cuda.is_available():
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"  peak GPU memory {out['peak_mem_gb']:.2f} GiB")
    return out


def synthetic_fill(memory, n_families, rng):
    """Grow memory by n_families families of synthetic groups, each with a full set of experiences and insights."""
    ops = list(OPS)
    s = memory.settings
    for start in range(0, n_families, 64):
        rolls = []
        for i in range(start, min(start + 64, n_families)):
            fam, group = f"fill{i:06d}", f"fill{i // 4}"
            for j in range(s["max_experiences"] + s["max_insights"]):
                prompt = f"{fam}:{''.join(rng.choice('abcdefghijkl') for _ in range(5))}>"
                plan = tuple(rng.choice(ops) for _ in range(3))
                reward = int(rng.random() < 0.3)
                rolls.append(Rollout(Problem(f"{fam}/{j}", fam, group, prompt, ""), ",".join(plan) + "|x|y|z\n", [], [], reward,
                                     "" if reward else "wrong answer", plan))
        memory.update(rolls)


def speed_memory(run, mem_path, step_ms):
    """Memory update + render with the run's memory and with the memory grown 100x, and one problem's render in each."""
    c, task = run.c, run.task
    rng = random.Random(0)
    problems = run.rng.sample(task.train, c.prompts_per_step)
    rolls = [Rollout(p, task.attempt(p, rng, 0.3), [], [], 0, "", None) for p in problems for _ in range(c.group_size)]
    for r in rolls:
        r.reward, r.feedback = task.verify(r.problem, r.completion)
        r.strategy = task.strategy(r.problem, r.completion)
    small = Memory.load(mem_path)
    n = len(small.groups)
    big = Memory.load(mem_path)
    big.settings.update(max_families=100 * big.settings["max_families"])
    synthetic_fill(big, 99 * max(n, 1), rng)
    res = {}
    for name, mem in (("run's memory", small), ("grown 100x", big)):
        size, families = sum(map(len, mem.experience.values())), len(mem.groups)  # before the timed updates add some

        def update_and_render(mem=mem):
            mem.update(rolls)
            for p in problems:
                mem.render(p)

        t_upd, _ = timed(update_and_render, 20)
        t_one, _ = timed(lambda mem=mem: mem.render(problems[0]), 200)
        res[name] = dict(families=families, experiences=size, update_render_ms=t_upd * 1e3, render_one_us=t_one * 1e6)
        print(f"  {name:<13} {families:6d} families {size:7d} experiences: update + render {t_upd * 1e3:6.2f} ms "
              f"({t_upd * 1e3 / step_ms * 100:.2f} % of a step); one problem's render {t_one * 1e6:.0f} us")
    ratio = res["grown 100x"]["render_one_us"] / res["run's memory"]["render_one_us"]
    print(f"  one render, 100x memory over the run's: {ratio:.2f}x")
    return res


def speed(common):
    """bench.py --speed: the default config unless settings say otherwise; the cached warm-up (trained if missing)."""
    with tempfile.TemporaryDirectory() as d:
        c, task, device, _, _ = train.setup(common + [f"--out_dir={d}"])
        print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
        run = train.start(c, task, device)
        print()
        out = dict(device=device, sampling=speed_sampling(run, repeats=5))
        steps = int(os.environ.get("BENCH_SPEED_STEPS", 20))
        out["step"] = speed_step(run, steps)
        mem_path = os.path.join(d, "memory.json")
        run.memory.save(mem_path)
        print(f"\nmemory cost (its update + render runs once per step) after {steps + 2} steps:")
        out["memory"] = speed_memory(run, mem_path, out["step"]["step_ms"])
    os.makedirs("out/bench", exist_ok=True)
    with open("out/bench/speed.json", "w") as f:
        json.dump(out, f, indent=1)
    print("wrote out/bench/speed.json")


def main(argv):
    mode = "bench"
    opts, common = dict(BENCH), []
    for a in argv:
        if a in ("--speed", "--sweep"):
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
        else:
            common.append(a)
    train.parse_args(common, {k: getattr(train, k) for k in train.CONFIG_KEYS})  # a bad setting fails now, not in every run
    if opts["workers"] < 1:
        raise ValueError(f"workers must be >= 1, got {opts['workers']}")
    if mode == "speed":
        return speed(common)
    os.makedirs(opts["bench_dir"], exist_ok=True)
    (sweep if mode == "sweep" else bench)(opts, common)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
