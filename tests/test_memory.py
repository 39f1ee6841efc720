"""memory.Memory: experiences, reflection into insights, consolidation into patterns, the budgeted render,
JSON save / load, and `python report.py FILE`."""
import json
import os

import pytest

from conftest import problem, rollout, run_script
from memory import Memory, clean
from verify import clusters

X = ("rev", "inc", "swp")
Y = ("rev", "mir", "rol")
Z = ("inc", "swp", "rev")
W = ("rev", "swp", "swp")
V = ("rev", "rol", "rol")


def feed(mem, *rolls):
    mem.update(list(rolls))
    return mem


def confirm(mem, family, plan, inputs=("a", "b")):
    """Enough passing inputs for plan to be the family's confirmed strategy."""
    return feed(mem, *(rollout(problem(family, s), 1, plan) for s in inputs))


def lines(text):
    return text.splitlines()


# -- experience ---------------------------------------------------------------------------------------------


def test_update_stores_experiences():
    """Each rollout becomes an experience of its family with pid, text, reward and feedback."""
    p = problem("A10", "abc")
    r1, r0 = rollout(p, 1, X), rollout(p, 0, Y)
    mem = feed(Memory(), r1, r0)
    exps = mem.experience["A10"]
    assert [(e["pid"], e["reward"], e["feedback"]) for e in exps] == [("A10:abc", 1, "ok"),
                                                                      ("A10:abc", 0, "wrong plan")]
    assert exps[0]["text"] == clean(p.prompt + r1.completion, 10**6) and mem.groups["A10"] == "A"


def test_identical_trajectory_is_stored_once_and_refreshed():
    """The same trajectory again refreshes its step instead of adding a copy."""
    r = rollout(problem("A10", "abc"), 1, X)
    mem = feed(feed(Memory(), r), r)
    assert len(mem.experience["A10"]) == 1 and mem.experience["A10"][0]["step"] == 2


def test_experience_cap_evicts_failures_before_successes():
    """Over max_experiences, the oldest failure goes first; the oldest success only when no failure is left."""
    mem = Memory(max_experiences=3)
    for i, reward in enumerate([1, 1, 0, 0, 0]):
        feed(mem, rollout(problem("A10", f"s{i}"), reward, X))
    assert [(e["pid"], e["reward"]) for e in mem.experience["A10"]] == [("A10:s0", 1), ("A10:s1", 1), ("A10:s4", 0)]
    for i in (5, 6):
        feed(mem, rollout(problem("A10", f"s{i}"), 1, X))
    assert [e["pid"] for e in mem.experience["A10"]] == ["A10:s1", "A10:s5", "A10:s6"]


def test_family_cap_evicts_least_recently_updated():
    """Over max_families, the family updated longest ago is forgotten at every level."""
    mem = Memory(max_families=2)
    for fam in ("A10", "A11", "A10", "A12"):  # A10 updated again: now A11 is the least recent
        confirm(mem, fam, X)
    assert set(mem.experience) == set(mem.insight) == set(mem.groups) == {"A10", "A12"}
    assert mem.members == {"A": ["A10", "A12"]}  # the group index forgets the evicted family too
    assert all(p["support"] == ["A10", "A12"] for p in mem.pattern["A"].values())  # and its patterns no longer cite it


# -- insight ------------------------------------------------------------------------------------------------


def test_reflect_pass_agrees_fail_contradicts_unfaithful_adds_nothing():
    """A passing faithful trace agrees with its strategy, a failing one contradicts, an unfaithful one is no
    evidence."""
    mem = feed(Memory(), rollout(problem("A10", "a"), 1, X), rollout(problem("A10", "b"), 0, Y),
               rollout(problem("A11", "a"), 0, None, feedback="step 2 wrong"))
    x, y = mem.insight["A10"]["rev,inc,swp"], mem.insight["A10"]["rev,mir,rol"]
    assert x["agree"] == ["A10:a"] and not x["contradict"]
    assert y["contradict"] == ["A10:b"] and not y["agree"]
    assert not mem.insight.get("A11") and len(mem.experience["A11"]) == 1


def test_strategy_needs_min_agree_distinct_inputs():
    """One input passing twice is one piece of evidence: not confirmed until a second input passes."""
    mem = feed(feed(Memory(), rollout(problem("A10", "a"), 1, X)), rollout(problem("A10", "a"), 1, X))
    assert mem.confirmed("A10") is None
    assert confirm(mem, "A10", X, ("b",)).confirmed("A10") == "rev,inc,swp"


def test_passed_once_failed_twice_is_a_lesson():
    """A strategy that passed on one input and then failed on two others is rendered as a 'bad' lesson."""
    mem = feed(Memory(), rollout(problem("A10", "a"), 1, X))
    assert "#A10 ok rev,inc,swp 1" in lines(mem.render(problem("A10", "z")))
    feed(mem, rollout(problem("A10", "b"), 0, X), rollout(problem("A10", "c"), 0, X))
    out = lines(mem.render(problem("A10", "z")))
    assert "#A10 bad rev,inc,swp 1" in out and not any(" ok rev,inc,swp" in l for l in out)


def test_equal_evidence_retires_a_strategy():
    """As many failing inputs as passing ones retire the strategy: it is neither strategy nor lesson."""
    mem = feed(Memory(), rollout(problem("A10", "a"), 1, X), rollout(problem("A10", "b"), 1, X))
    feed(mem, rollout(problem("A10", "c"), 0, X), rollout(problem("A10", "d"), 0, X))
    assert "rev,inc,swp" not in mem.render(problem("A10", "z"), ("insight",)) and mem.confirmed("A10") is None


def test_retired_strategy_is_not_revived_by_inputs_it_already_passed_on():
    """Re-passing inputs already counted (no new evidence) does not turn a retired 2-pass / 2-fail strategy into a
    confirmed one."""
    # evidence is counted over distinct inputs (README); the RL loop re-samples the same training problems all the time
    mem = Memory()
    feed(mem, rollout(problem("A10", "a"), 1, X), rollout(problem("A10", "b"), 1, X))
    feed(mem, rollout(problem("A10", "c"), 0, X), rollout(problem("A10", "d"), 0, X))  # 2 pass, 2 fail: retired
    feed(mem, rollout(problem("A10", "a"), 1, X), rollout(problem("A10", "b"), 1, X))  # the same two passes again
    assert mem.confirmed("A10") is None
    assert "ok rev,inc,swp" not in mem.render(problem("A10", "z"))


def test_insight_cap_evicts_lessons_first_then_weakest():
    """Over max_insights, lessons go before strategies; among strategies the weakest evidence goes."""
    mem = confirm(Memory(max_insights=2), "A10", X, ("a", "b", "c"))
    feed(mem, rollout(problem("A10", "d"), 0, Y), rollout(problem("A10", "e"), 0, Y))
    feed(mem, rollout(problem("A10", "f"), 1, Z))  # Y is the strongest by |evidence| after X, but a lesson
    assert set(mem.insight["A10"]) == {"rev,inc,swp", "inc,swp,rev"}
    confirm(mem, "A10", W, ("g", "h"))
    assert set(mem.insight["A10"]) == {"rev,inc,swp", "rev,swp,swp"}


def test_insight_count_is_capped_at_nine():
    """The rendered evidence count never exceeds 9 (one token), while the stored evidence keeps counting."""
    mem = confirm(Memory(), "A10", X, [f"s{i}" for i in range(12)])
    assert "#A10 ok rev,inc,swp 9" in lines(mem.render(problem("A10", "z")))
    assert len(mem.insight["A10"]["rev,inc,swp"]["agree"]) == 12


# -- pattern ------------------------------------------------------------------------------------------------


def test_pattern_needs_min_support_confirmed_families():
    """A shared step becomes a pattern only once min_support families' confirmed strategies share it."""
    mem = confirm(Memory(), "A10", X)
    assert "A" not in mem.pattern
    feed(mem, rollout(problem("A11", "a"), 1, Y))  # A11 passed once: not confirmed yet
    assert "A" not in mem.pattern
    confirm(mem, "A11", Y, ("b",))
    assert mem.pattern["A"] == {"1:rev": dict(support=["A10", "A11"], against=[])}


def test_min_support_setting_is_respected():
    """With min_support=3, two families sharing a step make no pattern; a third does."""
    mem = confirm(confirm(Memory(min_support=3), "A10", X), "A11", Y)
    assert "A" not in mem.pattern
    assert "1:rev" in confirm(mem, "A12", ("rev", "swp", "swp")).pattern["A"]


def test_pattern_disappears_when_its_strategy_is_contradicted():
    """When a supporting family's strategy is retired by failures, the pattern it supported goes away."""
    mem = confirm(confirm(Memory(), "A10", X), "A11", Y)
    assert "1:rev" in mem.pattern["A"]
    feed(mem, rollout(problem("A11", "c"), 0, Y), rollout(problem("A11", "d"), 0, Y))
    assert "1:rev" not in mem.pattern.get("A", {})


def test_pattern_disappears_when_as_many_families_disagree():
    """A step shared by 2 families but absent from 2 other confirmed families is no longer a pattern."""
    mem = confirm(confirm(Memory(), "A10", X), "A11", Y)
    confirm(confirm(mem, "A12", Z), "A13", ("inc", "rev", "rev"))
    assert "1:rev" not in mem.pattern.get("A", {}) and "1:inc" not in mem.pattern.get("A", {})


def test_unseen_family_gets_its_groups_pattern():
    """A family the memory never saw renders its group's pattern lines (and nothing of other families)."""
    mem = confirm(confirm(Memory(), "A10", X), "A11", Y)
    assert mem.render(problem("A99", "zz")) == "#A99 via rev,?,? 2\n"  # step 1 from the pattern, the others unknown
    assert mem.render(problem("B99", "zz")) == ""


def clustered(family, s):
    """A problem in one cluster per id character, as the built-in task's: A10 is in A**, *1* and **0."""
    return problem(family, s, clusters(family))


def test_patterns_are_kept_per_cluster_and_an_unseen_family_gets_each_clusters_best():
    """A family belongs to several clusters; each keeps the steps its confirmed families share. A family never seen,
    made of known characters, renders its clusters' patterns composed into one plan."""
    mem = Memory()
    for fam, plan in (("A10", ("rev", "inc", "swp")), ("A21", ("rev", "mir", "rol")), ("B11", ("inc", "inc", "rol")),
                      ("B20", ("inc", "mir", "swp"))):
        feed(mem, *(rollout(clustered(fam, s), 1, plan) for s in ("a", "b")))
    assert mem.pattern["A**"] == {"1:rev": dict(support=["A10", "A21"], against=[])}
    assert mem.pattern["*1*"] == {"2:inc": dict(support=["A10", "B11"], against=[])}
    assert mem.pattern["**0"] == {"3:swp": dict(support=["A10", "B20"], against=[])}
    assert mem.render(clustered("A11", "zz")) == "#A11 via rev,inc,rol 2\n"  # each step from its own cluster
    assert mem.render(clustered("C99", "zz")) == ""
    small = Memory(max_families=3)
    for fam in ("A10", "A21", "B11", "B20"):
        feed(small, *(rollout(clustered(fam, s), 1, X) for s in ("a", "b")))
    assert "A10" not in small.groups  # and evicted from every cluster
    assert all("A10" not in fams for fams in small.members.values())


def test_composed_pattern_takes_the_best_supported_step_and_its_weakest_count():
    """Where clusters' patterns disagree on a step, the one with more support wins; a step no pattern names is '?'; the
    line's count is the weakest support among the steps it names."""
    mem = Memory()
    for fam, plan in (("A10", ("rev", "inc", "swp")), ("A21", ("rev", "mir", "swp")), ("A32", ("rev", "rol", "swp")),
                      ("B13", ("inc", "inc", "rol")),
                      ("C13", ("mir", "inc", "rol"))):
        feed(mem, *(rollout(clustered(fam, s), 1, plan) for s in ("a", "b")))
    # A**: 1:rev and 3:swp (3 families); *1*: 2:inc (A10, B13, C13); **3: 2:inc and 3:rol (B13, C13), and 3:rol
    # loses to 3:swp
    assert mem.compose(clustered("A13", "z")) == "#A13 via rev,inc,swp 3"
    assert mem.compose(clustered("A33", "z")) == "#A33 via rev,inc,swp 2"  # step 2 only from **3: support 2
    assert mem.compose(clustered("A99", "z")) == "#A99 via rev,?,swp 3"
    assert mem.compose(clustered("D99", "z")) is None


# -- render -------------------------------------------------------------------------------------------------


def rich_memory(**settings):
    """Family A10 with 5 successes, 3 failures, 3 strategies and 2 lessons; group A with 3 patterns (A10, A11 share
    X)."""
    mem = Memory(**settings)
    confirm(mem, "A10", X, ("a", "b", "c"))
    feed(mem, rollout(problem("A10", "d"), 0, Y), rollout(problem("A10", "e"), 0, Z),
         rollout(problem("A10", "f"), 0, Z))
    feed(mem, rollout(problem("A10", "g"), 1, W))
    feed(mem, rollout(problem("A10", "h"), 1, V))
    confirm(mem, "A11", X)
    return mem


def kinds(text):
    ls = lines(text)
    return (sum(line.startswith("=") for line in ls), sum(line.startswith(("#A10 ok", "#A10 bad")) for line in ls),
            sum(line.startswith("#A10 via") for line in ls))


def test_render_line_caps_per_level():
    """Each level renders at most its cap of lines (experience, insight, pattern)."""
    # the default caps (2, 3, 1); one strategy
    assert kinds(rich_memory(budget=10**6).render(problem("A10", "z"))) == (2, 1, 1)
    assert kinds(rich_memory(budget=10**6, lines=(1, 2, 1)).render(problem("A10", "z"))) == (1, 1, 1)
    assert kinds(rich_memory(budget=10**6, lines=(0, 0, 1)).render(problem("A10", "z"))) == (0, 0, 1)


def test_render_shows_the_strongest_strategy_alone():
    """Of a family's strategies only the one with the most net evidence is rendered (a lone pass beside it is a lucky
    one until the evidence says otherwise); between equals the most recent; successes lead experiences."""
    out = lines(rich_memory(budget=10**6, lines=(8, 8, 8)).render(problem("A10", "z")))
    assert [l for l in out if l.startswith("#A10 ") and " via " not in l] == ["#A10 ok rev,inc,swp 3"]
    ties = feed(feed(Memory(), rollout(problem("A20", "a"), 1, W)), rollout(problem("A20", "b"), 1, V))
    assert lines(ties.render(problem("A20", "z"), ("insight",))) == ["#A20 ok rev,rol,rol 1"]
    exps = [l for l in out if l.startswith("=")]
    assert len(exps) == 5 and all(l.endswith(" 1") for l in exps)  # only successes: no failure of problem z exists


def test_lessons_are_shown_only_while_no_strategy_has_passed():
    """A family with only failed strategies renders its lessons, strongest first; once one passes, only strategies."""
    mem = feed(Memory(), rollout(problem("A20", "a"), 0, Y), rollout(problem("A20", "b"), 0, Z),
               rollout(problem("A20", "c"), 0, Z))
    assert lines(mem.render(problem("A20", "z"), ("insight",))) == ["#A20 bad inc,swp,rev 2", "#A20 bad rev,mir,rol 1"]
    feed(mem, rollout(problem("A20", "d"), 1, X))
    assert lines(mem.render(problem("A20", "z"), ("insight",))) == ["#A20 ok rev,inc,swp 1"]


def test_render_shows_failures_of_this_problem_only():
    """A failed trace is shown when rendering its own problem, never for another input."""
    mem = rich_memory(budget=10**6, lines=(8, 8, 8))
    assert any(l.startswith("=A10:d>") and " 0 " in l for l in lines(mem.render(problem("A10", "d"))))
    assert not any(l.startswith("=A10:d>") for l in lines(mem.render(problem("A10", "z"))))


def test_render_respects_the_budget():
    """For every budget the context fits in it and is made of lines of the unbudgeted context."""
    full = lines(rich_memory(budget=10**6).render(problem("A10", "z")))
    for budget in range(0, 260, 3):
        out = rich_memory(budget=budget).render(problem("A10", "z"))
        assert len(out) <= budget and set(lines(out)) <= set(full)
    assert lines(rich_memory(budget=sum(len(l) + 1 for l in full)).render(problem("A10", "z"))) == full


def test_tight_budget_keeps_the_best_insight():
    """A budget with room for one line keeps the strongest insight."""
    assert rich_memory(budget=len("#A10 ok rev,inc,swp 3\n")).render(problem("A10", "z")) == "#A10 ok rev,inc,swp 3\n"


@pytest.mark.parametrize("levels,prefix", [(("experience",), "="), (("insight",), "#A10 ok"),
                                           (("pattern",), "#A10 via ")])
def test_render_levels_argument(levels, prefix):
    """render(levels=...) shows only the levels asked for."""
    out = lines(rich_memory(budget=10**6).render(problem("A10", "z"), levels))
    assert out and all(l.startswith(prefix) for l in out)


def test_render_no_levels_is_empty():
    """An empty level list renders nothing."""
    assert rich_memory().render(problem("A10", "z"), ()) == ""


def test_unknown_setting_is_refused():
    """Memory(**settings) rejects a setting it does not know."""
    with pytest.raises(ValueError, match="bogus"):
        Memory(bogus=1)


# -- save / load --------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    """A loaded memory has the saved state, renders the same, and evolves the same under the same updates."""
    mem, path = rich_memory(lines=(1, 2, 3), budget=120), str(tmp_path / "memory.json")
    mem.save(path)
    back = Memory.load(path)
    assert back.state() == mem.state() and back.settings["lines"] == (1, 2, 3)
    for p in (problem("A10", "z"), problem("A10", "d"), problem("A99", "z"), problem("B10", "z")):
        assert back.render(p) == mem.render(p)
    more = [rollout(problem("A12", "a"), 1, X), rollout(problem("A10", "h"), 0, X)]
    assert feed(back, *more).state() == feed(mem, *more).state()
    assert not os.path.exists(path + ".tmp")


def test_load_keeps_least_recently_updated_first_whatever_the_files_order(tmp_path):
    """Eviction after a load forgets the family updated longest ago, even if the file lists it last."""
    path, d = _saved(tmp_path)
    d["touched"] = dict(reversed(list(d["touched"].items())))  # A11 (updated last) first, A10 last
    with open(path, "w") as f:
        json.dump(d, f)
    mem = Memory.load(path)
    mem.settings["max_families"] = 2
    confirm(mem, "B10", X)
    assert set(mem.groups) == {"A11", "B10"}


def _saved(tmp_path):
    path = str(tmp_path / "memory.json")
    rich_memory().save(path)
    return path, json.load(open(path))


CORRUPT = {
    "truncated": lambda text, d: text[: len(text) // 2],
    "not json": lambda text, d: "hello",
    "binary": lambda text, d: "\udcff",  # written as raw bytes below
    "json list": lambda text, d: "[1, 2]",
    "missing key": lambda text, d: json.dumps({k: v for k, v in d.items() if k != "insight"}),
    "wrong shape": lambda text, d: json.dumps(dict(d, experience={"A10": "oops"})),
    "unknown setting": lambda text, d: json.dumps(dict(d, settings=dict(d["settings"], bogus=1))),
    "bad step": lambda text, d: json.dumps(dict(d, step="x")),
    "deeply nested": lambda text, d: "[" * 100_000 + "]" * 100_000,
}


def _write_corrupt(tmp_path, case):
    path, d = _saved(tmp_path)
    text = CORRUPT[case](open(path).read(), d)
    with open(path, "wb") as f:
        f.write(b"\xff\xfe\x00garbage" if case == "binary" else text.encode())
    return path


@pytest.mark.parametrize("case", list(CORRUPT))
def test_load_corrupt_file_raises_value_error_naming_the_path(tmp_path, case):
    """Memory.load of a damaged file raises ValueError whose message names the file."""
    path = _write_corrupt(tmp_path, case)
    with pytest.raises(ValueError) as e:
        Memory.load(path)
    assert path in str(e.value)


def test_load_missing_file_or_directory_raises_value_error(tmp_path):
    """A missing path and a directory both give a ValueError naming the path."""
    for path in (str(tmp_path / "nope.json"), str(tmp_path)):
        with pytest.raises(ValueError) as e:
            Memory.load(path)
        assert path in str(e.value)


def _corrupt_cli_file(tmp_path, case):
    if case == "non-string support":  # valid JSON of the right shape, but a pattern lists numbers, not families
        path, d = _saved(tmp_path)
        d["pattern"]["A"]["1:rev"]["support"] = [1, 2]
        json.dump(d, open(path, "w"))
        return path
    return _write_corrupt(tmp_path, case)


CLI_CORRUPT = ["truncated", "json list", "deeply nested", "non-string support"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """`python report.py FILE` on a sound memory file ("sound") and on each CLI_CORRUPT case: case -> (the file, the
    finished script)."""
    paths = {}
    for case in ["sound", *CLI_CORRUPT]:
        d = tmp_path_factory.mktemp("cli")
        if case == "sound":
            paths[case] = str(d / "memory.json")
            rich_memory().save(paths[case])
        else:
            paths[case] = _corrupt_cli_file(d, case)
    return {case: (path, run_script("report.py", [path])) for case, path in paths.items()}


def test_cli_prints_the_three_levels(cli):
    """`python report.py FILE` describes each cluster's patterns, then each family's strategies, lessons and traces."""
    _, r = cli["sound"]
    assert r.returncode == 0, r.stderr
    assert "patterns (per cluster of families)" in r.stdout and "A        step 1:rev shared by A10, A11" in r.stdout
    assert "family A10 (A)" in r.stdout
    assert "strategy rev,inc,swp" in r.stdout and "lesson   inc,swp,rev" in r.stdout and "trace    A10:a>" in r.stdout


@pytest.mark.parametrize("case", CLI_CORRUPT)
def test_cli_on_corrupt_file_is_one_error_line(cli, case):
    """On a damaged file the CLI exits non-zero with one 'error: ...' line naming it and no traceback."""
    path, r = cli[case]
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and err[0].startswith("error: ") and path in err[0], r.stderr[-500:]
    assert "Traceback" not in r.stderr


# -- caps: evidence per insight side, patterns per cluster; the composed plan's tie-break ---------------------


def test_evidence_is_capped_at_max_evidence_keeping_the_most_recent():
    """Each side of an insight remembers at most max_evidence inputs, the most recent (an input seen again moves to the
    end); what was forgotten no longer counts in the rendered net evidence."""
    mem = confirm(Memory(max_evidence=3), "A10", X, ("a", "b", "c", "d", "e"))
    item = mem.insight["A10"]["rev,inc,swp"]
    assert item["agree"] == ["A10:c", "A10:d", "A10:e"]
    confirm(mem, "A10", X, ("c",))
    assert item["agree"] == ["A10:d", "A10:e", "A10:c"]
    feed(mem, *(rollout(problem("A10", s), 0, X) for s in ("f", "g", "h", "i")))
    assert item["contradict"] == ["A10:g", "A10:h", "A10:i"] and mem.confirmed("A10") is None
    assert len(confirm(Memory(), "A10", X, [f"s{i}" for i in range(40)]).insight["A10"]["rev,inc,swp"]["agree"]) == 32


def test_patterns_are_capped_at_max_patterns_most_supported_first():
    """Over max_patterns, a cluster keeps its most supported patterns; between equals, the first found (its first
    family's earliest step)."""
    plans = (("A10", ("rev", "inc", "swp")), ("A11", ("rev", "inc", "rol")), ("A12", ("rev", "mir", "rol")))
    kept = {}
    for cap in (1, 2, 8):
        mem = Memory(max_patterns=cap)
        for fam, plan in plans:
            confirm(mem, fam, plan)
        kept[cap] = {k: p["support"] for k, p in mem.pattern["A"].items()}
    assert kept[8] == {"1:rev": ["A10", "A11", "A12"], "2:inc": ["A10", "A11"], "3:rol": ["A11", "A12"]}
    assert kept[2] == {"1:rev": ["A10", "A11", "A12"], "2:inc": ["A10", "A11"]}
    assert kept[1] == {"1:rev": kept[8]["1:rev"]}


def test_composed_pattern_breaks_a_tie_for_the_first_cluster_of_the_problems_group():
    """Two clusters name step 2 with equal support: the first cluster in the problem's group wins; listing them the
    other way round flips the step."""
    mem = Memory()
    for fam, plan in (("A20", ("rev", "inc", "swp")), ("A32", ("rev", "inc", "rol")), ("B11", ("inc", "mir", "rol")),
                      ("C13", ("mir", "mir", "swp"))):
        feed(mem, *(rollout(clustered(fam, s), 1, plan) for s in ("a", "b")))
    assert mem.pattern["A**"]["2:inc"]["support"] == ["A20", "A32"] and mem.pattern["*1*"] == {
        "2:mir": dict(support=["B11", "C13"], against=[])}
    assert mem.compose(problem("A15", "z", "A** *1* **5")) == "#A15 via rev,inc,? 2"
    assert mem.compose(problem("A15", "z", "*1* A** **5")) == "#A15 via rev,mir,? 2"
