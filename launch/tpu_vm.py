"""Cloud TPU VMs (single host or pod slice) with `gcloud compute tpus ...`.

    python -m launch.tpu_vm create NAME --zone=Z [--project=P] --accelerator-type=v5p-64
                                [--runtime-version=V] [--spot | --reserved] [--queued]
    python -m launch.tpu_vm sync   NAME --zone=Z [--source=local [--repo=DIR] | --source=git --git-url=U --git-ref=R]
    python -m launch.tpu_vm setup  NAME --zone=Z [--python-version=3.12]
    python -m launch.tpu_vm stage-data NAME --zone=Z --src=gs://B/records --dst=/tmp/records
    python -m launch.tpu_vm train  NAME --zone=Z --gin-file=F [--gin-file=F2 ...] [--binding='a.b = 1' ...]
                                --workdir=gs://B/runs/R [--resume] [--env=K=V ...] [--kill-existing]
    python -m launch.tpu_vm logs   NAME --zone=Z [--worker=0] [--lines=200]
    python -m launch.tpu_vm stop   NAME --zone=Z
    python -m launch.tpu_vm status NAME --zone=Z [--queued]
    python -m launch.tpu_vm delete NAME --zone=Z [--queued] [--async]

Every subcommand takes ``--dry-run`` (print the commands, one per line, run nothing). The project
lives in ``~/vrefer-jax`` and its environment in ``~/vrefer-venv`` on every worker (``--remote-dir``,
``--venv``). On a pod every worker runs the same trainer command; the trainer initialises
`jax.distributed` itself, and its workdir must be a ``gs://`` path that all workers share.
A queued resource is given the same id as its node, so ssh/scp address the node by NAME either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from typing import Sequence

from launch import common
from launch.common import Poll, Runner, and_then, background, rq

# Runtime (software) versions per TPU generation, keyed by the accelerator type's prefix.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "~/vrefer-jax"
VENV = "~/vrefer-venv"
LOG = "~/vrefer-train.log"
ENV_FILE = "~/.vrefer-train.env"  # --env values on each worker, read and removed by the trainer start
REMOTE_TARBALL = "/tmp/vrefer-jax-src.tgz"
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def default_runtime_version(accelerator_type: str) -> str:
    prefix = accelerator_type.split("-", 1)[0]
    if prefix not in RUNTIME_VERSIONS:
        raise ValueError(f"no default runtime version for {accelerator_type!r}; pass --runtime-version "
                         f"(known prefixes: {', '.join(RUNTIME_VERSIONS)})")
    return RUNTIME_VERSIONS[prefix]


@dataclasses.dataclass(frozen=True)
class Tpu:
    """Where a TPU VM lives and how to reach it."""

    name: str
    zone: str
    project: str | None = None
    queued: bool = False  # created through a queued resource of the same id
    internal_ip: bool = False

    def __post_init__(self):
        if not _NAME_RE.match(self.name):
            raise ValueError(f"TPU name {self.name!r}: lowercase letters, digits and '-', starting with a letter")
        if not self.zone:
            raise ValueError("--zone is required")

    def scope(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def _conn(self) -> list[str]:
        return ["--internal-ip"] if self.internal_ip else []

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self.scope(), f"--worker={worker}",
                *self._conn(), f"--command={command}"]

    def scp(self, src: str, dst: str, worker: str = "all", recurse: bool = False) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", src, f"{self.name}:{dst}", *self.scope(),
                f"--worker={worker}", *(["--recurse"] if recurse else []), *self._conn()]


def create_steps(tpu: Tpu, accelerator_type: str, runtime_version: str | None = None, spot: bool = False,
                 reserved: bool = False, wait: bool = True) -> list:
    """Create the TPU VM (directly, or as a queued resource and wait until it is ACTIVE)."""
    if spot and reserved:
        raise ValueError("--spot and --reserved are exclusive")
    version = runtime_version or default_runtime_version(accelerator_type)
    tier = ["--spot"] if spot else ["--reserved"] if reserved else []
    if not tpu.queued:
        return [["gcloud", "compute", "tpus", "tpu-vm", "create", tpu.name, *tpu.scope(),
                 f"--accelerator-type={accelerator_type}", f"--version={version}", *tier]]
    steps: list = [["gcloud", "compute", "tpus", "queued-resources", "create", tpu.name, f"--node-id={tpu.name}",
                    *tpu.scope(), f"--accelerator-type={accelerator_type}", f"--runtime-version={version}", *tier]]
    if wait:
        steps.append(Poll(["gcloud", "compute", "tpus", "queued-resources", "describe", tpu.name, *tpu.scope(),
                           "--format=value(state.state)"], until="ACTIVE"))
    return steps


def sync_steps(tpu: Tpu, source: str = "local", repo: str | None = None, remote_dir: str = REMOTE_DIR,
               git_url: str | None = None, git_ref: str = "main", tarball: str | None = None) -> list:
    """Put the code on every worker: a tarball of the local tree (no .git/.venv/caches) copied with
    `tpu-vm scp --worker=all` and unpacked in place, or a git checkout of `git_ref`."""
    if source == "git":
        if not git_url:
            raise ValueError("--source=git needs --git-url")
        d = rq(remote_dir)
        fetch = f"{{ [ -d {d}/.git ] || git clone --no-checkout {shlex.quote(git_url)} {d}; }}"
        return [tpu.ssh(and_then(fetch, f"git -C {d} fetch --tags origin {shlex.quote(git_ref)}",
                                 f"git -C {d} checkout --force --detach FETCH_HEAD"))]
    if source != "local":
        raise ValueError(f"unknown --source {source!r} (local or git)")
    repo = str(repo or common.REPO_ROOT)
    tarball = tarball or f"/tmp/vrefer-jax-src-{tpu.name}.tgz"
    excludes = [f"--exclude={e}" for e in common.SYNC_EXCLUDES]
    return [
        ["tar", "-czf", tarball, *excludes, "-C", repo, "."],
        tpu.scp(tarball, REMOTE_TARBALL),
        tpu.ssh(and_then(f"mkdir -p {rq(remote_dir)}", f"tar -xzf {REMOTE_TARBALL} -C {rq(remote_dir)}",
                         f"rm -f {REMOTE_TARBALL}")),
    ]


def setup_steps(tpu: Tpu, remote_dir: str = REMOTE_DIR, venv: str = VENV, python_version: str = "3.12",
                jax_extra: str = "tpu") -> list:
    """pip-install the synced project (editable, so a later sync needs no reinstall) with jax[tpu]."""
    return [tpu.ssh(common.install_command(remote_dir, venv, python_version, jax_extra))]


def stage_data_steps(tpu: Tpu, src: str, dst: str) -> list:
    """Copy records from `src` (gs://) to the local disk of every worker (the reader opens local files)."""
    return [tpu.ssh(and_then(f"mkdir -p {rq(dst)}",
                             f"gcloud storage rsync --recursive {shlex.quote(src)} {rq(dst)}"))]


def done_marker_command(path: str) -> str:
    """Shell text that writes a DONE marker at `path` (gs:// or a local path)."""
    if path.startswith("gs://"):
        return f"date -u > /tmp/vrefer-DONE && gcloud storage cp /tmp/vrefer-DONE {shlex.quote(path)}"
    return f"date -u > {rq(path)}"


def train_steps(tpu: Tpu, gin_files: Sequence[str], bindings: Sequence[str], workdir: str, resume: bool = False,
                remote_dir: str = REMOTE_DIR, venv: str = VENV, log: str = LOG, env: dict | None = None,
                done_marker: str | None = None, kill_existing: bool = False, allow_local_workdir: bool = False,
                extra_args: Sequence[str] = (), env_file: str = ENV_FILE) -> list:
    """Start the trainer on all workers, detached (SIGHUP ignored, output appended to `log`).

    `env` values are secrets (common): they are copied to every worker's `env_file` from a private
    local temporary file (scp keeps its 0600 mode), and the trainer's shell sources that file and
    removes it before starting; no value is on a command line."""
    if not gin_files:
        raise ValueError("at least one --gin-file is needed")
    if not workdir.startswith("gs://") and not allow_local_workdir:
        raise ValueError(f"workdir {workdir!r} is not gs://: pod workers share no disk "
                         "(pass --allow-local-workdir for a single-host TPU VM)")
    args = common.trainer_args(gin_files, bindings, workdir, resume, extra_args)
    train = f"{rq(venv)}/bin/python -m {common.TRAINER_MODULE} " + " ".join(shlex.quote(a) for a in args)
    load_env = f". {rq(env_file)} && rm -f {rq(env_file)}" if env else ""
    command = and_then(load_env, train, done_marker_command(done_marker) if done_marker else "")
    start = background(command, log, cwd=remote_dir)
    if kill_existing:  # a leftover trainer keeps the TPU chips busy
        start = f"{{ pkill -f {shlex.quote(common.TRAINER_PGREP)} && sleep 10 || true; }}; {start}"
    steps: list = []
    if env:
        dst = env_file[2:] if env_file.startswith("~/") else env_file  # scp: relative to the home folder
        steps.append(common.SecretInput(tpu.scp(common.SECRET_FILE, dst), common.env_file_text(env),
                                        common.env_file_text(env, masked=True)))
    return [*steps, tpu.ssh(start)]


def logs_steps(tpu: Tpu, worker: str = "0", log: str = LOG, lines: int = 200, follow: bool = True) -> list:
    return [tpu.ssh(f"tail -n {int(lines)} {'-F ' if follow else ''}{rq(log)}", worker=worker)]


def stop_steps(tpu: Tpu, signal: str = "TERM") -> list:
    """Signal the trainer on all workers (no error where none runs)."""
    return [tpu.ssh(f"pkill -{shlex.quote(signal)} -f {shlex.quote(common.TRAINER_PGREP)} || true")]


def status_steps(tpu: Tpu) -> list:
    group = ["queued-resources"] if tpu.queued else ["tpu-vm"]
    return [["gcloud", "compute", "tpus", *group, "describe", tpu.name, *tpu.scope()]]


def delete_steps(tpu: Tpu, async_: bool = False) -> list:
    """Delete the TPU VM (a queued resource with --force, which deletes its node too)."""
    tail = ["--quiet"] + (["--async"] if async_ else [])
    if tpu.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", tpu.name, *tpu.scope(), "--force", *tail]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", tpu.name, *tpu.scope(), *tail]]


# ---------------------------------------------------------------------------------------------
# command line


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="TPU VM name (and queued-resource id)")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--queued", action="store_true", help="the TPU is (to be) a queued resource")
    p.add_argument("--internal-ip", action="store_true", help="ssh/scp over internal IPs")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def _layout_flags(p: argparse.ArgumentParser, venv: bool = True) -> None:
    p.add_argument("--remote-dir", default=REMOTE_DIR, help="project folder on each worker")
    if venv:
        p.add_argument("--venv", default=VENV, help="virtual environment on each worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("create", help="create a TPU VM or a queued resource")
    _common_flags(p)
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-8, v5p-64, v5litepod-256")
    p.add_argument("--runtime-version", default=None, help="default: by generation, see RUNTIME_VERSIONS")
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="Spot capacity (preemptible, cheaper)")
    tier.add_argument("--reserved", action="store_true", help="use a reservation")
    p.add_argument("--no-wait", action="store_true", help="queued: do not wait for ACTIVE")

    p = sub.add_parser("sync", help="copy the code to every worker (local tree or git ref)")
    _common_flags(p)
    _layout_flags(p, venv=False)
    p.add_argument("--source", choices=["local", "git"], default="local")
    p.add_argument("--repo", default=None, help="local tree to ship (default: this checkout)")
    p.add_argument("--tarball", default=None, help="local temporary tarball path")
    p.add_argument("--git-url", default=None)
    p.add_argument("--git-ref", default="main", help="branch, tag or commit")

    p = sub.add_parser("setup", help="install the project with jax[tpu] on every worker")
    _common_flags(p)
    _layout_flags(p)
    p.add_argument("--python-version", default="3.12")

    p = sub.add_parser("stage-data", help="gcloud storage rsync a gs:// folder to every worker's disk")
    _common_flags(p)
    p.add_argument("--src", required=True, help="gs://bucket/path")
    p.add_argument("--dst", required=True, help="folder on each worker")

    p = sub.add_parser("train", help="start the trainer on all workers, detached (survives the ssh session)")
    _common_flags(p)
    _layout_flags(p)
    p.add_argument("--gin-file", action="append", default=[], required=True)
    p.add_argument("--binding", action="append", default=[], help="gin binding 'a.b = 1' (repeatable)")
    p.add_argument("--workdir", required=True, help="gs:// path shared by all workers")
    p.add_argument("--resume", action="store_true", help="continue from the workdir's latest checkpoint")
    p.add_argument("--env", action="append", default=[],
                   help="NAME=VALUE for the trainer (repeatable). Every value is treated as a secret: it is "
                        "copied to the workers in a 0600 file, never put on a command line, printed as NAME=***")
    p.add_argument("--log", default=LOG, help="log file on each worker (appended)")
    p.add_argument("--done-marker", default=None, help="write this file (gs:// or local) when training succeeds")
    p.add_argument("--kill-existing", action="store_true", help="stop a running trainer first")
    p.add_argument("--allow-local-workdir", action="store_true", help="single-host VM: a non-gs:// workdir")

    p = sub.add_parser("logs", help="stream a worker's log (tail -F)")
    _common_flags(p)
    p.add_argument("--worker", default="0")
    p.add_argument("--log", default=LOG)
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--no-follow", action="store_true")

    p = sub.add_parser("stop", help="signal the trainer on all workers")
    _common_flags(p)
    p.add_argument("--signal", default="TERM")

    p = sub.add_parser("status", help="describe the TPU VM / queued resource")
    _common_flags(p)

    p = sub.add_parser("delete", help="delete the TPU VM / queued resource")
    _common_flags(p)
    p.add_argument("--async", dest="async_", action="store_true")
    return parser


def steps_from_args(a: argparse.Namespace) -> list:
    tpu = Tpu(a.name, a.zone, a.project, a.queued, a.internal_ip)
    if a.cmd == "create":
        return create_steps(tpu, a.accelerator_type, a.runtime_version, a.spot, a.reserved, wait=not a.no_wait)
    if a.cmd == "sync":
        return sync_steps(tpu, a.source, a.repo, a.remote_dir, a.git_url, a.git_ref, a.tarball)
    if a.cmd == "setup":
        return setup_steps(tpu, a.remote_dir, a.venv, a.python_version)
    if a.cmd == "stage-data":
        return stage_data_steps(tpu, a.src, a.dst)
    if a.cmd == "train":
        return train_steps(tpu, a.gin_file, common.normalize_bindings(a.binding), a.workdir, a.resume,
                           a.remote_dir, a.venv, a.log, common.parse_env(a.env), a.done_marker,
                           a.kill_existing, a.allow_local_workdir)
    if a.cmd == "logs":
        return logs_steps(tpu, a.worker, a.log, a.lines, follow=not a.no_follow)
    if a.cmd == "stop":
        return stop_steps(tpu, a.signal)
    if a.cmd == "status":
        return status_steps(tpu)
    if a.cmd == "delete":
        return delete_steps(tpu, a.async_)
    raise AssertionError(a.cmd)


def main(argv: Sequence[str] | None = None, out=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        steps = steps_from_args(a)
    except ValueError as e:
        parser.error(str(e))
    Runner(dry_run=a.dry_run, out=out).execute(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
