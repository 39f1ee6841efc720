"""Every setting is checked before any work: a bad value of any key, or a task missing part of the interface, stops
with one line naming it, before the task is built, the warm-up runs or a file is written."""
import math
import os
import re
from types import SimpleNamespace

import pytest

import bench
import config
import train
from addition_task import AdditionTask
from conftest import run_script

BAD = ("x1", "0", "-1", "nan", "inf", "-inf", "1e30", "10000000000000")  # wrong type, zero, negative, non-finite, huge


class Reached(Exception):
    """Raised in place of the warm-up: the value passed every check, and nothing was trained before them."""


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """train.main with the warm-up replaced by Reached, and a record of every task built, in an empty directory."""
    built = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "warmup", lambda *a: (_ for _ in ()).throw(Reached()))
    monkeypatch.setattr(train, "make_task", lambda c, make=train.make_task: built.append(c) or make(c))
    return built


def outcome(argv, task=None):
    """'valid' if the run got as far as the warm-up, else its error message (a ValueError; any other exception
    fails)."""
    try:
        train.main(argv, task=task)
    except Reached:
        return "valid"
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{argv}: returned without reaching the warm-up")


# why a value inside its key's own range may still be refused: a combination of settings, named in the message
COMBINATIONS = ("must be an even whole number", "is too small", "exceeds the", "exceed the", "needs at least",
                "(at most n_ops", "(at most input_len", "exclude each other", "must be divisible", "memory_init: ",
                "CUDA is not available", "CUDA device")
SLOW = {("plan_len", "6")}  # in range, but builds all 6**6 plans (20 s) to find none unambiguous at answer_len=2


INTERVAL = re.compile(r"([\[(])(\S+), (\S+)([\])])")


def within(text, v):
    """Whether v is allowed by an allowed-values text as config.allowed_values() gives it, read here independently of
    config.py: an interval '[lo, hi]' / '(lo, inf)' (a round bracket leaves its end out), or choices 'a|b|cuda:N'
    (N: any number), with ', comma-separated' a list of them."""
    if m := INTERVAL.fullmatch(text):
        lo, hi = float(m[2]), float(m[3])
        return (lo <= v if m[1] == "[" else lo < v) and (v <= hi if m[4] == "]" else v < hi)
    choices = text.split(", ")[0].split("|")
    one = lambda x: any(x == c or (c.endswith(":N") and re.fullmatch(re.escape(c[:-1]) + r"\d+", x)) for c in choices)
    return all(one(x) for x in v.split(",") if x) if text.endswith(", comma-separated") else one(v)


def edges(text, typ):
    """(outside, inside) for an allowed-values text: the values just past and at each finite end of an interval; for
    choices, near misses (a suffix, upper case) and the choices themselves."""
    if m := INTERVAL.fullmatch(text):
        step, fmt = (1, lambda v: str(int(v))) if typ is int else (1e-3, repr)
        lo, hi, outside, inside = float(m[2]), float(m[3]), [], []
        if math.isfinite(lo):
            outside.append(lo - step if m[1] == "[" else lo)
            inside.append(lo if m[1] == "[" else lo + step)
        if math.isfinite(hi):
            outside.append(hi + step if m[4] == "]" else hi)
            inside.append(hi if m[4] == "]" else hi - step)
        return [fmt(v) for v in outside], [fmt(v) for v in inside]
    choices = [c.replace(":N", ":0") for c in text.split(", ")[0].split("|")]
    outside = [c + "x" for c in choices] + [c.upper() for c in choices]
    if text.endswith(", comma-separated"):  # a list: every item must be a choice
        outside.append(f"{choices[0]},{choices[-1]}x")
        choices.append(f"{choices[0]},{choices[-1]}")
    return outside, choices


def test_ranges_are_read_as_stated():
    """The reading the walk below relies on."""
    assert edges("(0, 1]", float) == (["0.0", "1.001"], ["0.001", "1.0"])
    assert edges("[1, inf)", int) == (["0"], ["1"])
    assert edges("a|cuda:N", str) == (["ax", "cuda:0x", "A", "CUDA:0"], ["a", "cuda:0"])
    assert edges("a|b, comma-separated", str) == (["ax", "bx", "A", "B", "a,bx"], ["a", "b", "a,b"])
    outside, inside = edges("[-1, 3]", int)
    assert not any(within("[-1, 3]", int(v)) for v in outside) and all(within("[-1, 3]", int(v)) for v in inside)
    assert within("a|cuda:N", "cuda:12") and not within("a|cuda:N", "cuda:") and within("a|b, comma-separated", "b,a,")


@pytest.mark.parametrize("key", config.CONFIG_KEYS)
def test_every_key_with_bad_values_is_valid_or_one_line_naming_it(guarded, tmp_path, key):
    """Each key with BAD values and with the values at and just past the ends of its stated range: a value outside
    the range (or of the wrong type, or not finite) is refused in one line naming the key and what is allowed; one
    inside is accepted (the run gets as far as the warm-up) or refused for a combination of settings (COMBINATIONS).
    Nothing is built or written before a refusal."""
    spec, typ = config.allowed_values()[key], type(getattr(config, key))
    outside, inside = edges(spec[0], typ) if spec else ([], [])
    if key == "init_from":
        inside.remove("resume")  # continues a run: an empty out_dir has none (ERROR_CASES in test_reliability.py)
    for val in [*BAD, *outside, *inside]:
        if (key, val) in SLOW:
            continue
        out = tmp_path / f"out-{val}"
        guarded.clear()
        msg = outcome(["--cache_dir=cache", f"--out_dir={out}", f"--{key}={val}"])  # the last value of a key wins
        try:
            v = (val.lower() in ("true", "1", "false", "0") or None) if typ is bool else typ(val)
        except ValueError:
            v = None  # not of the key's type
        if v is None:
            refusal = "expects"
        elif spec is None:  # a path or a boolean: any value of the type is allowed
            refusal = None
        elif isinstance(v, float) and not math.isfinite(v):
            refusal = "is not a finite number"
        elif not within(spec[0], v):
            refusal = f"is not allowed: {spec[0]}"
        else:
            refusal = COMBINATIONS
        assert (val in outside) <= (refusal not in (None, COMBINATIONS))  # the reading and the edges agree
        assert (val in inside) <= (refusal is COMBINATIONS)
        if msg == "valid":
            assert refusal in (None, COMBINATIONS), (key, val, f"accepted, but should be refused: {refusal}")
            continue
        assert "\n" not in msg and key in msg, (key, val, msg)
        if isinstance(refusal, str):
            assert refusal in msg, (key, val, msg)
        elif refusal is COMBINATIONS:
            assert any(why in msg for why in COMBINATIONS), (key, val, f"refused inside its range: {msg}")
        assert not guarded and not out.exists(), (key, val, "work started before the error")


@pytest.mark.parametrize("argv, words", [
    (["--device=mps"], "device='mps' is not allowed: auto|cpu|cuda|cuda:N"),
    (["--n_head=0"], "n_head=0 is not allowed: [1, inf)"),
    (["--n_head=3"], "n_embd=128 / n_head=3 must be an even whole number"),
    (["--lr=-1"], "lr=-1.0 is not allowed: (0, 1]"),
    (["--lr=nan"], "lr=nan is not a finite number"),
    (["--n_layer=0"], "n_layer=0 is not allowed"),
    (["--mem_budget=-5"], "mem_budget=-5 is not allowed: [0, inf)"),
    (["--memory_levels=insight,foo"], "memory_levels='insight,foo' is not allowed"),
    (["--n_groups=7"], "n_groups=7 is not allowed: [1, 6]"),
    (["--n_train=300000"], "exceed the 248832 distinct inputs"),
    (["--group_size=100000000"], "needs at least"),
    (["--mem_budget=300"], "block_size=256 is too small: mem_budget=300"),
])
def test_the_error_says_what_is_allowed(guarded, argv, words):
    msg = outcome(argv)
    assert words in msg and not guarded, msg


def test_every_comment_states_what_is_allowed():
    """Every setting but the booleans and the paths has a parsed range or set (the check reads the comment)."""
    specs = config.allowed_values()
    assert set(specs) == set(config.CONFIG_KEYS)
    free = {k for k, v in specs.items() if v is None}
    booleans = {k for k in config.CONFIG_KEYS if isinstance(getattr(config, k), bool)}
    assert free == booleans | {"out_dir", "cache_dir", "memory_init"}, free


def test_pointless_settings_warn_in_one_line(guarded, capsys):
    cases = {"--mem_budget=5": "mem_budget=5 holds no memory line", "--warmup_steps=0": "warmup_steps=0",
             "--memory_levels=": "memory_levels is empty", "--memory_steps=0": "memory_steps=0",
             "--method=grpo --group_size=1": "group_size=1", "--method=sdpo --temperature=0": "temperature=0",
             "--replay_weight=0": "replay_weight=0",
             "--method=sdpo --transient=true": "only PMD's teacher reads the memory"}
    for args, words in cases.items():
        assert outcome(args.split() + ["--out_dir=o"]) == "valid"
        warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
        assert len(warnings) == 1 and words in warnings[0], (args, warnings)
    assert outcome(["--out_dir=o"]) == "valid" and "warning" not in capsys.readouterr().err  # the defaults make sense


def without(task, member):
    """The task's interface without one member."""
    return SimpleNamespace(**{m: getattr(task, m) for m in config.TASK_INTERFACE if m != member})


@pytest.mark.parametrize("member", config.TASK_INTERFACE)
def test_a_task_missing_any_interface_member_is_named(guarded, member):
    msg = outcome(["--out_dir=o"], task=without(AdditionTask(), member))
    assert msg.startswith("task SimpleNamespace lacks ") and member in msg and "\n" not in msg
    assert not os.path.exists("o")


def test_a_task_with_unusable_members_is_named(guarded):
    task = AdditionTask()
    broken = dict(solve=5, max_completion=0, train=[], heldout=[SimpleNamespace(pid="x")])
    for member, value in broken.items():
        t = without(task, "")
        setattr(t, member, value)
        msg = outcome(["--out_dir=o"], task=t)
        assert member in msg and "\n" not in msg, msg
    assert outcome(["--out_dir=o"], task=without(task, "")) == "valid"


def test_cli_errors_are_one_line_before_any_file(tmp_path):
    """The issue's cases through `python train.py`: exit 1, one 'error:' line, no traceback, nothing written."""
    args = ("--device=mps", "--n_head=0", "--lr=-1", "--lr=nan", "--n_layer=0", "--mem_budget=-5")
    procs = [run_script("train.py", [arg], cwd=tmp_path) for arg in args]
    for arg, p in zip(args, procs):
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
        assert arg[2:].split("=")[0] in lines[0], p.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("opt, words", [("--seeds=1,1", "seeds='1,1'"), ("--seeds=-3", "seeds='-3'"),
                                        ("--seeds=nan", "seeds='nan'"),
                                        ("--workers=0", "workers=0"), ("--workers=nan", "'workers' expects int"),
                                        ("--variants=pmd,ppo", "variants='pmd,ppo'"), ("--variants=", "variants=''"),
                                        ("--difficulty --knob=plan_len:1,9", "plan_len=9"),
                                        ("--difficulty --knob=foo:1", "knob='foo:1'"),
                                        ("--bench_dir=", "bench_dir")])
def test_bench_options_are_checked_before_any_work(tmp_path, monkeypatch, opt, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        bench.main(opt.split())
    assert words in str(e.value) and "\n" not in str(e.value) and os.listdir(tmp_path) == []
