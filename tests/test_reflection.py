"""Reflection: the counting rule's verdicts, what a model reflector reads and writes, its parser, fidelity against the
rule, and reflect=model end to end for every variant that keeps a memory."""
import hashlib
import json
import random

import pytest
import torch

import pmd
import train
from conftest import TINY, problem, quiet, rollout
from memory import Memory, counted, fidelity, parse_reflection, reflection_prompts, written
from model import GPT, GPTConfig, decode, encode
from pmd import reflection
from warmup import reflection_example, warmup_example
from verify import HiddenProcedures


def group():
    """One problem's four attempts: a pass, a faithful failure, an unfaithful one, and the pass again."""
    p = problem("A01", "abc")
    return p, [rollout(p, 1, ("rol", "swp")), rollout(p, 0, ("rev", "stp")),
               rollout(p, 0, None, completion="rol,rev|xx|yy\n", feedback="step 1 wrong"),
               rollout(p, 1, ("rol", "swp"))]


def test_counting_rule_writes_one_verdict_per_faithful_trace():
    p, rolls = group()
    assert counted(rolls) == [(p, ("rol", "swp"), True), (p, ("rev", "stp"), False), (p, ("rol", "swp"), True)]
    # an unfaithful trace: no verdict
    assert [written(r) for r in rolls] == ["ok rol,swp", "bad rev,stp", "-", "ok rol,swp"]


def test_each_distinct_attempt_is_one_prompt_with_the_groups_pass_count_passes_first():
    p, rolls = group()
    prompts = reflection_prompts([rolls[1], *rolls[2:], rolls[0]], 4)
    assert [r for r, _ in prompts] == [rolls[3], rolls[1], rolls[2]]  # the repeated pass once, passes first
    for r, text in prompts:
        lines = text.splitlines()
        assert r.problem is p and len(lines) == 3 and lines[0] == "A01:abc> 2/4" and lines[-1] == "reflect:"
    assert prompts[0][1].splitlines()[1].endswith(" 1") and prompts[1][1].splitlines()[1].endswith(" 0 wrong plan")


def test_groups_are_reflected_on_separately():
    a, b = problem("A01", "abc"), problem("B02", "abc")
    rolls = [rollout(a, 1, ("rol",)), rollout(a, 0, ("rev",)), rollout(b, 0, ("rev",)), rollout(b, 0, ("rev",))]
    prompts = reflection_prompts(rolls, 2)
    assert [(r.problem.pid, text.splitlines()[0]) for r, text in prompts] == [
        ("A01:abc", "A01:abc> 1/2"), ("A01:abc", "A01:abc> 1/2"), ("B02:abc", "B02:abc> 0/2")]


@pytest.mark.parametrize("text, verdicts, dropped", [
    ("ok rol,swp;bad rev,stp\n", [(("rol", "swp"), True), (("rev", "stp"), False)], 0),  # right
    ("ok rev,rev\n", [(("rev", "rev"), True)], 0),  # wrong, but well formed: it reaches the memory
    ("-\n", [], 0),
    ("ok rol,swp;bd rev;ok \n", [(("rol", "swp"), True)], 2),  # one good part, two dropped
    ("\x00\xff garbage;;ok a,,b\n", [], 3),
    ("", [], 1),
])
def test_parser_keeps_what_reads_and_counts_what_it_drops(text, verdicts, dropped):
    assert parse_reflection(text) == (verdicts, dropped)


def test_model_verdicts_update_the_insight_level_as_the_rule_would():
    p, rolls = group()
    by_rule, by_model = Memory(), Memory()
    by_rule.update(rolls)
    got, _ = parse_reflection("ok rol,swp;bad rev,stp")
    by_model.update(rolls, [(p, s, ok) for s, ok in got])
    assert by_model.state() == by_rule.state()
    wrong = Memory()
    wrong.update(rolls, [(p, ("rev", "stp"), True)])  # a flipped verdict reaches the memory as written
    assert wrong.insight["A01"] == {"rev,stp": dict(agree=[p.pid], contradict=[], step=1)}


def test_fidelity_counts_agree_flipped_invented_missed():
    p, rolls = group()
    model = [(p, ("rol", "swp"), True), (p, ("rev", "stp"), True), (p, ("mir", "mir"), False)]
    assert fidelity(model, counted(rolls)) == dict(written=3, agree=1, flipped=1, invented=1, rule=2, missed=1)


def evidence(mem):
    """The insight level as (family, strategy, passed, pid): each input a strategy's evidence names, and its side."""
    return {(fam, s, side == "agree", pid) for fam, items in mem.insight.items() for s, it in items.items()
            for side in ("agree", "contradict") for pid in it[side]}


def evidence_of(verdicts):
    """What verdicts (problem, strategy, passed) put into an empty memory's insight level."""
    return {(p.family, ",".join(s), ok, p.pid) for p, s, ok in verdicts}


def attempts(task, n_families=3, G=4):
    """G attempts (half right on average) at the first problem of each of n_families families, verified."""
    rng, rolls = random.Random(0), []
    for p in list({p.family: p for p in task.train}.values())[:n_families]:
        for _ in range(G):
            t = task.attempt(p, rng, 0.5)
            rolls.append(rollout(p, task.verify(p, t)[0], task.strategy(p, t), t, task.verify(p, t)[1]))
    return rolls


def test_an_untrained_model_reflects_without_crashing_and_its_verdicts_go_to_the_memory(monkeypatch):
    """An untrained model writes garbage: every part it writes is parsed or dropped and counted, never raised; the
    memory's insight level then holds what it wrote (here nothing), not what the counting rule would have."""
    task = HiddenProcedures()
    torch.manual_seed(0)
    model = GPT(GPTConfig(256, 1, 2, 32))
    rolls = attempts(task)
    texts, real = [], pmd.generate
    monkeypatch.setattr(pmd, "generate", lambda *a, **k: texts.append(real(*a, **k)[0]) or (texts[-1], None))
    verdicts, counts = reflection(model, rolls, 4)
    parsed = [parse_reflection(decode(y)) for y in texts[0]]
    assert len(texts[0]) == len(reflection_prompts(rolls, 4))  # one line per distinct attempt
    assert verdicts == [(r.problem, s, ok) for (r, _), (got, _) in zip(reflection_prompts(rolls, 4), parsed)
                        for s, ok in got]
    assert counts["dropped"] == sum(bad for _, bad in parsed) and counts["written"] == len(evidence_of(verdicts))
    assert counts["rule"] == len({(r.problem.pid, r.strategy, r.reward) for r in rolls if r.strategy})
    mem, by_rule = Memory(), Memory()
    mem.update(rolls, verdicts)
    by_rule.update(rolls)
    assert mem.step == 1 and len(mem.experience) == 3
    assert evidence(mem) == evidence_of(verdicts) and evidence(by_rule) == evidence_of(counted(rolls))
    assert evidence(by_rule) != evidence(mem)  # the rule's verdicts would have filled it otherwise


def test_a_reflectors_lines_reach_the_memory_as_written(monkeypatch):
    """A reflector that writes the opposite of the counting rule's verdict on every attempt: the memory's evidence is
    its verdicts, each flipped, not the rule's."""
    task = HiddenProcedures()
    rolls = attempts(task)
    chunks = reflection_prompts(rolls, 4)
    lines = ["-" if r.strategy is None else ("bad " if r.reward else "ok ") + ",".join(r.strategy) for r, _ in chunks]
    prompts = [encode(text) for _, text in chunks]
    monkeypatch.setattr(pmd, "generate", lambda model, ps, *a, **k: (
        [encode(lines[prompts.index(p)] + "\n") for p in ps], None))
    verdicts, counts = reflection(GPT(GPTConfig(256, 1, 2, 32)), rolls, 4)
    flipped = {(fam, s, not ok, pid) for fam, s, ok, pid in evidence_of(counted(rolls))}
    assert evidence_of(verdicts) == flipped and counts["flipped"] == counts["written"] == len(flipped) > 0
    mem = Memory()
    mem.update(rolls, verdicts)
    assert evidence(mem) == flipped


def test_reflection_examples_target_what_the_rule_writes():
    task, rng = HiddenProcedures(), random.Random(0)
    for _ in range(50):
        ctx, prompt, target = reflection_example(task, rng, rng.choice(task.warmup_group(rng)), 8)
        lines = prompt.splitlines()
        assert ctx == "" and len(lines) == 3 and lines[-1] == "reflect:"
        verdicts, dropped = parse_reflection(target)
        assert dropped == 0 and target.endswith("\n")
        assert all(f"{','.join(s)}|" in prompt for s, _ in verdicts)  # every verdict names a strategy the prompt shows


# sha1 of the JSON of the first 40 warm-up examples from random.Random(3) with {"budget": 160}, and the draw after
# them: computed at WARMUP_VERSION 5 (the same before the warm-up moved to warmup.py)
WARMUP_PIN = "da6b4de22902f9db631f72949d612d442dbb44d1", 0.2509946758782078


def test_no_reflection_share_leaves_the_warmup_examples_as_they_were():
    """reflect=count's warm-up and replay must stay as measured. A regression pin: it pins the examples (and the random
    draws they take) that every cached warm-up of this WARMUP_VERSION was trained on; p_reflect=0, given or not, draws
    nothing extra. If a change to the examples is meant, bump warmup.WARMUP_VERSION and the pin together."""
    task = HiddenProcedures()
    for kw in ({}, dict(p_reflect=0.0)):
        rng = random.Random(3)
        examples = [warmup_example(task, rng, {"budget": 160}, **kw) for _ in range(40)]
        assert (hashlib.sha1(json.dumps(examples).encode()).hexdigest(), rng.random()) == WARMUP_PIN, kw
    mixed = [warmup_example(task, random.Random(3), {"budget": 160}, p_plain=0, p_reflect=1.0) for _ in range(5)]
    assert all(p.endswith("reflect:") for _, p, _ in mixed)


VARIANTS = {"pmd": [], "pmd-transient": ["--transient=true"], "frozen-policy": ["--policy_frozen=true"],
            "experience-only": ["--memory_levels=experience"]}


@pytest.fixture(scope="module")
def reflect_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflect")
    out = {}
    for name, args in VARIANTS.items():
        d = root / name
        _, printed = quiet(train.main, TINY + ["--reflect=model", f"--out_dir={d}", f"--cache_dir={root / 'cache'}",
                                               *args])
        out[name] = (d, printed)
    d = root / "frozen-memory"  # frozen-policy's memory, never updated: the reflector is never asked
    quiet(train.main, TINY + ["--reflect=model", f"--out_dir={d}", f"--cache_dir={root / 'cache'}", "--memory_steps=0",
                              f"--memory_init={root / 'frozen-policy' / 'memory.json'}"])
    out["frozen-memory"] = (d, "")
    return out


@pytest.mark.parametrize("name", [*VARIANTS, "frozen-memory"])
def test_reflect_model_runs_every_variant_that_keeps_a_memory(reflect_runs, name):
    d, printed = reflect_runs[name]
    recs = [json.loads(line) for line in open(d / "metrics.jsonl")]
    assert all("reflect_agree" in r and "reflect_dropped" in r for r in recs)  # the probe, at every evaluation
    # the verdicts that reached the memory
    assert all("rl_reflect_written" in r for r in recs[1:]) == (name != "frozen-memory")
    mem = Memory.load(str(d / "memory.json"))
    if name == "frozen-memory":  # never updated: the memory it started from
        assert mem.state() == Memory.load(str(reflect_runs["frozen-policy"][0] / "memory.json")).state()
    else:
        assert mem.step == recs[-1]["step"]
    if name == "pmd":
        assert "reflection fidelity on the RL families' rollouts" in printed


def test_reflect_model_has_its_own_warmup(reflect_runs):
    """reflect=model trains a warm-up of its own: reflect=count's cached one is never replaced."""
    cache = next(iter(reflect_runs.values()))[0].parent / "cache"
    _, printed = quiet(train.main, TINY + [f"--out_dir={cache.parent / 'count'}", f"--cache_dir={cache}"])
    assert len(list(cache.glob("warmup-*.pt"))) == 2 and "warm-up: loaded" not in printed


def test_reflect_model_resumes_exactly(reflect_runs, tmp_path):
    """Reflection is greedy and its probe draws from a generator of its own: a run resumed half-way ends as one that ran
    straight through, weights, memory and logged fidelity alike."""
    from test_reliability import assert_same_run

    cache = next(iter(reflect_runs.values()))[0].parent / "cache"
    steps = lambda n: [a for a in TINY if not a.startswith("--steps=")] + ["--reflect=model", f"--cache_dir={cache}",
                                                                           f"--steps={n}"]
    quiet(train.main, steps(4) + [f"--out_dir={tmp_path / 'x'}"])
    quiet(train.main, steps(2) + [f"--out_dir={tmp_path / 'y'}"])
    quiet(train.main, steps(4) + [f"--out_dir={tmp_path / 'y'}", "--init_from=resume"])
    assert_same_run(tmp_path / "x", tmp_path / "y")  # checkpoints, memory.json and metrics.jsonl
