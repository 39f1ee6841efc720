"""bench.py on a tiny config: the benchmark (table, bench.json, reuse of finished runs), the sweep's grid, --speed."""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import bench as bench_module
from conftest import in_background, run_script


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--warmup_steps=3", "--warmup_batch=8", "--prompts_per_step=2",
        "--group_size=2", "--replay=2", "--n_train=4", "--n_heldout=2", "--device=cpu", "--steps=4",
        "--eval_interval=2"]


def table(out):
    """The rows of the tables bench.py prints, without their header and separator lines."""
    heads = ("| method", "| setting", "| ---")
    return [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(heads)]


def bench(args, tmp_path):
    """python bench.py args, through tests/forked.py: its train.py runs are forked from a process that has imported
    torch (a child Python spends about 2 s of CPU on that import). The SIGKILL and torchrun tests keep real children."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    runner = [os.path.join(REPO, "tests", "forked.py"), "bench.py"]
    p = subprocess.run([sys.executable, *runner, *args, f"--bench_dir={tmp_path / 'bench'}",
                        f"--cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    return p


@in_background
def test_bench_runs_every_variant_and_reuses_finished_runs(tmp_path):
    args = TINY + ["--seeds=1,2", "--variants=grpo,frozen-policy"]
    p = bench(args, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("new inputs") >= 4 and "[4/4]" in p.stdout  # progress: one line per finished run
    assert "start apart" not in p.stderr  # the methods that share a warm-up start from the same step-0 evaluation
    rows = table(p.stdout)
    assert [r.split("|")[1].strip() for r in rows] == ["grpo", "frozen-policy"]
    header = next(line for line in p.stdout.splitlines() if line.startswith("| method")).split("|")
    lag = header.index(" internalisation lag (steps) ")
    # GRPO's teacher reads no memory: no lag; frozen-policy's never trains: none either
    assert rows[0].split("|")[lag].strip() == "-" and rows[1].split("|")[lag].strip() == "-"
    records = json.load(open(tmp_path / "bench" / "bench.json"))
    assert len(records) == 4
    assert {(r["method"], r["seed"]) for r in records} == {(v, s) for v in ("grpo", "frozen-policy") for s in (1, 2)}
    for r in records:
        assert 0 <= r["heldout_acc"] <= 1 and r["rollouts"] == 4 * 2 * 2 and r["curve"][-1][1] == r["heldout_acc"]
        assert 0 <= r["unseen_acc"] <= 1 and r["curve"][-1][2] == r["unseen_acc"]
        if r["method"] == "grpo":
            assert 0 <= r["unseen_pass@16"] <= 1
        else:  # frozen-policy is scored by the policy reading its memory, and has no pass@k
            assert "unseen_pass@16" not in r and r["heldout_acc"] == r["teacher_acc"]
        assert r["rollouts_to_80"] is None or r["rollouts_to_80"] in [c[0] for c in r["curve"]]
    try:  # matplotlib is optional: without it the benchmark says so and writes no plot
        import matplotlib  # noqa: F401
        assert (tmp_path / "bench" / "curves.png").stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in p.stdout and not (tmp_path / "bench" / "curves.png").exists()
    # each seed's runs use a family table of their own (its warm-up too); a --task_seed given to bench.py fixes one
    # for all
    for v in ("grpo", "frozen-policy"):
        for s in (1, 2):
            done = json.load(open(tmp_path / "bench" / "runs" / f"{v}-s{s}" / "done.json"))
            assert f"--task_seed={s}" in done["args"]
    assert len(list((tmp_path / "cache").glob("warmup-*.pt"))) == 2
    assert bench_module.family_table(3, ["--task_seed=7"]) == []
    assert bench_module.job("grpo", 3, ["--task_seed=7"])[1].count("--task_seed=7") == 1
    # a second call finds every run finished with the same arguments: nothing reruns, the same table comes out, and
    # no warm-up is trained (the cache is gone: the finished runs need none)
    logs = sorted((tmp_path / "bench" / "runs").glob("*/log.txt"))
    stamps = [f.stat().st_mtime_ns for f in logs]
    shutil.rmtree(tmp_path / "cache")
    again = bench(args, tmp_path)
    assert again.returncode == 0 and table(again.stdout) == rows
    assert [f.stat().st_mtime_ns for f in logs] == stamps and not (tmp_path / "cache").exists()
    # a run whose record is corrupt, or was made with other arguments, runs again; the others are still reused
    assert [f.parent.name for f in logs] == ["frozen-policy-s1", "frozen-policy-s2", "grpo-s1", "grpo-s2"]
    (logs[0].parent / "done.json").write_text("{")
    done = json.load(open(logs[2].parent / "done.json"))
    (logs[2].parent / "done.json").write_text(json.dumps(dict(done, args=done["args"] + ["--steps=2"])))
    third = bench(args, tmp_path)
    assert third.returncode == 0 and third.stdout.count("new inputs") >= 4
    assert [f.stat().st_mtime_ns != t for f, t in zip(logs, stamps)] == [True, False, True, False]
    # both reruns are seed 1's: its table's warm-up, and only that one, is trained again
    assert len(list((tmp_path / "cache").glob("warmup-*.pt"))) == 1
    assert "start apart" not in third.stderr
    # a record that started from another warm-up than its seed's other runs is named: it would break the pairing
    done = json.load(open(logs[3].parent / "done.json"))
    done["metrics"][0]["heldout_pass@1"] += 0.01
    (logs[3].parent / "done.json").write_text(json.dumps(done))
    fourth = bench(args, tmp_path)
    assert fourth.returncode == 0 and fourth.stderr.count("start apart") == 1
    assert "warning: frozen-policy-s2 and grpo-s2 share a warm-up" in fourth.stderr


@in_background
def test_frozen_memory_runs_after_the_frozen_policy_it_starts_from(tmp_path):
    """The paper's frozen memory: the frozen-policy run of the same seed goes first (run, not reported), and its final
    memory is the one the policy trains against, unchanged to the end."""
    p = bench(TINY + ["--seeds=1", "--variants=frozen-memory,pmd-transient,experience-only"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [row.split("|")[1].strip() for row in table(p.stdout)]
    assert rows == ["frozen-memory", "pmd-transient", "experience-only"]
    runs = tmp_path / "bench" / "runs"
    source, frozen = (json.load(open(runs / d / "memory.json")) for d in ("frozen-policy-s1", "frozen-memory-s1"))
    assert source == frozen and source["experience"]


@in_background
def test_difficulty_sweep_runs_every_method_at_every_setting_and_resumes(tmp_path):
    """--difficulty: the four methods at each knob value, a table per evaluation set with each value's initial success
    rate, difficulty.json; a second call reruns nothing."""
    args = TINY + ["--difficulty", "--knob=plan_len:1,3", "--seeds=1"]
    p = bench(args, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[8/8]" in p.stdout and "new inputs:" in p.stdout and "unseen families:" in p.stdout
    rows = [[cell.strip() for cell in row.split("|")[1:-1]] for row in table(p.stdout)]
    assert [row[0] for row in rows] == ["plan_len=1", "plan_len=3"] * 2
    records = json.load(open(tmp_path / "bench" / "difficulty.json"))
    want = [(m, k) for m in ("grpo", "sdpo", "rft", "pmd") for k in (1, 3)]
    assert sorted((r["method"], int(r["point"][0].split("=")[1])) for r in records) == sorted(want)
    for r in records:  # each run's own numbers: pass@1 before RL, accuracy at the end
        k = r["point"][0].split("=")[1]
        d = tmp_path / "bench" / "runs" / f"{r['method']}-plan_len{k}-s1"
        evals = [json.loads(line) for line in open(d / "metrics.jsonl")]
        assert r["start_pass1"] == evals[0]["heldout_pass@1"] and r["unseen_acc"] == evals[-1]["unseen_acc"]
        assert 0 <= r["start_pass1"] <= 1 and 0 <= r["unseen_acc"] <= 1
        start = statistics.mean(q["start_pass1"] for q in records if q["point"] == r["point"])
        row = next(row for row in rows if row[0] == f"plan_len={k}")  # new inputs come first
        assert row[1] == f"{max(start, 1e-4):.3f}"  # the setting's x: its initial success rate
        assert row[2 + ["grpo", "sdpo", "rft", "pmd"].index(r["method"])] == f"{r['heldout_acc']:.3f}"
    for k in (1, 3):  # a setting's value reaches every run of that setting
        args_k = json.load(open(tmp_path / "bench" / "runs" / f"pmd-plan_len{k}-s1" / "done.json"))["args"]
        assert f"--plan_len={k}" in args_k
    stamps = sorted(f.stat().st_mtime_ns for f in (tmp_path / "bench" / "runs").glob("*/log.txt"))
    assert bench(args, tmp_path).returncode == 0
    assert sorted(f.stat().st_mtime_ns for f in (tmp_path / "bench" / "runs").glob("*/log.txt")) == stamps


def test_bench_errors_are_one_line(tmp_path):
    cases = ((["--variants=pmd,ppo"], "variants='pmd,ppo' is not allowed"),
             (["--workers=x"], "bench option 'workers' expects int"),
             (["--lr=fast"], "config key 'lr' expects float"),
             (["--difficulty", "--knob=plan_length:1"], "knob='plan_length:1' is not allowed"),
             (["--sweep", "--seeds=1"], "bench option 'seeds' is not read by --sweep: it reads workers, bench_dir"),
             (["--pressure", "--variants=pmd"], "bench option 'variants' is not read by --pressure"),
             (["--knob=plan_len:1,2"], "bench option 'knob' is not read by --bench"))
    for args, msg in cases:
        dirs = [f"--bench_dir={tmp_path / 'bench'}", f"--cache_dir={tmp_path / 'cache'}"]
        p = run_script("bench.py", TINY + args + dirs, cwd=tmp_path)
        assert p.returncode == 1 and p.stderr.strip().startswith("error:") and msg in p.stderr
        assert "Traceback" not in p.stderr


@in_background
def test_speed_prints_the_speedup_the_phases_and_the_memory_cost(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_SPEED_STEPS="2")
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--speed", *TINY,
                        f"--cache_dir={tmp_path / 'cache'}", f"--bench_dir={tmp_path / 'speed'}"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    speedup = [line for line in out.splitlines() if line.startswith("sampling speedup:")]  # a ratio of times: its form
    assert len(speedup) == 1 and re.fullmatch(r"sampling speedup: \d+\.\dx \(KV cache over full recomputation\)",
                                              speedup[0]), speedup
    for phase in ("rollout", "verify", "memory", "teacher", "student", "optimizer"):
        assert any(l.strip().startswith(phase) and "%" in l for l in out.splitlines()), phase
    saved = json.load(open(tmp_path / "speed" / "speed.json"))
    assert {"rollout", "verify", "memory", "teacher", "student", "optimizer"} <= set(saved["step"]["phases_ms"])


def test_claims_are_paired_differences_with_their_standard_error():
    """claims_table pairs the two variants' runs by seed: the mean difference ± its standard error, and whether it is
    beyond two standard errors in the claimed direction (by the claim's margin)."""
    def rec(m, s, h, u):
        return dict(method=m, seed=s, heldout_acc=h, unseen_acc=u)
    records = [rec("grpo", s, 0.2 + 0.01 * s, 0.1) for s in range(3)]
    records += [rec("sdpo", s, 0.4 + 0.01 * s, 0.1 + 0.02 * (s % 2)) for s in range(3)]
    records += [rec("frozen-policy", s, 0.5, 0.3) for s in range(3)]
    records += [rec("pmd", s, 0.55 + 0.01 * s, 0.5 + 0.01 * s) for s in range(3)]
    text = bench_module.claims_table(records, ["grpo", "sdpo", "frozen-policy", "pmd"])
    rows = {l.split("|")[1].strip(): l for l in text.splitlines()[2:]}
    assert set(rows) == {"grpo < sdpo", "sdpo < pmd", "frozen-policy < pmd by 10%"}
    grpo_sdpo = rows["grpo < sdpo"].split("|")
    assert grpo_sdpo[2].strip() == "+0.200 ± 0.000 (holds)"
    assert "does not hold" in grpo_sdpo[3]  # unseen: +0.007 ± 0.007
    frozen = rows["frozen-policy < pmd by 10%"].split("|")
    assert "(does not hold)" in frozen[2] and "+0.060" in frozen[2]  # 0.06 is short of 10 points
    assert "(holds)" in frozen[3]
    assert bench_module.claims_table(records, ["grpo"]) == ""


def test_parity_claim_holds_unless_below_by_more_than_two_standard_errors():
    """("pmd", "pmd-reflect", None): the model's reflection holds if its difference from counting is above -2 SE."""
    def rec(m, s, h):
        return dict(method=m, seed=s, heldout_acc=h, unseen_acc=h)
    level = [rec("pmd", s, 0.8) for s in range(3)]
    level += [rec("pmd-reflect", s, 0.8 + d) for s, d in enumerate((-0.02, 0.0, 0.01))]
    below = [rec("pmd", s, 0.8) for s in range(3)] + [rec("pmd-reflect", s, 0.6 + 0.01 * s) for s in range(3)]
    for records, verdict in ((level, "(holds)"), (below, "(does not hold)")):
        [row] = bench_module.claims_table(records, ["pmd", "pmd-reflect"]).splitlines()[2:]
        assert row.startswith("| pmd-reflect within 2 SE of pmd or above |")
        assert row.split("|")[2].strip().endswith(verdict)


@in_background
def test_bench_with_the_models_reflection_trains_its_own_warmups_first_and_reports_fidelity(tmp_path):
    p = bench(TINY + ["--seeds=1,2", "--variants=pmd,pmd-reflect"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list((tmp_path / "cache").glob("warmup-*.pt"))) == 4  # per table: counting's and reflect=model's
    assert "| pmd-reflect within 2 SE of pmd or above |" in p.stdout
    fidelity = p.stdout.split("fidelity against the counting rule", 1)[1].splitlines()
    seeds = [line.split("|")[1].strip() for line in fidelity if line.startswith("| ") and line[2].isdigit()]
    assert seeds == ["1", "2"]
    for s in (1, 2):  # every run's log says it loaded its warm-up: bench.py trained them all before the runs
        assert "warm-up: loaded" in open(tmp_path / "bench" / "runs" / f"pmd-reflect-s{s}" / "log.txt").read()


def test_sweep_grid_crosses_every_setting_and_names_each_in_its_runs():
    """Every (lr, replay weight, updates) point once; each point's settings are in its run's name and are the ones the
    run uses (they override the method's row of TUNED)."""
    points = bench_module.sweep_points()
    sweep = bench_module.SWEEP
    assert len(points) == len(sweep["lr"]) * len(sweep["replay_weight"]) * len(sweep["updates"])
    settings = [bench_module.tuned_of(list(p)) for p in points]
    assert len({tuple(sorted(s.items())) for s in settings}) == len(points)
    assert {s["lr"] for s in settings} == set(sweep["lr"]) and {s["updates"] for s in settings} == set(sweep["updates"])
    one = next(p for p, s in zip(points, settings) if s == dict(lr=3e-4, replay_weight=0.1, updates=1))
    name, args = bench_module.job("grpo", 101, [], one)
    assert name == "grpo-lr0.0003-replay_weight0.1-updates1-s101"
    assert bench_module.tuned_of(args) == dict(lr=3e-4, replay_weight=0.1, updates=1)
