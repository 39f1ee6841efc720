"""bench.py's sweeps along a mechanism's knob (--pressure, --lucky, --budget): their statistics, and a smoke of the
first two on a tiny config at two settings."""
import json
import subprocess
import sys

import pytest

import bench
from conftest import REPO, in_background, subprocess_env
from test_bench import TINY


def rec(method, seed, point, heldout, unseen=None, **more):
    return dict(method=method, seed=seed, point=list(point), heldout_acc=heldout, unseen_acc=unseen, **more)


def test_paired_differences_are_taken_seed_by_seed_at_one_point():
    """hi minus lo on the same seed, then mean and standard error: a seed that only one variant ran, or a run at
    another point, does not enter."""
    p, q = ("--plan_len=3",), ()
    records = [rec("pmd", 1, p, 0.9), rec("pmd", 2, p, 0.5), rec("pmd", 3, p, 0.7),
               rec("frozen-policy", 1, p, 0.4), rec("frozen-policy", 2, p, 0.4), rec("frozen-policy", 1, q, 0.0)]
    mean, se = bench.paired(records, "pmd", "frozen-policy", "heldout", p)
    assert mean == pytest.approx(0.3) and se == pytest.approx(0.2)  # differences 0.5 and 0.1: std 0.283, / sqrt(2)
    assert bench.paired(records, "pmd", "frozen-policy", "heldout", q) is None  # one seed: no standard error


def test_coverage_is_the_share_of_rl_families_the_frozen_policy_confirms_right():
    """Over the point's own number of RL families (n_groups x families_per_group), mean over seeds."""
    p = ("--plan_len=3", "--families_per_group=2")  # 3 x 2 = 6 RL families
    records = [rec("frozen-policy", 1, p, 0.0, mem_confirmed_right=3), rec("frozen-policy", 2, p, 0.0,
               mem_confirmed_right=6), rec("pmd", 1, p, 0.0, mem_confirmed_right=0)]
    assert bench.coverage(records, p) == pytest.approx((3 / 6 + 6 / 6) / 2)
    assert bench.coverage([rec("frozen-policy", 1, (), 0.0, mem_confirmed_right=6)], ()) == pytest.approx(6 / 12)


def test_lucky_passes_grow_as_the_answer_shortens():
    """A wrong plan's one-letter answer matches the right one's about 1 time in 12; each further letter makes a match
    rarer, by less than 12 times, since an answer's letters are not independent."""
    rates = [bench.lucky_rate(p) for p in bench.LUCKY]  # answer_len 3, 2 (the default), 1
    assert rates[0] < rates[1] < rates[2]
    assert 1 / 24 < rates[2] < 1 / 6 and 1 / 288 < rates[1] < 1 / 72
    assert rates[2] / rates[1] < 12 and rates[1] / rates[0] < 12


SMOKE = """
import os, sys, bench
bench.PRESSURE = [(), ("--families_per_group=2",)]
bench.PRESSURE_VARIANTS = ("pmd", "frozen-policy")
bench.LUCKY = [(), ("--answer_len=1",)]
bench.LUCKY_VARIANTS = ("experience-only", "pmd")
bench.main([*sys.argv[1:], "--pressure", "--seeds=1,2"])
log = os.path.join(sys.argv[1].split("=", 1)[1], "runs", "pmd-s1", "log.txt")
print("=== pmd-s1's log", os.stat(log).st_mtime_ns)
bench.main([*sys.argv[1:], "--lucky", "--seeds=1"])
print("=== pmd-s1's log", os.stat(log).st_mtime_ns)
"""


@in_background
def test_each_sweep_runs_its_points_and_writes_its_table(tmp_path):
    """--pressure (two seeds) and --lucky (one) at two settings each, one after the other: each prints its table per
    evaluation set and writes its json; a run both sweeps hold (the default point's pmd) is run once and read by
    both."""
    args = [f"--bench_dir={tmp_path / 'bench'}", f"--cache_dir={tmp_path / 'cache'}", *TINY]
    # tests/forked.py: bench.py's train.py runs forked from a process that has imported torch
    p = subprocess.run([sys.executable, f"{REPO}/tests/forked.py", "-c", SMOKE, *args], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    pressure, lucky_out, after = p.stdout.split("=== pmd-s1's log")
    assert lucky_out.split()[0] == after.split()[0]  # the lucky sweep read pmd-s1's record: its log was not rewritten
    records = json.load(open(tmp_path / "bench" / "pressure.json"))
    want = {(v, s, tuple(pt)) for v in ("pmd", "frozen-policy") for s in (1, 2)
            for pt in ([], ["--families_per_group=2"])}
    assert {(r["method"], r["seed"], tuple(r["point"])) for r in records} == want
    rows = [line for line in pressure.splitlines() if line.startswith("| default")]
    assert len(rows) == 2 and all(line.count("±") >= 2 for line in rows)  # both sets; paired differences over 2 seeds
    lucky = json.load(open(tmp_path / "bench" / "lucky.json"))
    assert {tuple(r["point"]) for r in lucky} == {(), ("--answer_len=1",)}
    assert "lucky-pass rate" in lucky_out and lucky_out.count("| answer_len=1 |") == 3  # both sets, then headroom
    headroom = lucky_out.split("headroom after warm-up")[1]
    assert [line.split("|")[1].strip() for line in headroom.splitlines() if line.startswith("| ")][2:] == \
        ["default", "answer_len=1"]
    shared = json.load(open(tmp_path / "bench" / "runs" / "pmd-s1" / "done.json"))
    assert [r for r in lucky if r["method"] == "pmd" and r["seed"] == 1 and r["point"] == []][0]["curve"] == \
        [[m["rollouts"], m["heldout_acc"], m.get("unseen_acc"), m["teacher_acc"]] for m in shared["metrics"]]
