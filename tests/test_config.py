"""Every setting is checked before any work: a bad value of any key, or a task missing part of the interface, stops
with one line naming it, before the task is built, the warm-up runs or a file is written."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import bench
import config
import train
from addition_task import AdditionTask
from conftest import REPO, subprocess_env

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
    """'valid' if the run got as far as the warm-up, else its error message (a ValueError; any other exception fails)."""
    try:
        train.main(argv, task=task)
    except Reached:
        return "valid"
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{argv}: returned without reaching the warm-up")


@pytest.mark.parametrize("key", config.CONFIG_KEYS)
def test_every_key_with_bad_values_is_valid_or_one_line_naming_it(guarded, tmp_path, key):
    for val in BAD:
        out = tmp_path / f"out-{val}"
        guarded.clear()
        msg = outcome(["--cache_dir=cache", f"--out_dir={out}", f"--{key}={val}"])  # the last value of a key wins
        if msg == "valid":
            continue
        assert "\n" not in msg and key in msg, (key, val, msg)
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
    assert free == {k for k in config.CONFIG_KEYS if isinstance(getattr(config, k), bool)} | {"out_dir", "cache_dir", "memory_init"}, free


def test_pointless_settings_warn_in_one_line(guarded, capsys):
    cases = {"--mem_budget=5": "mem_budget=5 holds no memory line", "--warmup_steps=0": "warmup_steps=0",
             "--memory_levels=": "memory_levels is empty", "--memory_steps=0": "memory_steps=0",
             "--method=grpo --group_size=1": "group_size=1", "--method=sdpo --temperature=0": "temperature=0",
             "--replay_weight=0": "replay_weight=0", "--method=sdpo --transient=true": "only PMD's teacher reads the memory"}
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
    assert msg.startswith("task SimpleNamespace lacks ") and member in msg and "\n" not in msg and not os.path.exists("o")


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
    for arg in ("--device=mps", "--n_head=0", "--lr=-1", "--lr=nan", "--n_layer=0", "--mem_budget=-5"):
        p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), arg], cwd=tmp_path, env=subprocess_env(),
                           capture_output=True, text=True, timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and arg[2:].split("=")[0] in lines[0], p.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("opt, words", [("--seeds=1,1", "seeds='1,1'"), ("--seeds=-3", "seeds='-3'"), ("--seeds=nan", "seeds='nan'"),
                                        ("--workers=0", "workers=0"), ("--workers=nan", "'workers' expects int"),
                                        ("--variants=pmd,ppo", "variants='pmd,ppo'"), ("--variants=", "variants=''"),
                                        ("--knob=plan_len:1,9", "plan_len=9"), ("--knob=foo:1", "knob='foo:1'"), ("--bench_dir=", "bench_dir")])
def test_bench_options_are_checked_before_any_work(tmp_path, monkeypatch, opt, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        bench.main([opt])
    assert words in str(e.value) and "\n" not in str(e.value) and os.listdir(tmp_path) == []
