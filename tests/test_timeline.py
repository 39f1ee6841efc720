"""Reading a run: the memory's growth per level, the per-family internalisation timeline, the plot and one family up
close (memory.py on a run directory), on hand-made files and on a tiny real run."""
import json

import pytest

import report
import config
import train
from conftest import TINY, problem, quiet, rollout, run_script
from memory import Memory


def evaluation(step, mem_family, student, teacher, unseen_student=0.0):
    """One metrics.jsonl line as train.evaluate writes it, for families A1, A2 (RL) and A9 (unseen)."""
    counts = {k: step for k in report.GROWTH}
    return dict(step=step, heldout_acc=0.0, teacher_acc=0.0, memory_family=mem_family, **counts,
                family_acc=dict(heldout=student, unseen={"A9": unseen_student}),
                teacher_family_acc=dict(heldout=teacher, unseen={"A9": 0.0}))


# A1: the memory is right at 20 (after a wrong strategy at 10), the teacher solves it at 20, the student at 60.
# A2: the memory is right at 40; the student never solves it.
RECS = [evaluation(0, {}, {"A1": 0.0, "A2": 0.0}, {"A1": 0.0, "A2": 0.0}),
        evaluation(10, {"A1": -1}, {"A1": 0.0, "A2": 0.0}, {"A1": 0.0, "A2": 0.0}),
        evaluation(20, {"A1": 1}, {"A1": 0.25, "A2": 0.0}, {"A1": 1.0, "A2": 0.0}),
        evaluation(40, {"A1": 1, "A2": 1}, {"A1": 0.25, "A2": 0.0}, {"A1": 1.0, "A2": 0.5}),
        evaluation(60, {"A1": 1, "A2": 1}, {"A1": 0.5, "A2": 0.25}, {"A1": 1.0, "A2": 1.0}, unseen_student=0.5)]
RECS[0]["families"] = {"A1": ["A", "x,y"], "A2": ["A", "x,z"], "A9": ["A", "x,w"]}


def write_run(d, recs=RECS, mem=True, tail=""):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs) + tail)
    if mem:  # two families confirm x,y and x,z: the group's pattern 1:x reaches A9
        m = Memory(min_agree=1)
        m.update([rollout(problem("A1", s), 1, ("x", "y")) for s in "ab"]
                 + [rollout(problem("A2", s), 1, ("x", "z")) for s in "ab"])
        m.save(str(d / "memory.json"))
    return d


def test_timeline_on_hand_made_metrics():
    tl = report.timeline(RECS)
    assert tl["A1"] == dict(set="heldout", memory_right=20, memory_wrong=10, teacher=20, student=60, lag=40)
    assert tl["A2"] == dict(set="heldout", memory_right=40, memory_wrong=None, teacher=40, student=None, lag=None)
    assert tl["A9"]["set"] == "unseen" and tl["A9"]["student"] == 60 and tl["A9"]["memory_right"] is None
    assert report.mean_lag(RECS) == (40.0, 1)


def test_describe_run_prints_growth_timeline_and_unseen_patterns(tmp_path):
    text = report.describe_run(write_run(tmp_path / "run"))
    assert text.startswith("memory at step 1")  # today's view of the final memory comes first
    growth = text.split("memory growth")[1].split("per-family timeline")[0].splitlines()
    assert [int(l.split()[0]) for l in growth if l.strip() and l.split()[0].isdigit()] == [r["step"] for r in RECS]
    assert "mean lag 40 steps over the 1 families" in text and "never caught up with the memory on 1 (A2)" in text
    a9 = next(l for l in text.splitlines() if l.strip().startswith("A9"))
    assert a9.split()[1:3] == ["-", "60"] and "1:x (yes)" in a9


DAMAGES = [  # (what write_run is given, what the partial report notes)
    (dict(tail='{"step": 80, "heldout'), "line 6 of"),  # a kill mid-write
    (dict(mem=False), "memory.json not found"),
    (dict(recs=[{k: v for k, v in r.items() if k not in ("memory_family", "family_acc")} for r in RECS]),
     "5 of 5 evaluations lack"),
]
CLI_ERRORS = [  # (how the run directory is made, report.py's options, the words of its one error line)
    (lambda d: d.mkdir(), [], "metrics.jsonl (No such file"),
    (lambda d: write_run(d, recs=[], tail="garbage\n"), [], "holds no evaluation"),
    (lambda d: write_run(d), ["--bogus"], "unknown option"),
    (lambda d: write_run(d), ["--family=A1"], "ckpt.pt not found"),
    (lambda d: write_run(d, recs=[{k: v for k, v in r.items() if k != "memory_family"} for r in RECS]), ["--plot"],
     "no memory counts to plot"),
]


@pytest.fixture(scope="module")
def report_cli(tmp_path_factory):
    """`python report.py` on every case below: (the run directory, the finished script) by the case's words."""
    root, cases = tmp_path_factory.mktemp("report-cli"), {}
    for i, (damage, note) in enumerate(DAMAGES):
        cases[note] = write_run(root / f"damaged-{i}", **damage), []
    for i, (setup, args, words) in enumerate(CLI_ERRORS):
        setup(root / f"error-{i}")
        cases[words] = root / f"error-{i}", args
    return {words: (d, run_script("report.py", [d, *args])) for words, (d, args) in cases.items()}


@pytest.mark.parametrize("damage, note", DAMAGES)
def test_damaged_or_old_runs_give_a_partial_report(report_cli, damage, note):
    d, p = report_cli[note]
    assert note in report.describe_run(d)
    assert p.returncode == 0 and note in p.stdout and "Traceback" not in p.stderr


@pytest.mark.parametrize("setup, args, words", CLI_ERRORS)
def test_cli_errors_are_one_line(report_cli, setup, args, words):
    _, p = report_cli[words]
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], p.stderr


def test_census_counts_each_level_and_checks_strategies():
    m = Memory(min_agree=1, min_support=2)
    m.update([rollout(problem("A1", "a"), 1, ("x", "y")), rollout(problem("A2", "a"), 1, ("x", "q")),
              rollout(problem("A2", "b"), 0, ("x", "z")), rollout(problem("A3", "a"), 0, None)])
    c = m.census({"A1": "x,y", "A2": "x,z"})
    assert (c["mem_passing"], c["mem_failing"], c["mem_strategies"], c["mem_lessons"]) == (2, 2, 2, 1)
    assert c["mem_patterns"] == 1 and c["memory_family"] == {"A1": 1, "A2": -1}
    assert (c["mem_confirmed"], c["mem_confirmed_right"]) == (2, 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("timeline")
    quiet(train.main, TINY + [f"--out_dir={root / 'out'}", f"--cache_dir={root / 'cache'}"])
    return root / "out"


def test_a_real_run_logs_growth_and_per_family_accuracy(tiny_run):
    recs = [json.loads(l) for l in open(tiny_run / "metrics.jsonl")]
    task = train.make_task(config.parse_args(TINY))
    for r in recs:
        assert set(report.GROWTH) | {"memory_family"} <= set(r)
        for name, key in (("heldout", "heldout_acc"), ("unseen", "unseen_acc")):
            fams = r["family_acc"][name]
            assert set(fams) == {p.family for p in getattr(task, name)}
            assert set(r["teacher_family_acc"][name]) == set(fams)
            # every family has as many problems: the mean is the accuracy
            assert abs(sum(fams.values()) / len(fams) - r[key]) < 1e-2
    mem = Memory.load(str(tiny_run / "memory.json"))
    assert recs[-1]["mem_passing"] + recs[-1]["mem_failing"] == sum(map(len, mem.experience.values()))
    assert set(recs[0]["families"]) == {p.family for p in task.heldout + task.unseen}


def test_one_family_up_close(tiny_run):
    text = report.up_close(str(tiny_run), "A26")
    lines = text.splitlines()
    assert lines[0].startswith("family A26 at step 3, problem A26:") and "memory lines the teacher reads" in text
    assert any(l.startswith("teacher (with memory)") or l.startswith("teacher (no memory)") for l in lines)
    assert any(l.startswith("student (no memory)") and "-> " in l for l in lines)
    explored = lines[-1].split("strategies ")[1].split(", ")  # the 16 samples' strategies, tallied
    assert lines[-1].startswith("student, 16 samples at temperature 1:")
    assert sum(int(x.rsplit(" x", 1)[1]) for x in explored) == 16
    with pytest.raises(ValueError, match="family 'Z99' is not in this run's task"):
        report.up_close(str(tiny_run), "Z99")


def test_plot_writes_a_png(tiny_run):
    pytest.importorskip("matplotlib")
    path = report.plot_run(str(tiny_run), str(tiny_run / "memory.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
