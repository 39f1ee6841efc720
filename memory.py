"""
Procedural memory: three levels, plain dicts and lists, saved as human-readable JSON.

    experience  family -> list of raw trajectories {pid, text, n_prompt, reward, feedback, step}; text is the
                prompt (its first n_prompt characters) and the completion
    insight     family -> {strategy: {agree: [pids], contradict: [pids], step}}
                a strategy whose faithful traces passed on more inputs than they failed on is a
                *strategy* (rendered `ok`); one that failed more is a *lesson* (rendered `bad`);
                evidence both ways in equal measure retires it.
    pattern     group -> {"i:step": {support: [families], against: [families]}}
                steps that the confirmed strategies of several families of a group share; they are
                what a family the memory has never seen can use.

The memory is task-agnostic: it sees problems only through their keys (pid, family, group, prompt)
and traces only through the task's verdict (reward, feedback) and the strategy (a tuple of steps)
of a faithful trace. Only faithful traces count as evidence for insights and patterns.

    python memory.py out/memory.json     prints the three levels
"""
import json
import os
import sys

LEVELS = ("experience", "insight", "pattern")
SETTINGS = dict(  # defaults; train.py's config is the source of truth for a run
    max_families=256,  # families kept (least recently updated evicted first)
    max_experiences=8,  # raw trajectories kept per family (failures evicted before successes)
    max_insights=16,  # strategies and lessons kept per family (weakest evidence evicted first)
    max_patterns=8,  # patterns kept per group (most supported first)
    max_evidence=32,  # pids remembered per insight side (the most recent)
    min_agree=2,  # distinct passing inputs before a strategy counts as confirmed for patterns
    min_support=2,  # confirmed families sharing a step before it is a pattern
    budget=160,  # characters of rendered context per problem
    lines=(2, 3, 2),  # at most this many lines per level: experience, insight, pattern
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
        self.groups = {}  # family -> group
        self.touched = {}  # family -> last step it was updated, least recently updated first (for eviction)
        self.members = {}  # group -> its families: derived from groups, so that no update scans every family

    # -- update: add experiences, reflect them into insights, consolidate patterns ----------------

    def update(self, rollouts):
        """rollouts: objects with .problem, .completion, .reward, .feedback, .strategy (None unless faithful)."""
        self.step += 1
        for r in rollouts:
            self.add(r.problem, r.completion, r.reward, r.feedback)
        self.reflect(rollouts)
        self.consolidate({r.problem.group for r in rollouts})
        self.evict()

    def add(self, problem, completion, reward, feedback):
        fam = problem.family
        if fam not in self.groups:
            self.members.setdefault(problem.group, []).append(fam)
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

    def reflect(self, rollouts):
        """Each faithful trace agrees with its strategy (it passed) or contradicts it (it failed)."""
        cap = self.settings["max_evidence"]
        for r in rollouts:
            problem, reward, strategy = r.problem, r.reward, r.strategy
            if strategy is None:
                continue
            items = self.insight.setdefault(problem.family, {})
            it = items.setdefault(",".join(strategy), dict(agree=[], contradict=[], step=self.step))
            side = it["agree"] if reward else it["contradict"]
            if problem.pid in side:
                side.remove(problem.pid)
            side.append(problem.pid)
            del side[:-cap]
            it["step"] = self.step  # equal evidence retires it (net 0: never rendered, never confirmed) but keeps its evidence
        for fam in {r.problem.family for r in rollouts if r.strategy is not None}:  # only the families reflected on can be over the cap
            items = self.insight[fam]
            while len(items) > self.settings["max_insights"]:  # lessons go before strategies, weakest evidence first
                weakest = min(items, key=lambda s: (net(items[s]) > 0, abs(net(items[s])), items[s]["step"]))
                del items[weakest]

    def confirmed(self, family):
        """The family's best strategy if it passed on at least min_agree more inputs than it failed."""
        items = self.insight.get(family, {})
        best = max(items, key=lambda s: net(items[s]), default=None)
        return best if best is not None and net(items[best]) >= self.settings["min_agree"] else None

    def consolidate(self, groups):
        """Recompute each group's patterns from its families' confirmed strategies."""
        for g in sorted(groups):  # sorted: a set's order varies per process, and it orders the pattern dict
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

    def evict(self):
        while len(self.touched) > self.settings["max_families"]:
            fam = next(iter(self.touched))  # the least recently updated
            self.members[self.groups[fam]].remove(fam)
            for d in (self.experience, self.insight, self.touched, self.groups):
                d.pop(fam, None)

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
            # lessons only while no strategy has passed: then they are all there is, later they are noise to echo
            shown = [s for s in items if net(items[s]) > 0] or [s for s in items if net(items[s]) < 0]
            ranked = sorted(shown, key=lambda s: (-abs(net(items[s])), -items[s]["step"]))
            by_level["insight"] = [insight_line(problem.family, s, net(items[s])) for s in ranked[:n_ins]]
        if "pattern" in levels:
            pats = self.pattern.get(problem.group, {})
            by_level["pattern"] = [f"#{problem.group}* {k} {len(p['support'])}" for k, p in list(pats.items())[:n_pat]]
        # fill the budget in priority order: the best line of each level first
        chosen, used = set(), 0
        for rank in range(max(n_exp, n_ins, n_pat)):
            for lvl in ("insight", "pattern", "experience"):
                if rank < len(by_level[lvl]) and used + len(by_level[lvl][rank]) + 1 <= self.settings["budget"]:
                    chosen.add((lvl, rank))
                    used += len(by_level[lvl][rank]) + 1
        return "".join(line + "\n" for lvl in LEVELS for r, line in enumerate(by_level[lvl]) if (lvl, r) in chosen)

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
                mem.members.setdefault(g, []).append(fam)
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


def describe(mem):
    """The three levels as text a person reads."""
    out = [f"memory at step {mem.step}: {len(mem.groups)} families, {sum(map(len, mem.experience.values()))} experiences, "
           f"{sum(map(len, mem.insight.values()))} insights, {sum(map(len, mem.pattern.values()))} patterns"]
    for g in sorted(set(mem.groups.values())):
        out.append(f"\ngroup {g}")
        for k, p in mem.pattern.get(g, {}).items():
            out.append(f"  pattern  step {k} shared by {', '.join(p['support'])}" + (f" (not by {', '.join(p['against'])})" if p["against"] else ""))
        for fam in sorted(f for f in mem.groups if mem.groups[f] == g):
            out.append(f"  family {fam}")
            for s, it in sorted(mem.insight.get(fam, {}).items(), key=lambda kv: -net(kv[1])):
                kind = "strategy" if net(it) > 0 else "lesson  " if net(it) < 0 else "retired "
                out.append(f"    {kind} {s:<16} passed on {len(it['agree'])} inputs, failed on {len(it['contradict'])}")
            for e in mem.experience.get(fam, []):
                out.append(f"    trace    {e['text']}  -> {e['reward']} {e['feedback']}")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        sys.exit(print(__doc__))
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python memory.py out/memory.json")
    if os.path.isdir(sys.argv[1]):
        sys.exit(f"error: {sys.argv[1]} is a directory; give the memory file in it, like {os.path.join(sys.argv[1], 'memory.json')}")
    try:
        print(describe(Memory.load(sys.argv[1])))
    except ValueError as e:
        sys.exit(f"error: {e}")
