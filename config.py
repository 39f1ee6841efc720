"""
Every setting of train.py: its default, what it allows, and the checks and warnings run before any work.

Each line of the block below is a setting, overridable as --key=value; its comment starts with what is allowed, and
that text is what check_config checks: [lo, hi] (a round bracket leaves its end out; a float must be finite) or a|b|c
(N: any number). `python train.py --help` prints the block. lr, replay_weight and updates default to the chosen
method's row of TUNED unless given.
"""
import math
import os
import re
import sys
from types import SimpleNamespace

import torch

from memory import Memory, settings_of
from model import VOCAB_SIZE, GPTConfig, encode, n_params
from warmup import reference_memory
from verify import RANGES, check_settings as check_task_settings, sizes as task_sizes, span

# each method's best of `python bench.py --sweep` (the mean of its 2 seeds): its defaults, and what bench.py runs
TUNED = dict(grpo=dict(lr=3e-4, replay_weight=1.0, updates=4), sdpo=dict(lr=3e-4, replay_weight=1.0, updates=4),
             rft=dict(lr=1e-3, replay_weight=1.0, updates=4), pmd=dict(lr=1e-3, replay_weight=1.0, updates=4))

# -----------------------------------------------------------------------------
# config: the one source of truth
# I/O
out_dir = "out"  # a writable directory: ckpt.pt, memory.json, metrics.jsonl
init_from = "scratch"  # scratch|resume: the warm-up checkpoint, then RL; or continue the run in out_dir
cache_dir = "cache"  # a directory: warm-up checkpoints, keyed by what they depend on, shared by all methods and seeds
device = "auto"  # auto|cpu|cuda|cuda:N: auto is cuda if available, else cpu
compile = False  # torch.compile the student (CUDA)
seed = 1337  # [0, 4294967295]: RL seed: problem order, sampling
# task (the built-in hidden-procedure task; its difficulty knobs; what each allows is verify.RANGES)
plan_len = 2  # ops per hidden plan (a random plan is right 1 time in n_ops**plan_len)
n_ops = 6  # ops to choose from
n_groups = 3  # letters of RL ids (each sets its own first op: at most n_ops)
families_per_group = 4  # RL families per letter (a digit of an id takes families_per_group + 2 values)
input_len = 5  # letters per input string
n_train = 32  # RL inputs per family (with n_heldout at most the 12**input_len distinct inputs)
n_heldout = 8  # held-out inputs per family (evaluation only), and inputs per unseen family
n_unseen = 2  # families per letter that RL never trains on (evaluation only)
answer_len = 2  # letters of the answer (at most input_len): the fewer, the more often a wrong plan passes by chance
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
method = "pmd"  # grpo|sdpo|pmd|rft: rft is the replay control (imitate the memory's verified successes)
steps = 200  # [1, inf): RL steps
prompts_per_step = 8  # [1, inf): problems per step (at most the training problems; a multiple of the ranks)
group_size = 8  # [1, inf): samples per problem (G)
temperature = 1.0  # [0, inf): sampling temperature; 0 is greedy
lr = TUNED["pmd"]["lr"]  # (0, 1]: RL learning rate (unless given, the method's row of TUNED)
lr_warmup = 20  # [0, inf): steps of linear learning-rate ramp at the start of RL
grad_clip = 1.0  # (0, inf): gradient norm clip
max_nonfinite = 5  # [1, inf): steps with a non-finite loss or gradient are skipped; this many in a row stop the run
replay = 16  # [0, inf): warm-up examples with a context in every update (keeps the teacher able to read it)
updates = TUNED["pmd"]["updates"]  # [1, inf): optimizer updates per batch of rollouts (as lr)
replay_weight = TUNED["pmd"]["replay_weight"]  # [0, inf): the replay loss's weight beside the method's (as lr)
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
memory_levels = "experience,insight,pattern"  # experience|insight|pattern, comma-separated: what PMD's teacher reads
memory_steps = -1  # [-1, inf): steps whose rollouts update the memory, then it stays as it is; -1: every step
memory_init = ""  # a memory.json to start from ('' starts empty): with memory_steps=0, the paper's frozen memory
transient = False  # the memory holds the current batch only, dropped after the step (PMD-Transient)
policy_frozen = False  # the policy never trains; its rollouts still feed the memory (the paper's frozen policy)
mem_max_families = 256  # [1, inf): families kept
mem_max_experiences = 8  # [1, inf): raw trajectories kept per family
mem_max_insights = 16  # [1, inf): strategies and lessons kept per family
mem_max_patterns = 8  # [1, inf): patterns kept per cluster
mem_min_agree = 2  # [1, inf): net passing inputs before a strategy is confirmed
mem_min_support = 2  # [1, inf): confirmed families sharing a step before it is a pattern
mem_budget = 160  # [0, inf): characters of context per problem
reflect = "count"  # count|model: who writes the insights' verdicts: the counting rule, or the teacher's weights
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in dict(globals()).items() if k.islower() and isinstance(v, (int, float, bool, str))]
CONFIG_KEYS = CONFIG_KEYS[CONFIG_KEYS.index("out_dir") :]
TASK_SETTINGS = tuple(RANGES)  # the built-in task's settings


def config_block():
    """The block above, as --help prints it: each task setting's comment opens with its range from verify.RANGES."""
    block = open(__file__).read().split("# config:", 1)[1].split("# ------", 1)[0]
    return re.sub(r"^(\w+)( = .*?  # )", lambda m: m[0] + (f"{span(m[1])}: " if m[1] in RANGES else ""), block,
                  flags=re.M)


def allowed_values():
    """key -> (text, test) from the start of each setting's comment (what a reader sees is what is checked);
    None where any value of the type will do."""
    specs = {}
    for line in config_block().splitlines():
        m = re.match(r"(\w+) = .*?  # (.*)", line)
        if not m:
            continue
        key, comment = m[1], m[2]
        if r := re.match(r"([\[(])([^,\s]+), ([^\])\s]+)([\])])", comment):  # an interval
            lo, hi = float(r[2]), float(r[3])
            specs[key] = (r[0], lambda v, r=r, lo=lo, hi=hi: (lo < v if r[1] == "(" else lo <= v)
                          and (v < hi if r[4] == ")" else v <= hi))
        elif r := re.match(r"\w+(?::N)?(\|\w+(?::N)?)+(, comma-separated)?", comment):  # choices, or a list of them
            one = re.compile("|".join(re.escape(o).replace("N", r"\d+") for o in r[0].split(",")[0].split("|")))
            specs[key] = (r[0], (lambda v, one=one: all(one.fullmatch(x) for x in v.split(",") if x)) if r[2]
                          else one.fullmatch)
        else:
            specs[key] = None
    return specs


def parse_args(argv, defaults=None):
    """--key=value overrides, typed by the default; lr, replay_weight and updates from TUNED[method] unless given;
    then checked (check_config). A one-line error for anything else."""
    defaults = defaults or {k: globals()[k] for k in CONFIG_KEYS}
    cfg, given = dict(defaults), set()
    for arg in argv:
        if arg in ("-h", "--help"):
            doc = sys.modules["__main__"].__doc__ or ""
            print(f"{doc}\nSettings (override as --key=value):\n{TUNED = }\n# config:{config_block()}")
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected --key=value")
        key, val = arg[2:].split("=", 1)
        if key not in cfg:
            raise ValueError(f"unknown config key {key!r} (see --help)")
        typ = type(defaults[key])
        try:
            if typ is bool and val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            cfg[key] = val.lower() in ("true", "1") if typ is bool else typ(val)
        except ValueError:
            raise ValueError(f"config key {key!r} expects {typ.__name__}, got {val!r}") from None
        given.add(key)
    cfg.update({k: v for k, v in TUNED.get(cfg["method"], {}).items() if k not in given})
    check_config(cfg)
    return SimpleNamespace(**cfg)


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
        raise ValueError(f"n_embd={c['n_embd']} / n_head={c['n_head']} must be an even whole number "
                         "(a head's size; rotary embeddings rotate pairs)")
    if c["sampled_token"] and c["topk"]:
        raise ValueError(f"sampled_token=True and topk={c['topk']} exclude each other (the sampled-token form uses "
                         "one token)")
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
    """A task passed to train.main() has the interface in verify.py's docstring, and problems the loop can use."""
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
            what = "list" if split == "unseen" else "non-empty list"
            raise ValueError(f"task {name}: {split} must be a {what} of problems")
        keys = ("pid", "family", "group", "prompt")
        lacks = sorted({f for p in probs for f in keys if not isinstance(getattr(p, f, None), str)})
        if lacks:
            raise ValueError(f"task {name}: problems in {split} lack str field(s) {', '.join(lacks)}")


def check_fit(c, prompt_tokens, completion_tokens, train_problems, world):
    """A sequence fits block_size, a step's problems exist and split over the ranks, and a lower bound on the memory a
    run holds (weights, gradients, Adam, a teacher; a step's key-value cache or a batch's logits) fits the device."""
    need = prompt_tokens + completion_tokens + c.mem_budget
    if need > c.block_size:
        raise ValueError(f"block_size={c.block_size} is too small: mem_budget={c.mem_budget} + prompt + completion "
                         f"take {need} tokens")
    reflecting = prompt_tokens + 2 * completion_tokens + 32  # header, one attempt, its verdict
    if c.reflect == "model" and reflecting > c.block_size:
        raise ValueError(f"block_size={c.block_size} is too small for reflect=model: a reflection on one attempt "
                         f"takes about {reflecting} tokens")
    if c.prompts_per_step > train_problems:
        raise ValueError(f"prompts_per_step={c.prompts_per_step} exceeds the {train_problems} training problems")
    if c.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={c.prompts_per_step} must be divisible by the number of ranks ({world})")
    C, L, T, V = c.n_embd, c.n_layer, prompt_tokens + completion_tokens, VOCAB_SIZE
    rows = c.prompts_per_step // world * c.group_size
    params = n_params(GPTConfig(c.block_size, L, c.n_head, C))
    nbytes = 4 * (5 * params + max(rows * T * 2 * L * C, max(c.warmup_batch, c.replay) * T * V))
    dev = pick_device(c)
    have = (torch.cuda.get_device_properties(dev).total_memory if dev.startswith("cuda")
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if nbytes > have:
        raise ValueError(f"the model (n_layer={L}, n_embd={C}) with {rows} rollouts per step (prompts_per_step x "
                         f"group_size), warmup_batch={c.warmup_batch} and replay={c.replay} needs at least "
                         f"{nbytes / 2**30:.3g} GiB, more than the {have / 2**30:.3g} GiB of device {dev!r}")


def configure(argv, task=None):
    """Every check that needs no work: the settings, a given task's interface, what must fit (the built-in task's
    sizes are known without building it) and memory_init. Returns the config."""
    c = parse_args(argv)
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


def pick_device(c):
    return ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device


def levels(c):
    return [lvl for lvl in c.memory_levels.split(",") if lvl]


def warn_pointless(c, task):
    """Legal settings that make a run pointless: a one-line warning each, before any work."""
    why, name = [], c.method.upper()
    if c.warmup_steps == 0 and c.init_from == "scratch":
        why.append("warmup_steps=0: RL starts from an untrained model, which can neither execute a plan nor read a "
                   "memory")
    if c.group_size == 1 and c.method in ("grpo", "sdpo"):
        why.append(f"group_size=1: {name} learns from differences within a group, and a group of one has none")
    if c.temperature == 0 and c.method in ("grpo", "sdpo"):
        why.append(f"temperature=0: a group's samples are all the same greedy completion, so {name} has nothing to "
                   "compare")
    lines = reference_memory(task, settings_of(c), c.seed, budget=10**9).render(task.train[0], levels(c))
    shortest = min(map(len, lines.splitlines()), default=0) + 1  # with its newline
    if c.method == "pmd" and not levels(c):
        why.append("memory_levels is empty: PMD's teacher is shown no memory")
    elif c.method == "pmd" and c.memory_steps == 0 and not c.memory_init:
        why.append("memory_steps=0: the memory is never written, so PMD's teacher is shown an empty one")
    elif c.method == "pmd" and c.mem_budget < shortest:
        why.append(f"mem_budget={c.mem_budget} holds no memory line (the shortest takes {shortest} characters): "
                   "PMD's teacher is shown no memory")
    if c.method != "pmd" and (c.transient or c.memory_init) and not c.policy_frozen:
        what = "transient=True" if c.transient else "memory_init"
        why.append(f"{what} with method={c.method}: only PMD's teacher reads the memory")
    if c.replay and not c.replay_weight:
        why.append(f"replay={c.replay} with replay_weight=0: the replay examples are computed, then ignored")
    for w in why:
        print(f"warning: {w}", file=sys.stderr)
    return why
