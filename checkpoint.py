"""
Checkpoint files: written atomically (a kill at any point leaves a pair that loads), loaded with weights_only, and
what a resumed run needs (every RNG state, the metrics up to the checkpoint, ranks that still agree).
"""
import hashlib
import json
import os

import torch
import torch.distributed as dist
from tqdm import tqdm


def atomic_save(obj, path, rename=True):
    """torch.save to a temp file, fsynced, then renamed over path; returns it (rename=False: the caller renames)."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: runs that share cache_dir may write the same warm-up at once
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if rename:
        os.replace(tmp, path)
    return tmp


def load_checkpoint(path, keys=("model", "config")):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} not found") from None
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        why = " (or not one to resume from)" if isinstance(ckpt, dict) and "model" in ckpt else ""
        raise ValueError(f"checkpoint {path} is not a checkpoint of this project{why}")
    return ckpt


def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not fit this model (n_layer, n_head, n_embd must match): "
                         f"{' '.join(str(e).split())[:200]}") from None


RESUME_KEYS = ("model", "config", "optimizer", "step", "rollouts", "py_rng", "torch_rng", "gen_rng")


def read_metrics(path, upto):
    """The lines of metrics.jsonl up to step upto, to resume from; a torn last line (a kill mid-write) ends them."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError as e:
        raise ValueError(f"cannot read {path} to resume ({e.strerror})") from None
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] > upto:
                break
        except (ValueError, KeyError, TypeError):
            break
        kept.append(line)
    if not kept or json.loads(kept[0])["step"] != 0:
        raise ValueError(f"{path} lacks the step-0 evaluation; cannot resume")
    return kept


def fingerprint(run):
    """sha1s (12 hex digits) of what every rank must hold identically: weights, memory, the problem RNG."""
    h = hashlib.sha1()
    for m in {id(run.model): run.model, id(run.teacher): run.teacher}.values():
        for t in m.state_dict().values():
            h.update(t.detach().float().cpu().numpy().tobytes())
    sha = lambda b: hashlib.sha1(b).hexdigest()[:12]
    return dict(params=h.hexdigest()[:12], memory=sha(json.dumps(run.memory.state()).encode()),
                rng=sha(repr(run.rng.getstate()).encode()))


def save(run, step_):
    """ckpt.pt and memory.json, both complete on disk before either replaces its old version (resume checks that they
    match). Under torchrun, also every rank's sampler state, and a check that the ranks still agree."""
    c, world = run.c, run.world
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, (fingerprint(run), run.gen.get_state()))
        prints = [fp for fp, _ in states]
        if any(fp != prints[0] for fp in prints):
            raise ValueError(f"ranks disagree at step {step_}: {prints}")
        if not run.rank:
            tqdm.write(f"step {step_}: all {world} ranks agree: " + ", ".join(f"{k} {v}" for k, v in prints[0].items()))
    if run.rank:
        return
    ckpt = dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), config=vars(c), step=step_,
                rollouts=run.rollouts, py_rng=to_list(run.rng.getstate()), torch_rng=torch.get_rng_state(),
                gen_rng=run.gen.get_state(), memory_step=run.memory.step)
    if run.teacher is not run.model:
        ckpt["teacher"] = run.teacher.state_dict()
    if world > 1:
        ckpt.update(world_size=world, gen_rngs=[g for _, g in states])
    path = os.path.join(c.out_dir, "ckpt.pt")
    tmp = atomic_save(ckpt, path, rename=False)
    run.memory.save(os.path.join(c.out_dir, "memory.json"))
    os.replace(tmp, path)


def to_list(x):
    return [to_list(v) for v in x] if isinstance(x, tuple) else x


def to_tuple(x):
    return tuple(to_tuple(v) for v in x) if isinstance(x, list) else x


def open_metrics(run, path):
    """metrics.jsonl for this run: empty for a fresh one; for a resumed one, cut back to its checkpoint's step, with
    pass@k dropped from all but step 0 (it is measured at a run's end, and a continued run has a new end)."""
    if run.c.init_from != "resume":
        open(path, "w").close()
        return
    kept = read_metrics(path, run.step)
    strip = lambda line: json.dumps({k: v for k, v in json.loads(line).items() if "_pass@" not in k}) + "\n"
    kept[1:] = map(strip, kept[1:])
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
