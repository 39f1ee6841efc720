"""End to end: train.main with a tiny config for each method (files, metrics, the shared warm-up cache), and the
one-line errors of `python train.py` on bad settings."""
import glob
import hashlib
import json
import os

import pytest
import torch

import config
import train
from conftest import GS, PPS, STEPS, TINY, quiet, run_script
from memory import Memory
from model import GPT, GPTConfig
from verify import RANGES, span

METHODS = ("grpo", "sdpo", "pmd")
DEFAULTS = {k: getattr(config, k) for k in config.CONFIG_KEYS}


def digest(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three methods, one after the other, sharing one warm-up cache; each run's student and teacher weights as
    train.start hands them to the loop, before any step."""
    root = tmp_path_factory.mktemp("e2e")
    cache = root / "cache"
    res, started, real = {}, [], train.start

    def start(*a, **k):
        run = real(*a, **k)
        started.append((weights(run.model), weights(run.teacher)))
        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "start", start)
        for m in METHODS:
            out = root / m
            _, printed = quiet(train.main, TINY + [f"--method={m}", f"--out_dir={out}", f"--cache_dir={cache}"])
            files = sorted(glob.glob(str(cache / "*")))
            res[m] = dict(out=out, printed=printed, cache=files, start=started[-1][0], start_teacher=started[-1][1],
                          cache_state=[(f, os.stat(f).st_mtime_ns, digest(f)) for f in files])
    return res


def metrics(run):
    return [json.loads(line) for line in open(run["out"] / "metrics.jsonl")]


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_loads_weights_only(runs, method):
    """ckpt.pt loads with weights_only=True, is at the last step, and its weights fit the configured model."""
    ckpt = torch.load(runs[method]["out"] / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["rollouts"] == STEPS * PPS * GS and ckpt["config"]["method"] == method
    GPT(GPTConfig(256, 1, 2, 32)).load_state_dict(ckpt["model"])
    assert "teacher" in ckpt  # the default teacher is an EMA copy, saved for resuming


@pytest.mark.parametrize("method", METHODS)
def test_memory_file_loads(runs, method):
    """memory.json loads with Memory.load and holds one update per step (every method keeps a memory)."""
    mem = Memory.load(str(runs[method]["out"] / "memory.json"))
    assert mem.step == STEPS
    assert 1 <= sum(map(len, mem.experience.values())) <= STEPS * PPS * GS
    # a family's clusters, its letter's first
    assert {g.split()[0] for g in mem.groups.values()} <= {"A**", "B**", "C**"}


def share_of(x, n):
    """Whether x is a share of n things: k / n for a whole k in 0..n."""
    return 0 <= x <= 1 and abs(x * n - round(x * n)) < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_metrics_records(runs, method):
    """metrics.jsonl starts at step 0 with 0 rollouts, then logs every eval_interval and the last step, cumulatively.
    An accuracy is the share of an evaluation set's problems solved (24 held-out, 12 unseen), pass@k from 16 samples
    of each, and reward the mean over the steps since the last evaluation of each step's share of its 4 rollouts."""
    recs = metrics(runs[method])
    assert [r["step"] for r in recs] == [0, 2, 3]
    passes = {f"{s}_pass@{k}" for s in ("heldout", "unseen") for k in (1, 4, 16)}
    sizes = dict(heldout=24, unseen=12)
    for i, r in enumerate(recs):
        assert {"step", "method", "rollouts", "heldout_acc", "teacher_acc", "unseen_acc",
                "teacher_unseen_acc"} <= set(r) and r["method"] == method
        assert (passes <= set(r)) == (i in (0, len(recs) - 1))  # pass@k at the ends
        assert all(share_of(r[f"{s}_pass@1"], 16 * n) for s, n in sizes.items() if f"{s}_pass@1" in r)
        assert all(0 <= r[k] <= 1 for k in passes & set(r)) and r["rollouts"] == r["step"] * PPS * GS
        for key, n in (("heldout_acc", 24), ("teacher_acc", 24), ("unseen_acc", 12), ("teacher_unseen_acc", 12)):
            assert share_of(r[key], n), (key, r[key])
        for name, key in (("heldout", "heldout_acc"), ("unseen", "unseen_acc")):  # as many problems per family
            fams = r["family_acc"][name]
            assert sum(fams.values()) / len(fams) == pytest.approx(r[key], abs=2e-3)
    assert recs[0]["heldout_pass@1"] <= recs[0]["heldout_pass@4"] <= recs[0]["heldout_pass@16"]
    assert all(a["rollouts"] < b["rollouts"] for a, b in zip(recs, recs[1:]))
    assert "reward" not in recs[0] and share_of(recs[1]["reward"], 2 * PPS * GS) and share_of(recs[2]["reward"],
                                                                                           PPS * GS)


def test_methods_start_from_the_same_weights(runs):
    """Every method's RL starts from the warm-up checkpoint's weights, bit for bit (the first run trained it, the others
    loaded it), its teacher from the same; so the step-0 evaluation is identical for every method."""
    warm = torch.load(runs[METHODS[0]]["cache"][0], weights_only=True)["model"]
    init = weights(GPT(GPTConfig(256, 1, 2, 32)))
    assert any(not torch.equal(warm[k], init[k]) for k in warm)  # the warm-up trained: its weights are its own
    for m in METHODS:
        for key in ("start", "start_teacher"):
            got = runs[m][key]
            assert got.keys() == warm.keys() and all(torch.equal(got[k], warm[k]) for k in warm), (m, key)
    firsts = [metrics(runs[m])[0] for m in METHODS]
    assert len({(f["heldout_acc"], f["teacher_acc"]) for f in firsts}) == 1


def test_warmup_cache_is_reused_by_other_methods(runs):
    """The first run writes one warm-up file; the later methods load that same file and train no warm-up."""
    first, later = runs[METHODS[0]], [runs[m] for m in METHODS[1:]]
    assert len(first["cache"]) == 1 and "warm-up: loaded" not in first["printed"]
    for run in later:
        assert run["cache_state"] == first["cache_state"]  # same file, same mtime, same bytes
        assert f"warm-up: loaded {first['cache'][0]}" in run["printed"]


CLI_ERRORS = {
    "unknown key": (["--bogus_key=1"], "bogus_key"),
    "int expected": (["--steps=abc"], "steps"),
    "bool expected": (["--adv_std=maybe"], "adv_std"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """`python train.py` with each of CLI_ERRORS' arguments, and with --help, each in a directory of its own: name ->
    (the directory, the finished script)."""
    runs = {}
    for name, (args, _) in CLI_ERRORS.items():
        d = tmp_path_factory.mktemp("cli")
        runs[name] = d, [*args, f"--out_dir={d / 'out'}", f"--cache_dir={d / 'cache'}"]
    runs["help"] = tmp_path_factory.mktemp("help"), ["--help"]
    return {name: (d, run_script("train.py", args, cwd=d)) for name, (d, args) in runs.items()}


def test_cli_config_errors_are_one_line(cli):
    """Bad settings make `python train.py` exit non-zero with one 'error: ...' line naming the key, no traceback."""
    for name, (_, key) in CLI_ERRORS.items():
        d, p = cli[name]
        err = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(err) == 1, (name, p.stderr[-400:])
        assert err[0].startswith("error: ") and key in err[0], (name, p.stderr[-400:])
        assert "Traceback" not in p.stderr
        assert os.listdir(d) == []  # refused before any work: neither out_dir nor cache_dir


def test_help_lists_every_setting_and_the_tuned_rows(cli):
    """`python train.py --help`: exit 0, every key of config.CONFIG_KEYS as a `key = default  # allowed: ...` line
    (a task setting's range from verify.RANGES), TUNED as it is, and nothing written."""
    d, p = cli["help"]
    assert p.returncode == 0 and not p.stderr and os.listdir(d) == [], p.stderr[-400:]
    lines = {line.split(" = ", 1)[0]: line for line in p.stdout.splitlines() if " = " in line}
    assert set(config.CONFIG_KEYS) <= set(lines), set(config.CONFIG_KEYS) - set(lines)
    allowed = config.allowed_values()
    for key in config.CONFIG_KEYS:
        default = lines[key].split(" = ", 1)[1].split("  # ", 1)[0]  # as written: 2e-3, TUNED["pmd"]["lr"]
        assert eval(default, {"TUNED": config.TUNED}) == getattr(config, key), lines[key]
        assert allowed[key] is None or f"  # {allowed[key][0]}" in lines[key], lines[key]
    assert all(f"  # {span(k)}: " in lines[k] for k in RANGES)
    assert f"TUNED = {config.TUNED!r}" in p.stdout and all(m in p.stdout for m in config.TUNED)


@pytest.mark.parametrize("method", list(config.TUNED))
def test_each_method_runs_at_its_tuned_row_unless_a_key_is_given(method):
    """parse_args: lr, replay_weight and updates default to TUNED[method]; one given on the command line wins,
    wherever it stands, and the row fills the others."""
    row = config.TUNED[method]
    c = config.parse_args([f"--method={method}"])
    assert {k: getattr(c, k) for k in row} == row and c.method == method
    mine = dict(lr=0.0123, replay_weight=0.25, updates=7)  # no row has these
    assert not any(row[k] == v for tuned in config.TUNED.values() for k, v in mine.items() for row in [tuned])
    for key, value in mine.items():
        for argv in ([f"--method={method}", f"--{key}={value}"], [f"--{key}={value}", f"--method={method}"]):
            c = config.parse_args(argv)
            assert {k: getattr(c, k) for k in row} == dict(row, **{key: value}), argv
    assert {k: getattr(config.parse_args([]), k) for k in row} == config.TUNED[config.method]  # the default method


@pytest.mark.parametrize("arg", ["--lr=fast", "--steps=1.5", "--method=ppo", "--teacher=old",
                                 "--memory_levels=insight,foo",
                                 "--alpha=2", "--steps=0", "--n_embd=30", "--replay=-1", "stray"])
def test_bad_settings_raise_value_error(arg):
    """parse_args refuses wrongly typed, unknown-choice and out-of-range values with a ValueError naming the key."""
    with pytest.raises(ValueError, match=arg.lstrip("-").split("=")[0]):
        config.parse_args([arg])


@pytest.mark.parametrize("arg", ["--topk=-1", "--topk=257", "--is_clip=-1", "--temperature=-0.5", "--ema_rate=1.5"])
def test_out_of_range_settings_are_refused(arg):
    """Values that would crash mid-run or silently invert the update are refused up front with a ValueError naming
    the key."""
    # topk outside [0, 256] crashes in topk_with_tail after the warm-up; is_clip < 0 flips the distillation loss's sign;
    # temperature < 0 samples the least likely tokens; ema_rate outside [0, 1] extrapolates the teacher
    key = arg[2:].split("=")[0]
    with pytest.raises(ValueError, match=key):
        config.parse_args([arg])


def test_valid_overrides_are_typed():
    """--key=value is converted to the default's type."""
    c = config.parse_args(["--steps=7", "--lr=0.5", "--adv_std=false", "--method=sdpo", "--topk=8"])
    assert (c.steps, c.lr, c.adv_std, c.method, c.topk) == (7, 0.5, False, "sdpo", 8)


def test_pass_at_k_is_the_unbiased_estimate(monkeypatch):
    """With r of n = 16 samples right, pass@k is 1 - C(16 - r, k) / C(16, k), averaged over problems: pass@1 is the
    share of right samples, pass@16 the share of problems with any right sample."""
    from types import SimpleNamespace
    from verify import HiddenProcedures
    task = HiddenProcedures(n_train=1, n_heldout=1)
    probs, right = task.heldout[:3], (0, 1, 16)
    comps = [[task.solve(p) if j < r else "x\n" for j in range(16)] for p, r in zip(probs, right)]
    monkeypatch.setattr(train, "generate", lambda *a, **k: ([list(y.encode()) for c in comps for y in c], None))
    got = train.pass_at_k(None, task, probs, SimpleNamespace(seed=0, temperature=1.0), "cpu")
    assert got[1] == pytest.approx((0 + 1 / 16 + 1) / 3) and got[16] == pytest.approx(2 / 3)
    assert got[4] == pytest.approx((0 + 4 / 16 + 1) / 3) and train.pass_at_k(None, task, [], None, "cpu") == {}


@pytest.mark.parametrize("method", ["grpo", "pmd"])
def test_several_updates_per_batch_sample_and_reflect_once_and_step_the_optimizer_each_time(tmp_path, method):
    runs = {}
    for n in (1, 3):
        args = TINY + [f"--method={method}", f"--updates={n}", f"--out_dir={tmp_path / str(n)}",
                       f"--cache_dir={tmp_path / 'cache'}"]
        c, task, device, _, _ = train.setup(args)
        run, _ = quiet(train.start, c, task, device)
        train.step(run, run.rng.sample(task.train, c.prompts_per_step))
        runs[n] = run
    assert torch.equal(runs[1].gen.get_state(), runs[3].gen.get_state())  # one batch of rollouts either way
    assert runs[1].memory.state() == runs[3].memory.state()  # and one memory update
    adam_steps = lambda run: {int(s["step"]) for s in run.opt.state_dict()["state"].values()}
    assert adam_steps(runs[1]) == {1} and adam_steps(runs[3]) == {3} and runs[3].step == 1
