"""
Procedural Memory Distillation: one RL step, for every method, in the paper's order (`step`).

    rollout   the student samples G completions per problem
    verify    the task's verifier scores each: reward, feedback, and the strategy of a faithful trace
    memory    the rollouts update the memory: add experiences, reflect them into insights (the counting rule's
              verdicts, or the teacher's weights writing them), consolidate patterns across families
    teacher   the contexts the teacher reads: PMD's is the memory rendered for the problem, SDPO's the first
              successful sibling of the sample's group
    losses    distil the teacher's next-token distributions on the student's own tokens (SDPO, PMD), or weigh them
              by the group's advantages (GRPO), or imitate the memory's verified successes (rft); plus replay
    optimize  backward, clip, AdamW, the EMA teacher: `updates` times per batch of rollouts
The student never sees a context, so the trained model needs no memory at inference.
"""
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from memory import LEVELS, Rollout, counted, experience_line, fidelity, parse_reflection, reflection_prompts
from model import autocast, completion_logits, completion_logits_shared, decode, encode, generate
from warmup import reflection_mix, sft_loss, warmup_example


# -----------------------------------------------------------------------------
# the step


def step(run, problems):
    """One RL step on this rank's share of problems. Returns (loss, grad norm, stats, finite) of the last update;
    finite is whether every update was. A frozen policy only feeds the memory."""
    c, clock = run.c, run.clock
    share = problems[run.rank * len(problems) // run.world : (run.rank + 1) * len(problems) // run.world]
    rolls = rollout(run.student, run.task, share, c.group_size, c.temperature, run.gen)
    clock("rollout")
    verify(run.task, rolls)
    clock("verify")
    stats = dict(reward=mean_reward(run, rolls))
    if c.memory_steps < 0 or run.step < c.memory_steps:  # else the memory stays as it is (a frozen memory)
        stats.update(update_memory(run, rolls))
    clock("memory")
    loss, norm, finite = torch.zeros(()), torch.zeros(()), True
    if not c.policy_frozen:  # the paper's frozen policy never trains; its rollouts still feed the memory
        contexts = teacher_contexts(c.method, rolls, c.group_size, run.memory, run.levels)
        for _ in range(c.updates):
            with autocast(run.device):
                loss, more = losses(run, rolls, contexts, share)
            stats.update(more)
            norm, ok = optimize(run, loss)
            finite = finite and ok
    run.step += 1
    run.rollouts += c.prompts_per_step * c.group_size
    return loss, norm, stats, finite


def mean_reward(run, rolls):
    """The batch's mean reward, over every rank's rollouts."""
    reward = sum(r.reward for r in rolls) / len(rolls)
    if run.world > 1:
        total = torch.tensor([reward], device=run.device)
        dist.all_reduce(total)
        reward = total.item() / run.world
    return reward


# -----------------------------------------------------------------------------
# rollout, verify


def rollout(model, task, problems, G, temperature, generator):
    """G sampled completions per problem, not yet verified: len(problems) * G Rollouts, grouped by problem."""
    was_training = model.training
    model.eval()
    comps, logps = generate(model, [encode(p.prompt) for p in problems], G, task.max_completion, temperature, generator)
    model.train(was_training)
    return [Rollout(problems[i // G], decode(y), y, lp) for i, (y, lp) in enumerate(zip(comps, logps))]


def verify(task, rolls):
    """The verifier's reward and feedback on each rollout, and the strategy of a faithful trace; in place."""
    for r in rolls:
        r.reward, r.feedback = task.verify(r.problem, r.completion)
        r.strategy = task.strategy(r.problem, r.completion)
    return rolls


# -----------------------------------------------------------------------------
# memory: add, reflect, consolidate


def update_memory(run, rolls):
    """Every rank's rollouts into the memory (Memory.update: add, reflect, consolidate). Every method keeps one, so
    that teacher_acc is comparable; only PMD's teacher reads it. Returns the reflection's counts (reflect=model)."""
    c, stats = run.c, {}
    if c.transient:  # PMD-Transient: the memory holds this batch only
        run.memory.forget()
    seen, verdicts = run.gather(rolls) if run.world > 1 else rolls, None
    if c.reflect == "model":  # the teacher's weights write the verdicts (a frozen policy's teacher is frozen too)
        verdicts, counts = reflection(run.teacher, seen, c.group_size)
        stats = {f"reflect_{k}": v for k, v in counts.items()}
        run.clock("reflect")
    run.memory.update(seen, verdicts)
    return stats


@torch.no_grad()
def reflection(model, rollouts, G):
    """The model, greedy, writes the verdicts on each problem's attempts (memory.reflection_prompts) in one batch.
    Returns (verdicts for Memory.update, memory.fidelity's counts against the counting rule plus unparsed parts)."""
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
        # the sample's own failed trace is not shown: a teacher shown it raises that very plan's probability
        contexts.append(experience_line(demo.problem.prompt, demo.completion, 1, "") + "\n" if demo else None)
    return contexts


def make_teacher(model, mode):
    """live: the student itself; ema: a copy updated towards the student every update; frozen: a copy never updated."""
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


def losses(run, rolls, contexts, problems):
    """The method's own loss on the batch's rollouts, plus replay (warm-up examples that keep the teacher reading).
    Returns (loss, stats)."""
    c, clock = run.c, run.clock
    prompts = [encode(r.problem.prompt) for r in rolls]
    s_logits, targets = completion_logits(run.student, prompts, [r.tokens for r in rolls], run.device)  # (N, L, V)
    mask = (targets >= 0).float()  # (N, L)
    stats = dict(length=mask.sum(1).mean().item())
    loss = 0.0 * s_logits.sum()  # a graph even when every rollout is masked out
    if c.method == "grpo" or c.pg_weight > 0:
        rewards = torch.tensor([float(r.reward) for r in rolls], device=run.device)  # (N,)
        adv = grpo_advantages(rewards, c.group_size, c.adv_std)
        logp_old = sampler_logprobs(rolls, mask) if c.updates > 1 else None
        pg = pg_loss(token_logprobs(s_logits, targets), adv, mask, logp_old)
        loss = loss + (1.0 if c.method == "grpo" else c.pg_weight) * pg
    clock("student")
    if c.method == "rft":  # the replay control: imitate the verified successes the memory keeps for these families
        examples = memory_successes(run.memory, problems)
        stats["imitated"] = len(examples)
        if examples:
            loss = loss + sft_loss(run.student, examples, run.device)
    if c.method in ("sdpo", "pmd"):
        keep = [i for i, ctx in enumerate(contexts) if ctx is not None]
        stats["teacher_frac"] = len(keep) / len(rolls)
        if keep:
            with torch.no_grad():
                rows = [encode(contexts[i]) + prompts[i] for i in keep]
                t_logits, _ = completion_logits_shared(run.teacher, rows, [rolls[i].tokens for i in keep], run.device)
            clock("teacher")
            Lt = t_logits.size(1)  # the longest kept completion: a masked-out rollout may be longer
            kd = distill_loss(s_logits[keep, :Lt], t_logits, targets[keep, :Lt], mask[keep, :Lt], c.alpha, c.topk,
                              c.sampled_token, sampler_logprobs(rolls, mask)[keep, :Lt], c.is_clip)
            loss = loss + kd  # a token mean over the kept rollouts only, as SDPO's: masked-out ones do not dilute it
            stats["distill"] = kd.item()
    if c.replay:
        replay = [warmup_example(run.task, run.rng, run.mem_settings, p_plain=0, **reflection_mix(c))
                  for _ in range(c.replay)]
        loss = loss + c.replay_weight * sft_loss(run.student, replay, run.device)
    clock("student")
    return loss, stats


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


PPO_CLIP = 0.2  # with several updates per batch: the policy's ratio to the sampler is clipped to [0.8, 1.2]


def pg_loss(logp, adv, mask, logp_old=None):
    """Policy gradient, token-level mean over the rollouts whose advantage is not zero (a group whose samples all
    agree teaches nothing and does not dilute the others, as DAPO drops it). With logp_old (B, L), for several
    updates per batch: PPO's clipped ratio p / p_old, which is 1 at the first update."""
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
    tail = lambda lp: torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    return torch.cat([ls_k, tail(ls_k)], -1), torch.cat([lt_k, tail(lt_k)], -1)


def distill_loss(s_logits, t_logits, targets, mask, alpha=0.5, topk=0, sampled_token=False, logp_old=None,
                 is_clip=0.0):
    """Self-distillation on the student's own tokens, token-level mean over unmasked positions.
    s_logits, t_logits (B, L, V); targets, mask, logp_old (B, L; logp_old from the sampler).
    sampled_token: the reverse-KL estimator stopgrad(log p_s(y) - log p_t(y)) * log p_s(y), on the sampled token only.
    is_clip > 0: weighted by min(p_s(y) / p_old(y), is_clip), detached."""
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


def sampler_logprobs(rolls, mask):
    """Each completion token's log-prob when it was sampled, (N, L) like mask: for PPO's ratio or the IS weight."""
    out = torch.zeros_like(mask)
    for i, r in enumerate(rolls):
        out[i, : len(r.logp_old)] = torch.tensor(r.logp_old)
    return out


def memory_successes(memory, problems):
    """(context, prompt, completion) for every passing trajectory the memory keeps of the problems' families: the
    replay control's buffer. Completions end with the newline of every sampled one (the memory stores lines)."""
    families = dict.fromkeys(p.family for p in problems)  # distinct, in batch order
    return [("", e["text"][: e["n_prompt"]], e["text"][e["n_prompt"] :] + "\n")
            for f in families for e in memory.experience.get(f, []) if e["reward"]]


# -----------------------------------------------------------------------------
# optimize


def optimize(run, loss):
    """Backward, gradients averaged over ranks, clip, AdamW and the EMA teacher. A non-finite loss or gradient norm
    skips the update on every rank. Returns (grad norm, finite)."""
    c, model = run.c, run.model
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.world > 1:  # by hand: DDP expects one forward per backward, and a step has several
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= run.world
    run.clock("student")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(norm))
    if run.world > 1:  # every rank skips together
        flag = torch.tensor([float(not finite)], device=run.device)
        dist.all_reduce(flag)
        finite = flag.item() == 0
    if finite:
        for g in run.opt.param_groups:  # a linear ramp: a fresh Adam's first steps move every weight by about lr
            g["lr"] = c.lr * min(1.0, (run.step + 1) / max(c.lr_warmup, 1))
        run.opt.step()
        if c.teacher == "ema":
            ema_update(run.teacher, model, c.ema_rate)
    run.clock("optimizer")
    return norm, finite
