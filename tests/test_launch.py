"""Launchers: dry-run snapshots of every TPU / GPU subcommand, sweep expansion and local execution.

Snapshots live in tests/snapshots/launch_<case>.txt; VREFER_UPDATE_SNAPSHOTS=1 rewrites them.
Nothing here calls gcloud, ssh or the real trainer: remote shell texts are syntax-checked with
`bash -n` and, for the trainer start, executed locally against a fake interpreter.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gin import config_parser

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `launch` is used from the checkout, not installed
    sys.path.insert(0, str(ROOT))

from launch import common, gpu_cluster, sweep, tpu_vm  # noqa: E402

SNAPSHOTS = ROOT / "tests" / "snapshots"
UPDATE = os.environ.get("VREFER_UPDATE_SNAPSHOTS") == "1"
REPO = "/src/vrefer-jax"  # a fixed --repo keeps the snapshots machine independent


def check_snapshot(case: str, text: str) -> None:
    path = SNAPSHOTS / f"launch_{case}.txt"
    if UPDATE:
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no snapshot {path}; create it with VREFER_UPDATE_SNAPSHOTS=1"
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), "snapshot", "now"))
        pytest.fail(f"dry-run output of {case} changed (VREFER_UPDATE_SNAPSHOTS=1 to accept):\n{diff}")


def dry(main, argv: list[str]) -> str:
    buf = io.StringIO()
    assert main([*argv, "--dry-run"], out=buf) == 0
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# TPU VM snapshots

T = ["pod", "--zone=us-east5-a", "--project=my-proj"]
TRAIN = ["--gin-file=configs/experiments/stage1.gin", "--gin-file=configs/meshes/v5p-64.gin",
         "--binding=train.num_steps = 1000", "--binding=OptimizerConfig.learning_rate = 2e-05",
         "--binding=data.records = '/tmp/records/train-*.tfrecord'", "--workdir=gs://my-bucket/runs/stage1"]
TPU_CASES = {
    "tpu_create": ["create", *T, "--accelerator-type=v5p-64"],
    "tpu_create_queued_spot": ["create", *T, "--accelerator-type=v5p-64", "--queued", "--spot"],
    "tpu_create_reserved": ["create", *T, "--accelerator-type=v4-8", "--reserved",
                            "--runtime-version=tpu-ubuntu2204-base", "--internal-ip"],
    "tpu_sync_local": ["sync", *T, f"--repo={REPO}"],
    "tpu_sync_git": ["sync", *T, "--source=git", "--git-url=https://example.com/vrefer-jax.git", "--git-ref=v0.1.0"],
    "tpu_setup": ["setup", *T],
    "tpu_stage_data": ["stage-data", *T, "--src=gs://my-bucket/records", "--dst=/tmp/records"],
    "tpu_train": ["train", *T, *TRAIN, "--env=TPU_STDERR_LOG_LEVEL=0"],
    "tpu_train_resume": ["train", *T, *TRAIN, "--resume", "--kill-existing",
                         "--done-marker=gs://my-bucket/runs/stage1/DONE"],
    "tpu_logs": ["logs", *T],
    "tpu_stop": ["stop", *T],
    "tpu_status_queued": ["status", *T, "--queued"],
    "tpu_delete": ["delete", *T],
    "tpu_delete_queued": ["delete", *T, "--queued", "--async"],
}


@pytest.mark.parametrize("case", sorted(TPU_CASES))
def test_tpu_vm_dry_run_snapshot(case):
    text = dry(tpu_vm.main, TPU_CASES[case])
    assert text.strip(), case
    check_snapshot(case, text)


# ---------------------------------------------------------------------------------------------
# GPU cluster snapshots


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# three nodes\ngpu-a slots=8\n\nalice@gpu-b\ngpu-c  # last\n")
    return str(path)


GPU_TRAIN = ["--gin-file=configs/experiments/stage1.gin", "--gin-file=configs/meshes/8xH100.gin",
             "--binding=train.num_steps = 1000", "--workdir=/shared/runs/stage1"]
GPU_CASES = {
    "gpu_sync": ["sync", f"--repo={REPO}"],
    "gpu_sync_ssh_opts": ["sync", f"--repo={REPO}", "--ssh-opt=-p", "--ssh-opt=2222", "--delete",
                          "--remote-dir=/opt/vrefer-jax"],
    "gpu_setup": ["setup", "--jax-extra=cuda13"],
    "gpu_train": ["train", *GPU_TRAIN, "--port=23456", "--env=NCCL_DEBUG=WARN"],
    "gpu_logs": ["logs", "--host-index=1"],
    "gpu_stop": ["stop"],
}


@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_cluster_dry_run_snapshot(case, hostfile):
    argv = GPU_CASES[case]
    text = dry(gpu_cluster.main, [argv[0], f"--hostfile={hostfile}", *argv[1:]])
    assert text.strip(), case
    check_snapshot(case, text)


SBATCH = ["sbatch", *GPU_TRAIN, "--nodes=4", "--job-name=stage1", "--time=24:00:00", "--partition=gpu",
          "--chdir=/shared/vrefer-jax", "--python=/shared/venv/bin/python", "--resume", "--requeue",
          "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]


def test_sbatch_snapshot_and_syntax(tmp_path):
    text = dry(gpu_cluster.main, SBATCH)
    check_snapshot("gpu_sbatch", text)
    submit = dry(gpu_cluster.main, [*SBATCH, "--script=/shared/jobs/stage1.sbatch", "--submit"])
    check_snapshot("gpu_sbatch_submit", submit)
    assert submit.rstrip().endswith("sbatch /shared/jobs/stage1.sbatch")
    script = tmp_path / "job.sbatch"
    assert gpu_cluster.main([*SBATCH, f"--script={script}"]) == 0  # no --submit: only writes
    # the printed script masks --env values, the written one holds them and is the owner's alone
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=***" in text and "0.9" not in text
    assert script.read_text() == text.replace("FRACTION=***", "FRACTION=0.9") and os.access(script, os.X_OK)
    assert script.stat().st_mode & 0o777 == 0o700
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "--ntasks-per-node=1" in text and 'VREFER_PROCESS_ID="$SLURM_PROCID"' in text


def test_sbatch_task_command_runs(tmp_path):
    """The srun payload sets VREFER_PROCESS_ID from SLURM_PROCID and passes the trainer flags intact."""
    text = gpu_cluster.sbatch_script(["a.gin"], ["x.y = 'a b'"], "/w", nodes=2, python=sys.executable, port=1)
    srun_line = next(line for line in text.splitlines() if line.startswith("srun "))
    payload = shlex.split(srun_line)[-1]
    dump = "import json,os,sys; print(json.dumps([os.environ['VREFER_PROCESS_ID'], sys.argv[1:]]))"
    probe = payload.replace(f"-m {common.TRAINER_MODULE}", f"-c {shlex.quote(dump)}")
    out = subprocess.run(["bash", "-c", probe], env={**os.environ, "SLURM_PROCID": "1"}, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == ["1", ["--gin_file=a.gin", "--gin_bindings=x.y = 'a b'", "--workdir=/w"]]


# ---------------------------------------------------------------------------------------------
# remote shell texts: syntax, and the trainer start executed locally against a fake python


def _remote_texts(steps) -> list[str]:
    texts = []
    for s in steps:
        if isinstance(s, common.SecretInput):
            s = s.argv
        for argv in (s.argvs if isinstance(s, common.Parallel) else [s] if isinstance(s, list) else []):
            if argv[0] == "gcloud" and "ssh" in argv:
                texts.append(next(a for a in argv if a.startswith("--command=")).split("=", 1)[1])
            elif argv[0] == "ssh":
                texts.append(argv[-1])
    return texts


def test_remote_commands_are_valid_shell(hostfile):
    tpu = tpu_vm.Tpu("pod", "z")
    c = gpu_cluster.Cluster(tuple(gpu_cluster.read_hostfile(hostfile)))
    steps = [*tpu_vm.sync_steps(tpu, "git", git_url="u"), *tpu_vm.sync_steps(tpu, repo=REPO),
             *tpu_vm.setup_steps(tpu), *tpu_vm.stage_data_steps(tpu, "gs://b/r", "~/data"),
             *tpu_vm.train_steps(tpu, ["a.gin"], ["a.b = 'it''s'"], "gs://b/w", True, env={"A": "1 2"},
                                 done_marker="gs://b/w/DONE", kill_existing=True),
             *tpu_vm.logs_steps(tpu), *tpu_vm.stop_steps(tpu),
             *gpu_cluster.setup_steps(c), *gpu_cluster.train_steps(c, ["a.gin"], ["a.b = \"x y\""], "/w"),
             *gpu_cluster.logs_steps(c), *gpu_cluster.stop_steps(c)]
    texts = _remote_texts(steps)
    assert len(texts) == 7 + 3 + 3 + 1 + 3  # TPU ones, then per GPU host
    for text in texts:
        subprocess.run(["bash", "-n", "-c", text], check=True)


def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import json, os, sys\n"
                    "keep = ('VREFER_COORDINATOR', 'VREFER_NUM_PROCESSES', 'VREFER_PROCESS_ID', 'MY_')\n"
                    "env = {k: v for k, v in os.environ.items() if k.startswith(keep)}\n"
                    "json.dump({'argv': sys.argv[1:], 'env': env, 'cwd': os.getcwd()}, open('fake_out.json', 'w'))\n")
    fake.chmod(0o755)
    return venv


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.05)


def test_tpu_train_command_runs_detached(tmp_path):
    venv, code = _fake_venv(tmp_path), tmp_path / "code"
    code.mkdir()
    marker, log = tmp_path / "DONE", tmp_path / "train.log"
    bindings = ["a.b = 'it''s'", 'c.d = "x y"', "e.f = [1, 2]"]
    env_file = tmp_path / "env"
    copy, step = tpu_vm.train_steps(tpu_vm.Tpu("pod", "z"), ["configs/x.gin"], bindings, str(tmp_path / "w"),
                                    resume=True, remote_dir=str(code), venv=str(venv), log=str(log),
                                    env={"MY_VAR": "a b"}, done_marker=str(marker), allow_local_workdir=True,
                                    env_file=str(env_file))
    assert copy.argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "a b" not in str(copy.argv)
    env_file.write_text(copy.text)  # what the scp delivers
    (text,) = _remote_texts([step])
    assert "a b" not in text
    subprocess.run(["bash", "-c", text], check=True, timeout=10)  # returns at once
    _wait_for(marker)
    got = json.loads((code / "fake_out.json").read_text())
    assert got["argv"] == ["-m", common.TRAINER_MODULE, "--gin_file=configs/x.gin",
                           *[f"--gin_bindings={b}" for b in bindings], f"--workdir={tmp_path / 'w'}", "--resume"]
    assert got["env"] == {"MY_VAR": "a b"} and got["cwd"] == str(code)
    assert not env_file.exists()  # removed once read


def test_gpu_train_sets_process_env(tmp_path, hostfile):
    venv = _fake_venv(tmp_path)
    c = gpu_cluster.Cluster(tuple(gpu_cluster.read_hostfile(hostfile)))
    assert c.hosts == ("gpu-a", "alice@gpu-b", "gpu-c")
    steps = gpu_cluster.train_steps(c, ["g.gin"], ["a.b = 1"], "/w", port=4321, venv=str(venv), env={"MY_X": "1"},
                                    remote_dir=str(tmp_path), log=str(tmp_path / "log"))
    assert [s.argv[1] for s in steps] == list(c.hosts)
    for i, step in enumerate(steps):
        out = tmp_path / "fake_out.json"
        out.unlink(missing_ok=True)
        assert "MY_X" not in step.argv[-1]  # the value travels on stdin
        subprocess.run(["bash", "-c", step.argv[-1]], input=step.text, text=True, check=True, timeout=10)
        _wait_for(out)
        got = json.loads(out.read_text())
        assert got["env"] == {"MY_X": "1", "VREFER_COORDINATOR": "gpu-a:4321", "VREFER_NUM_PROCESSES": "3",
                              "VREFER_PROCESS_ID": str(i)}
        assert got["argv"][2:] == ["--gin_file=g.gin", "--gin_bindings=a.b = 1", "--workdir=/w"]


def test_hostfile_and_argument_errors(tmp_path):
    dup = tmp_path / "dup"
    dup.write_text("a\na\n")
    with pytest.raises(ValueError, match="duplicate"):
        gpu_cluster.read_hostfile(str(dup))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no hosts"):
        gpu_cluster.read_hostfile(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="gs://"):
        tpu_vm.train_steps(tpu_vm.Tpu("pod", "z"), ["a.gin"], [], "/local/dir")
    with pytest.raises(ValueError, match="TPU name"):
        tpu_vm.Tpu("Bad_Name", "z")
    with pytest.raises(ValueError, match="runtime"):
        tpu_vm.default_runtime_version("v9x-8")
    assert tpu_vm.default_runtime_version("v5litepod-256") == "v2-alpha-tpuv5-lite"
    with pytest.raises(SystemExit):  # argparse: --spot and --reserved exclude each other
        tpu_vm.main(["create", *T, "--accelerator-type=v4-8", "--spot", "--reserved", "--dry-run"], out=io.StringIO())


def test_runner_executes_polls_and_parallel(tmp_path):
    r = common.Runner(echo=False)
    assert r.run([sys.executable, "-c", "pass"]) == 0
    with pytest.raises(subprocess.CalledProcessError):
        r.run([sys.executable, "-c", "raise SystemExit(3)"])
    r.poll(common.Poll([sys.executable, "-c", "print('ACTIVE')"], until="ACTIVE", interval_s=0.01))
    with pytest.raises(TimeoutError):
        r.poll(common.Poll([sys.executable, "-c", "print('WAITING')"], until="ACTIVE", interval_s=0.01, timeout_s=0))
    outs = [tmp_path / f"p{i}" for i in range(3)]
    r.parallel(common.Parallel([[sys.executable, "-c", f"open({str(o)!r}, 'w')"] for o in outs]))
    assert all(o.exists() for o in outs)


# ---------------------------------------------------------------------------------------------
# secrets: --env values stay off command lines and are masked wherever printed

SECRET = "sk-live-5ecret"


def _all_argvs(steps) -> list[list[str]]:
    out = []
    for s in steps:
        if isinstance(s, common.Parallel):
            out += s.argvs
        elif isinstance(s, (common.SecretInput, common.Poll)):
            out.append(s.argv)
        elif isinstance(s, list):
            out.append(s)
    return out


def test_env_values_never_on_command_lines_and_masked_in_dry_runs(hostfile, tmp_path):
    tpu_text = dry(tpu_vm.main, ["train", *T, *TRAIN, f"--env=API_KEY={SECRET}", "--env=B=2"])
    gpu_text = dry(gpu_cluster.main, ["train", f"--hostfile={hostfile}", *GPU_TRAIN, f"--env=API_KEY={SECRET}"])
    sbatch_text = dry(gpu_cluster.main, [*SBATCH, f"--env=API_KEY={SECRET}", f"--script={tmp_path / 'j.sh'}"])
    for text in (tpu_text, gpu_text, sbatch_text):
        assert SECRET not in text and "API_KEY=***" in text
    assert "B=***" in tpu_text
    steps = [*tpu_vm.train_steps(tpu_vm.Tpu("pod", "z"), ["a.gin"], [], "gs://b/w", env={"API_KEY": SECRET}),
             *gpu_cluster.train_steps(gpu_cluster.Cluster(("h1", "h2")), ["a.gin"], [], "/w", env={"API_KEY": SECRET})]
    argvs = _all_argvs(steps)
    assert len(argvs) == 4 and not any(SECRET in a for argv in argvs for a in argv)
    assert all(isinstance(s, common.SecretInput) and SECRET in s.text and SECRET not in s.masked
               for s in steps if not isinstance(s, list))
    with pytest.raises(ValueError) as e:  # a malformed item is not echoed back
        common.parse_env([f"API_KEY:{SECRET}"])
    assert SECRET not in str(e.value)
    with pytest.raises(SystemExit):
        tpu_vm.main(["train", *T, *TRAIN, f"--env={SECRET}", "--dry-run"], out=io.StringIO())


def test_secret_input_runs_via_stdin_and_private_file(tmp_path, capsys):
    r = common.Runner()  # echoes what it runs to stderr
    got = tmp_path / "stdin.txt"
    r.secret_input(common.SecretInput(["sh", "-c", f"cat > {got}"], f"export K={SECRET}\n", "export K=***\n"))
    assert got.read_text() == f"export K={SECRET}\n"
    copy, mode = tmp_path / "copy.txt", tmp_path / "mode.txt"
    probe = f'stat -c %a "$1" > {mode} && cp "$1" {copy} && echo "$1" >> {mode}'
    r.secret_input(common.SecretInput(["sh", "-c", probe, "x", common.SECRET_FILE], SECRET, "***"))
    perm, path = mode.read_text().split()
    assert copy.read_text() == SECRET and perm == "600" and not os.path.exists(path)  # private, then removed
    assert SECRET not in capsys.readouterr().err
    with pytest.raises(subprocess.CalledProcessError) as e:
        r.secret_input(common.SecretInput(["sh", "-c", "exit 3"], SECRET, "***"))
    assert SECRET not in str(e.value)


def test_private_files_are_created_private(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("old")
    script.chmod(0o644)
    assert gpu_cluster.main([*SBATCH, f"--env=API_KEY={SECRET}", f"--script={script}"]) == 0
    assert script.stat().st_mode & 0o777 == 0o700 and f"export API_KEY={SECRET}" in script.read_text()
    definition = {"base": {"gin_files": ["a.gin"]}, "grid": {"x.y": [1, 2]}, "env": {"API_KEY": SECRET}}
    runs = sweep.expand(definition, str(tmp_path / "sw"), command=["true"])
    sweep.write_runs(runs, str(tmp_path / "sw"), definition, str(tmp_path))
    recorded = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert recorded["env"] == {"API_KEY": "***"} and definition["env"] == {"API_KEY": SECRET}
    assert not any(SECRET in p.read_text() for p in (tmp_path / "sw").rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# gin literals and sweep expansion


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, name, evaluate):
        return ("@", name, evaluate)

    def macro(self, name):
        return ("%", name)


def _parse_binding(line: str):
    (statement,) = list(config_parser.ConfigParser(line, _Delegate()))
    return statement.scope, statement.selector, statement.arg_name, statement.value


def test_gin_literals_parse_back():
    """Each formatted binding parses (with gin's own parser) to the key and value it came from."""
    values = {"f": 2e-4, "tiny": 1e-12, "i": 3, "t": True, "n": None, "s": "it's \"x\"", "l": [1, "a"],
              "tu": (1,), "d": {"k": [0.5]}, "neg": -1.5, "ref": "@fn", "call": "@fn()", "mac": "%M"}
    want = {**values, "ref": ("@", "fn", False), "call": ("@", "fn", True), "mac": ("%", "M")}
    for k, v in values.items():
        assert _parse_binding(common.gin_binding(f"scope/probe.{k}", v)) == ("scope", "probe", k, want[k])
    assert common.gin_literal("@foo") == "@foo" and common.gin_literal("%MACRO") == "%MACRO"
    with pytest.raises(ValueError):
        common.gin_literal(float("inf"))
    with pytest.raises(ValueError):
        common.gin_binding("a b", 1)


def test_example_sweep_expansion_is_stable(tmp_path):
    definition = sweep.load_sweep(ROOT / "launch" / "sweeps" / "example_lr.json")
    runs = sweep.expand(definition, str(tmp_path), command=["python", "-m", "x"])
    assert len(runs) == 3 * 2
    assert [r.name for r in runs] == [
        "000-learning_rate=0.001_warmup_ratio=0.0", "001-learning_rate=0.001_warmup_ratio=0.03",
        "002-learning_rate=0.0003_warmup_ratio=0.0", "003-learning_rate=0.0003_warmup_ratio=0.03",
        "004-learning_rate=0.0001_warmup_ratio=0.0", "005-learning_rate=0.0001_warmup_ratio=0.03"]
    again = sweep.expand(json.loads(json.dumps(definition)), str(tmp_path), command=["python", "-m", "x"])
    assert [r.record() for r in again] == [r.record() for r in runs]
    r = runs[3]
    assert r.bindings == ["OptimizerConfig.min_lr_ratio = 0.0", "OptimizerConfig.learning_rate = 0.0003",
                          "OptimizerConfig.warmup_ratio = 0.03"]
    assert r.argv[-1] == f"--workdir={tmp_path}/{r.name}" and r.run_dir == str(tmp_path / r.name)


def test_names_safe_unique_and_bounded(tmp_path):
    long = "x" * 200
    definition = {"base": {"bindings": {"m.a": 1, "m.lr": 9}},
                  "list": [{"m.lr": 0.1, "n.lr": "a/b c", "k.ref": "@fn"}, {"m.lr": 0.1, "n.lr": [1, 2]},
                           {"m.lr": 0.1, "n.lr": long}, {"m.lr": 0.2, "n.lr": long + "y"}]}
    runs = sweep.expand(definition, str(tmp_path), command=["p"])
    names = [r.name for r in runs]
    assert len(set(names)) == 4
    assert all(len(n) <= sweep.MAX_NAME and all(c.isalnum() or c in "._=+-" for c in n) for n in names)
    # the two `lr` keys are told apart by their full keys
    assert names[0] == "000-m.lr=0.1_n.lr=a-b-c_ref=fn" and names[1] == "001-m.lr=0.1_n.lr=1-2"
    assert len(runs[2].name) == sweep.MAX_NAME and runs[2].name[4:-9] == runs[3].name[4:-9].replace("0.2", "0.1")
    assert runs[2].name[-9:] != runs[3].name[-9:]  # truncated names end in a digest of the bindings
    # a swept key replaces the base value instead of being bound twice
    assert runs[0].bindings == ["m.a = 1", "m.lr = 0.1", "n.lr = 'a/b c'", "k.ref = @fn"]
    assert sweep.expand({}, str(tmp_path), command=["p"])[0].name == "000"
    # a binding with the same value in every run is left out of the names
    grid = sweep.expand({"grid": {"a.x": [1, 2], "a.y": [3]}}, str(tmp_path), command=["p"])
    assert [r.name for r in grid] == ["000-x=1", "001-x=2"] and grid[1].bindings == ["a.x = 2", "a.y = 3"]


def test_sweep_validation_and_selection(tmp_path):
    for bad, msg in [({"grid": {"a.b": [1]}, "list": [{}]}, "not both"), ({"grid": {"a.b": []}}, "non-empty"),
                     ({"gird": {}}, "unknown keys"), ({"base": {"gin": []}}, "base"),
                     ({"base": {"bindings": ["no equals sign"]}}, "key = value")]:
        with pytest.raises(ValueError, match=msg):
            sweep.expand(bad, str(tmp_path), command=["p"])
    runs = sweep.expand({"grid": {"a.b": list(range(10))}}, str(tmp_path), command=["p"])
    assert [r.index for r in sweep.select(runs, "0,3,5:7,8:")] == [0, 3, 5, 6, 8, 9]


def test_yaml_and_json_loading(tmp_path, monkeypatch):
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"grid": {"a.lr": [1e-3]}}))
    ym = tmp_path / "s.yaml"
    ym.write_text("grid:\n  a.lr: [1e-3, 2.5E+2, '1e-3', 5]\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        yaml = None
    if yaml is not None:  # YAML 1.1 would read 1e-3 as a string; the loader reads a float
        assert sweep.load_sweep(ym)["grid"]["a.lr"] == [1e-3, 250.0, "1e-3", 5]
    monkeypatch.setitem(sys.modules, "yaml", None)  # as without pyyaml: JSON still works
    assert sweep.load_sweep(js)["grid"]["a.lr"] == [1e-3]
    with pytest.raises(ValueError, match="pyyaml"):
        sweep.load_sweep(ym)


TINY_TRAINER = """
import json, os, sys
args = sys.argv[1:]
workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "args.json"), "w") as f:
    json.dump({"args": args, "run": os.environ.get("VREFER_SWEEP_RUN"), "cwd": os.getcwd()}, f)
with open(os.environ["CALLS"], "a") as f:
    f.write(os.environ["VREFER_SWEEP_RUN"] + "\\n")
print("trained", flush=True)
sys.exit(3 if "--gin_bindings=m.fail = True" in args else 0)
"""


def test_local_sweep_runs_skips_done_and_records_failures(tmp_path):
    script = tmp_path / "tiny_trainer.py"
    script.write_text(TINY_TRAINER)
    calls = tmp_path / "calls.txt"
    definition = {"base": {"gin_files": ["a.gin"], "bindings": ["m.steps = 2"], "args": ["--flag"]},
                  "grid": {"m.lr": [0.1, 0.2], "m.name": ["x y", "z"]},
                  "command": [sys.executable, str(script)], "env": {"CALLS": str(calls)}}
    path, out = tmp_path / "sweep.json", tmp_path / "sw"
    path.write_text(json.dumps(definition))
    assert sweep.main([str(path), f"--out={out}", "--parallel=2", f"--cwd={tmp_path}"]) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 4 and sorted(calls.read_text().split()) == sorted(r["name"] for r in runs)
    for rec in runs:
        d = Path(rec["run_dir"])
        assert (d / "DONE").exists() and "trained" in (d / "log.txt").read_text()
        got = json.loads((d / "args.json").read_text())
        assert got["args"] == rec["argv"][2:] and got["run"] == rec["name"] and got["cwd"] == str(tmp_path)
        lr = rec["swept"]["m.lr"]
        assert got["args"][:3] == ["--gin_file=a.gin", "--gin_bindings=m.steps = 2", f"--gin_bindings=m.lr = {lr}"]
        assert got["args"][-1] == "--flag"
        assert (d / "bindings.gin").read_text().splitlines() == rec["bindings"]
        assert json.loads((d / "run.json").read_text()) == rec
        subprocess.run(["bash", "-n", str(d / "command.sh")], check=True)
    assert runs[1]["bindings"][-1] == "m.name = 'z'" and runs[0]["bindings"][-1] == "m.name = 'x y'"

    # DONE runs are skipped: only the run whose marker was removed runs again
    (Path(runs[2]["run_dir"]) / "DONE").unlink()
    calls.write_text("")
    buf = io.StringIO()
    assert sweep.main([str(path), f"--out={out}", "--dry-run"], out=buf) == 0
    lines = buf.getvalue().splitlines()
    assert sum(line.endswith("DONE, skipped") for line in lines) == 3 and shlex.split(lines[-1]) == runs[2]["argv"]
    assert sweep.main([str(path), f"--out={out}", f"--cwd={tmp_path}"]) == 0
    assert calls.read_text().split() == [runs[2]["name"]]

    # a failing run gets FAILED and no DONE, and the sweep exits 1
    definition["grid"]["m.fail"] = [True]
    path.write_text(json.dumps(definition))
    out2 = tmp_path / "sw2"
    assert sweep.main([str(path), f"--out={out2}", "--only=0", f"--cwd={tmp_path}"]) == 1
    recs = [json.loads(line) for line in (out2 / "runs.jsonl").read_text().splitlines()]
    assert len(recs) == 4  # every run is recorded, --only picks which start
    d = Path(recs[0]["run_dir"])
    assert (d / "FAILED").read_text().strip() == "exit code 3" and not (d / "DONE").exists()
    assert not any((Path(r["run_dir"]) / "log.txt").exists() for r in recs[1:])


def _sweep_file(tmp_path) -> Path:
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"base": {"gin_files": ["configs/experiments/stage1.gin", "configs/meshes/v5p-64.gin"],
                                         "bindings": {"train.num_steps": 500}},
                                "grid": {"OptimizerConfig.learning_rate": [2e-5, 1e-5]},
                                "command": ["python", "-m", "vrefer_jax.training.cli"]}))
    return path


def test_sweep_dry_run_snapshots(tmp_path):
    path = _sweep_file(tmp_path)
    out = tmp_path / "sw"
    local = dry(sweep.main, [str(path), f"--out={out}", "--parallel=2"]).replace(str(tmp_path), "<TMP>")
    check_snapshot("sweep_local", local)
    tpu = dry(sweep.main, [str(path), f"--out={out}", "--backend=tpu", "--workdir-root=gs://my-bucket/sweeps/lr",
                           "--tpu-prefix=lr", "--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-8",
                           "--spot", "--queued", f"--repo={REPO}"]).replace(str(tmp_path), "<TMP>")
    check_snapshot("sweep_tpu", tpu)
    delete = dry(sweep.main, [str(path), f"--out={out}", "--backend=tpu", "--workdir-root=gs://my-bucket/sweeps/lr",
                              "--tpu-prefix=lr", "--zone=us-east5-a", "--queued", "--steps=delete"])
    check_snapshot("sweep_tpu_delete", delete)
    assert not out.exists()  # a dry run writes nothing
    assert "--workdir=gs://my-bucket/sweeps/lr/001-learning_rate=1e-05" in tpu
    with pytest.raises(SystemExit):  # the TPU backend needs a gs:// workdir root
        dry(sweep.main, [str(path), f"--out={out}", "--backend=tpu", "--workdir-root=/local", "--tpu-prefix=lr",
                         "--zone=z", "--accelerator-type=v4-8"])
