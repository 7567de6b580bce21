"""Fork-based driver for tests/test_races.py (run as a script, not collected by pytest).

It imports safelora and torch once, then for every job ``fork()``s children that run the real
CLI (``safelora_cli.cli.app``), so hundreds of runs cost no interpreter start each:

- ``pair``: two children released at the same instant (a pipe barrier) run one command with one
  ``-o``; per repetition it records both exit codes and logs, the output tree and what else is
  beside it.
- ``kill``: a reference run counts the calls of each swept function; then for every point
  (function, N-th call, before/after, SIGKILL or SIGINT) and repetition a child is signalled at
  that point. The state left is recorded (output tree, hidden siblings and their trees), then
  the same command runs again without ``--force`` and with it (first repetition only, or every
  one with ``rerun_all``). ``fallback``: the child runs as on a platform without
  ``RENAME_EXCHANGE`` (fsio.exchange answers False).

Usage: python races_driver.py PLAN.json RESULT.json
"""

import importlib
import json
import os
import shutil
import signal
import sys
import time

import torch

torch.set_num_threads(1)
torch.mm(torch.ones(4, 4), torch.ones(4, 4))
import safelora_cli.adapter  # noqa: E402
import safelora_cli.cache  # noqa: E402
import safelora_cli.compute  # noqa: E402
import safelora_cli.patch  # noqa: E402
import safelora_cli.scoring  # noqa: E402
import safelora_cli.sources  # noqa: E402,F401
from safelora_cli.cli import app  # noqa: E402
from tests._trees import tree  # noqa: E402


def state(d):
    """The output tree and every other entry of ``d`` (hidden siblings with their trees)."""
    hidden = {}
    for name in sorted(os.listdir(d)):
        if name in ("out",) or name.startswith("log"):
            continue
        p = os.path.join(d, name)
        hidden[name] = tree(p) if os.path.isdir(p) and not os.path.islink(p) else "file"
    return {"out": tree(os.path.join(d, "out")), "hidden": hidden}


def install(target, n, when, sig):
    mod_name, attr = target.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    real = getattr(mod, attr)
    count = [0]

    def hooked(*a, **k):
        count[0] += 1
        if when == "before" and count[0] == n:
            os.kill(os.getpid(), sig)
        r = real(*a, **k)
        if when == "after" and count[0] == n:
            os.kill(os.getpid(), sig)
        return r

    setattr(mod, attr, hooked)


def counting(targets, counts):
    for target in targets:
        mod_name, attr = target.rsplit(".", 1)
        mod = importlib.import_module(mod_name)
        real = getattr(mod, attr)

        def hooked(*a, _real=real, _t=target, **k):
            counts[_t] = counts.get(_t, 0) + 1
            return _real(*a, **k)

        setattr(mod, attr, hooked)


def child(argv, log, hook=None, count=None, fallback=False, gate=None):
    """In the forked child: run the CLI, exit with its code (never returns)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if gate is not None:
        os.read(gate, 1)  # released together with the other child
    if fallback:
        import safelora_cli.fsio as fsio

        fsio.exchange = lambda a, b: False
    counts = {}
    if hook:
        install(*hook)
    if count:
        counting(count, counts)
    code = 0
    try:
        app(args=argv, prog_name="safelora", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if count:
        with open(log + ".counts", "w") as f:
            json.dump(counts, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def status(st):
    if os.WIFSIGNALED(st):
        return {"signal": os.WTERMSIG(st), "code": None}
    return {"signal": None, "code": os.WEXITSTATUS(st)}


def run(argv, log, **kw):
    pid = os.fork()
    if pid == 0:
        child(argv, log, **kw)
    _, st = os.waitpid(pid, 0)
    return status(st)


def read(p):
    with open(p, errors="replace") as f:
        return f.read()


def argv_for(template, out, force=True):
    argv = [a.replace("{OUT}", out) for a in template]
    return argv if force else [a for a in argv if a != "--force"]


def fresh(work, name, prepare_from):
    d = os.path.join(work, name)
    os.makedirs(d)
    out = os.path.join(d, "out")
    if prepare_from:
        shutil.copytree(prepare_from, out)
    return d, out


def do_pair(job, work):
    d, out = fresh(work, "reference", job.get("prepare_from"))
    ref = run(argv_for(job["argv"], out), os.path.join(d, "log"))
    results = {"reference": {**ref, "tree": tree(out), "log": read(os.path.join(d, "log"))}}
    reps = []
    for k in range(job["reps"]):
        d, out = fresh(work, f"r{k}", job.get("prepare_from"))
        r, w = os.pipe()
        pids = []
        for i in range(2):
            pid = os.fork()
            if pid == 0:
                os.close(w)
                child(argv_for(job["argv"], out), os.path.join(d, f"log{i}"), gate=r)
            pids.append(pid)
        os.close(r)
        os.write(w, b"go")
        os.close(w)
        codes = [status(os.waitpid(p, 0)[1]) for p in pids]
        logs = [read(os.path.join(d, f"log{i}")) for i in range(2)]
        reps.append({"codes": codes, "logs": logs, **state(d)})
    results["reps"] = reps
    return results


def do_kill(job, work):
    d, out = fresh(work, "reference", job.get("prepare_from"))
    log = os.path.join(d, "log")
    ref = run(argv_for(job["argv"], out), log, count=job["sweep"], fallback=job.get("fallback"))
    with open(log + ".counts") as f:
        counts = json.load(f)
    results = {"reference": {**ref, "counts": counts, "tree": tree(out), "log": read(log)}}
    runs = []
    k = 0
    for target in job["sweep"]:
        total = counts.get(target, 0)
        points = list(range(1, total + 1))
        cap = job.get("max_points", {}).get(target)
        if cap and total > cap:
            step = -(-total // cap)
            points = sorted(set(range(1, total + 1, step)) | {total})
        for n in points:
            for when in job["when"].get(target, ["before", "after"]):
                for sig in job.get("signals_for", {}).get(target, job["signals"]):
                    for rep in range(job["reps"]):
                        k += 1
                        d, out = fresh(work, f"k{k}", job.get("prepare_from"))
                        hook = (target, n, when, getattr(signal, sig))
                        killed = run(
                            argv_for(job["argv"], out),
                            os.path.join(d, "log"),
                            hook=hook,
                            fallback=job.get("fallback"),
                        )
                        row = {
                            "point": [target, n, when, sig, rep],
                            "killed": killed,
                            "log": read(os.path.join(d, "log")),
                            "after": state(d),
                        }
                        if rep == 0 or job.get("rerun_all"):
                            plain = run(
                                argv_for(job["argv"], out, force=False), os.path.join(d, "log1")
                            )
                            row["plain"] = {**plain, "log": read(os.path.join(d, "log1"))}
                            row["plain_state"] = state(d)
                            forced = run(argv_for(job["argv"], out), os.path.join(d, "log2"))
                            row["forced"] = {**forced, "log": read(os.path.join(d, "log2"))}
                            row["final"] = state(d)
                        runs.append(row)
    results["runs"] = runs
    return results


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    out = {}
    for job in plan["jobs"]:
        work = os.path.join(plan["work"], job["name"])
        os.makedirs(work)
        t0 = time.monotonic()
        out[job["name"]] = (do_pair if job["kind"] == "pair" else do_kill)(job, work)
        out[job["name"]]["seconds"] = round(time.monotonic() - t0, 1)
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
