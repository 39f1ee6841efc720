"""
Warm-up, then online self-improvement with GRPO, SDPO, PMD or the replay control (rft), on the built-in task.

    python train.py                              # warm-up (cached), then PMD; CUDA when present, else CPU
    python train.py --method=sdpo --out_dir=out/sdpo   # each method at its own tuned lr, replay_weight, updates
    python train.py --init_from=resume           # continue the run in out_dir, bit for bit
    python train.py --help                       # every setting (config.py): its default and what it allows
    torchrun --standalone --nproc_per_node=8 train.py   # one process per GPU (NCCL; gloo on CPU)

Under torchrun each rank samples its share of each step's problems, gradients are averaged, every rank's memory takes
all ranks' rollouts; rank 0 evaluates and writes out_dir: ckpt.pt, memory.json, metrics.jsonl (one line per evaluation).
"""
import datetime
import json
import math
import os
import random
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import TASK_SETTINGS, configure, levels, pick_device, warn_pointless
from memory import LEVELS, Memory, settings_of
from checkpoint import RESUME_KEYS, load_checkpoint, load_weights, open_metrics, save, to_tuple
from model import GPT, GPTConfig, decode, encode, generate
from pmd import make_teacher, reflection, rollout, step, verify
from warmup import reference_memory, warmup
from verify import HiddenProcedures

# -----------------------------------------------------------------------------
# evaluation: the memory-free student, and the teacher reading the memory

HELDOUT = ("heldout", "unseen")  # the two evaluation sets: new inputs of the RL families, families RL never trains on
PASS_K = (1, 4, 16)  # pass@k at the start and the end of a run, from PASS_K[-1] samples per problem


@torch.no_grad()
def solved(model, task, problems, contexts):
    """Greedy reward (0 or 1) on each problem, after its context ('' for the memory-free student)."""
    if not problems:
        return []
    prompts = [encode(c + p.prompt) for c, p in zip(contexts, problems)]
    comps, _ = generate(model, prompts, 1, task.max_completion, temperature=0)
    return [task.verify(p, decode(y))[0] for p, y in zip(problems, comps)]


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def per_family(problems, rewards):
    """family -> share of its problems solved (3 decimals: metrics.jsonl stays compact)."""
    fams = {}
    for p, r in zip(problems, rewards):
        fams.setdefault(p.family, []).append(r)
    return {f: round(sum(rs) / len(rs), 3) for f, rs in fams.items()}


def right_strategies(task):
    """family -> the strategy of its reference solution, as the memory writes it: what a right insight says."""
    steps = {p.family: task.strategy(p, task.solve(p)) for p in task.heldout + task.unseen}
    return {f: ",".join(s) for f, s in steps.items() if s is not None}


@torch.no_grad()
def pass_at_k(model, task, problems, c, device):
    """For each k in PASS_K, the share of problems that one of k samples solves: 1 - C(n - right, k) / C(n, k) from
    n = PASS_K[-1] samples at the RL temperature, from a generator of its own (training's streams stay as they were)."""
    if not problems:
        return {}
    n = PASS_K[-1]
    gen = torch.Generator(device=device).manual_seed(c.seed)
    comps, _ = generate(model, [encode(p.prompt) for p in problems], n, task.max_completion, c.temperature, gen)
    right = [sum(task.verify(p, decode(y))[0] for y in comps[i * n : (i + 1) * n]) for i, p in enumerate(problems)]
    return {k: sum(1 - math.comb(n - r, k) / math.comb(n, k) for r in right) / len(problems) for k in PASS_K}


def headroom(model, task, c):
    """Right after warm-up: the student without memory against the teacher given each level of a reference memory
    (warmup.reference_memory), on both evaluation sets. An unseen family has no experience or insight of its own."""
    mem, rows = reference_memory(task, settings_of(c), c.seed), {}
    for name in HELDOUT:
        probs = getattr(task, name)
        row = dict(student=mean(solved(model, task, probs, [""] * len(probs))))
        for lvl in LEVELS:
            row[f"teacher+{lvl}"] = mean(solved(model, task, probs, [mem.render(p, (lvl,)) for p in probs]))
        row["teacher+all"] = mean(solved(model, task, probs, [mem.render(p) for p in probs]))
        rows[name] = row
    return rows


def print_headroom(model, task, c, device):
    rows = headroom(model, task, c)
    print("\nheadroom after warm-up (greedy accuracy; the teacher reads a reference memory: per RL family 3 verified "
          "traces, then a lucky pass):")
    print(f"  {'':<32}" + "".join(f"{k:>19}" for k in rows["heldout"]))
    for name, row in rows.items():
        probs = getattr(task, name)
        what = f"{name} ({len(probs)} problems, {len({p.family for p in probs})} families)"
        print(f"  {what:<32}" + "".join(f"{'-' if v is None else f'{v:.3f}':>19}" for v in row.values()))
    if c.reflect == "model":
        f = reflection_probe(model, model, task, c, device)
        pct = lambda k: "-" if f[k] is None else f"{f[k]:.1%}"
        print(f"  reflection fidelity on the RL families' rollouts ({f['reflect_written']} verdicts written, "
              f"{f['reflect_dropped']} parts unparsed): the rule agrees with {pct('reflect_agree')}, flipped "
              f"{pct('reflect_flipped')}, invented {pct('reflect_invented')}; missed {pct('reflect_missed')} of the "
              "rule's")


def fidelity_shares(counts, prefix="reflect_"):
    """memory.fidelity's counts (summed over reflections) as shares of the verdicts written (agree, flipped,
    invented) or of the rule's (missed), with the written and unparsed counts."""
    w, r = counts.get("written", 0), counts.get("rule", 0)
    share = lambda k, d: round(counts.get(k, 0) / d, 4) if d else None
    return {f"{prefix}{k}": v for k, v in dict(agree=share("agree", w), flipped=share("flipped", w),
            invented=share("invented", w), missed=share("missed", r), written=w,
            dropped=counts.get("dropped", 0)).items()}


def reflection_probe(model, teacher, task, c, device):
    """Reflection fidelity: the student's group_size samples at the RL temperature (a generator of its own) on each RL
    family's first training problem, reflected on by the teacher's weights, scored against the counting rule."""
    firsts = {}
    for p in task.train:
        firsts.setdefault(p.family, p)
    gen = torch.Generator(device=device).manual_seed(c.seed)
    rolls = verify(task, rollout(model, task, list(firsts.values()), c.group_size, c.temperature, gen))
    return fidelity_shares(reflection(teacher, rolls, c.group_size)[1])


def evaluate(model, teacher, task, memory, c, device, pass_k=False, right=None):
    """Greedy accuracy of the memory-free student and of the teacher reading the memory, on both sets and per family;
    the memory's census (right: right_strategies(task)); pass@k with pass_k; the reflection probe (reflect=model)."""
    model.eval()
    out, fam, t_fam = memory.census(right or {}), {}, {}
    for name in HELDOUT:
        probs, tag = getattr(task, name), "" if name == "heldout" else f"{name}_"
        student = solved(model, task, probs, [""] * len(probs))
        teacher_ = solved(teacher, task, probs, [memory.render(p, levels(c)) for p in probs])
        out[f"{name}_acc"], out[f"teacher_{tag}acc"] = mean(student), mean(teacher_)
        fam[name], t_fam[name] = per_family(probs, student), per_family(probs, teacher_)
        if pass_k:
            out.update({f"{name}_pass@{k}": v for k, v in pass_at_k(model, task, probs, c, device).items()})
    if c.reflect == "model":
        out.update(reflection_probe(model, teacher, task, c, device))
    model.train()
    return dict(out, family_acc=fam, teacher_family_acc=t_fam)


# -----------------------------------------------------------------------------
# the run


def make_task(c):
    return HiddenProcedures(seed=c.task_seed, **{k: getattr(c, k) for k in TASK_SETTINGS})


def setup(argv, task=None):
    """Check everything (config.configure), make the task, warn of pointless settings, pick the device, join the
    process group under torchrun. Returns (config, task, device, rank, world)."""
    c = configure(argv, task)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    task = task or make_task(c)
    if not rank:
        warn_pointless(c, task)
    try:
        os.makedirs(c.out_dir, exist_ok=True)
        probe = os.path.join(c.out_dir, f".write-test-{rank}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"out_dir {c.out_dir!r} is not writable ({e.strerror})") from None
    device = pick_device(c)
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        # the long timeout covers rank 0 training the warm-up while the others wait at a barrier
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=1))
        if rank:
            sys.stdout = open(os.devnull, "w")
    return c, task, device, rank, world


def start(c, task, device, rank=0, world=1):
    """Everything a run holds (model; student, its compiled form; teacher, optimizer, memory, RNGs, counts), from the
    warm-up checkpoint or, with init_from=resume, out_dir's. A fresh run prints the headroom table."""
    ckpt_path, mem_path = os.path.join(c.out_dir, "ckpt.pt"), os.path.join(c.out_dir, "memory.json")
    if c.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path, RESUME_KEYS)
        model = GPT(GPTConfig(c.block_size, c.n_layer, c.n_head, c.n_embd)).to(device)
        load_weights(model, ckpt["model"], ckpt_path)
        memory = Memory.load(mem_path)
        if memory.step != ckpt.get("memory_step", memory.step):  # a kill between the two renames in save()
            raise ValueError(f"{mem_path} (memory step {memory.step}) does not belong to {ckpt_path} "
                             f"(memory step {ckpt['memory_step']})")
        if ckpt.get("world_size", 1) != world:
            raise ValueError(f"{ckpt_path} was written by {ckpt.get('world_size', 1)} rank(s); resume it with as "
                             f"many, not {world}")
    else:
        if rank:
            dist.barrier()  # rank 0 trains (or loads) the warm-up checkpoint and caches it; then the others load it
        model = warmup(c, task, device)
        if world > 1 and not rank:
            dist.barrier()
        memory = Memory.load(c.memory_init) if c.memory_init else Memory(**settings_of(c))
        model.eval()
        print_headroom(model, task, c, device)
        model.train()
    run = SimpleNamespace(c=c, task=task, device=device, rank=rank, world=world, model=model, memory=memory, step=0,
                          rollouts=0, teacher=make_teacher(model, c.teacher), levels=levels(c),
                          mem_settings=settings_of(c), clock=lambda phase: None,  # bench.py --speed times phases
                          opt=torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0),
                          rng=random.Random(c.seed),  # problem order and replay examples: the same on every rank
                          gen=torch.Generator(device=device).manual_seed(c.seed + rank))  # sampling: per rank
    torch.manual_seed(c.seed)
    if c.init_from == "resume":
        try:
            run.opt.load_state_dict(ckpt["optimizer"])
            if "teacher" in ckpt and run.teacher is not model:
                load_weights(run.teacher, ckpt["teacher"], ckpt_path)
            run.step, run.rollouts = ckpt["step"], ckpt["rollouts"]
            run.rng.setstate(to_tuple(ckpt["py_rng"]))
            torch.set_rng_state(ckpt["torch_rng"])
            run.gen.set_state(ckpt["gen_rngs"][rank] if world > 1 else ckpt["gen_rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"checkpoint {ckpt_path} does not fit this run ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]})") from None
    run.student = torch.compile(model) if c.compile else model

    def gather(rolls):  # every rank's rollouts in rank order: the memory update is the same on every rank
        parts = [None] * world
        dist.all_gather_object(parts, rolls)
        return [r for part in parts for r in part]

    run.gather = gather
    return run


def main(argv, task=None):
    """Run from command-line style arguments. task: any object with the interface in verify.py's docstring
    (default: the built-in HiddenProcedures made from the task settings)."""
    c, task, device, rank, world = setup(argv, task)
    master = rank == 0  # the one rank that evaluates, writes files and prints
    metrics_path, t0 = os.path.join(c.out_dir, "metrics.jsonl"), time.time()
    run = start(c, task, device, rank, world)
    if master:
        open_metrics(run, metrics_path)
    right = right_strategies(task)

    def log(step_, extra, pass_k=False):  # evaluation runs on rank 0 only
        if not master:
            return {}
        rec = dict(step=step_, method=c.method, rollouts=run.rollouts,
                   **evaluate(run.model, run.teacher, task, run.memory, c, device, pass_k, right), **extra)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    if run.step == 0:
        families = {p.family: [p.group, right.get(p.family)] for p in task.heldout + task.unseen}  # for report.py
        before = log(0, dict(families=families), pass_k=True).get("heldout_acc", 0.0)
    else:
        before = json.loads(open(metrics_path).readline())["heldout_acc"] if master else 0.0
    bar = tqdm(range(run.step, c.steps), desc=c.method, dynamic_ncols=True, initial=run.step, total=c.steps,
               disable=not master)
    last, nonfinite, saved, rewards, reflected = {}, 0, run.step if c.init_from == "resume" else None, [], {}
    for it in bar:
        loss, norm, stats, finite = step(run, run.rng.sample(task.train, c.prompts_per_step))
        rewards.append(stats["reward"])
        for k, v in stats.items():  # the model's verdicts that reached the memory (reflect=model)
            if k.startswith("reflect_"):
                reflected[k.removeprefix("reflect_")] = reflected.get(k.removeprefix("reflect_"), 0) + v
        nonfinite = 0 if finite else nonfinite + 1
        if not finite and master:
            tqdm.write(f"warning: step {it + 1}: non-finite loss ({loss.item():.4g}) or gradient norm "
                       f"({norm.item():.4g}); update skipped ({nonfinite} in a row, max_nonfinite={c.max_nonfinite})")
        if nonfinite >= c.max_nonfinite:
            where = (f"the last good checkpoint, {c.out_dir}/ckpt.pt (step {saved}), is intact" if saved is not None
                     else "no checkpoint was written")
            raise ValueError(f"{nonfinite} consecutive steps with a non-finite loss or gradient norm (steps "
                             f"{it + 2 - nonfinite}-{it + 1}); stopped, {where}")
        if (it + 1) % c.eval_interval == 0 or it + 1 == c.steps:  # means since the last evaluation
            since = dict(reward=sum(rewards) / len(rewards))
            since.update(fidelity_shares(reflected, "rl_reflect_") if reflected else {})
            last = log(it + 1, since, pass_k=it + 1 == c.steps)
            rewards, reflected = [], {}
            save(run, it + 1)
            saved = it + 1
        bar.set_postfix(reward=f"{stats['reward']:.2f}", heldout=f"{last.get('heldout_acc', before):.2f}",
                        teacher=f"{last.get('teacher_acc', 0):.2f}")
    if world > 1:
        dist.barrier()  # rank 0 evaluates (pass@k at the end) while the others wait: none tears down the group early
        dist.destroy_process_group()
    if master:
        summary(c, run, metrics_path, time.time() - t0)


def summary(c, run, metrics_path, seconds):
    recs = [json.loads(line) for line in open(metrics_path)]
    first, end = recs[0], recs[-1]
    print(f"\nmemory-free accuracy (greedy) before -> after ({c.method}, {c.steps} steps, {run.rollouts} rollouts, "
          f"{seconds:.0f} s):")
    for name in HELDOUT:
        if end.get(f"{name}_acc") is not None:
            passes = "  ".join(f"pass@{k} {first[f'{name}_pass@{k}']:.3f} -> {end[f'{name}_pass@{k}']:.3f}"
                               for k in PASS_K)
            print(f"  {name:<8} {first[f'{name}_acc']:.3f} -> {end[f'{name}_acc']:.3f}   {passes}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
