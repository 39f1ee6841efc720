"""
Procedural memory: three levels, plain dicts and lists, saved as human-readable JSON.

    experience  family -> raw trajectories {pid, text (prompt + completion), n_prompt, reward, feedback, step}
    insight     family -> {strategy: {agree: [pids], contradict: [pids], step}}: passed on more inputs than failed,
                a *strategy* (rendered `ok`); failed more, a *lesson* (`bad`); equal evidence retires it
    pattern     cluster -> {"i:step": {support: [families], against: [families]}}: steps the confirmed strategies
                of most of a cluster's families share: what a family never seen can use

Task-agnostic: it sees a problem's pid, family, group (clusters, space-separated) and prompt, a trace's verdict
(reward, feedback) and, if faithful, its strategy, the only evidence counted. Read: `python report.py out/memory.json`.
"""
import json
import os
from dataclasses import dataclass

LEVELS = ("experience", "insight", "pattern")
SETTINGS = dict(  # defaults; a run's come from config.py (memory.settings_of)
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


def settings_of(c):
    """A run config's memory settings: its mem_* keys."""
    return {k[4:]: v for k, v in vars(c).items() if k.startswith("mem_")}


def clean(text, n=48):
    """One printable line of at most n characters (completions can be any bytes)."""
    text = text.rstrip("\n")[:n]
    if text.isascii() and text.isprintable():  # the common case, without a loop over characters
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def experience_line(prompt, completion, reward, feedback):
    """A raw trajectory as a context line; PMD's memory and SDPO's reprompt both render this way."""
    return f"={clean(prompt + completion)} {reward}" + ("" if reward else f" {clean(feedback, 16)}")


@dataclass
class Rollout:
    problem: object
    completion: str
    tokens: list  # completion token ids
    logp_old: list  # each token's log-prob under the policy that sampled it
    reward: int = 0
    feedback: str = ""
    strategy: tuple = None  # the steps of a faithful trace, else None


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
        """Each verdict (problem, strategy, passed) is evidence for (passed) or against its strategy, on one input."""
        cap = self.settings["max_evidence"]
        for problem, strategy, passed in verdicts:
            items = self.insight.setdefault(problem.family, {})
            it = items.setdefault(",".join(strategy), dict(agree=[], contradict=[], step=self.step))
            side = it["agree"] if passed else it["contradict"]
            if problem.pid in side:
                side.remove(problem.pid)
            side.append(problem.pid)
            del side[:-cap]
            it["step"] = self.step  # equal evidence retires it (never rendered, never confirmed), evidence kept
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
            pats = {k: p for k, p in pats.items()
                    if len(p["support"]) >= self.settings["min_support"] and len(p["support"]) > len(p["against"])}
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
        """Drop the least recently updated families over max_families; their clusters' patterns are recomputed."""
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
            by_level["experience"] = [f"={e['text']} {e['reward']}" + ("" if e["reward"] else f" {e['feedback']}")
                                      for e in exps[:n_exp]]
        if "insight" in levels:
            items = self.insight.get(problem.family, {})
            ranked = sorted(items, key=lambda s: (-abs(net(items[s])), -items[s]["step"]))
            # once a strategy has passed, the strongest alone (a weaker one may be a lucky pass); before, the lessons
            shown = ([s for s in ranked if net(items[s]) > 0][:1] or [s for s in ranked if net(items[s]) < 0])[:n_ins]
            by_level["insight"] = [insight_line(problem.family, s, net(items[s])) for s in shown]
        if "pattern" in levels:
            by_level["pattern"] = [line for line in [self.compose(problem)] if line][:n_pat]
        chosen, used = set(), 0  # fill the budget in priority order: the best line of each level first
        for rank in range(max(n_exp, n_ins, n_pat)):
            for lvl in ("insight", "pattern", "experience"):
                if rank < len(by_level[lvl]) and used + len(by_level[lvl][rank]) + 1 <= self.settings["budget"]:
                    chosen.add((lvl, rank))
                    used += len(by_level[lvl][rank]) + 1
        return "".join(line + "\n" for lvl in LEVELS for r, line in enumerate(by_level[lvl]) if (lvl, r) in chosen)

    def compose(self, problem):
        """The problem's clusters' patterns as one line a small model copies: per step the op named with the most
        support ('?' where none), then the weakest support among them: `#A48 via mev,rol,? 2`. None: no patterns."""
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
            mem.touched = dict(sorted(d["touched"].items(), key=lambda kv: kv[1]))  # least recently updated first
            mem.experience, mem.insight, mem.pattern = dict(d["experience"]), dict(d["insight"]), dict(d["pattern"])
            check_state(mem)
            for fam, g in mem.groups.items():
                for key in g.split():
                    mem.members.setdefault(key, []).append(fam)
        except FileNotFoundError:
            raise ValueError(f"memory file {path} not found") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            why = f"{type(e).__name__}: {str(e)[:80]}"
            raise ValueError(f"memory file {path} is corrupt or not a memory file ({why})") from None
        return mem


def check_state(mem):
    """Raise TypeError unless a loaded memory has the shapes that update() and render() rely on."""
    is_int, is_list = lambda x: isinstance(x, int), lambda x: isinstance(x, list)
    is_strs = lambda x: is_list(x) and all(isinstance(v, str) for v in x)
    has = lambda d, test, *keys: isinstance(d, dict) and all(test(d.get(k)) for k in keys)
    experience = lambda e: (has(e, lambda v: isinstance(v, str), "text", "feedback")
                            and has(e, is_int, "reward", "step", "n_prompt") and "pid" in e)
    ok = (all(map(is_int, (v for k, v in mem.settings.items() if k != "lines"))) and len(mem.settings["lines"]) == 3
          and all(map(is_int, mem.settings["lines"])) and all(map(is_int, mem.touched.values()))
          and all(isinstance(g, str) for g in mem.groups.values()) and set(mem.touched) == set(mem.groups)
          and set(mem.experience) <= set(mem.groups) and set(mem.insight) <= set(mem.groups)
          and all(is_list(es) and all(map(experience, es)) for es in mem.experience.values())
          and all(isinstance(its, dict) and all(has(it, is_strs, "agree", "contradict") and has(it, is_int, "step")
                                                for it in its.values()) for its in mem.insight.values())
          and all(isinstance(ps, dict) and all(has(p, is_strs, "support", "against") for p in ps.values())
                  for ps in mem.pattern.values()))
    if not ok:
        raise TypeError("its levels or settings do not have the expected structure")


def net(item):
    return len(item["agree"]) - len(item["contradict"])


def insight_line(family, strategy, n):
    """The count is capped at 9: one token, and never beyond the range the warm-up showed the model."""
    return f"#{family} ok {strategy} {min(n, 9)}" if n > 0 else f"#{family} bad {strategy} {min(-n, 9)}"


# -----------------------------------------------------------------------------
# reflection: verdicts (problem, strategy, passed), drawn by the counting rule or written by a model reflector


def counted(rollouts):
    """The counting rule's verdicts: each faithful trace is evidence for (it passed) or against its strategy."""
    return [(r.problem, tuple(r.strategy), bool(r.reward)) for r in rollouts if r.strategy is not None]


def reflection_prompts(rollouts, G):
    """[(rollout, prompt)], one per distinct attempt (passes first) of each problem's G rollouts: the prompt, how many
    passed, the attempt and its verdict, then `reflect:`. One attempt each: a 3-layer model mixes up several at once."""
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
    """Model-written verdicts against the rule's on the same rollouts, as counts: written, rule (both distinct), agree
    (in both), missed (the rule's alone), flipped (a faithful trace's strategy, wrong sign), invented (in no trace)."""
    m, r = ({(p.pid, s, ok) for p, s, ok in vs} for vs in (verdicts, rule))
    supported = {(pid, s) for pid, s, _ in r}
    wrong = m - r
    flipped = sum((pid, s) in supported for pid, s, _ in wrong)
    return dict(written=len(m), agree=len(m & r), flipped=flipped, invented=len(wrong) - flipped, rule=len(r),
                missed=len(r - m))
