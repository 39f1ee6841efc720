"""
Reading a finished run directory: the final memory, how it grew, and when the memory-free student caught up with it.

    python report.py out/memory.json     the memory's three levels: patterns, strategies, lessons, traces
    python report.py out/                the same, then how the memory grew per level at
                                         every evaluation, and a per-family timeline: when the memory held the family's
                                         right strategy, when the teacher and the memory-free student solved it, the lag
    python report.py out/ --plot         also writes out/memory.png (needs matplotlib; training never does)
    python report.py out/ --family=A07   one family up close: the memory lines the teacher reads for one held-out
                                         problem, the teacher's and the student's greedy answers, their verdicts
"""
import json
import os
import sys
from collections import Counter
from types import SimpleNamespace

import torch

import config
from memory import Memory, clean, net
from checkpoint import load_checkpoint, load_weights
from model import GPT, GPTConfig, decode, encode, generate
from train import make_task

SOLVED = 0.5  # a family counts as solved at an evaluation once this share of its held-out problems is (greedy)
GROWTH = dict(mem_passing="passing", mem_failing="failing", mem_strategies="strategies", mem_lessons="lessons",
              mem_patterns="patterns", mem_confirmed="confirmed", mem_confirmed_right="right")


def describe(mem):
    """The three levels as text a person reads."""
    size = lambda level: sum(map(len, level.values()))
    out = [f"memory at step {mem.step}: {len(mem.groups)} families, {size(mem.experience)} experiences, "
           f"{size(mem.insight)} insights, {size(mem.pattern)} patterns"]
    if mem.pattern:
        out.append("\npatterns (per cluster of families)")
    for g, pats in sorted(mem.pattern.items()):
        for k, p in pats.items():
            against = f" (not by {', '.join(p['against'])})" if p["against"] else ""
            out.append(f"  {g:<8} step {k} shared by {', '.join(p['support'])}{against}")
    for fam in sorted(mem.groups):
        out.append(f"\nfamily {fam} ({mem.groups[fam]})")
        for s, it in sorted(mem.insight.get(fam, {}).items(), key=lambda kv: -net(kv[1])):
            kind = "strategy" if net(it) > 0 else "lesson  " if net(it) < 0 else "retired "
            out.append(f"  {kind} {s:<16} passed on {len(it['agree'])} inputs, failed on {len(it['contradict'])}")
        for e in mem.experience.get(fam, []):
            out.append(f"  trace    {e['text']}  -> {e['reward']} {e['feedback']}")
    return "\n".join(out)


def read_run(run_dir):
    """(the evaluations of run_dir/metrics.jsonl, its final Memory or None, notes on what is missing). A torn line
    (a kill mid-write) ends the evaluations; a missing or unreadable memory.json leaves the memory None."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror})") from None
    recs, notes = [], []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            int(rec["step"])
        except (ValueError, KeyError, TypeError, IndexError):
            notes.append(f"line {i} of {path} is torn or not an evaluation: read the {len(recs)} before it")
            break
        recs.append(rec)
    if not recs:
        raise ValueError(f"{path} holds no evaluation")
    old = sum("memory_family" not in r or "family_acc" not in r for r in recs)
    if old:
        notes.append(f"{old} of {len(recs)} evaluations lack the memory counts and per-family accuracy (a run from "
                     "before they were logged): the growth table and the timeline leave them out")
    try:
        mem = Memory.load(os.path.join(run_dir, "memory.json"))
    except ValueError as e:
        mem = None
        notes.append(f"{e}: no view of the final memory, and no patterns for the unseen families")
    return recs, mem, notes


def first_step(recs, test):
    return next((r["step"] for r in recs if test(r)), None)


def timeline(recs):
    """family -> {set, memory_right, memory_wrong, teacher, student, lag}: the step of the first evaluation at which
    the memory held the family's right (wrong) confirmed strategy, the teacher with memory solved the family's
    held-out problems, the memory-free student did, and student - memory_right (the internalisation lag)."""
    recs = [r for r in recs if "memory_family" in r and "family_acc" in r]
    out = {}
    for name in ("heldout", "unseen"):
        for f in sorted({f for r in recs for f in r["family_acc"].get(name, {})}):
            right = first_step(recs, lambda r: r["memory_family"].get(f) == 1)
            student = first_step(recs, lambda r: r["family_acc"][name].get(f, 0) >= SOLVED)
            out[f] = dict(set=name, memory_right=right,
                          memory_wrong=first_step(recs, lambda r: r["memory_family"].get(f) == -1),
                          teacher=first_step(recs, lambda r: r["teacher_family_acc"][name].get(f, 0) >= SOLVED),
                          student=student, lag=None if right is None or student is None else student - right)
    return out


def mean_lag(recs):
    """(mean internalisation lag over the families that both the memory and the student got, how many they are)."""
    lags = [t["lag"] for t in timeline(recs).values() if t["lag"] is not None]
    return (sum(lags) / len(lags) if lags else None), len(lags)


def describe_run(run_dir):
    """The final memory, then how it grew and the per-family timeline, as text a person reads."""
    recs, mem, notes = read_run(run_dir)
    out = ([describe(mem)] if mem else []) + [f"note: {n}" for n in notes]
    new = [r for r in recs if "memory_family" in r]
    if new:
        out.append("\nmemory growth (at every evaluation): experiences passing and failing, strategies, lessons, "
                   "patterns,\nfamilies with a confirmed strategy, and how many of those are right")
        out.append("  " + f"{'step':>6}" + "".join(f"{v:>12}" for v in GROWTH.values()))
        out += ["  " + f"{r['step']:>6}" + "".join(f"{r[k]:>12}" for k in GROWTH) for r in new]
    tl = timeline(recs)
    if tl:
        out += timeline_lines(recs, tl)
        unseen = {f: t for f, t in tl.items() if t["set"] == "unseen"}
        if unseen:
            out += unseen_lines(recs[0].get("families", {}), unseen, mem)
    return "\n".join(out)


def timeline_lines(recs, tl):
    fmt = lambda x: "-" if x is None else str(x)
    out = [f"\nper-family timeline: the first step at which the memory held the right (wrong) strategy, and the "
           f"teacher with\nmemory and the memory-free student solved at least {SOLVED:.0%} of the family's held-out "
           "problems (greedy)",
           f"  {'family':<8}{'memory right':>14}{'memory wrong':>14}{'teacher':>9}{'student':>9}{'lag':>6}"]
    held = {f: t for f, t in tl.items() if t["set"] == "heldout"}
    out += [f"  {f:<8}{fmt(t['memory_right']):>14}{fmt(t['memory_wrong']):>14}{fmt(t['teacher']):>9}"
            f"{fmt(t['student']):>9}{fmt(t['lag']):>6}" for f, t in held.items()]
    lag, n = mean_lag(recs)
    never = [f for f, t in held.items() if t["memory_right"] is not None and t["student"] is None]
    out.append(f"  mean lag {'-' if lag is None else f'{lag:.0f} steps'} over the {n} families both the memory and the "
               f"student got; the student never caught up with the memory on {len(never)}"
               + (f" ({', '.join(never)})" if never else ""))
    return out


def unseen_lines(families, unseen, mem):
    """The unseen families' timeline, with the patterns of their clusters (families: family -> [group, plan])."""
    fmt = lambda x: "-" if x is None else str(x)
    out = ["\nunseen families (RL never trains on them; only their clusters' patterns reach them)",
           f"  {'family':<8}{'teacher':>9}{'student':>9}   patterns of its clusters in the final memory "
           "(right for it?)"]
    for f, t in unseen.items():
        group, plan = families.get(f, [None, None])
        pats = [(key, k) for key in (group or "").split() for k in (mem.pattern.get(key, {}) if mem else {})]
        right = lambda k: plan and plan.split(",")[int(k.split(":")[0]) - 1] == k.split(":", 1)[1]
        said = ", ".join(f"{key} {k} ({'yes' if right(k) else 'no'})" for key, k in pats)
        out.append(f"  {f:<8}{fmt(t['teacher']):>9}{fmt(t['student']):>9}   "
                   + (said or ("none" if group and mem else "unknown")))
    return out


def plot_run(run_dir, path):
    """A PNG: the memory's size per level over steps, and the per-family timeline as bars (memory right -> student)."""
    recs, _, _ = read_run(run_dir)
    new, tl = [r for r in recs if "memory_family" in r], timeline(recs)
    if not new:
        raise ValueError(f"{run_dir}/metrics.jsonl has no memory counts to plot (a run from before they were logged)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib); training never does") from None
    fams = [f for f, t in tl.items() if t["set"] == "heldout"]
    end, steps = new[-1]["step"], [r["step"] for r in new]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 0.3 * len(fams) + 4))
    for k, label in list(GROWTH.items())[:5]:
        ax.plot(steps, [r[k] for r in new], label=label, lw=2)
    ax.plot(steps, [r["mem_confirmed_right"] for r in new], "k--", label="families with the right strategy")
    ax.set_yscale("symlog", linthresh=10)  # lessons run to hundreds, patterns to a few
    ax.set(xlabel="RL step", ylabel="items in the memory (linear below 10, log above)", title="memory size per level")
    ax.legend(fontsize=8)
    marks = (("memory_wrong", "memory wrong", "x", "tab:red"), ("teacher", "teacher solves", "^", "tab:blue"),
             ("student", "student solves", "o", "tab:green"))
    for y, f in enumerate(fams):
        t = tl[f]
        if t["memory_right"] is not None:  # the lag: memory right -> student solves (or the run's end, hatched)
            stop = end if t["student"] is None else t["student"]
            bx.barh(y, max(stop - t["memory_right"], 1), left=t["memory_right"], color="tab:orange", alpha=0.6,
                    hatch="//" if t["student"] is None else None)
        for key, _, mark, color in marks:
            if t[key] is not None:
                bx.plot(t[key], y, mark, color=color, ms=8)
    bx.plot([], [], "s", color="tab:orange", alpha=0.6, label="memory right -> student solves (hatched: not yet)")
    for _, label, mark, color in marks:
        bx.plot([], [], mark, color=color, label=label)
    bx.set(yticks=range(len(fams)), yticklabels=fams, xlim=(-5, end + 5), ylim=(len(fams) - 0.5, -0.5),
           xlabel=f"RL step (solves: greedy, at least {SOLVED:.0%} of the family's held-out problems)",
           title="per family: the memory knows, the student catches up")
    bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def up_close(run_dir, family):
    """One family at the run's end: for its first held-out problem, the memory lines the teacher reads, the teacher's
    greedy answer with them and the memory-free student's, with their verdicts, and what the student samples. The
    built-in task only: it is rebuilt from the checkpoint's settings."""
    path = os.path.join(run_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    c = SimpleNamespace(**{k: ckpt["config"].get(k, getattr(config, k)) for k in config.CONFIG_KEYS})
    task, mem = make_task(c), Memory.load(os.path.join(run_dir, "memory.json"))
    probs = [p for p in task.heldout + task.unseen if p.family == family]
    if not probs:
        names = ", ".join(sorted({p.family for p in task.heldout + task.unseen}))
        raise ValueError(f"family {family!r} is not in this run's task (its families: {names})")
    p, models = probs[0], {}
    for who in ("student", "teacher"):  # a live teacher is the student
        models[who] = GPT(GPTConfig(c.block_size, c.n_layer, c.n_head, c.n_embd))
        load_weights(models[who], ckpt["model"] if who == "student" else ckpt.get("teacher", ckpt["model"]), path)
        models[who].eval()
    context = mem.render(p, config.levels(c))
    kind = "new input" if p in task.heldout else "unseen family"
    out = [f"family {family} at step {ckpt.get('step', '?')}, problem {p.pid} ({kind}); its right strategy: "
           f"{','.join(task.strategy(p, task.solve(p)))}",
           "memory lines the teacher reads:" + ("".join(f"\n  {line}" for line in context.splitlines()) or " none")]
    with torch.no_grad():
        for who, ctx in (("teacher", context), ("student", "")):
            comp, _ = generate(models[who], [encode(ctx + p.prompt)], 1, task.max_completion, temperature=0)
            reward, feedback = task.verify(p, decode(comp[0]))
            who += " (with memory)" if ctx else " (no memory)"
            out.append(f"{who:<24} {clean(p.prompt + decode(comp[0]), 80)}   -> {reward} {feedback}")
        # what the student explores: its strategies over 16 samples at the RL temperature (None: an unfaithful trace)
        gen = torch.Generator().manual_seed(c.seed)
        comps, _ = generate(models["student"], [encode(p.prompt)], 16, task.max_completion, c.temperature, gen)
        texts = [decode(y) for y in comps]
    tally = Counter(",".join(s) if s else "unfaithful" for s in (task.strategy(p, t) for t in texts))
    passed = sum(task.verify(p, t)[0] for t in texts)
    out.append(f"student, 16 samples at temperature {c.temperature:g}: {passed} pass; strategies "
               + ", ".join(f"{s} x{n}" for s, n in tally.most_common()))
    return "\n".join(out)


def main(args):
    if not args or args[0] in ("-h", "--help"):
        sys.exit(print(__doc__) if args else "usage: python report.py out/memory.json  |  out/ [--plot] [--family=A07]")
    path, flags = args[0], args[1:]
    if not os.path.isdir(path):
        if flags:
            raise ValueError(f"{' '.join(flags)}: options need a run directory, like {os.path.dirname(path) or 'out'}/")
        return print(describe(Memory.load(path)))
    unknown = [f for f in flags if f != "--plot" and not f.startswith("--family=")]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}: --plot, --family=NAME")
    families = [f.split("=", 1)[1] for f in flags if f.startswith("--family=")]
    print(up_close(path, families[-1]) if families else describe_run(path))
    if "--plot" in flags:
        print(f"wrote {plot_run(path, os.path.join(path, 'memory.png'))}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
