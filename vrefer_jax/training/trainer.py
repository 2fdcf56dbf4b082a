"""The training loop: data -> sharded step -> metrics, eval, checkpoints; resumable and
preemption-safe.

    train(workdir, resume=True) runs the gin-configured job (ModelConfig, MeshConfig,
    OptimizerConfig, StepConfig, DataConfig, TrainConfig) and returns a summary dict.

Every process runs the same loop on its slice of each global batch (`distributed.to_global`). Process 0
writes TensorBoard scalars (`<workdir>/tb`), the progress bar and `metrics.jsonl`. A SIGTERM (TPU
preemption, `launch/… stop`) finishes the current step, saves a checkpoint and returns; `--resume`
(the default) continues from the latest intact checkpoint with the same data order, bit-exactly.

Re-running a finished run is a no-op that says so; raising `total_steps` continues it and replaces
`final/` atomically. `metrics.jsonl` keeps one line per step (an eval's loss joins that step's line);
on resume, lines written after the restored checkpoint are dropped first, so none is duplicated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import gin
import jax
import numpy as np

from vrefer_jax import families
from vrefer_jax.config import IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, ModelConfig
from vrefer_jax.sharding import MeshConfig, logical_axis_rules, make_mesh
from vrefer_jax.training import adapters, flops as flops_lib
from vrefer_jax.training import optimizer as opt_lib
from vrefer_jax.training import train_state
from vrefer_jax.training.checkpointing import Checkpointer, _barrier
from vrefer_jax.training.step import DATA_AXES, StepConfig, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The configured job cannot run as given (the CLI prints it in one line)."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Record sets (dirs/globs of `vrefer-data convert` shards), mixture weights and the tokenizer.

    The loader itself is `data_pipeline.loader.LoaderConfig`, bound in gin once for both loaders
    (`LoaderConfig.seq_len = 2048`) or per loader through the scopes `train/` and `eval/`
    (`eval/LoaderConfig.overflow = 'error'`); what the model fixes (frames, image size, grid, pad
    id, aspect) comes from the model config."""

    train: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    eval: str = ""
    tokenizer: str = ""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    total_steps: int = 1000
    global_batch_size: int = 128
    seed: int = 42
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_last: int = 3
    keep_every: int = 0
    async_checkpoint: bool = True
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    peak_flops_per_device: float = 0.0  # for MFU; 0 = not reported
    init_from: str = ""  # imported folder (`vrefer-convert import`, a run's final/) or HF folder
    save_final: bool = True  # write <workdir>/final in the imported-folder layout
    progress_bar: bool = True


class _Preemption:
    """SIGTERM sets a flag; the loop saves and returns at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            log.warning("signal %d: saving a checkpoint after this step", signum)
            self.requested = True
        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def agreed(self) -> bool:
        """Every process stops at the same step (any one signalled -> all save)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def load_init_params(path: str, mesh=None, rules=None):
    """(cfg, params) from an imported folder (restored straight into the parameter shardings on
    `mesh`: each host reads its own shards) or an official Hugging Face folder (imported by the
    family its `model_type` names, each tensor placed straight into its shards on `mesh`)."""
    from vrefer_jax.checkpoints import hf_config, store

    if store.is_imported(path):
        return store.load_imported(path, mesh, rules)
    family = families.for_model_type(hf_config.find_config(path).get("model_type"))
    return family.load_hf(path, mesh=mesh, rules=rules)


def check_special_ids(cfg: ModelConfig, tok) -> None:
    """Refuse a model config whose special ids disagree with the tokenizer the data is encoded with.

    The model turns `region_token_id` positions into object slots and the loader pads with
    `pad_token_id`; the data has `<region>`, pad and eos from the tokenizer. A different region id
    would train an ordinary text token as object slots. The multimodal placeholders (-200/-201) are
    shared constants (`vrefer_jax.config`), so the ids above must be real vocabulary ids, never them.
    """
    from vrefer_jax.text.tokenizer import REGION_TOKEN

    vocab = cfg.text.vocab_size
    region = tok.token_to_id(REGION_TOKEN)
    problems = []
    if tok.vocab_size > vocab:
        problems.append(f"the tokenizer has {tok.vocab_size} ids, TextConfig.vocab_size is {vocab}")
    if region is None:
        problems.append(f"the tokenizer has no {REGION_TOKEN} token")
    elif region != cfg.region_token_id:
        problems.append(f"ModelConfig.region_token_id is {cfg.region_token_id}, the tokenizer's {REGION_TOKEN} is "
                        f"{region}")
    if cfg.pad_token_id != tok.pad_id:
        problems.append(f"ModelConfig.pad_token_id is {cfg.pad_token_id}, the tokenizer's pad is {tok.pad_id}")
    for name, i in (("ModelConfig.region_token_id", cfg.region_token_id), ("ModelConfig.pad_token_id", cfg.pad_token_id),
                    ("the tokenizer's eos", tok.eos_id)):
        if i in (IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX) or not 0 <= i < vocab:
            problems.append(f"{name} {i} is not a vocabulary id (0..{vocab - 1})")
    for name, i in (("eos", tok.eos_id), ("pad", tok.pad_id), ("bos", tok.bos_id)):
        if i is not None and i == cfg.region_token_id:
            problems.append(f"ModelConfig.region_token_id {i} is also the tokenizer's {name}")
    if problems:
        raise ConfigError("special ids of the model and the tokenizer disagree: " + "; ".join(problems))


def final_complete(final_dir: str) -> bool:
    """`final/` as `save_final` leaves it (written under another name and renamed: complete or absent)."""
    from vrefer_jax.checkpoints import store

    return store.is_imported(final_dir) and os.path.isdir(os.path.join(final_dir, store.PARAMS))


class MetricsLog:
    """`metrics.jsonl` with one line per step (process 0 only).

    Opening it for a run starting at `start` drops the lines of later steps (written after the
    checkpoint a resume restores, before the run stopped) and any unreadable partial line, so the
    resumed run writes each step once. A second record for the step just written (its eval loss)
    is merged into that line instead of adding another."""

    def __init__(self, path: str, start: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self._last: dict | None = None
        self._offset = 0
        if enabled:
            rows = self.read(path)
            kept = [r for r in rows if r["step"] <= start]
            if len(kept) != len(rows):
                log.info("metrics.jsonl: dropped %d lines past step %d (the run resumes there)", len(rows) - len(kept),
                         start)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, path)

    @staticmethod
    def read(path: str) -> list[dict]:
        """The records, one per step in step order (duplicates of a step merged, later wins)."""
        rows: dict[int, dict] = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        step = int(rec["step"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a kill
                    rows[step] = {**rows.get(step, {}), **rec}
        return [rows[k] for k in sorted(rows)]

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "r+") as f:
            if self._last is not None and self._last["step"] == rec["step"]:
                rec = {**self._last, **rec}
                f.seek(self._offset)
                f.truncate()
            else:
                f.seek(0, os.SEEK_END)
                self._offset = f.tell()
            f.write(json.dumps(rec) + "\n")
        self._last = rec


def _loader(scope: str, cfg, batch: int, seed: int, sources, tokenizer, weights=None, epochs=None,
            out_len: int | None = None, overrides: Mapping[str, Any] | None = None):
    """The `scope` ('train' / 'eval') loader of the model's family (`Family.train_loader`):
    `LoaderConfig` from its gin bindings in that scope, the model's fixed fields, and `overrides`
    (what `train(loader=...)` gives). VideoRefer-7B reads record shards, VRVL3 JSON / JSONL files."""
    family = families.for_config(cfg)
    try:
        with gin.config_scope(scope):
            return family.train_loader(cfg, list(sources), tokenizer, weights, max_expanded_len=out_len,
                                       batch_size=batch, seed=seed, num_epochs=epochs, **(overrides or {}))
    except TypeError as e:  # an unbound required field, e.g. seq_len
        raise ConfigError(f"{scope} loader: {e}; bind it in gin (e.g. LoaderConfig.seq_len = 2048)") from None


def _batch_spec(cfg) -> dict[str, int]:
    return {k: v.ndim for k, v in families.for_config(cfg).dummy_batch(cfg, abstract=True).items()}


def _gin_model_config():
    """The model config of the family whose config class the gin configuration binds (VideoRefer-7B's
    `ModelConfig` when none or several are)."""
    bound = [f for f in families.REGISTRY.values() if families._binds(f.config_class)]
    return (bound[0].config_class if len(bound) == 1 else ModelConfig)()


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def train(workdir: str, *, resume: bool = True, model_cfg: ModelConfig | None = None,
          data_cfg: DataConfig | None = None, train_cfg: TrainConfig | None = None,
          opt_cfg: opt_lib.OptimizerConfig | None = None, step_cfg: StepConfig | None = None,
          mesh_cfg: MeshConfig | None = None, tokenizer=None, on_step=None,
          loader: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a training job in `workdir`. Configs default to their gin bindings;
    `loader` holds `LoaderConfig` fields for both loaders without gin (tests, notebooks).
    `on_step(step, metrics)` is called for every step as its metrics are read back, which is while
    the next step runs: the host never waits on the device except to read the previous step."""
    from vrefer_jax.distributed import to_global

    cfg = model_cfg or _gin_model_config()
    family = families.for_config(cfg)
    data = data_cfg or DataConfig()
    tc = train_cfg or TrainConfig()
    oc = opt_cfg or opt_lib.OptimizerConfig()
    sc = step_cfg or StepConfig()
    if not data.train:
        raise ConfigError("DataConfig.train is empty: bind it to one or more record sets")
    vision = [n for n in opt_lib.PART_NAMES["vision_encoder"] if any(n in g for g in family.param_groups.values())]
    if any(n in oc.trainable for n in vision) != cfg.train_vision_tower:
        raise ConfigError(f"OptimizerConfig trains {oc.trainable} and {type(cfg).__name__}.train_vision_tower="
                         f"{cfg.train_vision_tower} disagree: the {vision[0]} gets gradients only with both set")
    nproc = jax.process_count()
    if tc.global_batch_size % nproc:
        raise ConfigError(f"global batch {tc.global_batch_size} not divisible by {nproc} processes")
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    final_dir = os.path.join(workdir, "final")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tc.checkpoint_every,
                        keep_last=tc.keep_last, keep_every=tc.keep_every, async_save=tc.async_checkpoint)
    latest = ckpt.latest_step if resume else None
    if not resume and (old := ckpt.latest_step) is not None:  # its saves would collide with the old steps
        ckpt.close()
        raise ConfigError(f"{workdir} holds checkpoints up to step {old}: resume it, or start afresh in "
                          "another workdir")
    if latest is not None and latest >= tc.total_steps and (final_complete(final_dir) or not tc.save_final):
        ckpt.close()
        log.info("%s already finished at step %d (total_steps %d): nothing to do; raise total_steps to train on",
                 workdir, latest, tc.total_steps)
        return dict(step=latest, preempted=False, already_done=True, history=MetricsLog.read(metrics_path),
                    skipped={}, final=final_dir if tc.save_final else None, state=None)

    mesh = make_mesh(mesh_cfg or MeshConfig())
    rules = logical_axis_rules()
    tx, schedule = opt_lib.make_optimizer(oc, tc.total_steps)
    shardings = train_state.state_shardings(cfg, tx, mesh, rules)
    tok = tokenizer or family.load_tokenizer(data.tokenizer)
    if family.check_tokenizer is None:
        check_special_ids(cfg, tok)
    else:
        try:
            family.check_tokenizer(cfg, tok)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    it = _loader("train", cfg, tc.global_batch_size // nproc, tc.seed, data.train, tok, data.weights,
                 out_len=sc.out_len, overrides=loader)

    if latest is not None:
        state, meta = ckpt.restore(train_state.abstract_unboxed(cfg, tx, shardings), it)
        log.info("resumed from step %d (%s)", int(state.step), ckpt.directory)
    else:
        params = None
        if tc.init_from:
            init_cfg, params = load_init_params(tc.init_from, mesh, rules)
            try:  # a LoRA run from a plain checkpoint: fresh adapters (B = 0), base stored as configured
                params = adapters.attach(cfg, params, shardings.params, tc.seed)
            except ValueError as e:
                raise ConfigError(f"{tc.init_from}: {e}") from None
            if _count(params) != _count(family.abstract_params(cfg)):
                raise ConfigError(f"{tc.init_from}: parameter shapes do not match the configured model")
            if (init_cfg.region_token_id, init_cfg.pad_token_id) != (cfg.region_token_id, cfg.pad_token_id):
                raise ConfigError(f"{tc.init_from}: region/pad token ids {init_cfg.region_token_id}/"
                                  f"{init_cfg.pad_token_id} differ from ModelConfig's {cfg.region_token_id}/"
                                  f"{cfg.pad_token_id}")
            del init_cfg
        state = train_state.create_state(cfg, tx, shardings, tc.seed, params)
        meta = {}
    start = int(state.step)

    batch_spec = _batch_spec(cfg)
    step_fn = make_train_step(cfg, sc, tx, schedule, oc.trainable, mesh, rules, shardings, batch_spec)
    eval_fn = make_eval_step(cfg, sc, mesh, rules, shardings.params, batch_spec) if data.eval and tc.eval_every else None
    flop_model = flops_lib.FlopModel(cfg, oc.trainable) if isinstance(cfg, ModelConfig) else None

    writer = None
    if main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start)
        with open(os.path.join(workdir, "config.gin"), "w") as f:
            f.write(gin.config_str())
    metrics = MetricsLog(metrics_path, start, enabled=main)
    history: list[dict] = []
    bar = None
    if main and tc.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=tc.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    saved = {start} if ckpt.latest_step == start else set()

    def save(step: int, force: bool) -> None:
        if step in saved:
            return
        meta_now = {**meta, "step": step, "skipped": dict(it.skipped), "time": time.time()}
        if ckpt.save(step, state, it, meta_now, force=force):
            saved.add(step)

    preempted = False
    last_t, last_step, tokens_acc, flops_acc = time.perf_counter(), start, 0, 0.0
    pending: list[tuple[int, Any, int]] = []  # (done, device metrics, region frames) not yet read back
    done = start

    def record(step_done: int, m_dev, region_frames: int) -> None:
        """Read one step's metrics back and log them (the host is one step behind the device)."""
        nonlocal last_t, last_step, tokens_acc, flops_acc
        m = jax.device_get(m_dev)
        tokens_acc += int(m["tokens"])
        if flop_model is not None:
            flops_acc += flop_model.step_flops(tc.global_batch_size, int(m["tokens"]), region_frames)
        if int(m["nonfinite"]) >= tc.max_nonfinite:
            save(done, force=True)
            ckpt.wait()
            raise FloatingPointError(f"{int(m['nonfinite'])} non-finite steps in a row at step {step_done}")
        if step_done == start + 1 and main:
            with open(os.path.join(workdir, "operative_config.gin"), "w") as f:
                f.write(gin.operative_config_str())
        if step_done % tc.log_every == 0 or step_done == tc.total_steps:
            now = time.perf_counter()
            dt = (now - last_t) / max(step_done - last_step, 1)
            rec = dict(step=step_done, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                       learning_rate=float(m["learning_rate"]), step_time=dt,
                       tokens_per_s=tokens_acc / max(now - last_t, 1e-9),
                       skipped_steps=int(not m["finite"]), skipped_samples=sum(it.skipped.values()))
            if tc.peak_flops_per_device and flop_model is not None:
                rec["mfu"] = flops_acc / max(now - last_t, 1e-9) / (tc.peak_flops_per_device * jax.device_count())
            last_t, last_step, tokens_acc, flops_acc = now, step_done, 0, 0.0
            history.append(rec)
            if main:
                for k, v in rec.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step_done)
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['learning_rate']:.2e}")
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(step_done, m)

    def flush() -> None:
        while pending:
            record(*pending.pop(0))

    with _Preemption() as pre:
        for step in range(start, tc.total_steps):
            host_batch = next(it)
            batch = to_global(host_batch, mesh, DATA_AXES)
            state, m = step_fn(state, batch)  # dispatched; runs while the host reads the last metrics
            done = step + 1
            flush()
            pending.append((done, m, host_batch["region_frames"].shape[1] if "region_frames" in host_batch else 0))
            evaluating = eval_fn is not None and done % tc.eval_every == 0
            if evaluating or done == tc.total_steps:
                flush()
            if evaluating:
                ev = evaluate_loss(eval_fn, state.params, data, cfg, tc, sc, tok, mesh, loader)
                history.append(dict(step=done, eval_loss=ev))
                if main:
                    writer.add_scalar("eval/loss", ev, done)
                    metrics.write(dict(step=done, eval_loss=ev))
            save(done, force=False)
            if pre.agreed():
                flush()
                save(done, force=True)
                preempted = True
                break
        flush()
    if bar is not None:
        bar.close()
    final_step = int(state.step)
    if not preempted:
        save(final_step, force=True)
    ckpt.wait()
    ckpt.close()
    it.close()
    if writer is not None:
        writer.close()
    if not preempted and tc.save_final:
        save_final(final_dir, cfg, state.params, data.tokenizer or None)
    if main and not preempted:
        open(os.path.join(workdir, "DONE"), "w").close()
    return dict(step=final_step, preempted=preempted, already_done=False, history=history, skipped=dict(it.skipped),
                final=final_dir if (tc.save_final and not preempted) else None, state=state)


def evaluate_loss(eval_fn, params, data: DataConfig, cfg: ModelConfig, tc: TrainConfig, sc: StepConfig, tok,
                  mesh, loader: Mapping[str, Any] | None = None) -> float:
    """Mean next-token CE over the first `eval_batches` batches of the eval records (fixed order)."""
    from vrefer_jax.distributed import to_global

    nproc = jax.process_count()
    it = _loader("eval", cfg, tc.global_batch_size // nproc, 0, [data.eval], tok, epochs=1, out_len=sc.out_len,
                 overrides={**(loader or {}), "worker_count": 0})
    total, count = 0.0, 0
    try:
        for _ in range(tc.eval_batches):
            try:
                b = next(it)
            except StopIteration:
                break
            out = jax.device_get(eval_fn(params, to_global(b, mesh, DATA_AXES)))
            total, count = total + float(out["loss_sum"]), count + int(out["count"])
    finally:
        it.close()
    return total / max(count, 1)


def save_final(out: str, cfg, params, tokenizer_dir: str | None) -> None:
    """Parameters in the imported-folder layout, so `vrefer-infer` / `vrefer-eval` / `vrefer-convert
    export` read them. Called on every process (Orbax writes each process's shards).

    Written to `<out>.partial` and renamed into place by process 0 once every process is done, so
    `out` is never half-written and an extended run replaces the previous one's `final/`."""
    import shutil

    from vrefer_jax.checkpoints import hf_config
    from vrefer_jax.checkpoints.store import save_imported

    main = jax.process_index() == 0
    partial, old = out + ".partial", out + ".old"
    if main:
        if os.path.isdir(old):  # left by a run killed between the two renames below
            if os.path.isdir(out):
                shutil.rmtree(old)
            else:
                os.rename(old, out)
        shutil.rmtree(partial, ignore_errors=True)
    _barrier("vrefer_final_start")
    tok_src = tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else (
        os.path.dirname(tokenizer_dir) if tokenizer_dir else None)
    family = families.for_config(cfg)
    hf_cfg = family.hf_config(cfg) if family.hf_config is not None else hf_config.model_config_to_hf(cfg)
    save_imported(partial, cfg, params, hf_cfg, tok_src)
    _barrier("vrefer_final_written")
    if main:
        if os.path.isdir(out):
            os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    _barrier("vrefer_final_renamed")
