"""Hyper-parameter sweeps over gin bindings: expand a definition into runs, then run them locally
(one after another or N at a time) or on a fleet of TPU VMs (one VM per run).

    python -m launch.sweep launch/sweeps/example_lr.json --out runs/lr [--dry-run] [--parallel 2]
    python -m launch.sweep SWEEP --out runs/lr --backend tpu --workdir-root gs://B/sweeps/lr \\
        --tpu-prefix lr --zone Z [--project P] --accelerator-type v5p-8 [--spot] [--queued] \\
        [--steps create,sync,setup,train]          # later: --steps delete

A definition (JSON; YAML too when pyyaml is importable)::

    {"name": "lr",
     "base": {"gin_files": ["configs/experiments/synthetic_tiny.gin", "configs/meshes/cpu.gin"],
              "bindings": {"train.num_steps": 200},      # or a list of gin lines "a.b = 1"
              "args": []},                               # extra trainer flags
     "grid": {"OptimizerConfig.learning_rate": [1e-3, 2e-4], "OptimizerConfig.warmup_ratio": [0.03]},
     # or "list": [{"OptimizerConfig.learning_rate": 1e-3}, {...}]   (explicit binding sets)
     "command": ["python", "-m", "vrefer_jax.main_job"],   # optional (local backend; default the trainer,
                                                          # this one for the main job's experiment)
     "env": {"XLA_FLAGS": "..."}}             # optional (local backend; recorded as *** in sweep.json)

Grid order is the order of the keys, the last one varying fastest. Each run gets a folder
``<out>/<index>-<key>=<value>_...`` (index zero-padded; only bindings that vary across the sweep in
the name; unsafe characters replaced), holding ``run.json`` (its bindings and command),
``bindings.gin`` and ``command.sh``; ``<out>/runs.jsonl`` lists every run. Local runs write their
output to ``<folder>/log.txt`` and a ``DONE`` marker on success; runs with ``DONE`` are skipped.
On TPUs the workdir is ``<workdir-root>/<run name>`` and the remote trainer writes ``DONE`` there.
Swept string values are gin strings unless they start with ``@`` or ``%`` (references, macros).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from launch import common, tpu_vm
from launch.common import Runner

SWEEP_KEYS = {"name", "base", "grid", "list", "command", "env"}
BASE_KEYS = {"gin_files", "bindings", "args"}
MAX_NAME = 96
DONE = "DONE"
FAILED = "FAILED"


# ---------------------------------------------------------------------------------------------
# loading


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.1 reads `1e-3` (no dot) as a string; read it as a float like JSON does."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    return Loader


def load_sweep(path: str | os.PathLike) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML sweeps need pyyaml (a dev dependency); write it as JSON") from None
        data = yaml.load(text, Loader=_yaml_loader())
    else:
        data = json.loads(text)
    validate(data, str(path))
    return data


def validate(sweep: Any, where: str = "sweep") -> None:
    if not isinstance(sweep, dict):
        raise ValueError(f"{where}: a sweep is a mapping")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(SWEEP_KEYS)})")
    if "grid" in sweep and "list" in sweep:
        raise ValueError(f"{where}: give `grid` or `list`, not both")
    base = sweep.get("base", {})
    if not isinstance(base, dict) or set(base) - BASE_KEYS:
        raise ValueError(f"{where}: `base` is a mapping with keys {sorted(BASE_KEYS)}")
    if "grid" in sweep:
        grid = sweep["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ValueError(f"{where}: `grid` maps binding keys to non-empty lists of values")
        for k, vals in grid.items():
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"{where}: grid[{k!r}] must be a non-empty list")
    entries = sweep.get("list", [{}])
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{where}: `list` is a non-empty list of {{binding: value}} mappings")
    cmd = sweep.get("command")
    if cmd is not None and not (isinstance(cmd, str) or (
            isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd))):
        raise ValueError(f"{where}: `command` is a string or a list of strings")


# ---------------------------------------------------------------------------------------------
# expansion


def combinations(sweep: dict) -> list[dict[str, Any]]:
    """The swept binding sets, in a fixed order."""
    if "grid" in sweep:
        keys = list(sweep["grid"])
        return [dict(zip(keys, values)) for values in itertools.product(*(sweep["grid"][k] for k in keys))]
    if "list" in sweep:
        return [dict(e) for e in sweep["list"]]
    return [{}]


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=repr)


def varying_keys(combos: list[dict]) -> list[str]:
    """Keys whose value differs between runs (or that some runs lack), in first-seen order."""
    keys = list(dict.fromkeys(k for c in combos for k in c))
    return [k for k in keys if len({_canon(c[k]) if k in c else None for c in combos}) > 1]


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = {k: re.split(r"[./]", k)[-1] for k in keys}
    counts = {}
    for s in last.values():
        counts[s] = counts.get(s, 0) + 1
    return {k: (s if counts[s] == 1 else k) for k, s in last.items()}


def _name_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return v.lstrip("@%")
    if isinstance(v, (list, tuple)):
        return "-".join(_name_value(x) for x in v)
    if isinstance(v, dict):
        return "-".join(f"{k}-{_name_value(x)}" for k, x in v.items())
    return str(v)


def run_name(index: int, width: int, swept: dict[str, Any], keys: list[str]) -> str:
    """``<index>-<short key>=<value>_...`` over `keys`, filesystem-safe, at most MAX_NAME chars."""
    short = _short_keys(keys)
    parts = [f"{short[k]}={_name_value(swept[k])}" for k in keys if k in swept]
    name = f"{index:0{width}d}" + ("-" + "_".join(parts) if parts else "")
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", name)
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(_canon(swept).encode()).hexdigest()[:8]
        name = name[:MAX_NAME - 9] + "-" + digest
    return name


@dataclasses.dataclass
class Run:
    index: int
    name: str
    swept: dict[str, Any]
    gin_files: list[str]
    bindings: list[str]  # every gin binding line: base, then swept (gin keeps the last)
    extra_args: list[str]
    run_dir: str  # local folder with the run's records (and outputs on the local backend)
    workdir: str  # the trainer's --workdir
    argv: list[str]  # the trainer command

    def record(self) -> dict:
        rec = dataclasses.asdict(self)
        rec["shell"] = shlex.join(self.argv)
        return rec


def default_command() -> list[str]:
    return [sys.executable, "-m", common.TRAINER_MODULE]


def expand(sweep: dict, out: str, workdir_root: str | None = None, command: Sequence[str] | None = None,
           resume: bool = False) -> list[Run]:
    """All runs of `sweep` with folders under `out` and workdirs under `workdir_root` (default `out`)."""
    validate(sweep)
    base = sweep.get("base", {})
    combos = combinations(sweep)
    keys = varying_keys(combos)
    width = max(3, len(str(len(combos) - 1)))
    if command is None:
        cmd = sweep.get("command") or default_command()
        command = shlex.split(cmd) if isinstance(cmd, str) else cmd
    gin_files = list(base.get("gin_files", []))
    base_bindings = base.get("bindings") or []
    extra = [str(a) for a in base.get("args", [])]
    root = (workdir_root or out).rstrip("/")
    runs = []
    for i, swept in enumerate(combos):
        name = run_name(i, width, swept, keys)
        if isinstance(base_bindings, dict):  # a swept key replaces the base value
            base_lines = common.normalize_bindings({k: v for k, v in base_bindings.items() if k not in swept})
        else:
            base_lines = common.normalize_bindings(base_bindings)
        bindings = base_lines + common.normalize_bindings(swept)
        workdir = f"{root}/{name}"
        argv = [*command, *common.trainer_args(gin_files, bindings, workdir, resume, extra)]
        runs.append(Run(i, name, swept, gin_files, bindings, extra, str(Path(out) / name), workdir, argv))
    names = [r.name for r in runs]
    assert len(set(names)) == len(names), "run names must be unique"
    return runs


def write_runs(runs: list[Run], out: str, sweep: dict, cwd: str) -> None:
    """``<out>/sweep.json``, ``<out>/runs.jsonl`` and each run's ``run.json``/``bindings.gin``/``command.sh``."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    # "env" values may be secrets (common): the recorded copy shows them as ***
    recorded = {**sweep, "env": {k: common.MASK for k in sweep["env"]}} if sweep.get("env") else sweep
    (root / "sweep.json").write_text(json.dumps(recorded, indent=1, default=repr) + "\n")
    with open(root / "runs.jsonl", "w") as f:
        for r in runs:
            f.write(json.dumps(r.record(), default=repr) + "\n")
    for r in runs:
        d = Path(r.run_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "run.json").write_text(json.dumps(r.record(), indent=1, default=repr) + "\n")
        (d / "bindings.gin").write_text("".join(b + "\n" for b in r.bindings))
        script = d / "command.sh"
        script.write_text(f"#!/bin/sh\ncd {shlex.quote(cwd)} && exec {shlex.join(r.argv)}\n")
        script.chmod(0o755)


def select(runs: list[Run], only: str | None) -> list[Run]:
    """`only`: comma-separated indices or a:b ranges (``0,3,5:8``)."""
    if not only:
        return runs
    want = set()
    for part in only.split(","):
        a, sep, b = part.partition(":")
        want.update(range(int(a or 0), int(b or len(runs))) if sep else [int(a)])
    return [r for r in runs if r.index in want]


# ---------------------------------------------------------------------------------------------
# local backend


def is_done(run: Run) -> bool:
    return (Path(run.run_dir) / DONE).exists()


def run_local(runs: list[Run], parallel: int = 1, cwd: str | None = None, env: dict | None = None,
              runner: Runner | None = None, poll_s: float = 0.05) -> dict[str, int | str]:
    """Run each not-yet-DONE run as a subprocess, at most `parallel` at a time.

    Returns ``{name: exit code, or "skipped"}``. Output goes to ``<run_dir>/log.txt`` (appended);
    exit 0 writes ``DONE``, anything else ``FAILED`` (with the code).
    """
    runner = runner or Runner()
    cwd = cwd or str(common.REPO_ROOT)
    results: dict[str, int | str] = {}
    todo = []
    for r in runs:
        if is_done(r):
            results[r.name] = "skipped"
            if runner.dry_run:
                print(f"# {r.name}: DONE, skipped", file=runner.out)
        else:
            todo.append(r)
    if runner.dry_run:
        for r in todo:
            runner.run(r.argv)
            results[r.name] = 0
        return results
    base_env = {**os.environ, **(env or {})}
    running: list[tuple[Run, subprocess.Popen, Any]] = []
    pending = list(todo)
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                r = pending.pop(0)
                d = Path(r.run_dir)
                d.mkdir(parents=True, exist_ok=True)
                (d / FAILED).unlink(missing_ok=True)
                log = open(d / "log.txt", "ab")
                print(f"[sweep] start {r.name}", file=sys.stderr, flush=True)
                proc = subprocess.Popen(r.argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**base_env, "VREFER_SWEEP_RUN": r.name})
                running.append((r, proc, log))
            still = []
            for r, proc, log in running:
                rc = proc.poll()
                if rc is None:
                    still.append((r, proc, log))
                    continue
                log.close()
                results[r.name] = rc
                d = Path(r.run_dir)
                if rc == 0:
                    (d / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
                else:
                    (d / FAILED).write_text(f"exit code {rc}\n")
                print(f"[sweep] {'done' if rc == 0 else f'FAILED ({rc})'} {r.name}", file=sys.stderr, flush=True)
            running = still
            if running:
                time.sleep(poll_s)
    finally:
        for _, proc, log in running:  # interrupted: do not leave children behind
            proc.terminate()
            proc.wait()
            log.close()
    return results


# ---------------------------------------------------------------------------------------------
# TPU backend

TPU_STEPS = ("create", "sync", "setup", "train", "stop", "delete")


def tpu_name(prefix: str, run: Run) -> str:
    return f"{prefix}-{run.index:03d}"


def remote_done(run: Run) -> bool:
    """Whether the remote trainer left ``<workdir>/DONE`` (gcloud storage ls)."""
    res = subprocess.run(["gcloud", "storage", "ls", f"{run.workdir}/{DONE}"], capture_output=True)
    return res.returncode == 0


def tpu_steps(runs: list[Run], prefix: str, zone: str, accelerator_type: str, steps: Sequence[str],
              project: str | None = None, queued: bool = False, runtime_version: str | None = None,
              spot: bool = False, reserved: bool = False, source: str = "local", git_url: str | None = None,
              git_ref: str = "main", repo: str | None = None, resume: bool = False) -> dict[str, list]:
    """``{run name: steps}`` creating/using one TPU VM per run (named ``<prefix>-<index>``)."""
    bad = set(steps) - set(TPU_STEPS)
    if bad:
        raise ValueError(f"unknown --steps {sorted(bad)} (known: {', '.join(TPU_STEPS)})")
    out = {}
    for r in runs:
        if not r.workdir.startswith("gs://"):
            raise ValueError("the TPU backend needs --workdir-root gs://...")
        tpu = tpu_vm.Tpu(tpu_name(prefix, r), zone, project, queued)
        s: list = []
        for step in TPU_STEPS:  # fixed order, whatever the order on the command line
            if step not in steps:
                continue
            if step == "create":
                s += tpu_vm.create_steps(tpu, accelerator_type, runtime_version, spot, reserved)
            elif step == "sync":
                s += tpu_vm.sync_steps(tpu, source, repo, git_url=git_url, git_ref=git_ref)
            elif step == "setup":
                s += tpu_vm.setup_steps(tpu)
            elif step == "train":
                s += tpu_vm.train_steps(tpu, r.gin_files, r.bindings, r.workdir, resume, extra_args=r.extra_args,
                                        done_marker=f"{r.workdir}/{DONE}")
            elif step == "stop":
                s += tpu_vm.stop_steps(tpu)
            elif step == "delete":
                s += tpu_vm.delete_steps(tpu)
        out[r.name] = s
    return out


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep definition (.json, or .yaml with pyyaml)")
    p.add_argument("--out", required=True, help="local sweep folder (run folders, runs.jsonl)")
    p.add_argument("--backend", choices=["local", "tpu"], default="local")
    p.add_argument("--only", default=None, help="run indices: 0,3,5:8")
    p.add_argument("--resume", action="store_true", help="pass --resume to every run")
    p.add_argument("--dry-run", action="store_true", help="print the commands; write and run nothing")
    g = p.add_argument_group("local backend")
    g.add_argument("--parallel", type=int, default=1, help="runs at a time")
    g.add_argument("--cwd", default=None, help="folder the runs start in (default: the repository root)")
    g = p.add_argument_group("tpu backend (one TPU VM per run)")
    g.add_argument("--workdir-root", default=None, help="gs:// folder; each run's workdir is <root>/<name>")
    g.add_argument("--tpu-prefix", default=None, help="TPU VM names are <prefix>-<index>")
    g.add_argument("--zone", default=None)
    g.add_argument("--project", default=None)
    g.add_argument("--accelerator-type", default=None)
    g.add_argument("--runtime-version", default=None)
    tier = g.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true")
    tier.add_argument("--reserved", action="store_true")
    g.add_argument("--queued", action="store_true", help="create through queued resources")
    g.add_argument("--source", choices=["local", "git"], default="local")
    g.add_argument("--git-url", default=None)
    g.add_argument("--git-ref", default="main")
    g.add_argument("--repo", default=None, help="--source=local: the tree to ship (default: this checkout)")
    g.add_argument("--steps", default="create,sync,setup,train", help=f"comma list of {','.join(TPU_STEPS)}")
    return p


def main(argv: Sequence[str] | None = None, out=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    runner = Runner(dry_run=a.dry_run, out=out)
    try:
        sweep = load_sweep(a.sweep)
        if a.backend == "tpu":
            missing = [f for f in ("workdir_root", "tpu_prefix", "zone") if not getattr(a, f)]
            if "create" in a.steps.split(",") and not a.accelerator_type:
                missing.append("accelerator_type")
            if missing:
                raise ValueError("the TPU backend needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
            remote_python = [f"{tpu_vm.VENV}/bin/python", "-m", common.TRAINER_MODULE]
            runs = expand(sweep, a.out, a.workdir_root, command=remote_python, resume=a.resume)
        else:
            runs = expand(sweep, a.out, a.workdir_root, resume=a.resume)
        selected = select(runs, a.only)
        steps = a.steps.split(",")
        per_run = {} if a.backend == "local" else tpu_steps(
            selected, a.tpu_prefix, a.zone, a.accelerator_type, steps, a.project, a.queued, a.runtime_version,
            a.spot, a.reserved, a.source, a.git_url, a.git_ref, a.repo, a.resume)
        cwd = a.cwd or str(common.REPO_ROOT)
        if not a.dry_run:  # every run is recorded; --only picks the ones to start
            write_runs(runs, a.out, sweep, cwd)
        runs = selected
        if a.backend == "local":
            results = run_local(runs, a.parallel, cwd, sweep.get("env"), runner)
            failed = {k: v for k, v in results.items() if v not in (0, "skipped")}
            if failed and not a.dry_run:
                print(f"[sweep] failed: {failed}", file=sys.stderr)
                return 1
            return 0
    except ValueError as e:
        parser.error(str(e))
    starting = {"create", "sync", "setup", "train"} & set(steps)
    for r in runs:
        done = is_done(r) or (starting and not a.dry_run and remote_done(r))
        if starting and done:
            print(f"# {r.name}: DONE, skipped", file=runner.out if a.dry_run else sys.stderr)
            continue
        if a.dry_run:
            print(f"# {r.name} on {tpu_name(a.tpu_prefix, r)}", file=runner.out)
        runner.execute(per_run[r.name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
