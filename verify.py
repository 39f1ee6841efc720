"""
The built-in task, hidden procedures, and its verifier.

A family (an id like `A48`) has a hidden plan, a short sequence of string ops. A problem is a family id plus an input;
the model writes its plan and every intermediate string: `A48:kdbea>` -> `rol,swp,mev|dbeak|bdaek|kdleb` + newline.
Step i of a plan is set by one id character (the letter, the first digit, the second digit, then round again) through
hidden tables: families that share an id character share a step, so an unseen family made of characters RL families
use has a plan that pattern memory names. The verifier replays the trace: reward 1 iff every step is the stated op
applied to the previous string (the trace is faithful) and the answer (the first answer_len letters of the last
string) is right. A wrong plan can pass an input by coincidence: evidence over inputs, not one pass, proves a plan.

The task interface the loop and the memory use (replace this class to plug in your own task):
    task.train, task.heldout          lists of Problem (pid, family, group, prompt, solution): RL problems, and new
                                      inputs of their families (evaluation only); group: space-separated clusters
    task.unseen                       problems of families RL never trains on (evaluation only; may be empty)
    task.verify(problem, completion)  -> (reward in {0, 1}, feedback str); never raises
    task.strategy(problem, completion) -> tuple of steps if the trace is faithful, else None
    task.max_completion               tokens a completion may take
    task.warmup_group(rng)            problems of fresh families, never used in RL (for warm-up)
    task.solve(problem)               the reference completion
    task.attempt(problem, rng, p_right, p_lucky)  a plausible warm-up attempt: the right plan with probability
                                      p_right, else with probability p_lucky a wrong plan that passes by coincidence
"""
import itertools
import random
from dataclasses import dataclass

ALPHABET = "abcdefghijkl"


_SHIFTS = [str.maketrans(ALPHABET, ALPHABET[k:] + ALPHABET[:k]) for k in range(len(ALPHABET))]  # translate tables: the
_MIRROR = str.maketrans(ALPHABET, ALPHABET[::-1])  # warm-up runs these ops a million times


def _shift(s, k):
    return s.translate(_SHIFTS[k % len(ALPHABET)])


OPS = {  # ordered: n_ops takes the first n. The first six came out of a search over op sets for few plans that tie
    "rev": lambda s: s[::-1],
    "rol": lambda s: s[1:] + s[:1],
    "swp": lambda s: "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2)),
    "stp": lambda s: "".join(c.translate(_SHIFTS[(i + 1) % len(ALPHABET)]) for i, c in enumerate(s)),  # i by i + 1
    "bmp": lambda s: _shift(s[:1], 1) + s[1:],  # the first letter shifted by one
    "mev": lambda s: "".join(c.translate(_MIRROR) if i % 2 == 0 else c for i, c in enumerate(s)),  # 0, 2, 4 mirrored
    "ror": lambda s: s[-1:] + s[:-1],
    "inc": lambda s: _shift(s, 1),
    "mir": lambda s: s.translate(_MIRROR),
    "dec": lambda s: _shift(s, -1),
}
GROUPS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # an id's letter: RL families take the first n_groups; warm-up ones any
DIGITS = "0123456789"


@dataclass(frozen=True)
class Problem:
    pid: str  # unique: family and input
    family: str
    group: str  # the clusters the problem belongs to, space-separated (the memory's pattern level is kept per cluster)
    prompt: str
    solution: str  # the reference completion (never shown to the model)


def run_plan(plan, s):
    """The intermediate strings of a plan applied to s."""
    out = []
    for op in plan:
        s = OPS[op](s)
        out.append(s)
    return out


def trace(plan, s):
    return ",".join(plan) + "|" + "|".join(run_plan(plan, s)) + "\n"


def clusters(family):
    """`A48` -> `A** *4* **8`: the families that share each id character (and so a step of their plans)."""
    return " ".join("*" * i + c + "*" * (len(family) - 1 - i) for i, c in enumerate(family))


def sizes(plan_len, input_len):
    """(prompt, completion) lengths in characters (= tokens) at most: `A48:kdbea>`, `rol,swp|dbeak|bdaek` + newline."""
    return 3 + 1 + input_len + 1, 4 * plan_len + (input_len + 1) * plan_len + 2


RANGES = dict(plan_len=(1, 6), n_ops=(2, 8), n_groups=(1, 10), families_per_group=(1, 8), input_len=(2, 12),
              n_train=(1, None), n_heldout=(1, None), n_unseen=(0, 2), answer_len=(1, 12))  # each setting alone


def span(key):
    lo, hi = RANGES[key]
    return f"[{lo}, {'inf)' if hi is None else f'{hi}]'}"


def check_settings(**settings):
    """The task's settings, each (RANGES) and together; a ValueError names the setting, its value, what is allowed."""
    for key, (lo, hi) in RANGES.items():
        if not lo <= settings[key] <= (hi or settings[key]):
            raise ValueError(f"{key}={settings[key]} is not allowed: {span(key)}")
    n_ops, n_groups, input_len, n_train, n_heldout, answer_len = (settings[k] for k in (
        "n_ops", "n_groups", "input_len", "n_train", "n_heldout", "answer_len"))
    if n_groups > n_ops:
        raise ValueError(f"n_groups={n_groups} is not allowed: [1, {n_ops}] (at most n_ops: a letter sets its own op)")
    if answer_len > input_len:
        raise ValueError(f"answer_len={answer_len} is not allowed: [1, {input_len}] (at most input_len)")
    if n_train + n_heldout > len(ALPHABET) ** input_len:
        raise ValueError(f"n_train={n_train} + n_heldout={n_heldout} exceed the {len(ALPHABET) ** input_len} distinct "
                         f"inputs of input_len={input_len}")


class HiddenProcedures:
    def __init__(self, plan_len=2, n_ops=6, n_groups=3, families_per_group=4, input_len=5, n_train=32, n_heldout=8,
                 seed=0, n_unseen=2, answer_len=2):
        check_settings(plan_len=plan_len, n_ops=n_ops, n_groups=n_groups, families_per_group=families_per_group,
                       input_len=input_len, n_train=n_train, n_heldout=n_heldout, n_unseen=n_unseen,
                       answer_len=answer_len)
        self.plan_len, self.input_len, self.answer_len = plan_len, input_len, answer_len
        self.ops = list(OPS)[:n_ops]
        self.max_completion = sizes(plan_len, input_len)[1]
        rng = random.Random(seed)
        self.plans = self._unambiguous_plans(rng)
        letters, k = GROUPS[:n_groups], families_per_group + 2  # a letter keeps 2 first digits for unseen ids
        chars = (letters, "".join(rng.sample(DIGITS, k)), "".join(rng.sample(DIGITS, k)))  # what each id position takes
        rl, new = self._ids(rng, chars, families_per_group)
        self.tables = self._bind(rng, chars, rl)  # step -> id character -> op
        plan = lambda f: tuple(self.tables[i][f[i % 3]] for i in range(plan_len))
        self.families = {f: plan(f) for f in rl}  # family id -> hidden plan (RL families, then the unseen ones)
        self.train, self.heldout, self.unseen = [], [], []
        for f in rl:
            probs = [self._problem(f, s) for s in self._distinct_inputs(rng, n_train + n_heldout)]
            self.train += probs[:n_train]
            self.heldout += probs[n_train:]
        for f in (f for fs in new for f in fs[:n_unseen]):  # drawn last: the RL table is the same without them
            self.families[f] = plan(f)
            self.unseen += [self._problem(f, s) for s in self._distinct_inputs(rng, n_heldout)]

    def _ids(self, rng, chars, per_letter):
        """RL ids, per_letter per letter, and per letter the candidate ids of families RL never trains on. Digits are
        distinct within a letter and each value is taken equally often across letters (by two at the default: a
        digit's step has witnesses that share no other step). A candidate pairs its letter with a first digit none of
        its RL families has, so only what holds across families names its plan (from plan_len 2 on; it may tie)."""
        letters, tens, units = chars
        k = len(tens)
        rl, new = [], []
        for a, g in enumerate(letters):
            own = [(a * per_letter + j) % k for j in range(per_letter)]
            pairs = rng.sample(own, per_letter)  # the units digits of the same design, paired at random
            rl += [g + tens[t] + units[u] for t, u in zip(own, pairs)]
            new.append([g + tens[t] + rng.choice(units) for t in range(k) if t not in own])
        return rl, new

    def _bind(self, rng, chars, families):
        """The hidden tables, step -> {id character: op}: random (distinct ops for a position's characters where there
        are enough), by backtracking that drops a choice once some family's plan so far starts no unambiguous plan."""
        starts = {p[:j] for p in self.plans for j in range(1, self.plan_len + 1)}
        slots = [(i, c) for i in range(self.plan_len) for c in chars[i % 3]]
        for distinct in (True, False):
            tables, budget = [{} for _ in range(self.plan_len)], [20000]

            def fill(k):
                if k == len(slots):
                    return True
                i, c = slots[k]
                for op in rng.sample(self.ops, len(self.ops)):
                    budget[0] -= 1
                    if budget[0] < 0 or (distinct and len(chars[i % 3]) <= len(self.ops) and op in tables[i].values()):
                        continue
                    tables[i][c] = op
                    mine = [f for f in families if f[i % 3] == c]
                    if all(tuple(tables[j][f[j % 3]] for j in range(i + 1)) in starts for f in mine) and fill(k + 1):
                        return True
                    del tables[i][c]
                return False

            if fill(0):
                return tables
        raise ValueError("no binding leaves every family's plan unambiguous: try another task_seed, more n_ops or a "
                         "larger answer_len")

    def _unambiguous_plans(self, rng):
        """All plans whose answers no other plan shares (checked on random probes): a plan that passes on every input
        is then the family's plan, and two families' plans never tie."""
        probes = self._distinct_inputs(rng, 64)
        by_sig = {}
        for plan in itertools.product(self.ops, repeat=self.plan_len):
            by_sig.setdefault(tuple(run_plan(plan, s)[-1][: self.answer_len] for s in probes), []).append(plan)
        return sorted(ps[0] for ps in by_sig.values() if len(ps) == 1)

    def _distinct_inputs(self, rng, n):
        seen = set()
        while len(seen) < n:
            seen.add("".join(rng.choice(ALPHABET) for _ in range(self.input_len)))
        return sorted(sorted(seen), key=lambda _: rng.random())  # sorted first: a set's order varies per process

    def _problem(self, fam, s, plan=None):
        plan = plan or self.families[fam]
        return Problem(pid=f"{fam}:{s}", family=fam, group=clusters(fam), prompt=f"{fam}:{s}>", solution=trace(plan, s))

    # -- verifier ---------------------------------------------------------------------------------

    def _check(self, problem, completion):
        """(reward, feedback, plan if the trace is faithful else None). Never raises."""
        if not isinstance(completion, str) or not completion.endswith("\n"):
            return 0, "no end", None
        parts = completion[:-1].split("|")
        plan = tuple(parts[0].split(","))
        if len(parts) < 2 or any(op not in self.ops for op in plan):
            return 0, "bad plan", None
        if len(parts) - 1 != len(plan):
            return 0, "bad steps", None
        s = problem.prompt.split(":", 1)[1][:-1]
        for k, (op, got) in enumerate(zip(plan, parts[1:]), 1):
            s = OPS[op](s)
            if got != s:
                return 0, f"step {k} wrong", None
        if s[: self.answer_len] != problem.solution[:-1].split("|")[-1][: self.answer_len]:
            return 0, "wrong plan", plan
        return 1, "ok", plan

    def verify(self, problem, completion):
        reward, feedback, _ = self._check(problem, completion)
        return reward, feedback

    def strategy(self, problem, completion):
        return self._check(problem, completion)[2]

    # -- warm-up ----------------------------------------------------------------------------------

    def warmup_group(self, rng, n_families=6, n_inputs=4):
        """Problems of fresh families bound as RL's are (two letters, two values per digit, fresh random tables), with
        ids that are never an RL or unseen family's: warm-up teaches every id character but no RL family's plan."""
        chars = (rng.sample(GROUPS, 2), rng.sample(DIGITS, 2), rng.sample(DIGITS, 2))
        tables = [dict(zip(chars[i % 3], rng.sample(self.ops, 2))) for i in range(self.plan_len)]  # distinct, as RL's
        ids = [g + a + b for g in chars[0] for a in chars[1] for b in chars[2] if g + a + b not in self.families]
        probs = []
        for f in rng.sample(ids, min(n_families, len(ids))):
            plan = tuple(tables[i][f[i % 3]] for i in range(self.plan_len))
            probs += [self._problem(f, s, plan) for s in self._distinct_inputs(rng, n_inputs)]
        return probs

    def solve(self, problem):
        return problem.solution

    def attempt(self, problem, rng, p_right=0.4, p_lucky=0.0, p_slip=0.1):
        """The right plan with probability p_right; else with probability p_lucky a wrong plan that passes this input
        by coincidence (if a few draws find one); else a random plan. Executed faithfully, or with one slip (p_slip)."""
        right, s = tuple(problem.solution.split("|")[0].split(",")), problem.prompt.split(":", 1)[1][:-1]
        plan = right
        if rng.random() > p_right:
            n = 64 if rng.random() < p_lucky else 1
            draws = [tuple(rng.choice(self.ops) for _ in range(self.plan_len)) for _ in range(n)]
            want = run_plan(right, s)[-1][: self.answer_len]
            plan = next((q for q in draws if q != right and run_plan(q, s)[-1][: self.answer_len] == want), draws[-1])
        steps = run_plan(plan, s)
        if rng.random() < p_slip:
            k = rng.randrange(len(steps))
            steps[k] = steps[k][::-1] if steps[k] != steps[k][::-1] else _shift(steps[k], 1)
        return ",".join(plan) + "|" + "|".join(steps) + "\n"
