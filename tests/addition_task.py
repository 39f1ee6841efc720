"""A second task for the PMD loop: multi-digit addition with a column scratchpad.

    prompt      A37:58+47>
    completion  8+7=15|5+4+1=10|105      (columns right to left; '+1' takes the carry in) + newline

A family (an id like `A37`) is bound to a hidden *carry plan*: which columns take a carry in ('add' or 'adc'
per column, right to left); its problems are the additions whose carries follow that plan. A group (the id's
letter) holds the families of one digit count, so every plan of a group starts with 'add' (the units column
never takes a carry): something a pattern can find. A trace is *faithful* when every column adds that column's
digits (plus the carry it states) correctly and the answer is assembled from the column sums; its strategy is
the carry plan it followed. Reward 1 iff the trace is faithful and the answer is right.

It exposes exactly the interface of verify.HiddenProcedures (see verify.py's docstring).
"""
import itertools
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, when run alone
from verify import GROUPS, Problem  # noqa: E402

COLUMN = re.compile(r"([0-9])\+([0-9])(\+1)?=(1?[0-9])")  # a sum has no leading zero: 04 is not written


def column_sums(a, b, plan):
    """The column sums of a + b (strings of equal length) when column k takes a carry iff plan[k] == 'adc'."""
    return [int(x) + int(y) + (op == "adc") for x, y, op in zip(reversed(a), reversed(b), plan)]


def assemble(sums):
    """The answer a column scratchpad gives: each column's last digit, plus the last column's carry out."""
    return ("1" if sums[-1] >= 10 else "") + "".join(str(s % 10) for s in reversed(sums))


def true_plan(a, b):
    plan, carry = [], 0
    for x, y in zip(reversed(a), reversed(b)):
        plan.append("adc" if carry else "add")
        carry = int(x) + int(y) + carry >= 10
    return tuple(plan)


def scratchpad(a, b, plan):
    cols = [f"{x}+{y}" + ("+1" if op == "adc" else "") + f"={s}"
            for x, y, op, s in zip(reversed(a), reversed(b), plan, column_sums(a, b, plan))]
    return "|".join(cols) + "|" + assemble(column_sums(a, b, plan)) + "\n"


class AdditionTask:
    def __init__(self, digits=(2, 3), n_train=8, n_heldout=4, seed=0, n_unseen=1):
        if (not digits or any(not 1 <= d <= 6 for d in digits) or len(digits) > len(GROUPS) or n_train < 1
                or n_heldout < 1):
            raise ValueError("addition task: need 1 <= digits <= 6 and n_train, n_heldout >= 1")
        self.digits = tuple(digits)
        self.max_completion = 9 * max(digits) + max(digits) + 2  # 'x+y+1=ss|' per column, the answer, newline
        rng = random.Random(seed)
        self.families, self.train, self.heldout, self.unseen = {}, [], [], []
        for g, d in zip(GROUPS, self.digits):
            plans = [("add",) + rest for rest in itertools.product(("add", "adc"), repeat=d - 1)]
            for k, (num, plan) in enumerate(zip(rng.sample(range(10, 100), len(plans)), plans)):
                fam = f"{g}{num:02d}"
                self.families[fam] = plan
                if k < n_unseen:  # the group's first plans (all 'add'): families RL never trains on
                    self.unseen += [self._problem(fam, g, a, b) for a, b in self._pairs(rng, d, plan, n_heldout)]
                    continue
                probs = [self._problem(fam, g, a, b) for a, b in self._pairs(rng, d, plan, n_train + n_heldout)]
                self.train += probs[:n_train]
                self.heldout += probs[n_train:]

    @staticmethod
    def _pairs(rng, d, plan, n):
        """n distinct (a, b) pairs of d-digit numbers whose carries follow plan (in draw order)."""
        out, seen = [], set()
        lo, hi = 10 ** (d - 1) if d > 1 else 0, 10**d - 1
        for _ in range(100_000):
            a, b = str(rng.randint(lo, hi)), str(rng.randint(lo, hi))
            if (a, b) not in seen and true_plan(a, b) == plan:
                seen.add((a, b))
                out.append((a, b))
                if len(out) == n:
                    return out
        raise ValueError(f"addition task: cannot find {n} inputs for plan {plan}")

    @staticmethod
    def _problem(fam, group, a, b):
        return Problem(pid=f"{fam}:{a}+{b}", family=fam, group=group, prompt=f"{fam}:{a}+{b}>",
                       solution=scratchpad(a, b, true_plan(a, b)))

    @staticmethod
    def operands(problem):
        return problem.prompt.split(":", 1)[1][:-1].split("+")

    # -- verifier -------------------------------------------------------------------------------------------

    def _check(self, problem, completion):
        if not isinstance(completion, str) or not completion.endswith("\n"):
            return 0, "no end", None
        a, b = self.operands(problem)
        parts = completion[:-1].split("|")
        if len(parts) != len(a) + 1:
            return 0, "bad columns", None
        plan, sums = [], []
        for k, (part, x, y) in enumerate(zip(parts, reversed(a), reversed(b)), 1):
            m = COLUMN.fullmatch(part)
            if not m:
                return 0, f"col {k} garbled", None
            if (m[1], m[2]) != (x, y):
                return 0, f"col {k} wrong digits", None
            if int(m[4]) != int(x) + int(y) + bool(m[3]):
                return 0, f"col {k} wrong sum", None
            plan.append("adc" if m[3] else "add")
            sums.append(int(m[4]))
        if parts[-1] != assemble(sums):
            return 0, "answer mismatch", None
        if int(parts[-1]) != int(a) + int(b):
            return 0, "wrong carry", tuple(plan)
        return 1, "ok", tuple(plan)

    def verify(self, problem, completion):
        reward, feedback, _ = self._check(problem, completion)
        return reward, feedback

    def strategy(self, problem, completion):
        return self._check(problem, completion)[2]

    # -- warm-up --------------------------------------------------------------------------------------------

    def warmup_group(self, rng, n_families=4, n_inputs=4):
        """Problems of a fresh group: a random letter and digit count, random carry plans, ids no RL family has."""
        g, d = rng.choice(GROUPS), rng.choice(self.digits)
        nums = [n for n in range(10, 100) if f"{g}{n:02d}" not in self.families]
        probs = []
        for num in rng.sample(nums, n_families):
            plan = ("add",) + tuple(rng.choice(("add", "adc")) for _ in range(d - 1))
            probs += [self._problem(f"{g}{num:02d}", g, a, b) for a, b in self._pairs(rng, d, plan, n_inputs)]
        return probs

    def solve(self, problem):
        return problem.solution

    def attempt(self, problem, rng, p_right=0.4, p_lucky=0.0, p_slip=0.1):
        """A plausible attempt: the right carry plan or a random one, written faithfully or with one slipped sum. A
        wrong carry plan never gives the right sum, so there is no lucky pass to draw (p_lucky is accepted and has no
        effect)."""
        a, b = self.operands(problem)
        plan = list(true_plan(a, b))
        if rng.random() > p_right:
            plan = ["add"] + [rng.choice(("add", "adc")) for _ in range(len(a) - 1)]
        sums = column_sums(a, b, plan)
        cols = [f"{x}+{y}" + ("+1" if op == "adc" else "") for x, y, op in zip(reversed(a), reversed(b), plan)]
        answer = assemble(sums)
        if rng.random() < p_slip:
            k = rng.randrange(len(sums))
            sums[k] = (sums[k] + 1) % 20
        return "|".join(f"{c}={s}" for c, s in zip(cols, sums)) + "|" + answer + "\n"
