"""Training loop: endless synthetic batches, loss -log q(theta | prior, data)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flashbayes import tasks as _tasks
from flashbayes.amortized._checkpoint import (
    CheckpointError,
    has_tree,
    load_tree,
    read_header,
    save_checkpoint,
)
from flashbayes.amortized._dt import ConfigDict, DistributionTransformer, DTConfig
from flashbayes.amortized._model import AmortizedPosterior, checkpoint_header, frame_batch
from flashbayes.amortized._parallel import (
    barrier,
    broadcast_from_main,
    data_mesh,
    replicate,
    replicated,
    shard_batch,
    to_host,
)

_CKPT_RE = re.compile(r"^ckpt_(\d{8})\.safetensors$")


class TrainingError(RuntimeError):
    """Training could not go on (e.g. non-finite losses)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigDict):
    """Optimisation settings.

    Attributes:
        steps: total optimiser steps.
        batch_size: synthetic problems per step.
        learning_rate: peak learning rate (AdamW).
        warmup_steps: linear warm-up before cosine decay to `final_lr_ratio` of the peak.
        grad_clip: global-norm clipping.
        weight_decay: AdamW decoupled weight decay.
        checkpoint_every: write a checkpoint every this many steps (and at the end).
        log_every: call the progress callback every this many steps.
        max_bad_steps: consecutive non-finite steps tolerated before training stops.
        d_model, n_layers, n_heads, mlp_ratio, data_layers: the network (see DTConfig).
    """

    steps: int = 20_000
    batch_size: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    final_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    weight_decay: float = 1e-5
    checkpoint_every: int = 1000
    log_every: int = 50
    max_bad_steps: int = 20
    _what = "train config"
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: int = 2
    data_layers: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "max_bad_steps",
                     "d_model", "n_layers", "n_heads", "mlp_ratio", "data_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer; got {v!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0; got {self.warmup_steps!r}")
        for name in ("grad_clip", "weight_decay", "final_lr_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not v >= 0 or v != v:
                raise ValueError(f"{name}: expected a number >= 0; got {v!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: expected > 0; got {self.learning_rate}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={self.n_heads}; got "
                             f"{self.d_model}")

    def model_config(self, task: _tasks.Task) -> DTConfig:
        return DTConfig(theta_dim=task.theta_dim, data_dim=task.network_data_dim,
                        d_model=self.d_model,
                        n_layers=self.n_layers, n_heads=self.n_heads, mlp_ratio=self.mlp_ratio,
                        data_layers=self.data_layers, n_scale=float(max(task.n_max, 1)))


@dataclasses.dataclass(frozen=True)
class TrainEvent:
    """What the progress callback receives."""

    step: int
    total: int
    loss: float
    steps_per_second: float
    bad_steps: int = 0
    message: str = ""


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    warmup = min(cfg.warmup_steps, cfg.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.learning_rate * cfg.final_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def batch_loss(network: DistributionTransformer, batch: _tasks.Batch) -> jax.Array:
    """Mean over the batch of -log q(theta | prior, data)."""
    lp = jax.vmap(network.log_prob)(batch.theta, batch.weights, batch.means, batch.scale_tril,
                                    batch.cmask, batch.data, batch.dmask)
    return -jnp.mean(lp)


def latest_checkpoint(folder: str | Path) -> Path | None:
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if _CKPT_RE.match(p.name))
    return found[-1] if found else None


def _task_name(task: _tasks.Task | str) -> tuple[_tasks.Task, dict]:
    if isinstance(task, str):
        task = _tasks.get(task)
    if isinstance(task, _tasks.Task):
        return task, _tasks.task_params(task)
    raise TypeError(f"task: expected a task name or Task; got {type(task).__name__}")


_RESUME_MISMATCH = {
    "train_config": "with another train config; resume with the same settings",
    "key": "with another key (seed); resume with the same key",
    "task_params": "for other task parameters",
    "init_sha256": "from other starting weights (--init)",
}
_VOLATILE = ("step", "train_seconds", "format_version", "devices", "processes", "loss")


def _check_resume_header(found: dict, expected: dict, path: Path) -> None:
    if "task" in expected and found.get("task") != expected["task"]:
        raise CheckpointError(f"resume: expected a checkpoint of task {expected['task']!r}; got "
                              f"{found.get('task')!r} in {path}")
    for field, value in expected.items():
        if field in _VOLATILE or field == "task":
            continue
        if found.get(field) != value:
            what = _RESUME_MISMATCH.get(field, f"with another {field}")
            raise CheckpointError(f"resume: the checkpoint {path} was written {what}")


def fit_network(network: eqx.Module, loss_fn: Callable[[eqx.Module, Any], jax.Array],
                sample_batch: Callable[[jax.Array, int], Any], config: TrainConfig, *,
                key: jax.Array, out_dir: str | Path | None = None, resume: bool = False,
                callback: Callable[[TrainEvent], Any] | None = None,
                header: dict | None = None,
                devices: int | Sequence[Any] | None = 1) -> tuple[eqx.Module, dict]:
    """Fit any Equinox network on endless synthetic batches, data-parallel over devices.

    The batch axis is sharded over a one-axis device mesh and the parameters are replicated, so
    every device draws and differentiates its own slice of each batch and XLA averages the
    gradients; one compiled step serves one device, several devices of a host, and several
    processes joined by `initialize_distributed` (then `jax.devices()` spans all of them). The
    batches depend only on `key` and the step, so the loss and weights after k steps equal
    those of a one-device run to float rounding, whatever the number of devices.

    Args:
        network: the initial network.
        loss_fn: `loss_fn(network, batch)`, the scalar mean loss over the batch.
        sample_batch: `sample_batch(key, batch_size)`, a pytree of arrays whose leading axis is
            the batch (traced inside the compiled step).
        config: optimisation settings (AdamW, warm-up then cosine decay, clipping).
        key: PRNG key of the batches; batch `t` uses `fold_in(key, t)`.
        out_dir: folder for checkpoints `ckpt_XXXXXXXX.safetensors`, written atomically by
            process 0 only; with several hosts it must be storage they share.
        resume: continue from the latest checkpoint in `out_dir` (every process loads the one
            process 0 picked); the result equals that of an uninterrupted run, also when the
            number of devices differs.
        callback: receives a `TrainEvent` every `log_every` steps, on process 0 only.
        header: JSON-able description of the run stored in every checkpoint; on resume the
            checkpoint must agree with it field by field.
        devices: 1 (default), N for the first N devices JAX sees, None for all of them, or a
            list of devices. The batch size must be a multiple of their number.

    Returns:
        The fitted network and a dict with `step`, `train_config`, `train_seconds`, `devices`.

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> net = eqx.nn.Linear(1, 1, key=jax.random.key(0))
        >>> def sample(k, b):
        ...     x = jax.random.normal(k, (b, 1))
        ...     return x, 3.0 * x
        >>> def loss(n, batch):
        ...     return jnp.mean((jax.vmap(n)(batch[0]) - batch[1]) ** 2)
        >>> cfg = TrainConfig(steps=300, batch_size=32, learning_rate=0.05, warmup_steps=10)
        >>> fitted, meta = fit_network(net, loss, sample, cfg, key=jax.random.key(1))
        >>> round(float(fitted.weight[0, 0]), 1), meta["step"]
        (3.0, 300)
    """
    cfg = config
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig; got {type(cfg).__name__}")
    mesh = data_mesh(devices)
    n_dev = mesh.size
    if cfg.batch_size % n_dev:
        raise ValueError(f"batch_size: expected a multiple of the {n_dev} devices of the mesh; "
                         f"got {cfg.batch_size}")
    main = jax.process_index() == 0
    run_header = {"train_config": cfg.to_dict(), **(header or {})}
    run_header.setdefault("key", np.asarray(jax.random.key_data(key)).tolist())
    optimizer = make_optimizer(cfg)
    params, static = eqx.partition(network, eqx.is_array)
    opt_state = optimizer.init(params)
    start = 0
    elapsed_before = 0.0
    if resume:
        if out_dir is None:
            raise ValueError("resume: expected out_dir to name the checkpoint folder; got None")
        last = latest_checkpoint(out_dir) if main else None
        step_found = broadcast_from_main(int(_CKPT_RE.match(last.name).group(1)) if last else -1)
        if step_found >= 0:
            last = Path(out_dir) / f"ckpt_{step_found:08d}.safetensors"
            if not last.is_file():
                raise CheckpointError(
                    f"resume: process 0 resumes from {last.name}, which process "
                    f"{jax.process_index()} cannot see in {out_dir}; out_dir must be storage "
                    f"every process shares")
            found = read_header(last)
            _check_resume_header(found, run_header, last)
            if not has_tree(last, "opt"):
                raise CheckpointError(f"resume: {last} holds no optimiser state")
            params = load_tree(last, "params", params)
            opt_state = load_tree(last, "opt", opt_state)
            start = int(found["step"])
            elapsed_before = float(found.get("train_seconds", 0.0))
    params = replicate(params, mesh)
    opt_state = replicate(opt_state, mesh)
    keep = replicated(mesh)

    def replicated_tree(tree):
        return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, keep), tree)

    @eqx.filter_jit
    def step_fn(params, opt_state, step):
        batch = shard_batch(sample_batch(jax.random.fold_in(key, step), cfg.batch_size), mesh)

        def objective(p):
            return loss_fn(eqx.combine(p, static), batch)

        loss, grads = jax.value_and_grad(objective)(params)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = eqx.apply_updates(params, updates)
        # a non-finite step changes nothing: weights and optimiser state stay as they were
        new_params = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new_params,
                                            params)
        new_opt = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new_opt,
                                         opt_state)
        return replicated_tree(new_params), replicated_tree(new_opt), loss, finite

    def write(step_done: int, seconds: float):
        if out_dir is None or not main:
            return
        save_checkpoint(Path(out_dir) / f"ckpt_{step_done:08d}.safetensors",
                        {**run_header, "step": step_done, "train_seconds": seconds,
                         "devices": n_dev, "processes": jax.process_count(),
                         "loss": losses[-1] if losses else None},
                        {"params": to_host(params), "opt": to_host(opt_state)})

    bad = 0
    t0 = time.perf_counter()
    t_last, s_last = t0, start
    losses: list[float] = []
    report = callback if main else None
    for step in range(start, cfg.steps):
        params, opt_state, loss, finite = step_fn(params, opt_state, jnp.asarray(step))
        done = step + 1
        if not bool(finite):
            bad += 1
            if report is not None:
                report(TrainEvent(done, cfg.steps, float("nan"), 0.0, bad,
                                  f"non-finite loss at step {done}; update skipped"))
            if bad >= cfg.max_bad_steps:
                raise TrainingError(f"training stopped: {bad} consecutive non-finite losses "
                                    f"(last at step {done}); weights kept from before them")
        else:
            bad = 0
            losses.append(float(loss))
        if finite and report is not None and (done % cfg.log_every == 0 or
                                              done == cfg.steps):
            now = time.perf_counter()
            rate = (done - s_last) / max(now - t_last, 1e-9)
            t_last, s_last = now, done
            recent = losses[-cfg.log_every:] or [float("nan")]
            report(TrainEvent(done, cfg.steps, float(np.mean(recent)), rate, 0))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            write(done, elapsed_before + time.perf_counter() - t0)
    barrier("flashbayes-fit-end")
    total_seconds = elapsed_before + time.perf_counter() - t0
    fitted = eqx.combine(jax.tree_util.tree_map(jnp.asarray, to_host(params)), static)
    meta = {"step": cfg.steps, "train_config": cfg.to_dict(), "train_seconds": total_seconds,
            "devices": n_dev, "loss": losses[-1] if losses else None}
    return fitted, meta


def params_digest(network: eqx.Module) -> str:
    """SHA-256 of a network's weights (float32 bytes, in tree order)."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(eqx.filter(network, eqx.is_array)):
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


def _initial_network(init: Any, task: str, task_params: dict,
                     config: DTConfig) -> DistributionTransformer:
    if not isinstance(init, AmortizedPosterior):
        raise TypeError(f"init: expected an AmortizedPosterior (fb.load or fb.load_pretrained); "
                        f"got {type(init).__name__}")
    found = (init.task.name, _tasks.task_params(init.task))
    if json.dumps(found, sort_keys=True) != json.dumps((task, task_params), sort_keys=True):
        raise ValueError(f"init: expected a model of task {task!r} with parameters "
                         f"{task_params}; got {found[0]!r} with {found[1]}")
    if init.network.config != config:
        raise ValueError(f"init: expected a network of shape {config.to_dict()}; got "
                         f"{init.network.config.to_dict()}")
    return init.network


def train(task: _tasks.Task | str, config: TrainConfig | None = None, *, key: jax.Array,
          out_dir: str | Path | None = None, resume: bool = False,
          callback: Callable[[TrainEvent], Any] | None = None,
          devices: int | Sequence[Any] | None = 1,
          init: AmortizedPosterior | None = None) -> AmortizedPosterior:
    """Train a Distribution Transformer on endless synthetic batches of `task`.

    Args:
        task: task name or object.
        config: optimisation and network settings.
        key: PRNG key; the same key gives the same model.
        out_dir: folder for checkpoints `ckpt_XXXXXXXX.safetensors` (written atomically).
        resume: continue from the latest checkpoint in `out_dir`; the result equals that of an
            uninterrupted run with the same key and config.
        callback: receives a `TrainEvent` every `log_every` steps; training never prints.
        devices: data-parallel devices (see `fit_network`): 1, N, None for all, or a list.
        init: a model of the same task (same task parameters) and network shape whose weights
            start the run instead of fresh ones: fine-tuning with a new warm-up and decay. The
            checkpoints record the starting weights' digest, so a resume must start from the
            same weights.

    Returns:
        The trained model.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> cfg = fb.TrainConfig(steps=2, batch_size=8, d_model=16, n_layers=1)
        >>> model = fb.train("gmm_linear", cfg, key=jax.random.key(0))
        >>> model.meta["step"]
        2
    """
    task, task_params = _task_name(task)
    cfg = config or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig; got {type(cfg).__name__}")
    k_init, k_data, k_prep = jax.random.split(key, 3)
    key_list = np.asarray(jax.random.key_data(key)).tolist()
    net_cfg = cfg.model_config(task)
    extra = {}
    if init is None:
        network = DistributionTransformer(net_cfg, key=k_init)
    else:  # fine-tuning: the starting weights replace fresh ones
        network = _initial_network(init, task.name, task_params, net_cfg)
        extra["init_sha256"] = params_digest(network)
    state = task.prepare(k_prep)
    header = checkpoint_header(task.name, task_params, net_cfg, cfg.to_dict(), 0, None,
                               key=key_list, **extra)
    network, meta = fit_network(
        network, batch_loss, lambda k, b: frame_batch(task, task.sample_batch(k, b, state)),
        cfg, key=k_data, out_dir=out_dir, resume=resume, callback=callback, header=header,
        devices=devices)
    meta = {"step": meta["step"], "train_config": meta["train_config"],
            "task_params": task_params, "train_seconds": meta["train_seconds"]}
    return AmortizedPosterior(network, task, meta=meta)
