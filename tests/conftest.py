"""Shared set-up: the repository on sys.path, one torch thread (a 2-core CPU runs tiny models far faster
single-threaded), and small factories for problems and rollouts."""
import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
for p in (REPO, TESTS):
    if p not in sys.path:
        sys.path.insert(0, p)

torch.set_num_threads(1)

from pmd import Rollout  # noqa: E402
from verify import Problem  # noqa: E402


def subprocess_env():
    """Environment for child Pythons: one thread, no distributed variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def run_script(script, args, cwd=None):
    """`python script *args` (a script of the repository) run as __main__ in this process, as the interpreter runs a
    script: stdout and stderr captured; a SystemExit's code is the exit status (a message goes to stderr, status 1), an
    uncaught exception prints its traceback and gives 1. A child interpreter would first spend about 3 s of CPU
    importing torch; this one has. test_cli.py checks that the two give the same status and output."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, here = sys.argv, os.getcwd()
    try:
        sys.argv = [script, *map(str, args)]
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess([sys.executable, script, *args], code, out.getvalue(), err.getvalue())


def run_together(commands, timeout=120):
    """subprocess.run for several commands (dicts of Popen arguments), all started at once: each child Python spends
    about 2 s importing torch, and a 2-core machine runs two at a time. Their results, in order."""
    procs = [subprocess.Popen(**dict(dict(env=subprocess_env(), text=True), **cmd), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for cmd in commands]
    done = [(p, *p.communicate(timeout=timeout)) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, out, err in done]


def problem(family, s, group=None):
    """A problem keyed like the built-in task's (the memory only reads the keys and the prompt)."""
    return Problem(pid=f"{family}:{s}", family=family, group=group or family[0], prompt=f"{family}:{s}>",
                   solution="-\n")


def rollout(prob, reward, strategy, completion=None, feedback=None):
    """A pmd.Rollout with the fields Memory.update reads."""
    completion = completion if completion is not None else (",".join(strategy or ("x",)) + f"|{prob.pid}|{reward}\n")
    feedback = feedback if feedback is not None else ("ok" if reward else "wrong plan")
    return Rollout(prob, completion, [], [], reward, feedback, strategy)



# a tiny end-to-end configuration: a 1-layer model, 3 warm-up steps, 3 RL steps of 2 problems x 2 samples
PPS, GS, STEPS = 2, 2, 3
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--warmup_steps=3", "--warmup_batch=8", f"--steps={STEPS}",
        f"--prompts_per_step={PPS}", f"--group_size={GS}", "--eval_interval=2", "--replay=2", "--n_train=4",
        "--n_heldout=2", "--device=cpu"]


def quiet(fn, *args, **kwargs):
    """Call fn and return (its result, what it printed); stderr (tqdm's bars) is swallowed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        result = fn(*args, **kwargs)
    return result, out.getvalue()


def tiny_run(task, memory=None, seed=0, **settings):
    """What pmd.step reads from a run (train.start builds the real one), for a tiny untrained model on task.
    settings override the defaults below (replay off, the memory written every step, one update)."""
    import random
    from types import SimpleNamespace

    from memory import Memory
    from model import GPT, GPTConfig
    from pmd import make_teacher

    c = dict(group_size=2, prompts_per_step=2, temperature=1.0, method="pmd",
             memory_levels="experience,insight,pattern", pg_weight=0.0, adv_std=False, alpha=0.0, topk=0,
             sampled_token=False, is_clip=0.0, transient=False, policy_frozen=False, reflect="count", updates=1,
             memory_steps=-1, replay=0, replay_weight=1.0, lr=1e-3, lr_warmup=0, grad_clip=1.0, teacher="ema",
             ema_rate=0.05)
    c = SimpleNamespace(**{**c, **settings})
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=16))
    return SimpleNamespace(c=c, task=task, device="cpu", rank=0, world=1, model=model, student=model,
                           teacher=make_teacher(model, c.teacher), memory=Memory() if memory is None else memory,
                           step=0, rollouts=0, levels=[lvl for lvl in c.memory_levels.split(",") if lvl],
                           mem_settings={}, clock=lambda phase: None, rng=random.Random(seed),
                           opt=torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0),
                           gen=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# background jobs: the slowest tests are processes (bench.py's runs, torchrun's ranks) whose start is mostly imports
# and whose runs wait on each other. Every job a selected test needs starts with the session, two at a time, in
# the order of their modules, so that they run beside the in-process tests (one core's work) instead of after them.

BACKGROUND = {}  # (module, name) -> (fn(tmp_path), the one test that needs it or None: all the module's)


def background(fn, test=None):
    """Register fn(tmp_path) as a job of its module, run if a test of the module (or the test named) is selected:
    `jobs[fn.__module__, fn.__name__]` is a future of its result."""
    BACKGROUND[fn.__module__, fn.__name__] = fn, test
    return fn


def in_background(body):
    """A test whose body(tmp_path) is a background job: the test waits for it, and fails with its error."""
    background(body, test=body.__name__)

    def test(jobs):
        jobs[body.__module__, body.__name__].result()

    test.__name__, test.__doc__, test.__module__ = body.__name__, body.__doc__, body.__module__
    return test


@pytest.fixture(scope="session", autouse=True)
def jobs(request, tmp_path_factory):
    """The jobs that the selected tests need, two at a time in threads; the session ends when they have."""
    selected = [(item.module.__name__, item.originalname) for item in request.session.items if hasattr(item, "module")]
    modules = list(dict.fromkeys(module for module, _ in selected))
    wanted = [key for key, (fn, test) in BACKGROUND.items()
              if key[0] in modules and (test is None or (key[0], test) in selected)]
    wanted.sort(key=lambda key: modules.index(key[0]))
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {key: pool.submit(BACKGROUND[key][0], tmp_path_factory.mktemp(key[1][:30])) for key in wanted}
