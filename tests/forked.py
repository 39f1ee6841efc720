"""`python tests/forked.py SCRIPT ARGS...`: `python SCRIPT ARGS...` (a script of the repository), except that each
`python train.py ...` it starts with subprocess.run is a fork of this process, which has imported torch (and
torch._dynamo, which the optimizer imports) once: a child Python would spend about 2 s of CPU on those imports
before its run. The forked child is still a process of its own: train.py runs in it as __main__ with the arguments,
environment and output files subprocess.run was given, and its exit status is the run's.

`python tests/forked.py -c CODE ARGS...`: the same for `python -c CODE ARGS...`.
`python tests/forked.py --ranks=N SCRIPT ARGS...`: SCRIPT's N ranks, forked likewise (see ranks)."""
import os
import runpy
import subprocess
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = REPO  # as for `python SCRIPT`: the script's directory first

import torch  # noqa: E402

import train  # noqa: E402, F401  (what every forked run imports, imported before any fork)

torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())  # imports torch._dynamo, before any fork
TRAIN = os.path.join(REPO, "train.py")
real_run = subprocess.run


def child(args, stdout, stderr, env):
    """In the forked process: train.py as the interpreter runs it; returns its exit status."""
    out = stdout.fileno() if hasattr(stdout, "fileno") else None
    if out is not None:
        os.dup2(out, 1)
    if stderr == subprocess.STDOUT:
        os.dup2(1, 2)
    elif hasattr(stderr, "fileno"):
        os.dup2(stderr.fileno(), 2)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sys.argv = list(args[1:])
    try:
        runpy.run_path(args[1], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def run(args, *rest, stdout=None, stderr=None, env=None, **kwargs):
    """subprocess.run, with `python train.py ...` (no other options) forked."""
    args = list(args) if not isinstance(args, str) else args
    if rest or kwargs or isinstance(args, str) or args[:2] != [sys.executable, TRAIN]:
        return real_run(args, *rest, stdout=stdout, stderr=stderr, env=env, **kwargs)
    for f in (stdout, stderr, sys.stdout, sys.stderr):
        if hasattr(f, "flush"):
            f.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(args, stdout, stderr, env)
        finally:
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except Exception:
                    pass
            os._exit(code if 0 <= code < 256 else 1)
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status))


def ranks(n, script, args):
    """`torchrun --standalone --nproc_per_node=n script args` on one machine, its ranks forked from this process: each
    gets the variables torchrun sets (the process group's address on a free port) and runs script as __main__; when a
    rank fails the others are stopped, as torchrun stops them. Exits with the first failed rank's status, else 0."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sys.stdout.flush(), sys.stderr.flush()
    pids = []
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                           WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), ROLE_WORLD_SIZE=str(n),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                code = child([sys.executable, script, *args], None, None, env)
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code if 0 <= code < 256 else 1)
        pids.append(pid)
    codes, failed = {}, 0
    while len(codes) < n:
        pid, status = os.wait()
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] and not failed:
            failed = codes[pid] if codes[pid] > 0 else 1
            for other in pids:
                if other not in codes:
                    os.kill(other, signal.SIGTERM)
    sys.exit(failed)


subprocess.run = run
if sys.argv[1].startswith("--ranks="):
    ranks(int(sys.argv[1].split("=")[1]), os.path.abspath(sys.argv[2]), sys.argv[3:])
if sys.argv[1] == "-c":  # python -c CODE ARGS...
    code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
else:
    script = os.path.join(REPO, sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
