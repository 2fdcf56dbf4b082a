"""Multi-node GPU clusters: plain ssh hosts (a hostfile) or Slurm.

    python -m launch.gpu_cluster sync  --hostfile=H [--repo=DIR] [--delete]
    python -m launch.gpu_cluster setup --hostfile=H [--jax-extra=cuda12] [--python-version=3.12]
    python -m launch.gpu_cluster train --hostfile=H --gin-file=F [--gin-file=F2 ...] [--binding='a.b = 1' ...]
                                       --workdir=DIR [--resume] [--port=12355] [--env=K=V ...]
    python -m launch.gpu_cluster logs  --hostfile=H [--host-index=0]
    python -m launch.gpu_cluster stop  --hostfile=H
    python -m launch.gpu_cluster sbatch --nodes=N --gin-file=F ... --workdir=DIR [--script=run.sbatch] [--submit]

The hostfile has one host per line (``host`` or ``user@host``; blank lines and ``#`` comments are
skipped; anything after the first word is ignored). One trainer process runs per host and sees all
of that host's GPUs; the first host is the coordinator. Each process gets
``VREFER_COORDINATOR=<first host>:<port>``, ``VREFER_NUM_PROCESSES`` and ``VREFER_PROCESS_ID``,
from which the trainer calls `jax.distributed.initialize`. The workdir must be on storage that every
host sees (a shared file system or gs://). Every subcommand takes ``--dry-run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Sequence

from launch import common
from launch.common import Parallel, Runner, WriteFile, and_then, background, rq

REMOTE_DIR = "~/vrefer-jax"
VENV = "~/vrefer-venv"
LOG = "~/vrefer-train.log"
DEFAULT_PORT = 12355


def read_hostfile(path: str) -> list[str]:
    hosts = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    if not hosts:
        raise ValueError(f"no hosts in {path}")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"duplicate hosts in {path}: one process per host")
    return hosts


@dataclasses.dataclass(frozen=True)
class Cluster:
    hosts: tuple[str, ...]
    ssh_opts: tuple[str, ...] = ()  # e.g. ("-i", "key", "-p", "2222")

    def ssh(self, host: str, command: str) -> list[str]:
        return ["ssh", *self.ssh_opts, host, command]

    def coordinator(self, port: int, host: str | None = None) -> str:
        return f"{host or self.hosts[0].rsplit('@', 1)[-1]}:{int(port)}"


def sync_steps(c: Cluster, repo: str | None = None, remote_dir: str = REMOTE_DIR, delete: bool = False) -> list:
    """rsync the local tree (no .git/.venv/caches) to every host, in parallel."""
    src = str(repo or common.REPO_ROOT).rstrip("/") + "/"
    # A remote rsync path is relative to the login's home, so "~/x" is written "x" (no shell needed).
    dst = (remote_dir[2:] if remote_dir.startswith("~/") else remote_dir).rstrip("/") + "/"
    opts = ["-az", *(["--delete"] if delete else []), *[f"--exclude={e}" for e in common.SYNC_EXCLUDES]]
    if c.ssh_opts:
        opts += ["-e", shlex.join(["ssh", *c.ssh_opts])]
    return [Parallel([["rsync", *opts, src, f"{h}:{dst}"] for h in c.hosts])]


def setup_steps(c: Cluster, remote_dir: str = REMOTE_DIR, venv: str = VENV, python_version: str = "3.12",
                jax_extra: str = "cuda12") -> list:
    cmd = common.install_command(remote_dir, venv, python_version, jax_extra)
    return [Parallel([c.ssh(h, cmd) for h in c.hosts])]


def process_env(c: Cluster, index: int, port: int, coordinator_host: str | None = None) -> dict[str, str]:
    return {"VREFER_COORDINATOR": c.coordinator(port, coordinator_host),
            "VREFER_NUM_PROCESSES": str(len(c.hosts)), "VREFER_PROCESS_ID": str(index)}


def train_steps(c: Cluster, gin_files: Sequence[str], bindings: Sequence[str], workdir: str, resume: bool = False,
                port: int = DEFAULT_PORT, coordinator_host: str | None = None, remote_dir: str = REMOTE_DIR,
                venv: str = VENV, log: str = LOG, env: dict | None = None, extra_args: Sequence[str] = ()) -> list:
    """One background trainer per host; the coordinator (process 0) is started first.

    `env` values are secrets (common): each host's ssh reads them from stdin into a private
    (mktemp, 0600) file that the trainer's shell sources and removes; no value is on a command line.
    The per-process variables (coordinator address, process count and id) are not secret."""
    if not gin_files:
        raise ValueError("at least one --gin-file is needed")
    args = common.trainer_args(gin_files, bindings, workdir, resume, extra_args)
    train = f"{rq(venv)}/bin/python -m {common.TRAINER_MODULE} " + " ".join(shlex.quote(a) for a in args)
    steps: list = []
    for i, host in enumerate(c.hosts):
        exports = common.env_exports(process_env(c, i, port, coordinator_host))
        if not env:
            steps.append(c.ssh(host, background(and_then(exports, train), log, cwd=remote_dir)))
            continue
        load = '. "$VREFER_ENV_FILE" && rm -f "$VREFER_ENV_FILE"'
        # braces: a trailing `&` would put the whole `&&` list, `cat` too, in the background,
        # where stdin is /dev/null
        start = and_then('VREFER_ENV_FILE="$(mktemp)"', 'cat > "$VREFER_ENV_FILE"',
                         "{ " + background(and_then(load, exports, train), log, cwd=remote_dir) + " }")
        steps.append(common.SecretInput(c.ssh(host, start), common.env_file_text(env),
                                        common.env_file_text(env, masked=True)))
    return steps


def logs_steps(c: Cluster, host_index: int = 0, log: str = LOG, lines: int = 200, follow: bool = True) -> list:
    return [c.ssh(c.hosts[host_index], f"tail -n {int(lines)} {'-F ' if follow else ''}{rq(log)}")]


def stop_steps(c: Cluster, signal: str = "TERM") -> list:
    cmd = f"pkill -{shlex.quote(signal)} -f {shlex.quote(common.TRAINER_PGREP)} || true"
    return [Parallel([c.ssh(h, cmd) for h in c.hosts])]


def sbatch_script(gin_files: Sequence[str], bindings: Sequence[str], workdir: str, nodes: int,
                  job_name: str = "vrefer", gpus_per_node: int = 8, cpus_per_task: int | None = None,
                  time: str | None = None, partition: str | None = None, account: str | None = None,
                  output: str = "slurm-%x-%j.out", chdir: str | None = None, python: str = "python",
                  port: int = DEFAULT_PORT, resume: bool = False, requeue: bool = False,
                  env: dict | None = None, extra_args: Sequence[str] = ()) -> str:
    """A Slurm batch script: one task per node, each seeing all the node's GPUs; the coordinator is
    the first node of the allocation and each task's id is its SLURM_PROCID."""
    if nodes < 1:
        raise ValueError("--nodes must be >= 1")
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={gpus_per_node}", f"--output={output}"]
    directives += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    directives += [f"--time={time}"] if time else []
    directives += [f"--partition={partition}"] if partition else []
    directives += [f"--account={account}"] if account else []
    directives += ["--requeue"] if requeue else []
    argv = common.trainer_argv(python, gin_files, bindings, workdir, resume, extra_args)
    lines = ["#!/bin/bash", *[f"#SBATCH {d}" for d in directives], "set -euo pipefail"]
    lines += [f"cd {rq(chdir)}"] if chdir else []
    lines += common.env_file_text(env or {}).splitlines()
    lines += [
        f'export VREFER_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{int(port)}"',
        'export VREFER_NUM_PROCESSES="$SLURM_NTASKS"',
        "# VREFER_PROCESS_ID differs per task, so it is set inside the task.",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        + shlex.quote('export VREFER_PROCESS_ID="$SLURM_PROCID"; exec ' + shlex.join(argv)),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hostfile", required=True, help="one host (or user@host) per line; the first coordinates")
    p.add_argument("--ssh-opt", action="append", default=[],
                   help="extra ssh argument (repeatable), e.g. --ssh-opt=-i --ssh-opt=KEY")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gin-file", action="append", default=[], required=True)
    p.add_argument("--binding", action="append", default=[], help="gin binding 'a.b = 1' (repeatable)")
    p.add_argument("--workdir", required=True, help="shared by all hosts (shared file system or gs://)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--env", action="append", default=[],
                   help="NAME=VALUE for the trainer (repeatable). Every value is treated as a secret: sent on "
                        "ssh's stdin (never on a command line), printed as NAME=***; a --script holding "
                        "them is written 0700 (printed scripts show NAME=***, so write them with --script)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="coordinator port")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.gpu_cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("sync", help="rsync the code to every host")
    _cluster_flags(p)
    p.add_argument("--repo", default=None, help="local tree to ship (default: this checkout)")
    p.add_argument("--remote-dir", default=REMOTE_DIR)
    p.add_argument("--delete", action="store_true", help="remove remote files that are gone locally")

    p = sub.add_parser("setup", help="install the project with jax[cudaXX] on every host")
    _cluster_flags(p)
    p.add_argument("--remote-dir", default=REMOTE_DIR)
    p.add_argument("--venv", default=VENV)
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--jax-extra", default="cuda12", help="cuda12 or cuda13 (match the driver)")

    p = sub.add_parser("train", help="start one trainer process per host, detached")
    _cluster_flags(p)
    _train_flags(p)
    p.add_argument("--coordinator-host", default=None, help="address of the first host as the others reach it")
    p.add_argument("--remote-dir", default=REMOTE_DIR)
    p.add_argument("--venv", default=VENV)
    p.add_argument("--log", default=LOG)

    p = sub.add_parser("logs", help="stream one host's log (tail -F)")
    _cluster_flags(p)
    p.add_argument("--host-index", type=int, default=0)
    p.add_argument("--log", default=LOG)
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--no-follow", action="store_true")

    p = sub.add_parser("stop", help="signal the trainer on every host")
    _cluster_flags(p)
    p.add_argument("--signal", default="TERM")

    p = sub.add_parser("sbatch", help="write (and optionally submit) a Slurm batch script")
    _train_flags(p)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--job-name", default="vrefer")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--time", default=None, help="e.g. 24:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--output", default="slurm-%x-%j.out", help="Slurm log path pattern")
    p.add_argument("--chdir", default=None, help="project folder on the nodes (default: the submit folder)")
    p.add_argument("--python", default="python", help="interpreter on the nodes (e.g. ~/vrefer-venv/bin/python)")
    p.add_argument("--requeue", action="store_true", help="let Slurm requeue the job (combine with --resume)")
    p.add_argument("--script", default=None, help="write the script here (default: print it)")
    p.add_argument("--submit", action="store_true", help="run sbatch on the written script")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command")
    return parser


def steps_from_args(a: argparse.Namespace) -> tuple[list, str | None]:
    """(steps, text to print) for the parsed command line."""
    if a.cmd == "sbatch":
        text = sbatch_script(a.gin_file, common.normalize_bindings(a.binding), a.workdir, a.nodes, a.job_name,
                             a.gpus_per_node, a.cpus_per_task, a.time, a.partition, a.account, a.output, a.chdir,
                             a.python, a.port, a.resume, a.requeue, common.parse_env(a.env))
        env = common.parse_env(a.env)
        shown = common.mask_env_lines(text, env)  # --env values are secrets: printed as NAME=***
        if not a.script:
            if a.submit:
                raise ValueError("--submit needs --script")
            return [], shown
        mode = 0o700 if env else 0o755  # a script holding --env values is the owner's alone
        return [WriteFile(a.script, text, mode, shown), *([["sbatch", a.script]] if a.submit else [])], None
    c = Cluster(tuple(read_hostfile(a.hostfile)), tuple(a.ssh_opt))
    if a.cmd == "sync":
        return sync_steps(c, a.repo, a.remote_dir, a.delete), None
    if a.cmd == "setup":
        return setup_steps(c, a.remote_dir, a.venv, a.python_version, a.jax_extra), None
    if a.cmd == "train":
        return train_steps(c, a.gin_file, common.normalize_bindings(a.binding), a.workdir, a.resume, a.port,
                           a.coordinator_host, a.remote_dir, a.venv, a.log, common.parse_env(a.env)), None
    if a.cmd == "logs":
        return logs_steps(c, a.host_index, a.log, a.lines, follow=not a.no_follow), None
    if a.cmd == "stop":
        return stop_steps(c, a.signal), None
    raise AssertionError(a.cmd)


def main(argv: Sequence[str] | None = None, out=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        steps, text = steps_from_args(a)
    except ValueError as e:
        parser.error(str(e))
    if text is not None:
        print(text, end="", file=out if out is not None else sys.stdout)
    Runner(dry_run=a.dry_run, out=out).execute(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
