"""
The built-in task, hidden procedures, and its verifier.

A family (an id like `A07`) is bound to a hidden plan: a short sequence of string ops. A problem is a
family id plus an input string; the model must write the plan it chose, every intermediate string,
then stop:   prompt `A07:kdbea>`   completion `rev,inc,swp|aebdk|bfcel|fbelc` + newline.
Families form groups (the id's letter) whose plans share their first op, so something holds across
families for pattern memory to find. The verifier replays the trace: reward 1 iff every step is the
stated op applied to the previous string (the trace is faithful) and the answer is right.

The task interface the loop and the memory use (replace this class to plug in your own task):
    task.train, task.heldout          lists of Problem (pid, family, group, prompt, solution): RL problems, and new
                                      inputs of the same families (evaluation only)
    task.unseen                       problems of families RL never trains on (evaluation only; may be empty)
    task.verify(problem, completion)  -> (reward in {0, 1}, feedback str); never raises
    task.strategy(problem, completion) -> tuple of steps if the trace is faithful, else None
    task.max_completion               tokens a completion may take
    task.warmup_group(rng)            problems of a fresh group, never used in RL (for warm-up)
    task.solve(problem)               the reference completion
    task.attempt(problem, rng, p_right)  a plausible attempt, right with probability p_right (for warm-up memories)
"""
import itertools
import random
from dataclasses import dataclass

ALPHABET = "abcdefghijkl"


_SHIFTS = [str.maketrans(ALPHABET, ALPHABET[k:] + ALPHABET[:k]) for k in range(len(ALPHABET))]  # translate tables: the
_MIRROR = str.maketrans(ALPHABET, ALPHABET[::-1])  # warm-up runs these ops a million times


def _shift(s, k):
    return s.translate(_SHIFTS[k % len(ALPHABET)])


OPS = {  # ordered: n_ops takes the first n
    "rev": lambda s: s[::-1],
    "rol": lambda s: s[1:] + s[:1],
    "swp": lambda s: "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2)),
    "inc": lambda s: _shift(s, 1),
    "mir": lambda s: s.translate(_MIRROR),
    "stp": lambda s: "".join(c.translate(_SHIFTS[(i + 1) % len(ALPHABET)]) for i, c in enumerate(s)),  # shifts do not commute with moves only when position-dependent
    "ror": lambda s: s[-1:] + s[:-1],
    "dec": lambda s: _shift(s, -1),
}
GROUPS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # RL groups take the first n_groups; warm-up groups any letter


@dataclass(frozen=True)
class Problem:
    pid: str  # unique: family and input
    family: str
    group: str
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


def sizes(plan_len, input_len):
    """(prompt, completion) lengths in characters (= tokens) at most: `A07:kdbea>` and `rev,inc,swp|aebdk|bfcel|fbelc` + newline."""
    return 3 + 1 + input_len + 1, 4 * plan_len + (input_len + 1) * plan_len + 2


def check_settings(plan_len, n_ops, n_groups, families_per_group, input_len, n_train, n_heldout, n_unseen):
    """The task's settings, each and together; a ValueError naming the setting, its value and what is allowed."""
    ranges = dict(plan_len=(plan_len, 1, 6), n_ops=(n_ops, 2, len(OPS)), n_groups=(n_groups, 1, n_ops), input_len=(input_len, 2, len(ALPHABET)),
                  families_per_group=(families_per_group, 1, 86), n_train=(n_train, 1, None), n_heldout=(n_heldout, 1, None),
                  n_unseen=(n_unseen, 0, 86 - families_per_group))  # ids 10-99 per group letter, 4 left for a warm-up group
    for key, (v, lo, hi) in ranges.items():
        if not (lo <= v and (hi is None or v <= hi)):
            raise ValueError(f"{key}={v} is not allowed: [{lo}, {'inf)' if hi is None else f'{hi}]'}" + (" (at most n_ops: a group's first op is its own)" if key == "n_groups" else
                             " (families_per_group + n_unseen <= 86)" if key == "n_unseen" else ""))
    if n_train + n_heldout > len(ALPHABET) ** input_len:
        raise ValueError(f"n_train={n_train} + n_heldout={n_heldout} exceed the {len(ALPHABET) ** input_len} distinct inputs of input_len={input_len}")


class HiddenProcedures:
    def __init__(self, plan_len=3, n_ops=6, n_groups=3, families_per_group=4, input_len=5, n_train=32, n_heldout=8, seed=0, n_unseen=2):
        check_settings(plan_len, n_ops, n_groups, families_per_group, input_len, n_train, n_heldout, n_unseen)
        self.plan_len, self.input_len = plan_len, input_len
        self.ops = list(OPS)[:n_ops]
        self.max_completion = sizes(plan_len, input_len)[1]
        rng = random.Random(seed)
        self.plans = self._unambiguous_plans(rng)
        self.families = {}  # family id -> hidden plan (RL families and unseen ones)
        self.train, self.heldout, self.unseen = [], [], []
        firsts = [op for op in self.ops if any(p[0] == op for p in self.plans)]  # every op, unless one starts no plan
        groups = list(zip(GROUPS, rng.sample(firsts, n_groups)))
        for g, first in groups:
            nums = rng.sample(range(10, 100), families_per_group)
            for num, plan in zip(nums, self._draw_plans(rng, first, families_per_group)):
                fam = f"{g}{num:02d}"
                self.families[fam] = plan
                inputs = self._distinct_inputs(rng, n_train + n_heldout)
                probs = [self._problem(fam, g, plan, s) for s in inputs]
                self.train += probs[:n_train]
                self.heldout += probs[n_train:]
        # families RL never trains on, drawn after the RL families so that adding them leaves the RL table as it is;
        # a family of a group shares only the group's first op with the others: that is all that transfers to it
        for g, first in groups:
            nums = rng.sample([n for n in range(10, 100) if f"{g}{n:02d}" not in self.families], n_unseen)
            for num, plan in zip(nums, self._draw_plans(rng, first, n_unseen)):
                fam = f"{g}{num:02d}"
                self.families[fam] = plan
                self.unseen += [self._problem(fam, g, plan, s) for s in self._distinct_inputs(rng, n_heldout)]

    def _draw_plans(self, rng, first, k):
        """k plans starting with first, distinct from every family's so far while there are enough; a first op
        that starts fewer (plan_len 1 starts one) gives some families the same plan."""
        fresh = [p for p in self.plans if p[0] == first and p not in self.families.values()]
        picks = rng.sample(fresh, min(k, len(fresh)))
        return picks + [rng.choice([p for p in self.plans if p[0] == first]) for _ in range(k - len(picks))]

    def _unambiguous_plans(self, rng):
        """All plans whose input-output map no other plan shares (checked on random probes): a passing
        faithful trace then names the family's plan, and two plans never tie."""
        probes = self._distinct_inputs(rng, 64)
        by_sig = {}
        for plan in itertools.product(self.ops, repeat=self.plan_len):
            by_sig.setdefault(tuple(run_plan(plan, s)[-1] for s in probes), []).append(plan)
        return sorted(ps[0] for ps in by_sig.values() if len(ps) == 1)

    def _distinct_inputs(self, rng, n):
        seen = set()
        while len(seen) < n:
            seen.add("".join(rng.choice(ALPHABET) for _ in range(self.input_len)))
        return sorted(sorted(seen), key=lambda _: rng.random())  # sorted first: a set's order varies per process (str hashing)

    def _problem(self, fam, group, plan, s):
        return Problem(pid=f"{fam}:{s}", family=fam, group=group, prompt=f"{fam}:{s}>", solution=trace(plan, s))

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
        if s != problem.solution[:-1].split("|")[-1]:
            return 0, "wrong plan", plan
        return 1, "ok", plan

    def verify(self, problem, completion):
        reward, feedback, _ = self._check(problem, completion)
        return reward, feedback

    def strategy(self, problem, completion):
        return self._check(problem, completion)[2]

    # -- warm-up ----------------------------------------------------------------------------------

    def warmup_group(self, rng, n_families=4, n_inputs=6):
        """Problems of a fresh group: a random letter and first op, random plans, and ids that are never
        an RL family's (so warm-up teaches every id character but no RL family's plan)."""
        g, first = rng.choice(GROUPS), rng.choice(self.ops)
        probs = []
        nums = [n for n in range(10, 100) if f"{g}{n:02d}" not in self.families]
        for num in rng.sample(nums, n_families):
            plan = (first,) + tuple(rng.choice(self.ops) for _ in range(self.plan_len - 1))
            probs += [self._problem(f"{g}{num:02d}", g, plan, s) for s in self._distinct_inputs(rng, n_inputs)]
        return probs

    def solve(self, problem):
        return problem.solution

    def attempt(self, problem, rng, p_right=0.4, p_slip=0.1):
        """A plausible attempt: the right plan or a random one, executed faithfully or with one slip."""
        plan = problem.solution.split("|")[0].split(",")
        if rng.random() > p_right:
            plan = [rng.choice(self.ops) for _ in range(self.plan_len)]
        steps = run_plan(plan, problem.prompt.split(":", 1)[1][:-1])
        if rng.random() < p_slip:
            k = rng.randrange(len(steps))
            steps[k] = steps[k][::-1] if steps[k] != steps[k][::-1] else _shift(steps[k], 1)
        return ",".join(plan) + "|" + "|".join(steps) + "\n"
