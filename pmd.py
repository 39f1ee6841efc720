"""
Procedural Memory Distillation: rollout, reflect, teacher, distill.

One step, for every method (only what the student learns from differs):
    rollout   the student samples G completions per prompt; the task's verifier scores each
    reflect   the rollouts update the memory (experiences -> insights -> patterns); the insights' verdicts come from
              the counting rule, or from the teacher's weights reading each problem's attempts (reflect=model)
    teacher   the same network (live, EMA or frozen weights) reads a context and scores the
              student's own completion tokens: PMD's context is the memory rendered for the
              problem, SDPO's the first successful sibling in the sample's group
    distill   per-token divergence between student and teacher next-token distributions
GRPO instead weighs the sampled tokens' log-probs by r - mean(r) of the group; the replay control
(rft) imitates the verified successes the memory keeps for the batch's families. The student never
sees a context, so the trained model needs no memory at inference.
"""
import copy
import functools
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memory import LEVELS, Memory, counted, experience_line, fidelity, parse_reflection, reflection_prompts, written
from model import completion_logits, completion_logits_shared, decode, encode, generate


@dataclass
class Rollout:
    problem: object
    completion: str
    tokens: list  # completion token ids
    logp_old: list  # the sampler's log-prob of each token
    reward: int
    feedback: str
    strategy: tuple = None  # the steps of a faithful trace, else None


# -----------------------------------------------------------------------------
# rollout


def rollout(model, task, problems, G, temperature, generator, clock=None):
    """G sampled completions per problem, verified. Returns a list of len(problems) * G Rollouts."""
    clock = clock or Clock()
    was_training = model.training
    model.eval()
    comps, logps = generate(model, [encode(p.prompt) for p in problems], G, task.max_completion, temperature, generator)
    model.train(was_training)
    clock("rollout")
    out = []
    for i, (c, lp) in enumerate(zip(comps, logps)):
        p, text = problems[i // G], decode(c)
        reward, feedback = task.verify(p, text)
        out.append(Rollout(p, text, c, lp, reward, feedback, task.strategy(p, text)))
    clock("verify")
    return out


class Clock:
    """Wall time per phase of a step (bench.py --speed): clock(phase) charges the time since its previous call to
    phase. Without a dict to fill it does nothing. On a GPU it first waits for the queued kernels, so that each
    phase is charged with its own work rather than with whatever the next synchronisation waits for."""

    def __init__(self, times=None, device="cpu"):
        self.times, self.sync = times, times is not None and str(device).startswith("cuda")
        self.last = time.perf_counter()

    def __call__(self, phase):
        if self.times is None:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self.last
        self.last = now


# -----------------------------------------------------------------------------
# reflect: the model writes the verdicts


@torch.no_grad()
def reflection(model, rollouts, G):
    """The model, greedy, reads each problem's attempts (memory.reflection_prompts) and writes their verdicts: one
    batched generation for the whole step. Returns (verdicts for Memory.update, counts: fidelity against the counting rule,
    and dropped, the parts of its lines that do not parse)."""
    chunks = reflection_prompts(rollouts, G)
    prompts = [encode(text) for _, text in chunks]
    was_training = model.training
    model.eval()
    comps, _ = generate(model, prompts, 1, model.cfg.block_size - max(map(len, prompts)), temperature=0)
    model.train(was_training)
    verdicts, dropped = [], 0
    for (r, _), y in zip(chunks, comps):
        got, bad = parse_reflection(decode(y))
        verdicts += [(r.problem, s, ok) for s, ok in got]
        dropped += bad
    return verdicts, dict(fidelity(verdicts, counted(rollouts)), dropped=dropped)


# -----------------------------------------------------------------------------
# teacher: what it is shown, and which weights it uses


def teacher_contexts(method, rollouts, G, memory=None, levels=LEVELS):
    """The context text the teacher reads before each rollout's prompt; None masks the rollout out."""
    if method in ("grpo", "rft"):  # no teacher
        return [None] * len(rollouts)
    if method == "pmd":  # one render per problem: the G samples of its group share it
        rendered = {r.problem.pid: memory.render(r.problem, levels) or None for r in rollouts[::G]}
        return [rendered[r.problem.pid] for r in rollouts]
    contexts = []  # sdpo: the first successful sibling, never the sample itself; no success in the group masks it out
    for i, r in enumerate(rollouts):
        group = rollouts[i - i % G : i - i % G + G]
        demo = next((s for s in group if s.reward and s is not r), None)
        # the sample's own failed trace is not shown: a teacher shown it raises that very plan's probability (README)
        contexts.append(experience_line(demo.problem.prompt, demo.completion, 1, "") + "\n" if demo else None)
    return contexts


def make_teacher(model, mode):
    """live: the student itself; ema: a copy updated towards the student every step; frozen: a copy never updated."""
    if mode == "live":
        return model
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher, model, rate):
    for t, s in zip(teacher.parameters(), model.parameters()):
        t.lerp_(s, rate)


# -----------------------------------------------------------------------------
# losses


def grpo_advantages(rewards, G, std_norm=False):
    """rewards (N,) in groups of G -> advantages (N,): r - mean(r) of its group (optionally / std)."""
    r = rewards.view(-1, G)
    a = r - r.mean(1, keepdim=True)
    if std_norm:
        a = a / (r.std(1, keepdim=True) + 1e-4)
    return a.view(-1)


def token_logprobs(logits, targets):
    """logits (B, L, V), targets (B, L) with -1 ignored -> log-prob of each target (B, L), 0 where ignored."""
    logp = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (targets >= 0)


PPO_CLIP = 0.2  # with several updates per batch: the policy's ratio to the sampler is clipped to [1 - 0.2, 1 + 0.2]


def pg_loss(logp, adv, mask, logp_old=None):
    """Policy gradient, token-level mean over the rollouts whose advantage is not zero (a group whose samples all
    passed or all failed teaches nothing and does not dilute the others, as DAPO's dynamic sampling drops it).
    logp_old (B, L), the sampler's log-probs, for several updates per batch: PPO's clipped ratio p / p_old (at the
    first update the ratio is 1 and the gradient is the plain one's)."""
    informative = mask * (adv != 0)[:, None]
    a = adv[:, None]
    if logp_old is None:  # one update per batch
        return -(a * logp * mask).sum() / informative.sum().clamp(min=1)
    ratio = (logp - logp_old).exp()
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - PPO_CLIP, 1 + PPO_CLIP) * a)
    return -(surrogate * mask).sum() / informative.sum().clamp(min=1)


def divergence(ls, lt, alpha):
    """Per-position divergence between log-distributions ls (student) and lt (teacher), (..., K) -> (...).
    alpha 0: forward KL(t||s); 1: reverse KL(s||t); between: generalised JSD with M = (1-a) p_s + a p_t."""
    if alpha == 0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if alpha == 1:
        return (ls.exp() * (ls - lt)).sum(-1)
    a = torch.tensor(alpha, device=ls.device)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-a), lt + torch.log(a)]), 0)
    return alpha * (lt.exp() * (lt - lm)).sum(-1) + (1 - alpha) * (ls.exp() * (ls - lm)).sum(-1)


def topk_with_tail(ls, lt, k):
    """Restrict both distributions to the student's top-k tokens plus one bucket for the rest."""
    idx = ls.topk(k, -1).indices
    ls_k, lt_k = ls.gather(-1, idx), lt.gather(-1, idx)
    tail = lambda l: torch.log1p(-l.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    return torch.cat([ls_k, tail(ls_k)], -1), torch.cat([lt_k, tail(lt_k)], -1)


def distill_loss(s_logits, t_logits, targets, mask, alpha=0.5, topk=0, sampled_token=False, logp_old=None, is_clip=0.0):
    """Self-distillation on the student's own tokens, token-level mean over unmasked positions.

    s_logits, t_logits (B, L, V); targets (B, L); mask (B, L) float.
    sampled_token: the reverse-KL estimator stopgrad(log p_s(y) - log p_t(y)) * log p_s(y) on the sampled token only.
    is_clip > 0: multiply by min(p_s(y) / p_old(y), is_clip), detached (logp_old (B, L) from the sampler).
    """
    ls, lt = F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1).detach()
    if sampled_token:
        ls_y, lt_y = token_logprobs(s_logits, targets), token_logprobs(t_logits, targets).detach()
        per_tok = (ls_y - lt_y).detach() * ls_y  # (B, L)
    else:
        if topk:
            ls, lt = topk_with_tail(ls, lt, topk)
        per_tok = divergence(ls, lt, alpha)  # (B, L)
    if is_clip:
        ratio = (token_logprobs(s_logits, targets) - logp_old).exp()
        per_tok = per_tok * ratio.clamp(max=is_clip).detach()
    return (per_tok * mask).sum() / mask.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# one training step


def step(model, teacher, task, memory, problems, cfg, generator, device, gather=None, update_memory=True, clock=None, rolls=None):
    """Rollout, reflect, teacher, distill for one batch of problems. Returns (loss, stats) with the loss
    ready for backward (None for a frozen policy, which only feeds the memory).
    gather: maps this rank's rollouts to every rank's, merged in rank order, for the memory update (distributed).
    update_memory: False leaves the memory as it is (a frozen memory).
    clock: a Clock charged with each phase's time.
    rolls: the batch's rollouts, already sampled (train_step samples once for its updates); None samples them here."""
    clock = clock or Clock()
    rolls = rolls if rolls is not None else rollout(model, task, problems, cfg.group_size, cfg.temperature, generator, clock)
    stats = dict(reward=sum(r.reward for r in rolls) / len(rolls))
    if update_memory:  # every method keeps a memory (so teacher_acc is comparable); only PMD's teacher reads it
        if cfg.transient:  # PMD-Transient: the memory holds this batch only, and is gone after the step
            memory.forget()
        seen, verdicts = rolls if gather is None else gather(rolls), None
        if cfg.reflect == "model":  # the teacher's weights write the verdicts (a frozen policy's teacher is frozen too)
            verdicts, counts = reflection(teacher, seen, cfg.group_size)
            stats.update({f"reflect_{k}": v for k, v in counts.items()})
            clock("reflect")
        memory.update(seen, verdicts)
    clock("memory")
    if cfg.policy_frozen:  # the paper's frozen policy: it never trains; the memory evolves from its rollouts
        return None, stats
    contexts = teacher_contexts(cfg.method, rolls, cfg.group_size, memory, [l for l in cfg.memory_levels.split(",") if l])
    prompts = [encode(r.problem.prompt) for r in rolls]
    s_logits, targets = completion_logits(model, prompts, [r.tokens for r in rolls], device)  # (N, L, V), (N, L)
    mask = (targets >= 0).float()
    rewards = torch.tensor([float(r.reward) for r in rolls], device=device)
    stats["length"] = mask.sum(1).mean().item()
    loss = 0.0 * s_logits.sum()  # a graph even when every rollout is masked out
    if cfg.method == "grpo" or cfg.pg_weight > 0:
        adv = grpo_advantages(rewards, cfg.group_size, cfg.adv_std)
        pg = pg_loss(token_logprobs(s_logits, targets), adv, mask, sampler_logprobs(rolls, mask) if cfg.updates > 1 else None)
        loss = loss + (1.0 if cfg.method == "grpo" else cfg.pg_weight) * pg
    clock("student")
    if cfg.method == "rft":  # the replay control: imitate the verified successes the memory keeps for the batch's families
        examples = memory_successes(memory, problems)
        stats["imitated"] = len(examples)
        if examples:
            loss = loss + sft_loss(model, examples, device)
        clock("student")
    if cfg.method in ("sdpo", "pmd"):
        keep = [i for i, c in enumerate(contexts) if c is not None]
        stats["teacher_frac"] = len(keep) / len(rolls)
        if keep:
            with torch.no_grad():
                t_logits, _ = completion_logits_shared(teacher, [encode(contexts[i]) + prompts[i] for i in keep], [rolls[i].tokens for i in keep], device)
            clock("teacher")
            Lt = t_logits.size(1)  # the longest kept completion: a masked-out rollout may be longer
            kd = distill_loss(s_logits[keep, :Lt], t_logits, targets[keep, :Lt], mask[keep, :Lt], cfg.alpha, cfg.topk, cfg.sampled_token,
                              sampler_logprobs(rolls, mask)[keep, :Lt], cfg.is_clip)
            loss = loss + kd  # a token mean over the kept rollouts only, as SDPO's: masked-out ones do not dilute it
            stats["distill"] = kd.item()
            clock("student")
    return loss, stats


def sampler_logprobs(rolls, mask):
    """The sampler's log-prob of each completion token, (N, L) like mask: for an importance weight or PPO's ratio."""
    out = torch.zeros_like(mask)
    for i, r in enumerate(rolls):
        out[i, : len(r.logp_old)] = torch.tensor(r.logp_old)
    return out


def memory_successes(memory, problems):
    """(context, prompt, completion) for every passing trajectory the memory keeps of the problems' families: the
    cross-episode buffer of verified successes that the replay control imitates. Completions end with the newline
    that ends every sampled completion (the memory stores lines without it)."""
    families = dict.fromkeys(p.family for p in problems)  # distinct, in batch order
    return [("", e["text"][: e["n_prompt"]], e["text"][e["n_prompt"] :] + "\n")
            for f in families for e in memory.experience.get(f, []) if e["reward"]]


def sft_loss(model, examples, device):
    """Cross-entropy on completion tokens only; examples are (context, prompt, completion) strings."""
    logits, targets = completion_logits(model, [encode(c + p) for c, p, _ in examples], [encode(y) for _, _, y in examples], device)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


# -----------------------------------------------------------------------------
# warm-up data: executing procedures and reading memory, on groups never used in RL


PLAIN_POOL = 64  # warm-up groups whose families keep their plans and inputs: the model learns that an id sets a plan


@functools.lru_cache(maxsize=8)
def plain_pool(task):
    """The pool's problems by family: PLAIN_POOL warm-up groups drawn from fixed seeds. An id two groups draw keeps its
    first group's plan (ids are drawn at random, and one that recurs with another plan would teach that ids are noise)."""
    pool = {}
    for k in range(PLAIN_POOL):
        for p in task.warmup_group(random.Random(k)):
            if pool.setdefault(p.family, (k, []))[0] == k:
                pool[p.family][1].append(p)
    return {f: ps for f, (_, ps) in pool.items()}


def warmup_example(task, rng, memory_settings, p_plain=0.3, p_right=(0.0, 0.2, 0.5), p_unseen=0.35, p_reflect=0.0, group_size=8):
    """(context, prompt, completion) for one problem of fresh warm-up families.

    A memory is filled with plausible attempts (right, wrong, lucky passes of wrong plans, some unfaithful) at some
    problems of the families, then rendered for the target problem with a random subset of levels. The target is
    always the reference solution, so the model learns to use whatever the context tells it (copy a confirmed plan,
    weigh a lone pass against counted evidence, avoid a failed plan, take the steps its clusters share) and, without
    context, a uniform guess over plans. p_plain: the share with no context; p_right: the rates of right attempts
    a memory is drawn with (0: failures and lucky passes only, as in RL before discovery); p_unseen: the share whose
    target family has no memory of its own (as a family RL never trains on); p_reflect: the share of the others that
    teach reflection instead (reflection_example, with groups of up to group_size attempts)."""
    probs = task.warmup_group(rng)
    if rng.random() < p_plain:  # no context: half the time a family of a fixed pool, whose id always means the same plan
        pool = plain_pool(task)
        families = sorted(pool)
        if rng.random() < 0.5:
            probs = pool[rng.choice(families)]
        else:  # a fresh family never borrows a pooled id (it would show that id with another plan)
            probs = [p for p in probs if p.family not in pool] or pool[rng.choice(families)]
        target = rng.choice(probs)
        return "", target.prompt, task.solve(target)
    if p_reflect and rng.random() < p_reflect:  # drawn only when asked: without reflection the examples stay as they were
        return reflection_example(task, rng, rng.choice(probs), group_size)
    target = rng.choice(probs)
    mem = Memory(**memory_settings)
    seen = rng.sample(probs, rng.randint(1, len(probs)))
    if rng.random() < p_unseen:  # the target's family has no memory of its own: only its clusters' patterns reach it
        seen = [p for p in seen if p.family != target.family] or seen
    rate = rng.choice(p_right)
    rolls = []
    for p in seen:
        for _ in range(rng.randint(1, 4)):
            text = task.attempt(p, rng, rate, p_lucky=0.3)
            reward, feedback = task.verify(p, text)
            rolls.append(Rollout(p, text, [], [], reward, feedback, task.strategy(p, text)))
    mem.update(rolls)
    levels = [l for l in LEVELS if rng.random() < 0.6] or [rng.choice(LEVELS)]
    return mem.render(target, levels), target.prompt, task.solve(target)


def reflection_example(task, rng, problem, G):
    """("", prompt, completion): the attempts at one warm-up problem as a reflector reads them (memory.reflection_prompts)
    and, as the target, the verdicts the counting rule draws from them. A group is up to G attempts drawn, with
    repeats, from a few distinct ones (RL's groups repeat a trace), at a random rate of right plans, some cut short
    (malformed: no verdict to write)."""
    rate, distinct = rng.choice((0.0, 0.2, 0.5, 0.9)), rng.randint(1, G)
    texts = [task.attempt(problem, rng, rate, p_lucky=0.3) for _ in range(distinct)]
    texts = [t[: rng.randrange(1, len(t))] + "\n" if rng.random() < 0.15 else t for t in texts]
    rolls = [Rollout(problem, t, [], [], *task.verify(problem, t), task.strategy(problem, t))
             for t in (rng.choice(texts) for _ in range(rng.randint(distinct, G)))]
    attempt, prompt = rng.choice(reflection_prompts(rolls, len(rolls)))
    return "", prompt, written(attempt) + "\n"
