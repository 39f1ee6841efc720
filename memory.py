"""
Procedural memory: three levels, plain dicts and lists, saved as human-readable JSON.

    experience  family -> list of raw trajectories {pid, text, n_prompt, reward, feedback, step}; text is the
                prompt (its first n_prompt characters) and the completion
    insight     family -> {strategy: {agree: [pids], contradict: [pids], step}}
                a strategy whose faithful traces passed on more inputs than they failed on is a
                *strategy* (rendered `ok`); one that failed more is a *lesson* (rendered `bad`);
                evidence both ways in equal measure retires it.
    pattern     cluster -> {"i:step": {support: [families], against: [families]}}
                steps that the confirmed strategies of most families of a cluster share (a problem's group
                names its clusters, space-separated); they are what a family the memory has never seen can use.

The memory is task-agnostic: it sees problems only through their keys (pid, family, group, prompt)
and traces only through the task's verdict (reward, feedback) and the strategy (a tuple of steps)
of a faithful trace. Only faithful traces count as evidence for insights and patterns.

    python memory.py out/memory.json     prints the three levels
    python memory.py out/                a run directory: the same, then how the memory grew (per level, at every
                                         evaluation) and a per-family timeline: when the memory held the family's right
                                         strategy, when the teacher and the memory-free student solved it, the lag
    python memory.py out/ --plot         also writes out/memory.png (needs matplotlib; training never does)
    python memory.py out/ --family=A07   one family up close: the memory lines the teacher reads for one held-out
                                         problem, the teacher's and the student's greedy completions, their verdicts
"""
import json
import os
import sys
from collections import Counter

LEVELS = ("experience", "insight", "pattern")
SETTINGS = dict(  # defaults; train.py's config is the source of truth for a run
    max_families=256,  # families kept (least recently updated evicted first)
    max_experiences=8,  # raw trajectories kept per family (failures evicted before successes)
    max_insights=16,  # strategies and lessons kept per family (weakest evidence evicted first)
    max_patterns=8,  # patterns kept per cluster (most supported first)
    max_evidence=32,  # pids remembered per insight side (the most recent)
    min_agree=2,  # distinct passing inputs before a strategy counts as confirmed for patterns
    min_support=2,  # confirmed families sharing a step before it is a pattern
    budget=160,  # characters of rendered context per problem
    lines=(2, 3, 1),  # at most this many lines per level: experience, insight, pattern (0 or 1: one composed line)
)


def clean(text, n=48):
    """One printable line of at most n characters (completions can be any bytes)."""
    text = text.rstrip("\n")[:n]
    if text.isascii() and text.isprintable():  # the common case, without a loop over characters
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def experience_line(prompt, completion, reward, feedback):
    """A raw trajectory as a context line; PMD's memory and SDPO's reprompt both render this way."""
    return f"={clean(prompt + completion)} {reward}" + ("" if reward else f" {clean(feedback, 16)}")


class Memory:
    def __init__(self, **settings):
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"memory: unknown setting(s) {sorted(unknown)}")
        self.settings = {**SETTINGS, **settings}
        self.settings["lines"] = tuple(self.settings["lines"])
        self.step = 0
        self.experience, self.insight, self.pattern = {}, {}, {}
        self.groups = {}  # family -> its group (its clusters, space-separated)
        self.touched = {}  # family -> last step it was updated, least recently updated first (for eviction)
        self.members = {}  # cluster -> its families: derived from groups, so that no update scans every family

    # -- update: add experiences, reflect them into insights, consolidate patterns ----------------

    def update(self, rollouts, verdicts=None):
        """rollouts: objects with .problem, .completion, .reward, .feedback, .strategy (None unless faithful).
        verdicts: (problem, strategy, passed) that reflection drew from them; None: the counting rule's (counted)."""
        self.step += 1
        for r in rollouts:
            self.add(r.problem, r.completion, r.reward, r.feedback)
        self.reflect(counted(rollouts) if verdicts is None else verdicts)
        self.consolidate({key for r in rollouts for key in r.problem.group.split()})
        self.evict()

    def forget(self):
        """Drop every item (PMD-Transient starts each step from nothing); the settings and the step count stay."""
        self.experience, self.insight, self.pattern, self.groups, self.touched, self.members = {}, {}, {}, {}, {}, {}

    def add(self, problem, completion, reward, feedback):
        fam = problem.family
        if fam not in self.groups:
            for key in problem.group.split():
                self.members.setdefault(key, []).append(fam)
        self.groups[fam] = problem.group
        self.touched.pop(fam, None)  # re-insert: the dict stays in least-recently-updated order
        self.touched[fam] = self.step
        exps = self.experience.setdefault(fam, [])
        text = clean(problem.prompt + completion, 10**6)
        for e in exps:
            if e["text"] == text:  # the same trajectory again: refresh it, don't store a copy
                e["step"] = self.step
                return
        exps.append(dict(pid=problem.pid, text=text, n_prompt=len(clean(problem.prompt, 10**6)), reward=int(reward),
                         feedback=clean(feedback, 16), step=self.step))
        while len(exps) > self.settings["max_experiences"]:
            fails = [e for e in exps if not e["reward"]]
            exps.remove(min(fails or exps, key=lambda e: e["step"]))

    def reflect(self, verdicts):
        """Each verdict (problem, strategy, passed) is evidence for its strategy (passed) or against it, on one input."""
        cap = self.settings["max_evidence"]
        for problem, strategy, passed in verdicts:
            items = self.insight.setdefault(problem.family, {})
            it = items.setdefault(",".join(strategy), dict(agree=[], contradict=[], step=self.step))
            side = it["agree"] if passed else it["contradict"]
            if problem.pid in side:
                side.remove(problem.pid)
            side.append(problem.pid)
            del side[:-cap]
            it["step"] = self.step  # equal evidence retires it (net 0: never rendered, never confirmed) but keeps its evidence
        for fam in {problem.family for problem, _, _ in verdicts}:  # only the families reflected on can be over the cap
            items = self.insight[fam]
            while len(items) > self.settings["max_insights"]:  # lessons go before strategies, weakest evidence first
                weakest = min(items, key=lambda s: (net(items[s]) > 0, abs(net(items[s])), items[s]["step"]))
                del items[weakest]

    def confirmed(self, family):
        """The family's best strategy if it passed on at least min_agree more inputs than it failed."""
        items = self.insight.get(family, {})
        best = max(items, key=lambda s: net(items[s]), default=None)
        return best if best is not None and net(items[best]) >= self.settings["min_agree"] else None

    def consolidate(self, clusters):
        """Recompute each cluster's patterns from its families' confirmed strategies: a step is a pattern when at least
        min_support of them take it and more take it than not."""
        for g in sorted(clusters):  # sorted: a set's order varies per process, and it orders the pattern dict
            plans = {f: self.confirmed(f).split(",") for f in self.members.get(g, []) if self.confirmed(f)}
            feats = {}
            for f, plan in plans.items():
                for i, step in enumerate(plan, 1):
                    feats.setdefault(f"{i}:{step}", []).append(f)
            pats = {k: dict(support=sorted(fs), against=sorted(set(plans) - set(fs))) for k, fs in feats.items()}
            pats = {k: p for k, p in pats.items() if len(p["support"]) >= self.settings["min_support"] and len(p["support"]) > len(p["against"])}
            keep = sorted(pats, key=lambda k: -len(pats[k]["support"]))[: self.settings["max_patterns"]]
            self.pattern[g] = {k: pats[k] for k in keep}
            if not self.pattern[g]:
                del self.pattern[g]

    def census(self, right):
        """The memory's size per level, and what it holds per family: memory_family maps each family with a confirmed
        strategy to 1 if that strategy is right[family], else -1 (right: family -> its right strategy)."""
        exps = [e for es in self.experience.values() for e in es]
        nets = [net(it) for items in self.insight.values() for it in items.values()]
        held = {f: self.confirmed(f) for f in self.groups}
        family = {f: 1 if right.get(f) == s else -1 for f, s in held.items() if s}
        return dict(mem_passing=sum(e["reward"] > 0 for e in exps), mem_failing=sum(e["reward"] == 0 for e in exps),
                    mem_strategies=sum(n > 0 for n in nets), mem_lessons=sum(n < 0 for n in nets),
                    mem_patterns=sum(map(len, self.pattern.values())), mem_confirmed=len(family),
                    mem_confirmed_right=sum(v == 1 for v in family.values()), memory_family=family)

    def evict(self):
        """Drop the least recently updated families over max_families; their clusters' patterns are recomputed without them."""
        clusters = set()
        while len(self.touched) > self.settings["max_families"]:
            fam = next(iter(self.touched))  # the least recently updated
            for key in self.groups[fam].split():
                self.members[key].remove(fam)
                clusters.add(key)
            for d in (self.experience, self.insight, self.touched, self.groups):
                d.pop(fam, None)
        self.consolidate(clusters)

    # -- render: a budgeted context for one problem ------------------------------------------------

    def render(self, problem, levels=LEVELS):
        """The memory relevant to one problem, as context lines, within the character budget."""
        n_exp, n_ins, n_pat = self.settings["lines"]
        by_level = dict(experience=[], insight=[], pattern=[])
        if "experience" in levels:
            exps = self.experience.get(problem.family, [])
            rank = lambda e: (-e["reward"], e["pid"] != problem.pid, -e["step"])  # successes, this problem first
            exps = sorted((e for e in exps if e["reward"] or e["pid"] == problem.pid), key=rank)
            by_level["experience"] = [f"={e['text']} {e['reward']}" + ("" if e["reward"] else f" {e['feedback']}") for e in exps[:n_exp]]
        if "insight" in levels:
            items = self.insight.get(problem.family, {})
            ranked = sorted(items, key=lambda s: (-abs(net(items[s])), -items[s]["step"]))
            # the strongest strategy alone once one has passed (a weaker one is a lucky pass until the evidence says
            # otherwise); lessons only before that: then they are all there is, later they are noise to echo
            shown = ([s for s in ranked if net(items[s]) > 0][:1] or [s for s in ranked if net(items[s]) < 0])[:n_ins]
            by_level["insight"] = [insight_line(problem.family, s, net(items[s])) for s in shown]
        if "pattern" in levels:
            by_level["pattern"] = [line for line in [self.compose(problem)] if line][:n_pat]
        # fill the budget in priority order: the best line of each level first
        chosen, used = set(), 0
        for rank in range(max(n_exp, n_ins, n_pat)):
            for lvl in ("insight", "pattern", "experience"):
                if rank < len(by_level[lvl]) and used + len(by_level[lvl][rank]) + 1 <= self.settings["budget"]:
                    chosen.add((lvl, rank))
                    used += len(by_level[lvl][rank]) + 1
        return "".join(line + "\n" for lvl in LEVELS for r, line in enumerate(by_level[lvl]) if (lvl, r) in chosen)

    def compose(self, problem):
        """The problem's clusters' patterns as one plan: each step the one its clusters' patterns name with the most
        support ('?' where none names one), and the weakest support among the steps named: `#A48 via mev,rol,? 2`.
        One line a small model copies, rather than several to combine; None when no cluster has a pattern."""
        pats = [p for key in problem.group.split() for p in self.pattern.get(key, {}).items()]
        best = {}  # step index -> (support, step): the first cluster's wins a tie
        for k, p in pats:
            i, step = k.split(":", 1)
            best[int(i)] = max(best.get(int(i), (0, "")), (len(p["support"]), step), key=lambda b: b[0])
        if not best:
            return None
        # as many steps as the supporting families' strategies have: a step no cluster names is still a step
        n = max([len(s.split(",")) for _, p in pats for f in p["support"] if (s := self.confirmed(f))] + list(best))
        steps = ",".join(best[i][1] if i in best else "?" for i in range(1, n + 1))
        return f"#{problem.family} via {steps} {min(min(b[0] for b in best.values()), 9)}"

    # -- save / load as JSON -----------------------------------------------------------------------

    def state(self):
        return dict(version=2, settings=self.settings, step=self.step, groups=self.groups, touched=self.touched,
                    experience=self.experience, insight=self.insight, pattern=self.pattern)

    def save(self, path):
        """Atomic: write a temporary file, then rename it over the old one."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.state(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                d = json.load(f)
            mem = cls(**d["settings"])
            mem.step, mem.groups = int(d["step"]), dict(d["groups"])
            mem.touched = dict(sorted(d["touched"].items(), key=lambda kv: kv[1]))  # least recently updated first, whatever the file's order
            mem.experience, mem.insight, mem.pattern = dict(d["experience"]), dict(d["insight"]), dict(d["pattern"])
            check_state(mem)
            for fam, g in mem.groups.items():
                for key in g.split():
                    mem.members.setdefault(key, []).append(fam)
        except FileNotFoundError:
            raise ValueError(f"memory file {path} not found") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"memory file {path} is corrupt or not a memory file ({type(e).__name__}: {str(e)[:80]})") from None
        return mem


def check_state(mem):
    """Raise TypeError unless a loaded memory has the shapes that update() and render() rely on."""
    is_int, is_list = lambda x: isinstance(x, int), lambda x: isinstance(x, list)
    is_strs = lambda x: is_list(x) and all(isinstance(v, str) for v in x)
    ok = (all(map(is_int, (v for k, v in mem.settings.items() if k != "lines"))) and len(mem.settings["lines"]) == 3
          and all(map(is_int, mem.settings["lines"])) and all(map(is_int, mem.touched.values()))
          and all(isinstance(g, str) for g in mem.groups.values()) and set(mem.touched) == set(mem.groups)
          and set(mem.experience) <= set(mem.groups) and set(mem.insight) <= set(mem.groups)
          and all(is_list(es) and all(isinstance(e, dict) and isinstance(e.get("text"), str) and isinstance(e.get("feedback"), str)
                                      and is_int(e.get("reward")) and is_int(e.get("step")) and is_int(e.get("n_prompt")) and "pid" in e for e in es)
                  for es in mem.experience.values())
          and all(isinstance(its, dict) and all(isinstance(it, dict) and is_strs(it.get("agree")) and is_strs(it.get("contradict"))
                                                 and is_int(it.get("step")) for it in its.values()) for its in mem.insight.values())
          and all(isinstance(ps, dict) and all(isinstance(p, dict) and is_strs(p.get("support")) and is_strs(p.get("against"))
                                                for p in ps.values()) for ps in mem.pattern.values()))
    if not ok:
        raise TypeError("its levels or settings do not have the expected structure")


def net(item):
    return len(item["agree"]) - len(item["contradict"])


def insight_line(family, strategy, n):
    """The count is capped at 9: one token, and never beyond the range the warm-up showed the model."""
    return f"#{family} ok {strategy} {min(n, 9)}" if n > 0 else f"#{family} bad {strategy} {min(-n, 9)}"


# -----------------------------------------------------------------------------
# reflection: what the attempts at one problem say about strategies, as verdicts (problem, strategy, passed)
# The counting rule reads them off the verifier: one per faithful trace. A model reflector reads each attempt as text
# (reflection_prompts) and writes its verdict as one line (`ok rol,swp`, `bad rev,stp`, `-` for none: an unfaithful
# trace is no evidence), which parse_reflection reads.


def counted(rollouts):
    """The counting rule's verdicts: each faithful trace is evidence for (it passed) or against its strategy."""
    return [(r.problem, tuple(r.strategy), bool(r.reward)) for r in rollouts if r.strategy is not None]


def reflection_prompts(rollouts, G):
    """What a reflector reads, per problem (each group of G rollouts): for each distinct attempt (passes first), the
    problem's prompt and how many of its G attempts passed, then that attempt with the verifier's verdict, then
    `reflect:`. One attempt per prompt: a 3-layer model copies one trace's plan faithfully, and mixes up the plans of
    several side by side (README, Reflection). Returns [(rollout, prompt)]."""
    out = []
    for i in range(0, len(rollouts), G):
        group = rollouts[i : i + G]
        head = f"{clean(group[0].problem.prompt)} {sum(r.reward > 0 for r in group)}/{len(group)}\n"
        distinct = {}
        for r in group:
            distinct.setdefault(clean(r.completion), r)
        out += [(r, head + attempt_line(r) + "reflect:") for r in sorted(distinct.values(), key=lambda r: -r.reward)]
    return out


def attempt_line(r):
    return f"{clean(r.completion)} {r.reward}" + ("" if r.reward else f" {clean(r.feedback, 16)}") + "\n"


def written(r):
    """The verdict the counting rule writes for one attempt: what warm-up teaches a reflector to write."""
    return "-" if r.strategy is None else ("ok " if r.reward else "bad ") + ",".join(r.strategy)


def parse_reflection(text):
    """A reflector's line -> ([(strategy, passed)], parts dropped): each `;`-separated part must read `ok S` or `bad S`,
    S printable steps separated by commas; anything else is dropped and counted, never raised."""
    text = text.split("\n", 1)[0].strip()
    if text == "-":
        return [], 0
    got, dropped = [], 0
    for part in text.split(";"):
        kind, _, s = part.partition(" ")
        if kind in ("ok", "bad") and s.isascii() and s.isprintable() and " " not in s and all(s.split(",")):
            got.append((tuple(s.split(",")), kind == "ok"))
        else:
            dropped += 1
    return got, dropped


def fidelity(verdicts, rule):
    """Model-written verdicts against the counting rule's on the same rollouts, as counts: written (distinct), agree (the
    rule's too: same strategy, same sign), flipped (a strategy of a faithful trace, the wrong sign), invented (a
    strategy no faithful trace of the problem states), rule (the rule's, distinct) and missed (the rule's, not written)."""
    m, r = ({(p.pid, s, ok) for p, s, ok in vs} for vs in (verdicts, rule))
    supported = {(pid, s) for pid, s, _ in r}
    wrong = m - r
    flipped = sum((pid, s) in supported for pid, s, _ in wrong)
    return dict(written=len(m), agree=len(m & r), flipped=flipped, invented=len(wrong) - flipped, rule=len(r), missed=len(r - m))


def describe(mem):
    """The three levels as text a person reads."""
    out = [f"memory at step {mem.step}: {len(mem.groups)} families, {sum(map(len, mem.experience.values()))} experiences, "
           f"{sum(map(len, mem.insight.values()))} insights, {sum(map(len, mem.pattern.values()))} patterns"]
    if mem.pattern:
        out.append("\npatterns (per cluster of families)")
    for g, pats in sorted(mem.pattern.items()):
        for k, p in pats.items():
            out.append(f"  {g:<8} step {k} shared by {', '.join(p['support'])}" + (f" (not by {', '.join(p['against'])})" if p["against"] else ""))
    for fam in sorted(mem.groups):
        out.append(f"\nfamily {fam} ({mem.groups[fam]})")
        for s, it in sorted(mem.insight.get(fam, {}).items(), key=lambda kv: -net(kv[1])):
            kind = "strategy" if net(it) > 0 else "lesson  " if net(it) < 0 else "retired "
            out.append(f"  {kind} {s:<16} passed on {len(it['agree'])} inputs, failed on {len(it['contradict'])}")
        for e in mem.experience.get(fam, []):
            out.append(f"  trace    {e['text']}  -> {e['reward']} {e['feedback']}")
    return "\n".join(out)


# -----------------------------------------------------------------------------
# reading a run directory: how the memory grew, and when the memory-free student caught up with it

SOLVED = 0.5  # a family counts as solved at an evaluation once this share of its held-out problems is (greedy)
GROWTH = dict(mem_passing="passing", mem_failing="failing", mem_strategies="strategies", mem_lessons="lessons", mem_patterns="patterns",
              mem_confirmed="confirmed", mem_confirmed_right="right")


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
        notes.append(f"{old} of {len(recs)} evaluations lack the memory counts and per-family accuracy (a run from before they "
                     "were logged): the growth table and the timeline leave them out")
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
            out[f] = dict(set=name, memory_right=right, memory_wrong=first_step(recs, lambda r: r["memory_family"].get(f) == -1),
                          teacher=first_step(recs, lambda r: r["teacher_family_acc"][name].get(f, 0) >= SOLVED), student=student,
                          lag=None if right is None or student is None else student - right)
    return out


def mean_lag(recs):
    """(mean internalisation lag over the families that both the memory and the student got, how many they are)."""
    lags = [t["lag"] for t in timeline(recs).values() if t["lag"] is not None]
    return (sum(lags) / len(lags) if lags else None), len(lags)


def describe_run(run_dir):
    """The final memory, then how it grew and the per-family timeline, as text a person reads."""
    recs, mem, notes = read_run(run_dir)
    out = [describe(mem)] if mem else []
    out += [f"note: {n}" for n in notes]
    new = [r for r in recs if "memory_family" in r]
    if new:
        out.append("\nmemory growth (at every evaluation): experiences passing and failing, strategies, lessons, patterns,\n"
                   "families with a confirmed strategy, and how many of those are right")
        out.append("  " + f"{'step':>6}" + "".join(f"{v:>12}" for v in GROWTH.values()))
        out += ["  " + f"{r['step']:>6}" + "".join(f"{r[k]:>12}" for k in GROWTH) for r in new]
    tl = timeline(recs)
    if tl:
        fmt = lambda x: "-" if x is None else str(x)
        out.append(f"\nper-family timeline: the first step at which the memory held the right (wrong) strategy, and the teacher with\n"
                   f"memory and the memory-free student solved at least {SOLVED:.0%} of the family's held-out problems (greedy)")
        out.append(f"  {'family':<8}{'memory right':>14}{'memory wrong':>14}{'teacher':>9}{'student':>9}{'lag':>6}")
        out += [f"  {f:<8}{fmt(t['memory_right']):>14}{fmt(t['memory_wrong']):>14}{fmt(t['teacher']):>9}{fmt(t['student']):>9}{fmt(t['lag']):>6}"
                for f, t in tl.items() if t["set"] == "heldout"]
        lag, n = mean_lag(recs)
        never = [f for f, t in tl.items() if t["set"] == "heldout" and t["memory_right"] is not None and t["student"] is None]
        out.append(f"  mean lag {'-' if lag is None else f'{lag:.0f} steps'} over the {n} families both the memory and the student got; "
                   f"the student never caught up with the memory on {len(never)}" + (f" ({', '.join(never)})" if never else ""))
        unseen = {f: t for f, t in tl.items() if t["set"] == "unseen"}
        if unseen:
            families = recs[0].get("families", {})  # family -> [group, right strategy], logged at step 0
            out.append("\nunseen families (RL never trains on them; only their clusters' patterns reach them)")
            out.append(f"  {'family':<8}{'teacher':>9}{'student':>9}   patterns of its clusters in the final memory (right for it?)")
            for f, t in unseen.items():
                group, plan = families.get(f, [None, None])
                pats = [(key, k) for key in (group or "").split() for k in (mem.pattern.get(key, {}) if mem else {})]
                said = ", ".join(f"{key} {k} ({'yes' if plan and plan.split(',')[int(k.split(':')[0]) - 1] == k.split(':', 1)[1] else 'no'})"
                                 for key, k in pats) or ("none" if group and mem else "unknown")
                out.append(f"  {f:<8}{fmt(t['teacher']):>9}{fmt(t['student']):>9}   {said}")
    return "\n".join(out)


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
    end = new[-1]["step"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 0.3 * len(fams) + 4))
    for k, label in list(GROWTH.items())[:5]:
        ax.plot([r["step"] for r in new], [r[k] for r in new], label=label, lw=2)
    ax.plot([r["step"] for r in new], [r["mem_confirmed_right"] for r in new], "k--", label="families with the right strategy")
    ax.set_yscale("symlog", linthresh=10)  # lessons run to hundreds, patterns to a few
    ax.set(xlabel="RL step", ylabel="items in the memory (linear below 10, log above)", title="memory size per level")
    ax.legend(fontsize=8)
    for y, f in enumerate(fams):
        t = tl[f]
        if t["memory_right"] is not None:  # the lag: memory right -> student solves (or the run's end, hatched)
            stop = end if t["student"] is None else t["student"]
            bx.barh(y, max(stop - t["memory_right"], 1), left=t["memory_right"], color="tab:orange", alpha=0.6,
                    hatch="//" if t["student"] is None else None)
        for key, mark, color in (("memory_wrong", "x", "tab:red"), ("teacher", "^", "tab:blue"), ("student", "o", "tab:green")):
            if t[key] is not None:
                bx.plot(t[key], y, mark, color=color, ms=8)
    bx.plot([], [], "s", color="tab:orange", alpha=0.6, label="memory right -> student solves (hatched: not by the end)")
    for label, mark, color in (("memory wrong", "x", "tab:red"), ("teacher solves", "^", "tab:blue"), ("student solves", "o", "tab:green")):
        bx.plot([], [], mark, color=color, label=label)
    bx.set(yticks=range(len(fams)), yticklabels=fams, xlim=(-5, end + 5), ylim=(len(fams) - 0.5, -0.5),
           xlabel=f"RL step (solves: greedy, at least {SOLVED:.0%} of the family's held-out problems)", title="per family: the memory knows, the student catches up")
    bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def up_close(run_dir, family):
    """One family at the run's end: for its first held-out problem, the memory lines the teacher reads, the teacher's
    greedy completion with them and the memory-free student's, each with the verifier's verdict. The built-in task
    only: the task is rebuilt from the checkpoint's settings."""
    import torch
    import train
    from model import GPT, GPTConfig, decode, encode, generate

    path = os.path.join(run_dir, "ckpt.pt")
    ckpt = train.load_checkpoint(path)
    c = train.parse_args([], {**{k: getattr(train, k) for k in train.CONFIG_KEYS}, **{k: v for k, v in ckpt["config"].items() if k in train.CONFIG_KEYS}})
    task, mem = train.make_task(c), Memory.load(os.path.join(run_dir, "memory.json"))
    probs = [p for p in task.heldout + task.unseen if p.family == family]
    if not probs:
        raise ValueError(f"family {family!r} is not in this run's task (its families: {', '.join(sorted({p.family for p in task.heldout + task.unseen}))})")
    p = probs[0]
    models = {}
    for who, state in (("student", ckpt["model"]), ("teacher", ckpt.get("teacher", ckpt["model"]))):  # a live teacher is the student
        models[who] = GPT(GPTConfig(c.block_size, c.n_layer, c.n_head, c.n_embd))
        train.load_weights(models[who], state, path)
        models[who].eval()
    context = mem.render(p, [l for l in c.memory_levels.split(",") if l])
    out = [f"family {family} at step {ckpt.get('step', '?')}, problem {p.pid} ({'new input' if p in task.heldout else 'unseen family'}); "
           f"its right strategy: {','.join(task.strategy(p, task.solve(p)))}",
           "memory lines the teacher reads:" + ("".join(f"\n  {l}" for l in context.splitlines()) or " none")]
    with torch.no_grad():
        for who, ctx in (("teacher", context), ("student", "")):
            comp, _ = generate(models[who], [encode(ctx + p.prompt)], 1, task.max_completion, temperature=0)
            text = decode(comp[0])
            reward, feedback = task.verify(p, text)
            out.append(f"{who + (' (with memory)' if ctx else ' (no memory)'):<24} {clean(p.prompt + text, 80)}   -> {reward} {feedback}")
        # what the student explores: its strategies over 16 samples at the RL temperature (None: an unfaithful trace)
        comps, _ = generate(models["student"], [encode(p.prompt)], 16, task.max_completion, c.temperature, torch.Generator().manual_seed(c.seed))
        texts = [decode(y) for y in comps]
    tally = Counter(",".join(s) if s else "unfaithful" for s in (task.strategy(p, t) for t in texts))
    passed = sum(task.verify(p, t)[0] for t in texts)
    out.append(f"student, 16 samples at temperature {c.temperature:g}: {passed} pass; strategies "
               + ", ".join(f"{s} x{n}" for s, n in tally.most_common()))
    return "\n".join(out)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        sys.exit(print(__doc__) if args else "usage: python memory.py out/memory.json  |  out/ [--plot] [--family=A07]")
    try:
        path, flags = args[0], args[1:]
        if not os.path.isdir(path):
            if flags:
                raise ValueError(f"{' '.join(flags)}: options need a run directory, like {os.path.dirname(path) or 'out'}/")
            print(describe(Memory.load(path)))
        elif any(f != "--plot" and not f.startswith("--family=") for f in flags):
            raise ValueError(f"unknown option(s) {[f for f in flags if f != '--plot' and not f.startswith('--family=')]}: --plot, --family=NAME")
        else:
            families = [f.split("=", 1)[1] for f in flags if f.startswith("--family=")]
            print(up_close(path, families[-1]) if families else describe_run(path))
            if "--plot" in flags:
                print(f"wrote {plot_run(path, os.path.join(path, 'memory.png'))}")
    except ValueError as e:
        sys.exit(f"error: {e}")
