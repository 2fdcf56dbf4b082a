"""Shared pieces of the launchers: gin literals, the trainer command line, remote-shell quoting,
and a runner that either prints commands (dry run) or executes them.

Commands are argv lists everywhere; a dry run prints each with `shlex.join`, one per line, so the
printed text can be pasted into a shell and does exactly what a real run does.

Secrets: every ``--env`` value counts as one (API keys, tokens travel that way). Values never appear
in an argv (other users see argvs in `ps`, and the runner echoes them): they reach a remote
machine on ssh's stdin or in a private (0600) temporary file copied over, and every printed
command, dry run or script shows them as ``NAME=***``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

TRAINER_MODULE = "vrefer_jax.training.cli"
REPO_ROOT = Path(__file__).resolve().parent.parent
# The project's own jax pin (setup.py); the launchers add the accelerator extra ("tpu", "cuda12").
JAX_RANGE = ("0.10", "0.11")
# Not shipped to remote machines: VCS data, local environments, caches, build metadata.
SYNC_EXCLUDES = (".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".gl")
# A regex that matches the trainer's command line but not a shell line containing this pattern
# (so `pkill -f` run through `bash -c` does not kill its own shell).
TRAINER_PGREP = "[v]refer_jax.training.cli"


def jax_requirement(extra: str | None) -> str:
    """`jax[extra]>=lo,<hi` as one pip requirement string."""
    name = f"jax[{extra}]" if extra else "jax"
    return f"{name}>={JAX_RANGE[0]},<{JAX_RANGE[1]}"


# ---------------------------------------------------------------------------------------------
# gin bindings


def gin_literal(value: Any) -> str:
    """A Python value as gin source text.

    Strings are quoted, except those starting with ``@`` (configurable reference) or ``%`` (macro),
    which pass through unquoted. Lists, tuples and dicts recurse. NaN/inf have no gin spelling.
    """
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"gin cannot express the float {value!r}")
        return repr(value)
    if isinstance(value, str):
        return value if value[:1] in ("@", "%") else repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(gin_literal(v) for v in value)
        if isinstance(value, tuple):
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        return f"[{inner}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no gin literal for {type(value).__name__}: {value!r}")


def gin_binding(key: str, value: Any) -> str:
    """``key = literal`` (one ``--gin_bindings`` value)."""
    if not key or any(c.isspace() for c in key) or "=" in key:
        raise ValueError(f"bad gin binding key {key!r}")
    return f"{key} = {gin_literal(value)}"


def normalize_bindings(bindings: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    """Bindings given as gin lines (kept verbatim) or as a ``{key: value}`` mapping (formatted)."""
    if not bindings:
        return []
    if isinstance(bindings, Mapping):
        return [gin_binding(k, v) for k, v in bindings.items()]
    if isinstance(bindings, str):
        raise TypeError("bindings must be a list of gin lines or a mapping, not a string")
    out = []
    for line in bindings:
        if not isinstance(line, str) or "=" not in line:
            raise ValueError(f"a gin binding line needs `key = value`: {line!r}")
        out.append(line.strip())
    return out


def trainer_args(gin_files: Sequence[str], bindings: Sequence[str], workdir: str,
                 resume: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """The trainer's flags: ``--gin_file=F ... --gin_bindings=B ... --workdir=W [--resume]``."""
    if not workdir:
        raise ValueError("a workdir is required")
    args = [f"--gin_file={f}" for f in gin_files]
    args += [f"--gin_bindings={b}" for b in bindings]
    args.append(f"--workdir={workdir}")
    if resume:
        args.append("--resume")
    return args + list(extra)


def trainer_argv(python: Sequence[str] | str, *a, **kw) -> list[str]:
    """``python -m vrefer_jax.training.cli`` + `trainer_args`."""
    head = [python] if isinstance(python, str) else list(python)
    return [*head, "-m", TRAINER_MODULE, *trainer_args(*a, **kw)]


# ---------------------------------------------------------------------------------------------
# remote shell text


def rq(path: str) -> str:
    """Quote a remote path for a POSIX shell, keeping a leading ``~/`` expandable."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


MASK = "***"


def parse_env(items: Iterable[str]) -> dict[str, str]:
    """``["K=V", ...]`` -> ``{K: V}`` (command-line ``--env`` values; the error never shows a value)."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            shown = f"{key[:40]!r}=..." if sep else "an item without '='"
            raise ValueError(f"--env needs NAME=VALUE with NAME a shell identifier, got {shown}")
        env[key] = value
    return env


def env_exports(env: Mapping[str, str]) -> str:
    """``export A=1 B='x y'`` ('' for no variables). Only for values that are not secrets."""
    if not env:
        return ""
    return "export " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())


def env_file_text(env: Mapping[str, str], masked: bool = False) -> str:
    """Shell text with one ``export K=V`` line per variable (``K=***`` when `masked`)."""
    return "".join(f"export {k}={MASK if masked else shlex.quote(str(v))}\n" for k, v in env.items())


def mask_env_lines(text: str, env: Mapping[str, str]) -> str:
    """`text` with each ``export K=<value>`` line of `env_file_text(env)` shown as ``export K=***``."""
    for k, v in env.items():
        text = text.replace(f"export {k}={shlex.quote(str(v))}\n", f"export {k}={MASK}\n")
    return text


def and_then(*parts: str) -> str:
    """Join non-empty shell fragments with ``&&``."""
    return " && ".join(p for p in parts if p)


def background(command: str, log: str, cwd: str | None = None) -> str:
    """Shell text that starts `command` detached and returns at once.

    The subshell ignores SIGHUP (what nohup does; the disposition survives exec), so the job outlives
    the ssh session; all three standard streams are redirected (output appended to `log`) so the
    session can close.
    """
    start = f'( trap "" HUP; {command} ) >> {rq(log)} 2>&1 < /dev/null &'
    return and_then(f"cd {rq(cwd)}" if cwd else "", start)


def install_command(remote_dir: str, venv: str, python_version: str, jax_extra: str | None) -> str:
    """Shell text that installs the project (editable) and jax with `jax_extra` into `venv`.

    Cloud images ship an older system Python than the project needs (>=3.11), so `uv` (from PyPI)
    creates the environment with a Python it manages; an existing environment is reused.
    """
    uv = '"$HOME"/.local/bin/uv'
    if not remote_dir.startswith(("/", "~", ".")):
        remote_dir = "./" + remote_dir  # a bare name after `-e` would read as a package name
    pip_uv = "python3 -m pip install --user --quiet --upgrade uv"
    return and_then(
        f"{{ {pip_uv} || {pip_uv} --break-system-packages; }}",
        f"{{ [ -x {rq(venv)}/bin/python ] || {uv} venv --python {shlex.quote(python_version)} {rq(venv)}; }}",
        f"{uv} pip install --python {rq(venv)}/bin/python -e {rq(remote_dir)} "
        + shlex.quote(jax_requirement(jax_extra)),
    )


# ---------------------------------------------------------------------------------------------
# running


@dataclasses.dataclass(frozen=True)
class Poll:
    """Run `argv` every `interval_s` until its stripped output equals `until` (or `timeout_s`)."""

    argv: list[str]
    until: str
    interval_s: float = 30.0
    timeout_s: float = 4 * 3600.0


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Commands that may run at the same time (one per host)."""

    argvs: list[list[str]]


@dataclasses.dataclass(frozen=True)
class WriteFile:
    """Write `text` to the local `path` (a generated script), created with `mode` from the start.
    A dry run prints `shown` (the text with secrets masked) when given."""

    path: str
    text: str
    mode: int = 0o644
    shown: str | None = None


# In a SecretInput argv, the argument that stands for the private temporary file.
SECRET_FILE = "{secret-file}"


@dataclasses.dataclass(frozen=True)
class SecretInput:
    """Run `argv` with `text` (secrets) kept off every command line.

    If `argv` holds `SECRET_FILE`, `text` goes to a fresh private temporary file (mkstemp: 0600)
    whose path replaces that argument and which is removed afterwards; otherwise `text` is fed on
    stdin. A dry run prints the steps as shell text with `masked` in place of `text`."""

    argv: list[str]
    text: str
    masked: str


Step = list  # a plain argv list, or one of Poll / Parallel / WriteFile / SecretInput


class Runner:
    """Executes steps, or prints them (dry run) as shell lines, one command per line."""

    def __init__(self, dry_run: bool = False, out: TextIO | None = None, echo: bool = True):
        self.dry_run = dry_run
        self._out = out
        self.echo = echo

    @property
    def out(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout

    def _show(self, text: str) -> None:
        print(text, file=self.out if self.dry_run else sys.stderr, flush=True)

    def run(self, argv: Sequence[str], check: bool = True, cwd: str | None = None) -> int:
        if self.dry_run:
            self._show(shlex.join(argv))
            return 0
        if self.echo:
            self._show("+ " + shlex.join(argv))
        rc = subprocess.call(list(argv), cwd=cwd)
        if check and rc != 0:
            raise subprocess.CalledProcessError(rc, list(argv))
        return rc

    def poll(self, p: Poll) -> None:
        if self.dry_run:
            self._show(f"# repeat until it prints {p.until}:")
            self._show(shlex.join(p.argv))
            return
        deadline = time.monotonic() + p.timeout_s
        while True:
            res = subprocess.run(p.argv, capture_output=True, text=True)
            state = res.stdout.strip()
            if self.echo:
                self._show(f"+ {shlex.join(p.argv)} -> {state or res.stderr.strip()[-200:]}")
            if state == p.until:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{shlex.join(p.argv)} did not print {p.until!r} in {p.timeout_s:.0f}s")
            time.sleep(p.interval_s)

    def parallel(self, step: Parallel, check: bool = True) -> list[int]:
        if self.dry_run:
            for argv in step.argvs:
                self._show(shlex.join(argv))
            return [0] * len(step.argvs)
        procs = []
        for argv in step.argvs:
            if self.echo:
                self._show("+ " + shlex.join(argv) + " &")
            procs.append(subprocess.Popen(argv))
        rcs = [p.wait() for p in procs]
        bad = [(shlex.join(a), rc) for a, rc in zip(step.argvs, rcs) if rc != 0]
        if check and bad:
            raise subprocess.CalledProcessError(bad[0][1], bad[0][0])
        return rcs

    def write_file(self, step: WriteFile) -> None:
        if self.dry_run:
            self._show(f"# --- {step.path} ---")
            self._show((step.text if step.shown is None else step.shown).rstrip("\n"))
            self._show(f"# --- end of {step.path} ---")
            return
        path = Path(step.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created with its final mode (no window in which a private file is world-readable); an
        # existing file gets the mode too.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, step.mode)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), step.mode)
            f.write(step.text)
        if self.echo:
            self._show(f"+ wrote {path}")

    def secret_input(self, step: SecretInput, check: bool = True) -> int:
        via_file = SECRET_FILE in step.argv
        if self.dry_run:
            if via_file:
                shown = " ".join('"$SECRET_FILE"' if a == SECRET_FILE else shlex.quote(a) for a in step.argv)
                self._show("SECRET_FILE=$(mktemp) && cat > \"$SECRET_FILE\" <<'EOF'")
                self._show(step.masked.rstrip("\n"))
                self._show("EOF")
                self._show(shown)
                self._show('rm -f "$SECRET_FILE"')
            else:
                self._show(shlex.join(step.argv) + " <<'EOF'")
                self._show(step.masked.rstrip("\n"))
                self._show("EOF")
            return 0
        if not via_file:
            if self.echo:
                self._show("+ " + shlex.join(step.argv) + " < (secrets)")
            rc = subprocess.run(list(step.argv), input=step.text, text=True).returncode
        else:
            fd, path = tempfile.mkstemp(prefix="vrefer-secret-")  # 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(step.text)
                argv = [path if a == SECRET_FILE else a for a in step.argv]
                if self.echo:
                    self._show("+ " + shlex.join(argv))
                rc = subprocess.call(argv)
            finally:
                os.unlink(path)
        if check and rc != 0:
            raise subprocess.CalledProcessError(rc, list(step.argv))
        return rc

    def execute(self, steps: Iterable[Any]) -> None:
        for step in steps:
            if isinstance(step, Poll):
                self.poll(step)
            elif isinstance(step, Parallel):
                self.parallel(step)
            elif isinstance(step, WriteFile):
                self.write_file(step)
            elif isinstance(step, SecretInput):
                self.secret_input(step)
            else:
                self.run(step)
