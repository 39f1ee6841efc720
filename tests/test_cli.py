"""conftest.run_script, which the CLI tests use, against the interpreter itself: a script run in this process and the
same script run by `python` give the same exit status, stdout and stderr, for --help (train.py's docstring, as
__main__'s), a refused setting (the scripts' one-line error) and a report; a crash is a traceback and status 1 in
both."""
import sys

import pytest

from conftest import REPO, problem, rollout, run_script, run_together
from memory import Memory


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    mem = Memory()
    mem.update([rollout(problem("A10", s), 1, ("rev", "inc")) for s in "ab"] + [rollout(problem("A11", "a"), 0, None)])
    mem.save(str(root / "memory.json"))
    return {"train.py --help": ("train.py", ["--help"]), "train.py --lr=nan": ("train.py", ["--lr=nan"]),
            "report.py FILE": ("report.py", [root / "memory.json"])}, root


def test_a_script_run_in_process_is_the_script_run_by_the_interpreter(cases):
    cases, root = cases
    real = run_together([dict(args=[sys.executable, f"{REPO}/{script}", *map(str, args)], cwd=root)
                         for script, args in cases.values()])
    for (name, (script, args)), p in zip(cases.items(), real):
        mine = run_script(script, args, cwd=root)
        assert (mine.returncode, mine.stdout, mine.stderr) == (p.returncode, p.stdout, p.stderr), name
    statuses = {name: p.returncode for name, p in zip(cases, real)}
    assert statuses == {"train.py --help": 0, "train.py --lr=nan": 1, "report.py FILE": 0}
    assert [p.name for p in root.iterdir()] == ["memory.json"]  # nothing written by any of them


def test_a_crash_in_process_is_a_traceback_and_status_1_as_in_the_interpreter(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("print('before')\n{}['missing']\n")
    p, = run_together([dict(args=[sys.executable, str(script)], cwd=tmp_path)])
    mine = run_script(str(script), [], cwd=tmp_path)
    for q in (p, mine):
        assert q.returncode == 1 and q.stdout == "before\n" and "Traceback" in q.stderr
        assert q.stderr.strip().splitlines()[-1] == "KeyError: 'missing'"
