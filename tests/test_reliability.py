"""Reliability: bit-exact resume after SIGKILL, atomic writes, one-line errors, garbage-proof verifier and memory,
and the non-finite-step guard. Tiny CPU runs; every subprocess gets OMP_NUM_THREADS=1 and its own PYTHONHASHSEED
(so nothing may depend on str hashing)."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import memory as memory_mod  # noqa: E402
import checkpoint  # noqa: E402
import pmd  # noqa: E402
import train  # noqa: E402
from memory import LEVELS, Memory  # noqa: E402
from model import decode  # noqa: E402
from pmd import Rollout  # noqa: E402
from verify import HiddenProcedures  # noqa: E402
from conftest import background, quiet, run_script  # noqa: E402

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--warmup_steps=3", "--warmup_batch=8", "--prompts_per_step=2",
        "--group_size=2", "--replay=2", "--n_train=4", "--n_heldout=2", "--device=cpu"]
RUN = TINY + ["--steps=6", "--eval_interval=2"]

# test-side wrappers around train.main (nothing test-only lives in train.py); PMD_TEST_MODE picks one
WRAPPER = f"""
import io, os, signal, sys
sys.path.insert(0, {REPO!r})
import torch, train
mode = os.environ["PMD_TEST_MODE"]
if mode == "kill_after_step_3":  # SIGKILL mid-run: right after step 3, a step past the step-2 checkpoint
    step, done = train.step, []
    def dying_step(*a, **k):
        out = step(*a, **k)
        done.append(1)
        if len(done) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    train.step = dying_step
if mode == "kill_mid_save":  # SIGKILL half-way through writing step 4's checkpoint
    save = torch.save
    def dying(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            buf = io.BytesIO()
            save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *a, **k)
    torch.save = dying
train.main(sys.argv[1:])
"""


def env(hashseed):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(e, OMP_NUM_THREADS="1", PYTHONHASHSEED=str(hashseed))


def popen(args, hashseed=0, script="train.py", mode=None):
    e = env(hashseed) if mode is None else dict(env(hashseed), PMD_TEST_MODE=mode)
    return subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def dirs(out, cache):
    return [f"--out_dir={out}", f"--cache_dir={cache}"]


def ckpt_step(d):
    try:
        return torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["step"]
    except Exception:
        return -1


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """An uninterrupted 6-step run, in this process (it also fills the shared warm-up cache). The runs it is compared
    with ran in child processes with PYTHONHASHSEEDs of their own, so nothing may depend on str hashing."""
    root = tmp_path_factory.mktemp("ref")
    r = SimpleNamespace(out=root / "out", cache=root / "cache", root=root)
    quiet(train.main, RUN + dirs(r.out, r.cache))
    return r


def assert_same_run(x, y, teacher=True):
    """Two run directories hold the same run, bit for bit; teacher=False: a live teacher (the student), never saved."""
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (x, y))
    assert ("teacher" in a, "teacher" in b) == (teacher, teacher)
    for key in ("model", "teacher") if teacher else ("model",):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    for key in ("step", "rollouts", "py_rng", "memory_step"):
        assert a[key] == b[key], key
    assert torch.equal(a["gen_rng"], b["gen_rng"]) and torch.equal(a["torch_rng"], b["torch_rng"])
    for f in ("memory.json", "metrics.jsonl"):
        with open(os.path.join(x, f), "rb") as fx, open(os.path.join(y, f), "rb") as fy:
            assert fx.read() == fy.read(), f


# -----------------------------------------------------------------------------
# 1. resume is bit-exact after a SIGKILL (and 2. a kill in the middle of a save leaves the previous checkpoint)


def killed_runs(tmp_path):
    """The two runs of test_resume_after_sigkill_is_bit_exact that are SIGKILLed, child processes started with the
    session (conftest.background) while this process runs other tests; each trains its own warm-up (cache_dir).
    Returns (a, b, their return codes)."""
    a, b = tmp_path / "a", tmp_path / "b"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    pa = popen(RUN + dirs(a, tmp_path / "cache_a"), hashseed=2, script=str(wrapper), mode="kill_after_step_3")
    pb = popen(RUN + dirs(b, tmp_path / "cache_b"), hashseed=3, script=str(wrapper), mode="kill_mid_save")
    pa.communicate(timeout=120), pb.communicate(timeout=120)
    return a, b, (pa.returncode, pb.returncode)


background(killed_runs, test="test_resume_after_sigkill_is_bit_exact")


def test_resume_after_sigkill_is_bit_exact(ref, jobs):
    """Two runs SIGKILLed at points chosen in advance (no clock involved): a, right after step 3 (its step-2 checkpoint
    written, step 3's work lost); b, half-way through writing step 4's checkpoint. Each resumed (here) ends as the run
    that was never interrupted (here too)."""
    a, b, codes = jobs[__name__, "killed_runs"].result()
    assert codes == (-signal.SIGKILL, -signal.SIGKILL)
    # a died after step 3: the step-2 checkpoint and the evaluations up to step 2 are all there is
    assert ckpt_step(a) == 2 and [json.loads(line)["step"] for line in open(a / "metrics.jsonl")] == [0, 2]
    # b died half-way through writing step 4's checkpoint, after logging step 4: the step-2 checkpoint is intact
    assert ckpt_step(b) == 2 and any(f.endswith(".tmp") for f in os.listdir(b))
    assert json.loads(open(b / "metrics.jsonl").readlines()[-1])["step"] == 4
    with open(b / "metrics.jsonl", "a") as f:  # and a torn line, as from a kill in the middle of logging
        f.write('{"step": 6, "meth')
    for d in (a, b):
        quiet(train.main, RUN + dirs(d, ref.cache) + ["--init_from=resume"])
    assert_same_run(ref.out, a)
    assert_same_run(ref.out, b)


def test_co_evolution_variants_freeze_what_they_say_and_resume_exactly(ref, tmp_path):
    """The paper's frozen policy (policy_frozen): the weights stay the warm-up's while the memory grows, and a resumed
    run is exact. Its frozen memory (memory_init, memory_steps=0): that memory, unchanged, while the policy trains."""
    args = RUN + ["--policy_frozen=true", "--steps=4"]
    train.main(args + dirs(tmp_path / "x", ref.cache))
    train.main(args[:-1] + ["--steps=2"] + dirs(tmp_path / "y", ref.cache))
    train.main(args + ["--init_from=resume"] + dirs(tmp_path / "y", ref.cache))
    assert_same_run(tmp_path / "x", tmp_path / "y")
    ckpt = torch.load(tmp_path / "x" / "ckpt.pt", weights_only=True)
    warm = torch.load(next((ref.cache).glob("warmup-*.pt")), weights_only=True)["model"]
    assert all(torch.equal(ckpt["model"][k], warm[k]) for k in warm)
    grown = Memory.load(str(tmp_path / "x" / "memory.json"))
    assert grown.step == 4 and grown.experience
    train.main(RUN + ["--steps=4", "--memory_steps=0", f"--memory_init={tmp_path / 'x' / 'memory.json'}"]
               + dirs(tmp_path / "z", ref.cache))
    assert Memory.load(str(tmp_path / "z" / "memory.json")).state() == grown.state()
    trained = torch.load(tmp_path / "z" / "ckpt.pt", weights_only=True)["model"]
    assert not all(torch.equal(trained[k], warm[k]) for k in warm)


@pytest.mark.parametrize("teacher", ["live", "frozen"])
def test_live_and_frozen_teachers_train_and_resume_exactly(ref, tmp_path, monkeypatch, teacher):
    """--teacher=live: the student is its own teacher (no teacher weights saved); --teacher=frozen: a copy of the
    warm-up's weights, never updated, saved and restored. A run resumed half-way ends as one that ran straight
    through."""
    teachers, real = [], train.start
    monkeypatch.setattr(train, "start", lambda *a, **k: teachers.append(real(*a, **k)) or teachers[-1])
    args = RUN + [f"--teacher={teacher}", "--method=pmd"]
    train.main(args + ["--steps=4"] + dirs(tmp_path / "x", ref.cache))
    train.main(args + ["--steps=2"] + dirs(tmp_path / "y", ref.cache))
    train.main(args + ["--steps=4", "--init_from=resume"] + dirs(tmp_path / "y", ref.cache))
    assert_same_run(tmp_path / "x", tmp_path / "y", teacher=teacher != "live")
    assert all((run.teacher is run.model) == (teacher == "live") for run in teachers) and len(teachers) == 3
    ckpt = torch.load(tmp_path / "x" / "ckpt.pt", weights_only=True)
    warm = torch.load(next(ref.cache.glob("warmup-*.pt")), weights_only=True)["model"]
    assert not all(torch.equal(ckpt["model"][k], warm[k]) for k in warm)  # the student trained
    if teacher == "frozen":
        assert all(torch.equal(ckpt["teacher"][k], warm[k]) for k in warm)
        assert all(torch.equal(a, warm[k]) for k, a in teachers[-1].teacher.state_dict().items())


def test_a_damaged_cached_warmup_is_a_cache_miss(ref, tmp_path, capsys):
    """A cached warm-up checkpoint that does not load (truncated, garbage, not a checkpoint) is retrained, with one
    'warning:' line on stderr naming it, and overwritten with the weights a run that found no file trains; the run goes
    on."""
    cache = tmp_path / "cache"
    shutil.copytree(ref.cache, cache)
    (path,) = cache.glob("warmup-*.pt")
    good = torch.load(path, weights_only=True)["model"]
    damages = dict(truncated=_truncate, garbage=lambda f: f.write_bytes(b"PK\x03\x04garbage"),
                   foreign=lambda f: torch.save(torch.zeros(3), f))
    for name, damage in damages.items():
        damage(path)
        out = tmp_path / name
        train.main(RUN + ["--steps=1"] + dirs(out, cache))
        printed = capsys.readouterr()
        warnings = [line for line in re.split(r"[\r\n]", printed.err) if line.startswith("warning:")]
        assert len(warnings) == 1 and str(path) in warnings[0] and "training the warm-up again" in warnings[0], name
        assert "warm-up: loaded" not in printed.out
        again = torch.load(path, weights_only=True)["model"]
        assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good), name
        assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1]
    assert sorted(os.listdir(cache)) == [path.name]  # overwritten in place, no temporary file left
    train.main(RUN + ["--steps=1"] + dirs(tmp_path / "after", cache))
    assert f"warm-up: loaded {path}" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# 2. atomic writes; checkpoints load with weights_only=True


class Died(Exception):
    pass


def test_interrupted_saves_leave_previous_files_loadable(tmp_path, monkeypatch):
    ckpt, mem_path = str(tmp_path / "ckpt.pt"), str(tmp_path / "memory.json")
    checkpoint.atomic_save(dict(model={"w": torch.ones(3)}, config={}, step=1), ckpt)
    mem = Memory()
    mem.step = 1
    mem.save(mem_path)
    with open(ckpt + ".tmp", "wb") as f, open(mem_path + ".tmp", "w") as g:  # leftovers of an earlier killed save
        f.write(b"PK\x03\x04garbage")
        g.write('{"settings": {')

    def dying_torch_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")
        raise Died

    def dying_json_dump(obj, f, *a, **k):
        f.write('{"version": 1, "sett')
        raise Died

    monkeypatch.setattr(torch, "save", dying_torch_save)
    monkeypatch.setattr(memory_mod.json, "dump", dying_json_dump)
    with pytest.raises(Died):
        checkpoint.atomic_save(dict(model={"w": torch.zeros(3)}, config={}, step=2), ckpt)
    mem.step = 2
    with pytest.raises(Died):
        mem.save(mem_path)
    monkeypatch.undo()
    loaded = checkpoint.load_checkpoint(ckpt)  # weights_only=True inside
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert Memory.load(mem_path).step == 1
    checkpoint.atomic_save(dict(model={"w": torch.zeros(3)}, config={}, step=3), ckpt)  # the next save goes through
    assert checkpoint.load_checkpoint(ckpt)["step"] == 3


def test_checkpoints_load_with_weights_only(ref):
    ckpt = torch.load(ref.out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 6 and {"model", "optimizer", "teacher", "py_rng", "gen_rng", "torch_rng"} <= ckpt.keys()
    for f in os.listdir(ref.cache):
        assert "model" in torch.load(ref.cache / f, map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------
# 3. clear one-line errors, no tracebacks (each case a script run as the interpreter runs it: conftest.run_script)


def _copy_run(ref, d):
    shutil.copytree(ref.out, d)


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _foreign(d, obj):
    d.mkdir()
    torch.save(obj, d / "ckpt.pt")


RESUME = ["--init_from=resume"]
ERROR_CASES = {  # id: (setup(ref, d) or None, extra argv or ("memory.py", file), expected words in the error)
    "unknown_key": (None, ["--bogus=1"], "unknown config key 'bogus'"),
    "wrong_type": (None, ["--steps=three"], "'steps' expects int"),
    "sampled_token_with_topk": (None, ["--sampled_token=true", "--topk=5"], "exclude each other"),
    "bogus_init_from": (None, ["--init_from=bogus"], "init_from='bogus' is not allowed: scratch|resume"),
    "resume_missing_ckpt": (None, RESUME, "not found"),
    "resume_truncated_ckpt": (lambda r, d: (_copy_run(r, d), _truncate(d / "ckpt.pt")), RESUME,
                              "corrupt or unreadable"),
    "resume_foreign_ckpt_tensor": (lambda r, d: _foreign(d, torch.zeros(3)), RESUME,
                                   "not a checkpoint of this project"),
    "resume_foreign_ckpt_dict": (lambda r, d: _foreign(d, {"weights": torch.zeros(3)}), RESUME,
                                 "not a checkpoint of this project"),
    "resume_truncated_memory": (lambda r, d: (_copy_run(r, d), _truncate(d / "memory.json")), RESUME,
                                "memory.json is corrupt"),
    "resume_malformed_memory": (lambda r, d: (_copy_run(r, d), _write(d / "memory.json",
                                                                        '{"settings": {"budget": 1}, "step": "six"}')),
                                RESUME, "memory.json is corrupt"),
    "memory_py_truncated": (lambda r, d: (_copy_run(r, d), _truncate(d / "memory.json")), ("report.py", "memory.json"),
                            "is corrupt or not a memory file"),
    "memory_py_malformed": (lambda r, d: (d.mkdir(), _write(d / "memory.json", "[1, 2, 3]")),
                            ("report.py", "memory.json"), "is corrupt or not a memory file"),
    "out_dir_not_writable": (lambda r, d: (d.mkdir(), _write(d / "file", "")), ["--out_dir={d}/file/out"],
                             "is not writable"),
}


@pytest.fixture(scope="module")
def error_runs(ref, tmp_path_factory):
    """Every ERROR_CASES script (conftest.run_script: as the interpreter runs it): case -> (status, stdout, stderr)."""
    root = tmp_path_factory.mktemp("errors")
    results = {}
    for name, (setup, extra, _) in ERROR_CASES.items():
        d = root / name
        if setup:
            setup(ref, d)
        if isinstance(extra, tuple):
            p = run_script(extra[0], [d / extra[1]])
        else:
            p = run_script("train.py", RUN + dirs(d, ref.cache) + [a.format(d=d) for a in extra])
        results[name] = p.returncode, p.stdout, p.stderr
    return results


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_is_one_clear_line(error_runs, case):
    rc, out, err = error_runs[case]
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc != 0 and "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert ERROR_CASES[case][2] in lines[0], lines[0]


@pytest.mark.parametrize("argv, words", [
    (["--compile=maybe"], "'compile' expects bool"),
    (["steps=3"], "expected --key=value"),
    (["--n_head=4", "--n_embd=30"], "must be an even whole number"),
    (["--replay=-1"], "replay=-1 is not allowed: [0, inf)"),
    (["--max_nonfinite=0"], "max_nonfinite=0 is not allowed: [1, inf)"),
    (["--block_size=64"], "block_size=64 is too small"),
    (["--prompts_per_step=1000"], "prompts_per_step=1000 exceeds the 48 training problems"),
])
def test_more_config_errors_in_process(ref, tmp_path, argv, words):
    """The same ValueError -> 'error: ...' path as above, checked in-process to keep the file fast."""
    with pytest.raises(ValueError) as e:
        train.main(RUN + dirs(tmp_path / "out", ref.cache) + argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def _resume_case(ref, tmp_path, edit, extra=()):
    d = tmp_path / "out"
    shutil.copytree(ref.out, d)
    edit(d)
    with pytest.raises(ValueError) as e:
        train.main(RUN + dirs(d, ref.cache) + ["--init_from=resume", *extra])
    assert "\n" not in str(e.value)
    return str(e.value)


def test_resume_errors_in_process(ref, tmp_path):
    def bump_memory_step(d):  # a kill between the two renames of a save: memory.json one save ahead of ckpt.pt
        state = json.load(open(d / "memory.json"))
        state["step"] += 2
        _write(d / "memory.json", json.dumps(state))

    def mangle_memory(d):  # valid JSON, wrong structure: would crash update() or render() mid-run if accepted
        state = json.load(open(d / "memory.json"))
        state["experience"][next(iter(state["experience"]))] = 5
        _write(d / "memory.json", json.dumps(state))

    assert "does not belong to" in _resume_case(ref, tmp_path / "a", bump_memory_step)
    assert "memory.json is corrupt" in _resume_case(ref, tmp_path / "e", mangle_memory)
    assert "cannot read" in _resume_case(ref, tmp_path / "b", lambda d: os.remove(d / "metrics.jsonl"))
    assert "does not fit this model" in _resume_case(ref, tmp_path / "c", lambda d: None, ["--n_embd=64"])
    model_only = lambda d: torch.save(dict(model={}, config={}), d / "ckpt.pt")
    assert "not one to resume from" in _resume_case(ref, tmp_path / "d", model_only)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(ref, tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        train.main(TINY + dirs(tmp_path, ref.cache) + ["--device=cuda"])


# -----------------------------------------------------------------------------
# 4. garbage never crashes the verifier or the memory


def test_garbage_completions_fuzz(tmp_path):
    task = HiddenProcedures(n_train=4, n_heldout=2)
    rng = random.Random(0)
    probs = task.train + task.heldout

    def garbage(p):
        kind = rng.randrange(8)
        if kind == 0:  # random bytes, as a sampler produces them
            return decode([rng.randrange(256) for _ in range(rng.randrange(80))]), True
        if kind == 1:
            return rng.choice(["", "\n", "|", "|\n", ",|,\n", "\x00" * 5]), True
        if kind == 2:  # over-long
            return "".join(rng.choice("abcl|,\n ") for _ in range(rng.randrange(1000, 20000))), True
        if kind == 3:  # unterminated: a right trace without its newline, or cut anywhere
            return p.solution[: rng.randrange(len(p.solution))], True
        if kind == 4:  # any unicode, surrogates included
            return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(40))), True
        if kind == 5:  # plausible: ops (and non-ops) and strings
            plan = [rng.choice(task.ops + ["", "xyz", "rev rev"]) for _ in range(rng.randrange(5))]
            steps = ["".join(rng.choice("abcdefghijklm") for _ in range(rng.randrange(8)))
                     for _ in range(rng.randrange(5))]
            return ",".join(plan) + "|" + "|".join(steps) + rng.choice(["\n", "", "\n\n"]), False
        if kind == 6:
            return task.attempt(p, rng, p_slip=0.5), False
        return p.solution, False  # right answers too, so that insights and patterns form

    mem = Memory(max_families=5, max_experiences=3, max_insights=4, budget=120)
    batch, levels_seen = [], set()
    for i in range(4000):
        p = rng.choice(probs)
        text, surely_wrong = garbage(p)
        reward, feedback = task.verify(p, text)
        strategy = task.strategy(p, text)
        assert reward in (0, 1) and isinstance(feedback, str) and feedback
        assert strategy is None or (isinstance(strategy, tuple) and all(op in task.ops for op in strategy))
        assert not (surely_wrong and reward) and (not reward or strategy is not None)
        batch.append(Rollout(p, text, [], [], reward, feedback, strategy))
        if len(batch) == 8:
            mem.update(batch)
            batch = []
            levels_seen |= {lvl for lvl, d in zip(LEVELS, (mem.experience, mem.insight, mem.pattern)) if d}
            q = rng.choice(probs)
            ctx = mem.render(q, [l for l in LEVELS if rng.random() < 0.7])
            assert len(ctx) <= 120 and all(" " <= ch <= "~" for line in ctx.splitlines() for ch in line)
    for bad in (None, b"rev|abc\n", 5):  # not even a string
        assert task.verify(probs[0], bad)[0] == 0 and task.strategy(probs[0], bad) is None
    assert levels_seen == set(LEVELS)  # the fuzz reached every level
    mem.save(str(tmp_path / "memory.json"))
    back = Memory.load(str(tmp_path / "memory.json"))
    assert json.dumps(back.state()) == json.dumps(mem.state())
    assert all(back.render(p) == mem.render(p) for p in probs)


# -----------------------------------------------------------------------------
# 5. the non-finite guard


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradient norm is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_nonfinite_steps_are_skipped_then_stop_the_run(ref, tmp_path, monkeypatch, capsys):
    real, seen = pmd.losses, []  # seen[k]: (student, teacher) weights before step k + 1

    def losses(run, *a, **k):
        seen.append(([p.detach().clone() for p in run.model.parameters()],
                     [p.detach().clone() for p in run.teacher.parameters()]))
        loss, stats = real(run, *a, **k)
        n = len(seen)
        return (loss * float("nan") if n in (3, 6) else NanGrad.apply(loss) if n == 5 else loss), stats

    monkeypatch.setattr(pmd, "losses", losses)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        train.main(RUN + dirs(out, ref.cache) + ["--max_nonfinite=2", "--updates=1"])  # one losses call per step
    msg, printed = str(e.value), capsys.readouterr().out
    assert "2 consecutive steps with a non-finite loss or gradient norm (steps 5-6)" in msg
    assert "(step 4), is intact" in msg
    assert "warning: step 3:" in printed and "warning: step 5:" in printed and "warning: step 6:" in printed
    assert "warning: step 4:" not in printed and len(seen) == 6
    same = lambda x, y: all(torch.equal(a, b) for a, b in zip(x, y))
    for who in (0, 1):  # student and EMA teacher
        assert not same(seen[1][who], seen[2][who])  # step 2 updated
        assert same(seen[2][who], seen[3][who])  # step 3 (NaN loss) skipped
        assert not same(seen[3][who], seen[4][who])  # step 4 updated
        assert same(seen[4][who], seen[5][who])  # step 5 (NaN gradient) skipped
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"), checkpoint.RESUME_KEYS)  # the last good checkpoint
    assert ckpt["step"] == 4 and same(list(ckpt["model"].values()), seen[4][0])
    assert all(s["step"] == 3 for s in ckpt["optimizer"]["state"].values())  # optimizer stepped on 1, 2 and 4 only
    assert Memory.load(str(out / "memory.json")).step == ckpt["memory_step"] == 4
