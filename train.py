"""
Warm-up, then online self-improvement with GRPO, SDPO or PMD, on the built-in task.

    python train.py                              # warm-up (cached), then PMD; CUDA when present, else CPU
    python train.py --method=sdpo --out_dir=out/sdpo
    python train.py --init_from=resume           # continue the run in out_dir
    python train.py --help                       # every setting, its default and its comment
    torchrun --standalone --nproc_per_node=8 train.py   # one process per GPU (NCCL; gloo on CPU). Each rank samples
        # its share of every step's problems, gradients are averaged, every rank updates the memory with all ranks'
        # rollouts; rank 0 evaluates and writes files. Resume with the same number of ranks.

Every setting lives in the block below; any of them can be overridden as --key=value.
Writes to out_dir: ckpt.pt, memory.json, metrics.jsonl (one JSON object per evaluation).
"""
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

from memory import LEVELS, SETTINGS as MEMORY_DEFAULTS, Memory
from model import GPT, GPTConfig, VOCAB_SIZE, encode, decode, generate
from pmd import Clock, Rollout, ema_update, make_teacher, reflection, rollout, sft_loss, step as pmd_step, warmup_example
from verify import HiddenProcedures, check_settings as check_task_settings, sizes as task_sizes

# -----------------------------------------------------------------------------
# config: the one source of truth; each line is overridable as --key=value
# Each comment starts with what is allowed, checked before any work: [lo, hi] (a round bracket leaves its end out;
# a float must be finite) or a|b|c (N: any number).
# I/O
out_dir = "out"  # a writable directory: ckpt.pt, memory.json, metrics.jsonl
init_from = "scratch"  # scratch|resume: the warm-up checkpoint, then RL; or continue the run in out_dir
cache_dir = "cache"  # a directory: warm-up checkpoints, keyed by everything they depend on, shared by all methods and seeds
device = "auto"  # auto|cpu|cuda|cuda:N: auto is cuda if available, else cpu
compile = False  # torch.compile the student (CUDA)
seed = 1337  # [0, 4294967295]: RL seed: problem order, sampling
# task (the built-in hidden-procedure task; its difficulty knobs)
plan_len = 2  # [1, 6]: ops per hidden plan (a random plan is right 1 time in n_ops**plan_len)
n_ops = 6  # [2, 8]: ops to choose from
n_groups = 3  # [1, 10]: letters of RL ids (each sets its own first op: at most n_ops)
families_per_group = 4  # [1, 8]: RL families per letter (each digit of an id takes families_per_group + 2 values)
input_len = 5  # [2, 12]: letters per input string
n_train = 32  # [1, inf): RL inputs per family (with n_heldout at most the 12**input_len distinct inputs)
n_heldout = 8  # [1, inf): held-out inputs per family (evaluation only), and inputs per unseen family
n_unseen = 2  # [0, 2]: families per letter that RL never trains on, a letter with a first digit none of its RL families has (evaluation only)
answer_len = 2  # [1, 12]: letters of the last string the verifier checks (at most input_len): a wrong plan passes by chance about 1 time in 12**answer_len
task_seed = 0  # [0, 4294967295]: the family table
# model
n_layer = 3  # [1, inf)
n_head = 4  # [1, inf): n_embd / n_head must be an even number (rotary embeddings rotate pairs)
n_embd = 128  # [2, inf)
block_size = 256  # [1, inf): tokens a sequence may hold: memory budget + prompt + completion must fit
# warm-up: executing procedures and reading memory lines, on families never used in RL
warmup_steps = 1600  # [0, inf): 0 starts RL from an untrained model
warmup_batch = 32  # [1, inf)
warmup_lr = 2e-3  # (0, 1]: peak rate (a 50-step ramp, then a linear decay to zero)
warmup_seed = 0  # [0, 4294967295]
# RL
method = "pmd"  # grpo|sdpo|pmd|rft: rft is the replay control (imitate the memory's verified successes, no teacher)
steps = 200  # [1, inf): RL steps
prompts_per_step = 8  # [1, inf): problems per step (at most the training problems; a multiple of the ranks)
group_size = 8  # [1, inf): samples per problem (G)
temperature = 1.0  # [0, inf): sampling temperature; 0 is greedy
lr = 1e-3  # (0, 1]: RL learning rate: PMD's best in `python bench.py --sweep` (bench.TUNED has every method's)
lr_warmup = 20  # [0, inf): steps of linear learning-rate ramp at the start of RL (a fresh Adam's first steps move every weight by lr)
grad_clip = 1.0  # (0, inf): gradient norm clip
max_nonfinite = 5  # [1, inf): a step with a non-finite loss or gradient norm is skipped; this many in a row stop the run
replay = 16  # [0, inf): warm-up examples with a context mixed into every RL step (keeps the teacher able to read it)
updates = 4  # [1, inf): optimizer updates per batch of rollouts, each with its own replay examples and EMA step (GRPO's ratio clipped as PPO's when > 1); PMD's best, as lr
replay_weight = 1.0  # [0, inf): the replay loss's weight beside the method's own loss (PMD's best, as lr)
eval_interval = 20  # [1, inf): steps between evaluations (and checkpoints)
# loss
alpha = 0.0  # [0, 1]: 0 forward KL(teacher||student), 1 reverse KL, between: generalised JSD
topk = 0  # [0, 256]: >0: distil over the student's top-k tokens plus a tail bucket (256 tokens in all)
sampled_token = False  # the sampled-token reverse-KL estimator instead of the full distribution (not with topk)
is_clip = 0.0  # [0, inf): >0: importance-sampling weight min(p/p_old, is_clip)
pg_weight = 0.0  # [0, inf): >0: add the GRPO term to SDPO / PMD with this weight
adv_std = True  # divide GRPO advantages by the group's std (GRPO as published; Dr. GRPO drops it)
# teacher
teacher = "ema"  # live|ema|frozen: the teacher's weights
ema_rate = 0.05  # [0, 1]
# memory
memory_levels = "experience,insight,pattern"  # experience|insight|pattern, comma-separated: what PMD's teacher is shown
memory_steps = -1  # [-1, inf): steps whose rollouts update the memory, after which it stays as it is (frozen memory); -1: every step
memory_init = ""  # a memory.json to start from ('' starts empty): with memory_steps=0, the paper's frozen memory
transient = False  # the memory holds the current batch only: built, read for that step, then dropped (PMD-Transient)
policy_frozen = False  # the policy never trains; its rollouts still feed the memory (the paper's frozen policy: read it with memory)
mem_max_families = 256  # [1, inf): families kept (memory.SETTINGS)
mem_max_experiences = 8  # [1, inf): raw trajectories kept per family (memory.SETTINGS)
mem_max_insights = 16  # [1, inf): strategies and lessons kept per family (memory.SETTINGS)
mem_max_patterns = 8  # [1, inf): patterns kept per group (memory.SETTINGS)
mem_min_agree = 2  # [1, inf): net passing inputs before a strategy is confirmed (memory.SETTINGS)
mem_min_support = 2  # [1, inf): confirmed families sharing a step before it is a pattern (memory.SETTINGS)
mem_budget = 160  # [0, inf): characters of context per problem
reflect = "count"  # count|model: who draws insights from a problem's attempts: the counting rule, or the teacher's weights (taught in warm-up)
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in dict(globals()).items() if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))]
CONFIG_KEYS = CONFIG_KEYS[CONFIG_KEYS.index("out_dir") :]


def config_block():
    return open(__file__).read().split("# config:", 1)[1].split("# ------", 1)[0]


def allowed_values():
    """Each setting's allowed values, read from the start of its comment in the config block (what a reader sees is
    what is checked): key -> (text, test) with test(value) -> bool; None where any value of the type will do."""
    specs = {}
    for line in config_block().splitlines():
        m = re.match(r"(\w+) = .*?  # (.*)", line)
        if not m or m[1] not in CONFIG_KEYS:
            continue
        key, comment = m[1], m[2]
        if r := re.match(r"([\[(])([^,\s]+), ([^\])\s]+)([\])])", comment):  # an interval
            lo, hi = float(r[2]), float(r[3])
            specs[key] = (r[0], lambda v, r=r, lo=lo, hi=hi: (lo < v if r[1] == "(" else lo <= v) and (v < hi if r[4] == ")" else v <= hi))
        elif r := re.match(r"\w+(?::N)?(\|\w+(?::N)?)+(, comma-separated)?", comment):  # choices, or a comma list of them
            one = re.compile("|".join(re.escape(o).replace("N", r"\d+") for o in r[0].split(",")[0].split("|")))
            specs[key] = (r[0], (lambda v, one=one: all(one.fullmatch(x) for x in v.split(",") if x)) if r[2] else one.fullmatch)
        else:
            specs[key] = None
    return specs


def parse_args(argv, defaults):
    """--key=value overrides, typed by the default, then checked (check_config); a one-line error for anything else."""
    cfg = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):  # the docstring, then the config block itself: every key, default, range and comment
            print(__doc__ + "\nSettings (override as --key=value):\n# config:" + config_block())
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected --key=value")
        key, val = arg[2:].split("=", 1)
        if key not in cfg:
            raise ValueError(f"unknown config key {key!r} (see --help)")
        typ = type(defaults[key])
        try:
            if typ is bool:
                if val.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                cfg[key] = val.lower() in ("true", "1")
            else:
                cfg[key] = typ(val)
        except ValueError:
            raise ValueError(f"config key {key!r} expects {typ.__name__}, got {val!r}") from None
    check_config(cfg)
    return SimpleNamespace(**cfg)


TASK_SETTINGS = ("plan_len", "n_ops", "n_groups", "families_per_group", "input_len", "n_train", "n_heldout", "n_unseen", "answer_len")


def check_config(c):
    """Every setting alone (its comment's range or set), then the combinations that cannot work."""
    for key, spec in allowed_values().items():
        v = c[key]
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{key}={v} is not a finite number" + (f" (allowed: {spec[0]})" if spec else ""))
        if isinstance(v, str) and not v and key.endswith("_dir"):
            raise ValueError(f"{key} is empty: a directory is needed")
        if spec and not spec[1](v):
            raise ValueError(f"{key}={v!r} is not allowed: {spec[0]}")
    if (c["n_embd"] % c["n_head"]) or (c["n_embd"] // c["n_head"]) % 2:
        raise ValueError(f"n_embd={c['n_embd']} / n_head={c['n_head']} must be an even whole number (a head's size; rotary embeddings rotate pairs)")
    if c["sampled_token"] and c["topk"]:
        raise ValueError(f"sampled_token=True and topk={c['topk']} exclude each other (the sampled-token form uses one token)")
    check_task_settings(**{k: c[k] for k in TASK_SETTINGS})
    if c["device"].startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={c['device']!r}: CUDA is not available (use cpu or auto)")
        if ":" in c["device"] and int(c["device"][5:]) >= torch.cuda.device_count():
            raise ValueError(f"device={c['device']!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


TASK_PROBLEMS = ("train", "heldout", "unseen")  # lists of problems (unseen may be empty)
TASK_METHODS = ("verify", "strategy", "warmup_group", "solve", "attempt")
TASK_INTERFACE = TASK_PROBLEMS + ("max_completion",) + TASK_METHODS  # verify.py's docstring


def check_task(task):
    """A task passed to main() has the interface in verify.py's docstring, and problems the loop can use."""
    name = type(task).__name__
    missing = [m for m in TASK_INTERFACE if not hasattr(task, m)]
    missing += [m for m in TASK_METHODS if m not in missing and not callable(getattr(task, m))]
    if missing:
        raise ValueError(f"task {name} lacks {', '.join(missing)} (the task interface is in verify.py's docstring)")
    if not isinstance(task.max_completion, int) or task.max_completion < 1:
        raise ValueError(f"task {name}: max_completion must be a positive int, got {task.max_completion!r}")
    for split in TASK_PROBLEMS:
        probs = getattr(task, split)
        if not isinstance(probs, list) or (split != "unseen" and not probs):
            raise ValueError(f"task {name}: {split} must be a " + ("list" if split == "unseen" else "non-empty list") + " of problems")
        lacks = sorted({f for p in probs for f in ("pid", "family", "group", "prompt") if not isinstance(getattr(p, f, None), str)})
        if lacks:
            raise ValueError(f"task {name}: problems in {split} lack str field(s) {', '.join(lacks)}")


def check_fit(c, prompt_tokens, completion_tokens, train_problems, world):
    """What needs the task's sizes: a sequence fits block_size, a step's problems exist and split over the ranks, and
    a lower bound on the memory a run holds (weights, gradients, Adam, a teacher copy; one step's key-value cache, or a
    warm-up batch's logits) fits the device's."""
    need = prompt_tokens + completion_tokens + c.mem_budget
    if need > c.block_size:
        raise ValueError(f"block_size={c.block_size} is too small: mem_budget={c.mem_budget} + prompt + completion take {need} tokens")
    if c.reflect == "model" and prompt_tokens + 2 * completion_tokens + 32 > c.block_size:  # header, one attempt, its verdict
        raise ValueError(f"block_size={c.block_size} is too small for reflect=model: a reflection on one attempt takes about "
                         f"{prompt_tokens + 2 * completion_tokens + 32} tokens")
    if c.prompts_per_step > train_problems:
        raise ValueError(f"prompts_per_step={c.prompts_per_step} exceeds the {train_problems} training problems")
    if c.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={c.prompts_per_step} must be divisible by the number of ranks ({world})")
    C, L, T = c.n_embd, c.n_layer, prompt_tokens + completion_tokens
    params = VOCAB_SIZE * C + L * (12 * C * C + 13 * C) + 2 * C
    rows = c.prompts_per_step // world * c.group_size
    nbytes = 4 * (5 * params + max(rows * T * 2 * L * C, max(c.warmup_batch, c.replay) * T * VOCAB_SIZE))
    dev = pick_device(c)
    have = torch.cuda.get_device_properties(dev).total_memory if dev.startswith("cuda") else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > have:
        raise ValueError(f"the model (n_layer={L}, n_embd={C}) with {rows} rollouts per step (prompts_per_step x group_size), warmup_batch={c.warmup_batch} "
                         f"and replay={c.replay} needs at least {nbytes / 2**30:.3g} GiB, more than the {have / 2**30:.3g} GiB of device {dev!r}")


def warn_pointless(c, task):
    """Legal settings that make a run pointless: a one-line warning each, before any work."""
    levels, why = [l for l in c.memory_levels.split(",") if l], []
    if c.warmup_steps == 0 and c.init_from == "scratch":
        why.append("warmup_steps=0: RL starts from an untrained model, which can neither execute a plan nor read a memory")
    if c.group_size == 1 and c.method in ("grpo", "sdpo"):
        why.append(f"group_size=1: {c.method.upper()} learns from differences within a group, and a group of one has none")
    if c.temperature == 0 and c.method in ("grpo", "sdpo"):
        why.append(f"temperature=0: a group's samples are all the same greedy completion, so {c.method.upper()} has nothing to compare")
    if c.method == "pmd" and not levels:
        why.append("memory_levels is empty: PMD's teacher is shown no memory")
    elif c.method == "pmd" and c.memory_steps == 0 and not c.memory_init:
        why.append("memory_steps=0: the memory is never written, so PMD's teacher is shown an empty one")
    elif c.method == "pmd" and c.mem_budget < (shortest := shortest_line(task, c, levels)):
        why.append(f"mem_budget={c.mem_budget} holds no memory line (the shortest takes {shortest} characters): PMD's teacher is shown no memory")
    if c.method != "pmd" and (c.transient or c.memory_init) and not c.policy_frozen:
        why.append(f"{'transient=True' if c.transient else 'memory_init'} with method={c.method}: only PMD's teacher reads the memory")
    if c.replay and not c.replay_weight:
        why.append(f"replay={c.replay} with replay_weight=0: the replay examples are computed, then ignored")
    for w in why:
        print(f"warning: {w}", file=sys.stderr)
    return why


def shortest_line(task, c, levels):
    """Characters (with its newline) of the shortest line PMD's memory renders for this task: a budget below it shows nothing."""
    lines = reference_memory(task, c, budget=10**9).render(task.train[0], levels).splitlines()
    return min(map(len, lines), default=0) + 1


def memory_settings(c):
    return dict(max_families=c.mem_max_families, max_experiences=c.mem_max_experiences, max_insights=c.mem_max_insights,
                max_patterns=c.mem_max_patterns, min_agree=c.mem_min_agree, min_support=c.mem_min_support, budget=c.mem_budget,
                lines=MEMORY_DEFAULTS["lines"], max_evidence=MEMORY_DEFAULTS["max_evidence"])


def make_task(c):
    return HiddenProcedures(seed=c.task_seed, **{k: getattr(c, k) for k in TASK_SETTINGS})


def pick_device(c):
    if c.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return c.device


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def atomic_save(obj, path, rename=True):
    """torch.save to a temporary file, flushed to disk, then renamed over path: a kill mid-write leaves the old file intact.
    rename=False leaves the rename to the caller (returns the temporary path)."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: runs that share cache_dir may write the same warm-up at once
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if rename:
        os.replace(tmp, path)
    return tmp


RESUME_KEYS = ("model", "config", "optimizer", "step", "rollouts", "py_rng", "torch_rng", "gen_rng")


def load_checkpoint(path, keys=("model", "config")):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} not found") from None
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise ValueError(f"checkpoint {path} is not a checkpoint of this project" + (" (or not one to resume from)" if isinstance(ckpt, dict) and "model" in ckpt else ""))
    return ckpt


def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not fit this model (n_layer, n_head, n_embd must match): {' '.join(str(e).split())[:200]}") from None


def read_metrics(path, upto):
    """The lines of metrics.jsonl up to step upto, to resume from; a torn last line (a kill mid-write) ends them."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise ValueError(f"cannot read {path} to resume ({e.strerror})") from None
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
            if rec["step"] > upto:
                break
        except (ValueError, KeyError, TypeError):
            break
        kept.append(line)
    if not kept or json.loads(kept[0])["step"] != 0:
        raise ValueError(f"{path} lacks the step-0 evaluation; cannot resume")
    return kept


def fingerprint(model, teacher, memory, rng):
    """sha1s (12 hex digits) of what every rank must hold identically: weights (student, teacher), memory, problem RNG."""
    h = hashlib.sha1()
    for m in {id(model): model, id(teacher): teacher}.values():
        for t in m.state_dict().values():
            h.update(t.detach().float().cpu().numpy().tobytes())
    return dict(params=h.hexdigest()[:12], memory=hashlib.sha1(json.dumps(memory.state()).encode()).hexdigest()[:12],
                rng=hashlib.sha1(repr(rng.getstate()).encode()).hexdigest()[:12])


# -----------------------------------------------------------------------------
# evaluation


HELDOUT = ("heldout", "unseen")  # the two evaluation sets: new inputs of the RL families, families RL never trains on
PASS_K = (1, 4, 16)  # pass@k at the start and the end of a run, from PASS_K[-1] samples per problem


@torch.no_grad()
def solved(model, task, problems, contexts):
    """Greedy reward (0 or 1) on each problem, after its context ('' for the memory-free student)."""
    if not problems:
        return []
    comps, _ = generate(model, [encode(c + p.prompt) for c, p in zip(contexts, problems)], 1, task.max_completion, temperature=0)
    return [task.verify(p, decode(y))[0] for p, y in zip(problems, comps)]


def accuracy(model, task, problems, contexts, device):
    """Greedy accuracy on problems, each after its context; None for no problems."""
    return sum(solved(model, task, problems, contexts)) / len(problems) if problems else None


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
    """The share of problems that at least one of k samples solves, for each k in PASS_K: the unbiased estimate
    1 - C(n - right, k) / C(n, k) from n = PASS_K[-1] samples at the RL temperature, from a generator of its own
    (so that evaluating leaves the training's random streams as they were). {} for no problems."""
    if not problems:
        return {}
    n = PASS_K[-1]
    gen = torch.Generator(device=device).manual_seed(c.seed)
    comps, _ = generate(model, [encode(p.prompt) for p in problems], n, task.max_completion, c.temperature, gen)
    right = [sum(task.verify(p, decode(y))[0] for y in comps[i * n : (i + 1) * n]) for i, p in enumerate(problems)]
    return {k: sum(1 - math.comb(n - r, k) / math.comb(n, k) for r in right) / len(problems) for k in PASS_K}


def reference_memory(task, c, budget=None):
    """What PMD's memory holds once the policy has found each family's plan, and just after a lucky pass: per RL family,
    verified reference traces of 3 training problems with a wrong attempt each, then (the most recent experience) an
    attempt at a 4th that passes with a wrong plan where the task has one. budget: the render budget, if not c's."""
    rng = random.Random(c.seed)
    mem = Memory(**dict(memory_settings(c), budget=budget or c.mem_budget))
    per_family = {}
    for p in task.train:
        per_family.setdefault(p.family, []).append(p)
    found = [(p, text) for probs in per_family.values() for p in probs[:3] for text in (task.solve(p), task.attempt(p, rng, 0.0, p_lucky=0.0))]
    lucky = [(probs[3], task.attempt(probs[3], rng, 0.0, p_lucky=1.0)) for probs in per_family.values() if len(probs) > 3]
    for batch in (found, lucky):
        rolls = []
        for p, text in batch:
            r, fb = task.verify(p, text)
            rolls.append(Rollout(p, text, [], [], r, fb, task.strategy(p, text)))
        mem.update(rolls)
    return mem


def headroom(model, task, c, device):
    """Right after warm-up: the student without memory vs the teacher given each memory level (reference_memory), on
    both evaluation sets. An unseen family has no experience or insight of its own; only its group's pattern reaches it."""
    mem, rows = reference_memory(task, c), {}
    for name in HELDOUT:
        probs = getattr(task, name)
        row = dict(student=accuracy(model, task, probs, [""] * len(probs), device))
        for lvl in LEVELS:
            row[f"teacher+{lvl}"] = accuracy(model, task, probs, [mem.render(p, (lvl,)) for p in probs], device)
        row["teacher+all"] = accuracy(model, task, probs, [mem.render(p) for p in probs], device)
        rows[name] = row
    return rows


def fidelity_shares(counts, prefix="reflect_"):
    """memory.fidelity's counts (summed over any number of reflections) as shares: of the verdicts written, those the
    counting rule agrees with, flips and invents; of the rule's, those missed; and the unparsed parts, a count."""
    w, r = counts.get("written", 0), counts.get("rule", 0)
    share = lambda n, d: round(n / d, 4) if d else None
    return {f"{prefix}{k}": v for k, v in dict(agree=share(counts.get("agree", 0), w), flipped=share(counts.get("flipped", 0), w),
            invented=share(counts.get("invented", 0), w), missed=share(counts.get("missed", 0), r), written=w, dropped=counts.get("dropped", 0)).items()}


def reflection_probe(model, teacher, task, c, device):
    """Reflection fidelity on the RL families' rollouts: group_size samples of the student at the RL temperature (from a
    generator of its own) on each family's first training problem, which the teacher's weights reflect on (pmd.reflection),
    scored against the counting rule on the same rollouts (fidelity_shares)."""
    firsts = {}
    for p in task.train:
        firsts.setdefault(p.family, p)
    probs = list(firsts.values())
    rolls = rollout(model, task, probs, c.group_size, c.temperature, torch.Generator(device=device).manual_seed(c.seed))
    return fidelity_shares(reflection(teacher, rolls, c.group_size)[1])


def evaluate(model, teacher, task, memory, c, device, pass_k=False, right=None):
    """Greedy accuracy of the memory-free student and of the teacher reading the memory, on both evaluation sets
    (heldout_acc, teacher_acc; unseen_acc, teacher_unseen_acc), the same per family (family_acc, teacher_family_acc:
    set -> family -> accuracy), and the memory's size per level (memory.census; right: right_strategies(task)); with
    pass_k (at a run's start and end) also the student's pass@k on both; with reflect=model the reflection probe."""
    model.eval()
    levels = [l for l in c.memory_levels.split(",") if l]
    out, fam, t_fam = memory.census(right or {}), {}, {}
    for name in HELDOUT:
        probs, tag = getattr(task, name), "" if name == "heldout" else f"{name}_"
        student = solved(model, task, probs, [""] * len(probs))
        teacher_ = solved(teacher, task, probs, [memory.render(p, levels) for p in probs])
        out[f"{name}_acc"] = sum(student) / len(probs) if probs else None
        out[f"teacher_{tag}acc"] = sum(teacher_) / len(probs) if probs else None
        fam[name], t_fam[name] = per_family(probs, student), per_family(probs, teacher_)
        if pass_k:
            out.update({f"{name}_pass@{k}": v for k, v in pass_at_k(model, task, probs, c, device).items()})
    if c.reflect == "model":
        out.update(reflection_probe(model, teacher, task, c, device))
    model.train()
    return dict(out, family_acc=fam, teacher_family_acc=t_fam)


# -----------------------------------------------------------------------------
# warm-up (cached: every method and seed starts from the same weights)


WARMUP_VERSION = 5  # part of the cache key: bump it when the model's code or the warm-up data change
REFLECTION = 0.2  # with reflect=model: the share of the warm-up's and replay's examples with a context that teach reflection


def reflection_mix(c):
    """warmup_example's reflection settings: none with reflect=count (its warm-up and replay stay as they were)."""
    return dict(p_reflect=REFLECTION, group_size=c.group_size) if c.reflect == "model" else {}


def warmup(c, task, device):
    """The warm-up checkpoint for this config and task: loaded from cache_dir, or trained and cached."""
    keys = ("plan_len", "n_ops", "input_len", "answer_len", "n_layer", "n_head", "n_embd", "block_size", "warmup_steps", "warmup_batch", "warmup_lr",
            "warmup_seed", "mem_max_experiences", "mem_max_insights", "mem_min_agree", "mem_min_support", "mem_budget")
    problems = [p.pid for p in task.train + task.heldout + task.unseen]  # a task's settings show in its problems
    key = dict({k: getattr(c, k) for k in keys}, task=type(task).__name__, max_completion=task.max_completion, version=WARMUP_VERSION,
               problems=hashlib.sha1(json.dumps(problems).encode()).hexdigest(), **reflection_mix(c))
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(c.cache_dir, f"warmup-{tag}.pt")
    torch.manual_seed(c.warmup_seed)  # before the model's init: torch's start-up seed differs from process to process
    model = GPT(GPTConfig(c.block_size, c.n_layer, c.n_head, c.n_embd)).to(device)
    if os.path.exists(path):
        model.load_state_dict(load_checkpoint(path)["model"])
        print(f"warm-up: loaded {path}")
        return model
    train_warmup(model, c, task, device)
    os.makedirs(c.cache_dir, exist_ok=True)
    atomic_save(dict(model=model.state_dict(), config=vars(c)), path)
    return model


def train_warmup(model, c, task, device):
    """Supervised steps on fresh warm-up families (pmd.warmup_example), in three phases: executing a plan with no context
    (the first 5/12 of the steps), then reading contexts whose memories hold more right attempts than RL's will (to
    11/12), then the mix RL's memories have. Execution first is what makes the warm-up reliable (README, Warm-up).
    With reflect=model the two later phases also teach reflection (reflection_mix)."""
    rng = random.Random(c.warmup_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=c.warmup_lr, weight_decay=0.0)
    settings = memory_settings(c)
    bar = tqdm(range(c.warmup_steps), desc="warm-up", dynamic_ncols=True)
    batches = []
    for it in bar:
        for g in opt.param_groups:  # linear ramp, then linear decay to zero
            g["lr"] = c.warmup_lr * min(1.0, (it + 1) / 50) * (1 - it / c.warmup_steps)
        if not batches:  # draw 32 batches at once and group them by length: 3 % padding (11 % over 8 batches, 57 % ungrouped)
            phase = dict(p_plain=1) if it < c.warmup_steps * 5 // 12 else dict(p_plain=0, p_right=(0.5, 0.8, 1.0)) if it < c.warmup_steps * 11 // 12 else {}
            phase.update(reflection_mix(c) if it >= c.warmup_steps * 5 // 12 else {})  # reflection is learnt beside reading
            pool = sorted((warmup_example(task, rng, settings, **phase) for _ in range(32 * c.warmup_batch)), key=lambda e: sum(map(len, e)))
            batches = [pool[i : i + c.warmup_batch] for i in range(0, len(pool), c.warmup_batch)]
            rng.shuffle(batches)
        batch = batches.pop()
        with autocast(device):
            loss = sft_loss(model, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


# -----------------------------------------------------------------------------
# the loop


def configure(argv, task=None):
    """Every check that needs no work: the settings (parse_args), a given task's interface (check_task) and what must
    fit (check_fit; the built-in task's sizes are known without building it). Returns the config."""
    c = parse_args(argv, {k: globals()[k] for k in CONFIG_KEYS})
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if c.memory_init:
        try:
            Memory.load(c.memory_init)  # a missing or corrupt file stops here, in one line
        except ValueError as e:
            raise ValueError(f"memory_init: {e}") from None
    if task is None:
        prompt_len, completion_len = task_sizes(c.plan_len, c.input_len)
        check_fit(c, prompt_len, completion_len, c.n_groups * c.families_per_group * c.n_train, world)
    else:
        check_task(task)
        prompt_len = max(len(encode(p.prompt)) for p in task.train + task.heldout + task.unseen)
        check_fit(c, prompt_len, task.max_completion, len(task.train), world)
    return c


def setup(argv, task=None):
    """Check everything (configure), make the task, warn of pointless settings, pick the device, join the process
    group under torchrun. Returns (config, task, device, rank, world)."""
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
    """Everything a run holds, from the warm-up checkpoint (init_from='scratch') or from out_dir's checkpoint
    ('resume'): the student (model; student is its compiled form), the teacher, the optimizer, the memory (empty,
    or memory_init), the RNGs, and the step and rollout counts."""
    ckpt_path, mem_path = os.path.join(c.out_dir, "ckpt.pt"), os.path.join(c.out_dir, "memory.json")
    if c.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path, RESUME_KEYS)
        model = GPT(GPTConfig(c.block_size, c.n_layer, c.n_head, c.n_embd)).to(device)
        load_weights(model, ckpt["model"], ckpt_path)
        memory = Memory.load(mem_path)
        if memory.step != ckpt.get("memory_step", memory.step):  # a kill between the two renames in save()
            raise ValueError(f"{mem_path} (memory step {memory.step}) does not belong to {ckpt_path} (memory step {ckpt['memory_step']})")
        if ckpt.get("world_size", 1) != world:
            raise ValueError(f"{ckpt_path} was written by {ckpt.get('world_size', 1)} rank(s); resume it with as many, not {world}")
    else:
        if rank:
            dist.barrier()  # rank 0 trains (or loads) the warm-up checkpoint and caches it; then the others load it
        model = warmup(c, task, device)
        if world > 1 and not rank:
            dist.barrier()
        memory = Memory.load(c.memory_init) if c.memory_init else Memory(**memory_settings(c))
        model.eval()
        rows = headroom(model, task, c, device)
        print("\nheadroom after warm-up (greedy accuracy; the teacher reads a reference memory: per RL family 3 verified traces, then a lucky pass):")
        print(f"  {'':<32}" + "".join(f"{k:>19}" for k in rows["heldout"]))
        for name, row in rows.items():
            probs = getattr(task, name)
            what = f"{name} ({len(probs)} problems, {len({p.family for p in probs})} families)"
            print(f"  {what:<32}" + "".join(f"{'-' if v is None else f'{v:.3f}':>19}" for v in row.values()))
        if c.reflect == "model":
            f = reflection_probe(model, model, task, c, device)
            pct = lambda k: "-" if f[k] is None else f"{f[k]:.1%}"
            print(f"  reflection fidelity on the RL families' rollouts ({f['reflect_written']} verdicts written, {f['reflect_dropped']} parts "
                  f"unparsed): the rule agrees with {pct('reflect_agree')}, flipped {pct('reflect_flipped')}, invented "
                  f"{pct('reflect_invented')}; missed {pct('reflect_missed')} of the rule's")
        model.train()
    run = SimpleNamespace(c=c, task=task, device=device, rank=rank, world=world, model=model, memory=memory, step=0, rollouts=0,
                          teacher=make_teacher(model, c.teacher), opt=torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0),
                          rng=random.Random(c.seed),  # problem order and replay examples: the same on every rank
                          gen=torch.Generator(device=device).manual_seed(c.seed + rank))  # sampling: each rank its own stream
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
            raise ValueError(f"checkpoint {ckpt_path} does not fit this run ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    run.student = torch.compile(model) if c.compile else model
    return run


def train_step(run, problems, clock=None):
    """One RL step on this rank's share of problems: rollout, then `updates` times: reflect (the first time only),
    teacher, distill (pmd.step), plus replay, then update. A frozen policy only feeds the memory. Returns (loss, grad
    norm, stats, finite) of the last update; finite is whether every update was."""
    c, device = run.c, run.device
    clock = clock or Clock()
    share = problems[run.rank * len(problems) // run.world : (run.rank + 1) * len(problems) // run.world]
    update_memory = c.memory_steps < 0 or run.step < c.memory_steps
    rolls = rollout(run.student, run.task, share, c.group_size, c.temperature, run.gen, clock)
    every_finite, merged, settings = True, {}, memory_settings(c)
    for k in range(c.updates):
        with autocast(device):
            loss, stats = pmd_step(run.student, run.teacher, run.task, run.memory, share, c, run.gen, device,
                                   gather=run.gather if run.world > 1 else None, update_memory=update_memory and k == 0, clock=clock, rolls=rolls)
            if loss is not None and c.replay:
                replay = [warmup_example(run.task, run.rng, settings, p_plain=0, **reflection_mix(c)) for _ in range(c.replay)]
                loss = loss + c.replay_weight * sft_loss(run.student, replay, device)
        merged.update(stats)  # the reflection's counts come with the first update only
        if loss is None:  # a frozen policy: nothing to update
            loss, norm, finite = torch.zeros(()), torch.zeros(()), True
            break
        loss, norm, finite = update(run, loss, merged, clock)
        every_finite = every_finite and finite
    run.step += 1
    run.rollouts += c.prompts_per_step * c.group_size
    return loss, norm, merged, every_finite


def update(run, loss, stats, clock):
    """Backward, gradients averaged over ranks, clipping, the optimizer and EMA teacher updates. A non-finite loss or
    gradient norm skips the update on every rank. Returns (loss, grad norm, finite)."""
    c, model, device, world = run.c, run.model, run.device, run.world
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:  # average the gradients over ranks (by hand: DDP expects one forward per backward, a step has several)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    clock("student")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(norm))
    if world > 1:  # every rank skips together; the logged reward is the mean over ranks
        flags = torch.tensor([stats["reward"], float(not finite)], device=device)
        dist.all_reduce(flags)
        stats["reward"], finite = flags[0].item() / world, flags[1].item() == 0
    if finite:  # else no optimizer step and no EMA update
        for g in run.opt.param_groups:
            g["lr"] = c.lr * min(1.0, (run.step + 1) / max(c.lr_warmup, 1))
        run.opt.step()
        if c.teacher == "ema":
            ema_update(run.teacher, model, c.ema_rate)
    clock("optimizer")
    return loss, norm, finite


def main(argv, task=None):
    """Run from command-line style arguments. task: any object with the interface in verify.py's docstring
    (default: the built-in HiddenProcedures made from the task settings)."""
    c, task, device, rank, world = setup(argv, task)
    master = rank == 0  # the one rank that evaluates, writes files and prints
    ckpt_path, mem_path, metrics_path = (os.path.join(c.out_dir, f) for f in ("ckpt.pt", "memory.json", "metrics.jsonl"))
    t0 = time.time()
    run = start(c, task, device, rank, world)
    model, teacher, memory, rng, gen = run.model, run.teacher, run.memory, run.rng, run.gen
    if c.init_from == "resume" and master:  # drop evaluations logged after the checkpoint
        kept = read_metrics(metrics_path, run.step)
        # pass@k is measured at the start and at a run's end: a run continued past its end measures it at the new end
        kept[1:] = [json.dumps({k: v for k, v in json.loads(l).items() if "_pass@" not in k}) + "\n" for l in kept[1:]]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
    elif master:
        open(metrics_path, "w").close()

    right = right_strategies(task)

    def log(step_, extra, pass_k=False):
        if not master:  # evaluation runs on rank 0 only
            return {}
        rec = dict(step=step_, method=c.method, rollouts=run.rollouts,
                   **evaluate(model, teacher, task, memory, c, device, pass_k, right), **extra)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def save(step_):
        if world > 1:  # every rank's sampler state (for an exact resume), and a check that the ranks still agree
            states = [None] * world
            dist.all_gather_object(states, (fingerprint(model, teacher, memory, rng), gen.get_state()))
            prints = [fp for fp, _ in states]
            if any(fp != prints[0] for fp in prints):
                raise ValueError(f"ranks disagree at step {step_}: {prints}")
            if master:
                tqdm.write(f"step {step_}: all {world} ranks agree: " + ", ".join(f"{k} {v}" for k, v in prints[0].items()))
        if not master:
            return
        ckpt = dict(model=model.state_dict(), optimizer=run.opt.state_dict(), config=vars(c), step=step_, rollouts=run.rollouts,
                    py_rng=to_list(rng.getstate()), torch_rng=torch.get_rng_state(), gen_rng=gen.get_state(), memory_step=memory.step)
        if teacher is not model:
            ckpt["teacher"] = teacher.state_dict()
        if world > 1:
            ckpt.update(world_size=world, gen_rngs=[g for _, g in states])
        # both files are complete on disk before either replaces its old version; resume checks they match
        tmp = atomic_save(ckpt, ckpt_path, rename=False)
        memory.save(mem_path)
        os.replace(tmp, ckpt_path)

    def gather(rolls):  # every rank's rollouts in rank order: the memory update is the same on every rank
        parts = [None] * world
        dist.all_gather_object(parts, rolls)
        return [r for part in parts for r in part]

    run.gather = gather
    if run.step == 0:
        families = {p.family: [p.group, right.get(p.family)] for p in task.heldout + task.unseen}  # for memory.py's timeline
        before = log(0, dict(families=families), pass_k=True).get("heldout_acc", 0.0)
    else:
        before = json.loads(open(metrics_path).readline())["heldout_acc"] if master else 0.0
    bar = tqdm(range(run.step, c.steps), desc=c.method, dynamic_ncols=True, initial=run.step, total=c.steps, disable=not master)
    last, nonfinite, saved, rewards, reflected = {}, 0, run.step if c.init_from == "resume" else None, [], {}
    for it in bar:
        loss, norm, stats, finite = train_step(run, rng.sample(task.train, c.prompts_per_step))
        rewards.append(stats["reward"])
        for k, v in stats.items():  # the model's verdicts that reached the memory (reflect=model)
            if k.startswith("reflect_"):
                reflected[k.removeprefix("reflect_")] = reflected.get(k.removeprefix("reflect_"), 0) + v
        nonfinite = 0 if finite else nonfinite + 1
        if not finite and master:
            tqdm.write(f"warning: step {it + 1}: non-finite loss ({loss.item():.4g}) or gradient norm ({norm.item():.4g}); "
                       f"update skipped ({nonfinite} in a row, max_nonfinite={c.max_nonfinite})")
        if nonfinite >= c.max_nonfinite:
            where = f"the last good checkpoint, {ckpt_path} (step {saved}), is intact" if saved is not None else "no checkpoint was written"
            raise ValueError(f"{nonfinite} consecutive steps with a non-finite loss or gradient norm (steps {it + 2 - nonfinite}-{it + 1}); stopped, {where}")
        if (it + 1) % c.eval_interval == 0 or it + 1 == c.steps:
            since = dict(reward=sum(rewards) / len(rewards), **(fidelity_shares(reflected, "rl_reflect_") if reflected else {}))
            last = log(it + 1, since, pass_k=it + 1 == c.steps)  # means since the last evaluation
            rewards, reflected = [], {}
            save(it + 1)
            saved = it + 1
        bar.set_postfix(reward=f"{stats['reward']:.2f}", heldout=f"{last.get('heldout_acc', before):.2f}", teacher=f"{last.get('teacher_acc', 0):.2f}")
    if world > 1:
        dist.barrier()  # rank 0 evaluates (pass@k at the end) while the others wait: none tears down the group early
        dist.destroy_process_group()
    if not master:
        return
    recs = [json.loads(line) for line in open(metrics_path)]
    first, end = recs[0], recs[-1]
    print(f"\nmemory-free accuracy (greedy) before -> after ({c.method}, {c.steps} steps, {run.rollouts} rollouts, {time.time() - t0:.0f} s):")
    for name in HELDOUT:
        if end.get(f"{name}_acc") is not None:
            passes = "  ".join(f"pass@{k} {first[f'{name}_pass@{k}']:.3f} -> {end[f'{name}_pass@{k}']:.3f}" for k in PASS_K)
            print(f"  {name:<8} {first[f'{name}_acc']:.3f} -> {end[f'{name}_acc']:.3f}   {passes}")


def to_list(x):
    return [to_list(v) for v in x] if isinstance(x, tuple) else x


def to_tuple(x):
    return tuple(to_tuple(v) for v in x) if isinstance(x, list) else x


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
