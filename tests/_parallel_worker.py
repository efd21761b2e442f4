"""Run by tests/test_parallel.py in a fresh interpreter with several simulated CPU devices.

Trains the same small model with the same key on 1, 2 and 4 devices (and resumes a 4-device
run on 2 devices, and runs a deliberately wrong sharding), then prints one JSON line: the
per-step losses and flat parameters of each.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import flashbayes as fb
from flashbayes.amortized import batch_loss, fit_network


def flat(model) -> list[float]:
    leaves = jax.tree_util.tree_leaves(eqx.filter(model.network, eqx.is_array))
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves]).tolist()


def run(cfg, devices, seed=7, **kw):
    losses: list[float] = []
    model = fb.train("gmm_linear", cfg, key=jax.random.key(seed), devices=devices,
                     callback=lambda ev: losses.append(ev.loss), **kw)
    return {"loss": losses, "params": flat(model)}


def run_duplicated(cfg):
    task = fb.tasks.get("gmm_linear")
    k_init, k_data, k_prep = jax.random.split(jax.random.key(7), 3)
    network = fb.DistributionTransformer(cfg.model_config(task), key=k_init)
    state = task.prepare(k_prep)

    def sample(k, b):
        quarter = task.sample_batch(k, b // 4, state)
        return jax.tree_util.tree_map(lambda x: jnp.concatenate([x] * 4), quarter)

    losses: list[float] = []
    net, _ = fit_network(network, batch_loss, sample, cfg, key=k_data, devices=4,
                         callback=lambda ev: losses.append(ev.loss))
    leaves = jax.tree_util.tree_leaves(eqx.filter(net, eqx.is_array))
    return {"loss": losses, "params": np.concatenate([np.ravel(x) for x in leaves]).tolist()}


def main() -> None:
    steps = int(sys.argv[1])
    cfg = fb.TrainConfig(steps=steps, batch_size=16, d_model=16, n_layers=1, log_every=1,
                         checkpoint_every=max(steps // 2, 1), warmup_steps=1)
    out = {"n_devices": len(jax.devices())}
    for n in (1, 2, 4):
        out[str(n)] = run(cfg, n)
    # what a wrong answer looks like: the bug of every device drawing the same quarter of the
    # batch (same initial weights, same key, 4 devices)
    out["duplicated_slices"] = run_duplicated(cfg)
    with tempfile.TemporaryDirectory() as folder:
        # a 4-device run, its later checkpoints removed, resumed on 2 devices from the first
        run(cfg, 4, out_dir=folder)
        ckpts = sorted(Path(folder).iterdir())
        for p in ckpts[1:]:
            p.unlink()
        out["resumed"] = run(cfg, 2, out_dir=folder, resume=True)
        out["resumed_from"] = ckpts[0].name
    print(json.dumps(out))


if __name__ == "__main__":
    main()
