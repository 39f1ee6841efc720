"""
The supervised warm-up: the general skills a from-scratch GPT needs before RL (executing a plan, reading a memory,
reflecting), taught on fresh families that RL never sees; its examples double as replay during RL.

    warmup_example      one (context, prompt, completion): a memory filled with plausible attempts, rendered
    reflection_example  one attempt at a problem as a reflector reads it, and the counting rule's verdict
    reference_memory    what a memory holds once every family's plan is found: the headroom table reads it
    warmup              the warm-up checkpoint: loaded from the cache, or trained (train_warmup) and cached
"""
import functools
import hashlib
import json
import os
import random
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memory import LEVELS, Memory, Rollout, reflection_prompts, settings_of, written
from checkpoint import atomic_save, load_checkpoint, load_weights
from model import GPT, GPTConfig, autocast, completion_logits, encode

PLAIN_POOL = 64  # warm-up groups whose families keep their plans and inputs: the model learns that an id sets a plan
REFLECTION = 0.2  # with reflect=model: the share of the warm-up's and replay's context examples that teach reflection


def reflection_mix(c):
    """warmup_example's reflection settings: none with reflect=count (its warm-up and replay stay as they were)."""
    return dict(p_reflect=REFLECTION, group_size=c.group_size) if c.reflect == "model" else {}


@functools.lru_cache(maxsize=8)
def plain_pool(task):
    """The pool's problems by family: PLAIN_POOL warm-up groups from fixed seeds. An id two groups draw keeps its first
    group's plan (an id that recurs with another plan would teach that ids are noise)."""
    pool = {}
    for k in range(PLAIN_POOL):
        for p in task.warmup_group(random.Random(k)):
            if pool.setdefault(p.family, (k, []))[0] == k:
                pool[p.family][1].append(p)
    return {f: ps for f, (_, ps) in pool.items()}


def warmup_example(task, rng, memory_settings, p_plain=0.3, p_right=(0.0, 0.2, 0.5), p_unseen=0.35, p_reflect=0.0,
                   group_size=8):
    """(context, prompt, completion) on fresh warm-up families: a memory of plausible attempts (right, wrong, lucky,
    some unfaithful) rendered at random levels, and always the reference solution, so the model learns to use whatever
    the context says. Shares: p_plain with no context, p_unseen whose target family has no memory of its own, p_reflect
    that teach reflection instead; p_right: the rates of right attempts a memory is drawn with."""
    probs = task.warmup_group(rng)
    if rng.random() < p_plain:  # no context: half the time a family of a fixed pool, whose id always means one plan
        pool = plain_pool(task)
        families = sorted(pool)
        if rng.random() < 0.5:
            probs = pool[rng.choice(families)]
        else:  # a fresh family never borrows a pooled id (it would show that id with another plan)
            probs = [p for p in probs if p.family not in pool] or pool[rng.choice(families)]
        target = rng.choice(probs)
        return "", target.prompt, task.solve(target)
    if p_reflect and rng.random() < p_reflect:  # drawn only when asked: without reflection the examples stay the same
        return reflection_example(task, rng, rng.choice(probs), group_size)
    target = rng.choice(probs)
    mem = Memory(**memory_settings)
    seen = rng.sample(probs, rng.randint(1, len(probs)))
    if rng.random() < p_unseen:  # the target's family has no memory of its own: only its clusters' patterns reach it
        seen = [p for p in seen if p.family != target.family] or seen
    rate = rng.choice(p_right)
    attempts = [(p, task.attempt(p, rng, rate, p_lucky=0.3)) for p in seen for _ in range(rng.randint(1, 4))]
    mem.update(verified(task, attempts))
    levels = [lvl for lvl in LEVELS if rng.random() < 0.6] or [rng.choice(LEVELS)]
    return mem.render(target, levels), target.prompt, task.solve(target)


def reflection_example(task, rng, problem, G):
    """("", prompt, completion): one problem's attempts as a reflector reads them, and the counting rule's verdict.
    Up to G attempts, repeats of a few distinct ones, at a random rate of right plans; some cut short (no verdict)."""
    rate, distinct = rng.choice((0.0, 0.2, 0.5, 0.9)), rng.randint(1, G)
    texts = [task.attempt(problem, rng, rate, p_lucky=0.3) for _ in range(distinct)]
    texts = [t[: rng.randrange(1, len(t))] + "\n" if rng.random() < 0.15 else t for t in texts]
    rolls = verified(task, [(problem, rng.choice(texts)) for _ in range(rng.randint(distinct, G))])
    attempt, prompt = rng.choice(reflection_prompts(rolls, len(rolls)))
    return "", prompt, written(attempt) + "\n"


def reference_memory(task, settings, seed, budget=None):
    """The memory once every plan is found, just after a lucky pass: per RL family, reference traces of 3 training
    problems with a wrong attempt each, then a wrong plan passing a 4th (if any). budget: None keeps the settings'."""
    rng = random.Random(seed)
    mem = Memory(**dict(settings, budget=budget or settings["budget"]))
    per_family = {}
    for p in task.train:
        per_family.setdefault(p.family, []).append(p)
    found = [(p, text) for probs in per_family.values() for p in probs[:3]
             for text in (task.solve(p), task.attempt(p, rng, 0.0, p_lucky=0.0))]
    lucky = [(ps[3], task.attempt(ps[3], rng, 0.0, p_lucky=1.0)) for ps in per_family.values() if len(ps) > 3]
    for batch in (found, lucky):
        mem.update(verified(task, batch))
    return mem


def verified(task, attempts):
    """(problem, completion) pairs as Rollouts with the verifier's verdicts (no tokens: they are never sampled)."""
    return [Rollout(p, y, [], [], *task.verify(p, y), task.strategy(p, y)) for p, y in attempts]


def sft_loss(model, examples, device):
    """Cross-entropy on completion tokens only; examples are (context, prompt, completion) strings."""
    prefixes, completions = [encode(c + p) for c, p, _ in examples], [encode(y) for _, _, y in examples]
    logits, targets = completion_logits(model, prefixes, completions, device)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


# -----------------------------------------------------------------------------
# warm-up (cached: every method and seed of a task starts from the same weights)

WARMUP_VERSION = 5  # part of the cache key: bump it when the model's code or the warm-up data change
WARMUP_KEYS = ("plan_len", "n_ops", "input_len", "answer_len", "n_layer", "n_head", "n_embd", "block_size",
               "warmup_steps", "warmup_batch", "warmup_lr", "warmup_seed", "mem_max_experiences", "mem_max_insights",
               "mem_min_agree", "mem_min_support", "mem_budget")


def warmup_path(c, task):
    """cache_dir/warmup-<tag>.pt, the tag a hash of everything the warm-up depends on."""
    problems = [p.pid for p in task.train + task.heldout + task.unseen]  # a task's settings show in its problems
    key = dict({k: getattr(c, k) for k in WARMUP_KEYS}, task=type(task).__name__, max_completion=task.max_completion,
               version=WARMUP_VERSION, problems=hashlib.sha1(json.dumps(problems).encode()).hexdigest(),
               **reflection_mix(c))
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(c.cache_dir, f"warmup-{tag}.pt")


def warmup(c, task, device):
    """The warm-up model for this config and task, from cache_dir; trained and cached if absent or unloadable."""
    path = warmup_path(c, task)
    torch.manual_seed(c.warmup_seed)  # before the model's init: torch's start-up seed differs from process to process
    model = GPT(GPTConfig(c.block_size, c.n_layer, c.n_head, c.n_embd)).to(device)
    if os.path.exists(path):
        try:
            load_weights(model, load_checkpoint(path)["model"], path)
            print(f"warm-up: loaded {path}")
            return model
        except ValueError as e:
            print(f"warning: {e}: training the warm-up again", file=sys.stderr)
            torch.manual_seed(c.warmup_seed)  # the same initial weights as a run that found no file
            model = GPT(GPTConfig(c.block_size, c.n_layer, c.n_head, c.n_embd)).to(device)
    train_warmup(model, c, task, device)
    os.makedirs(c.cache_dir, exist_ok=True)
    atomic_save(dict(model=model.state_dict(), config=vars(c)), path)
    return model


def train_warmup(model, c, task, device):
    """Supervised phases: plans executed without context (the first 5/12 of steps: this makes the warm-up reliable),
    memories richer in right plans than RL's (to 11/12), RL's mix. reflect=model adds reflection to the last two."""
    rng = random.Random(c.warmup_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=c.warmup_lr, weight_decay=0.0)
    settings, batches = settings_of(c), []
    bar = tqdm(range(c.warmup_steps), desc="warm-up", dynamic_ncols=True)
    for it in bar:
        for g in opt.param_groups:  # linear ramp, then linear decay to zero
            g["lr"] = c.warmup_lr * min(1.0, (it + 1) / 50) * (1 - it / c.warmup_steps)
        if not batches:  # 32 batches at once, grouped by length: 3 % padding (57 % ungrouped)
            reading = it >= c.warmup_steps * 5 // 12
            phase = dict(p_plain=0, p_right=(0.5, 0.8, 1.0)) if reading and it < c.warmup_steps * 11 // 12 else {}
            phase = dict(phase, **reflection_mix(c)) if reading else dict(p_plain=1)
            pool = [warmup_example(task, rng, settings, **phase) for _ in range(32 * c.warmup_batch)]
            pool.sort(key=lambda e: sum(map(len, e)))
            batches = [pool[i : i + c.warmup_batch] for i in range(0, len(pool), c.warmup_batch)]
            rng.shuffle(batches)
        with autocast(device):
            loss = sft_loss(model, batches.pop(), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
