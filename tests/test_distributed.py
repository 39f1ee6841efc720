"""torchrun with 2 CPU ranks (gloo): the ranks hold identical weights and memory at every checkpoint, the check
catches ranks that drift apart, the memory sees every rank's rollouts, and a resumed run is exact. The resume is
torchrun's own; the other runs fork their ranks (tests/forked.py --ranks=2)."""
import ast
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import config  # noqa: E402
import train  # noqa: E402
from conftest import background  # noqa: E402
from memory import Memory  # noqa: E402

ARGS = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--warmup_steps=3", "--warmup_batch=8", "--prompts_per_step=2",
        "--group_size=2", "--replay=2", "--n_train=4", "--n_heldout=2", "--device=cpu", "--eval_interval=1"]

# rank 1 drifts from rank 0 (PMD_DRIFT): "memory", its memory is fed the merged rollouts in reverse order; "weights",
# one of its student's weights moves by 1e-3 before the first step (its gradients are still averaged with rank 0's)
DRIFT = f"""
import os, sys
sys.path.insert(0, {REPO!r})
import torch, train
if os.environ["RANK"] == "1":
    real = train.start
    def start(*a, **k):
        run = real(*a, **k)
        if os.environ["PMD_DRIFT"] == "memory":
            gather = run.gather
            run.gather = lambda rolls: gather(rolls)[::-1]
        else:
            with torch.no_grad():
                next(run.model.parameters()).view(-1)[0] += 1e-3
        return run
    train.start = start
try:
    train.main(sys.argv[1:])
except ValueError as e:
    sys.exit(f"error: {{e}}")
"""


def torchrun(args, script="train.py", real=True, **env_vars):
    """torchrun's 2 ranks of script; real=False: tests/forked.py's stand-in, which forks them from a process that has
    imported torch (torchrun's launcher and each rank would spend about 2 s of CPU each on that import)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHASHSEED", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(env_vars, OMP_NUM_THREADS="1")  # each rank gets its own str-hash seed: nothing may depend on it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if real else [
        sys.executable, os.path.join(REPO, "tests", "forked.py"), "--ranks=2"]
    cmd += [script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def dirs(out, cache):
    return [f"--out_dir={out}", f"--cache_dir={cache}"]


RESUME = "--init_from=resume"


# every torchrun of this module is a background job (conftest.background): a run's rank 0 evaluates while rank 1
# waits, so runs side by side keep both cores busy. The resumed run follows the straight one, whose warm-up it
# shares; the others train their own (3 steps).


@background
def straight_and_resumed(root):
    """A 3-step run, then a 2-step run (both forked) resumed to 3 by torchrun in its warm-up cache: (the three
    processes, the straight run's (out_dir, cache_dir), the resumed run's out_dir)."""
    out, cache, resumed = root / "out", root / "cache", root / "resumed"
    procs = [torchrun(ARGS + ["--steps=3"] + dirs(out, cache), real=False)]
    for extra, real in ((["--steps=2"], False), (["--steps=3", RESUME], True)):
        procs.append(torchrun(ARGS + extra + dirs(resumed, cache), real=real))
    return procs, (out, cache), resumed


def drifting(drift):
    def job(root):
        script = root / "drift.py"
        script.write_text(DRIFT)
        return torchrun(ARGS + ["--steps=1"] + dirs(root / "out", root / "cache"), script=str(script), real=False,
                        PMD_DRIFT=drift), root / "out"
    job.__name__ = f"drift_{drift}"
    return background(job)


for kind in ("memory", "weights"):
    drifting(kind)


@background
def reflecting(root):
    return torchrun(ARGS + ["--steps=2", "--reflect=model"] + dirs(root / "out", root / "cache"), real=False)


@pytest.fixture(scope="module")
def run3(jobs):
    (p, *_), (out, cache), _ = jobs[__name__, "straight_and_resumed"].result()
    assert p.returncode == 0, p.stderr[-3000:]
    return p, out, cache


def test_two_ranks_agree_at_every_checkpoint(run3):
    p, out, _ = run3
    assert "Traceback" not in p.stderr
    agree = [l for l in p.stdout.splitlines() if "ranks agree" in l]
    assert [l.split(":")[0] for l in agree] == ["step 1", "step 2", "step 3"] and all("all 2 ranks" in l for l in agree)
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [0, 1, 2, 3]  # rank 0 alone writes
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and not torch.equal(*ckpt["gen_rngs"])  # own sampler per rank
    mem = Memory.load(str(out / "memory.json"))
    printed = dict(kv.split() for kv in agree[-1].rsplit(": ", 1)[1].split(", "))
    assert hashlib.sha1(json.dumps(mem.state()).encode()).hexdigest()[:12] == printed["memory"]
    # the memory holds both ranks' rollouts: step 1's problems are the first draw of the shared problem RNG
    c = config.parse_args(ARGS)
    first = random.Random(c.seed).sample(train.make_task(c).train, c.prompts_per_step)  # rank 0 takes [0], rank 1 [1]
    pids = {e["pid"] for es in mem.experience.values() for e in es}
    assert mem.step == 3 and {q.pid for q in first} <= pids


@pytest.mark.parametrize("drift, differs", [("memory", "memory"), ("weights", "params")])
def test_ranks_that_drift_apart_stop_the_run(jobs, drift, differs):
    """A rank whose memory, or whose weights, drift from rank 0's is caught at the first checkpoint: the error names
    the step and both ranks' fingerprints, which differ in what drifted and only there."""
    p, out = jobs[__name__, f"drift_{drift}"].result()
    assert p.returncode != 0 and "error: ranks disagree at step 1" in p.stderr, p.stderr[-2000:]
    assert not os.path.exists(out / "ckpt.pt")
    line = next(line for line in p.stderr.splitlines() if "ranks disagree at step 1" in line)
    prints = ast.literal_eval(line.split("ranks disagree at step 1: ", 1)[1])
    assert len(prints) == 2 and {k for k in prints[0] if prints[0][k] != prints[1][k]} == {differs}, prints


def test_resume_under_torchrun_matches_uninterrupted(run3, jobs):
    _, ref, _ = run3
    (_, *resuming), _, out = jobs[__name__, "straight_and_resumed"].result()
    for p in resuming:
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (ref, out))
    for f in ("memory.json", "metrics.jsonl"):  # first: a memory that differs explains weights that differ
        assert open(ref / f).read() == open(out / f).read(), f
    assert all(torch.equal(x, y) for x, y in zip(a["gen_rngs"], b["gen_rngs"])) and a["py_rng"] == b["py_rng"]
    for key in ("model", "teacher"):
        differ = [n for n in a[key] if not torch.equal(a[key][n], b[key][n])]
        gap = lambda: max((a[key][n] - b[key][n]).abs().max().item() for n in differ)
        assert not differ, f"{key}: {differ[:4]}, max abs diff {gap():.3g}"


def test_rank_count_errors(run3, tmp_path, monkeypatch):
    d = tmp_path / "out"
    shutil.copytree(run3[1], d)
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\); resume it with as many, not 1"):
        train.main(ARGS + ["--steps=4", "--init_from=resume"] + dirs(d, run3[2]))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"prompts_per_step=3 must be divisible by the number of ranks \(2\)"):
        train.main(ARGS + ["--prompts_per_step=3"] + dirs(d, run3[2]))


def test_two_ranks_agree_when_the_model_reflects(jobs):
    """reflect=model: every rank reflects on all ranks' rollouts with the same weights, so the memories stay equal."""
    p = jobs[__name__, "reflecting"].result()
    assert p.returncode == 0, p.stderr[-3000:]
    assert [line.split(":")[0] for line in p.stdout.splitlines() if "all 2 ranks agree" in line] == ["step 1", "step 2"]
