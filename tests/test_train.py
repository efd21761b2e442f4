import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import flashbayes as fb
from flashbayes.amortized import CheckpointError, TrainingError, latest_checkpoint
from flashbayes.tasks._linear import GMMLinear


def _params(model):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(model.network,
                                                                        eqx.is_array))]


def test_training_reduces_loss_and_reports(tmp_path):
    events = []
    cfg = fb.TrainConfig(steps=300, batch_size=64, d_model=16, n_layers=1, n_heads=2,
                         log_every=100, warmup_steps=20, checkpoint_every=150,
                         learning_rate=3e-3)
    fb.train("gmm_linear", cfg, key=jax.random.key(0), out_dir=tmp_path, callback=events.append)
    assert [e.step for e in events] == [100, 200, 300]
    assert events[-1].loss < events[0].loss - 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000150.safetensors",
                                                          "ckpt_00000300.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_same_key_same_model(tiny_cfg):
    a = fb.train("gmm_linear", tiny_cfg, key=jax.random.key(3))
    b = fb.train("gmm_linear", tiny_cfg, key=jax.random.key(3))
    c = fb.train("gmm_linear", tiny_cfg, key=jax.random.key(4))
    for x, y in zip(_params(a), _params(b)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(_params(a), _params(c)))


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = fb.TrainConfig(steps=6, batch_size=8, d_model=16, n_layers=1, n_heads=2,
                         checkpoint_every=3, log_every=1, warmup_steps=2)
    full = fb.train("gmm_linear", cfg, key=jax.random.key(1), out_dir=tmp_path / "full")

    class Crash(Exception):
        pass

    def crash_at_4(ev):
        if ev.step == 4:
            raise Crash

    with pytest.raises(Crash):
        fb.train("gmm_linear", cfg, key=jax.random.key(1), out_dir=tmp_path / "cut",
                 callback=crash_at_4)
    assert latest_checkpoint(tmp_path / "cut").name == "ckpt_00000003.safetensors"
    resumed = fb.train("gmm_linear", cfg, key=jax.random.key(1), out_dir=tmp_path / "cut",
                       resume=True)
    for x, y in zip(_params(full), _params(resumed)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(CheckpointError, match="another key"):
        fb.train("gmm_linear", cfg, key=jax.random.key(2), out_dir=tmp_path / "cut",
                 resume=True)
    # resuming with other settings is refused rather than silently mixing runs
    other = fb.TrainConfig(steps=8, batch_size=8, d_model=16, n_layers=1, n_heads=2,
                           checkpoint_every=3, log_every=1, warmup_steps=2)
    with pytest.raises(CheckpointError, match="another train config"):
        fb.train("gmm_linear", other, key=jax.random.key(1), out_dir=tmp_path / "cut",
                 resume=True)


def test_task_parameters_travel_with_the_checkpoint(tmp_path, tiny_cfg):
    task = GMMLinear(noise_sd=1.25)
    model = fb.train(task, tiny_cfg, key=jax.random.key(0))
    loaded = fb.load(model.save(tmp_path / "m.safetensors"))
    assert loaded.task.noise_sd == 1.25
    assert oct((tmp_path / "m.safetensors").stat().st_mode & 0o777) != oct(0o600)


def test_checkpoint_round_trip(tiny_model_path):
    model = fb.load(tiny_model_path)
    again = fb.load(model.save(tiny_model_path.parent / "copy.safetensors"))
    for x, y in zip(_params(model), _params(again)):
        np.testing.assert_array_equal(x, y)
    prob = model.task.sample_problem(jax.random.key(0), n=4)
    a, b = model.posterior(prob.prior, prob.data), again.posterior(prob.prior, prob.data)
    np.testing.assert_array_equal(np.asarray(a.means), np.asarray(b.means))
    # a training folder loads its latest checkpoint
    assert fb.load(tiny_model_path.parent).meta["step"] == 4


def test_checkpoint_errors(tmp_path, tiny_model_path):
    with pytest.raises(CheckpointError, match="no file"):
        fb.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not one"):
        fb.load(junk)
    with pytest.raises(CheckpointError, match="task 'logistic_regression'"):
        fb.load(tiny_model_path, task="logistic_regression")
    future = tmp_path / "future.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(future),
              metadata={"flashbayes": json.dumps({"format_version": 99})})
    with pytest.raises(CheckpointError, match="format version 1; got 99"):
        fb.load(future)
    nohead = tmp_path / "nohead.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(nohead))
    with pytest.raises(CheckpointError, match="header"):
        fb.load(nohead)


@pytest.mark.slow  # 20-30 s: the default tier is kept under 15 minutes
def test_init_starts_from_a_models_weights(tmp_path, tiny_model_path, tiny_cfg):
    """Fine-tuning: `init` starts the run from a model's weights (a step at a vanishing
    learning rate leaves them as they were, where a fresh run's differ), the checkpoints record
    the starting weights' digest, and a resume from other starting weights, another task or
    another network shape is refused."""
    from flashbayes.amortized._checkpoint import read_header
    from flashbayes.amortized._train import params_digest

    base = fb.load(tiny_model_path)
    cfg = fb.TrainConfig(steps=2, batch_size=8, d_model=16, n_layers=1, n_heads=2,
                         warmup_steps=0, learning_rate=1e-12, checkpoint_every=1)
    tuned = fb.train("gmm_linear", cfg, key=jax.random.key(7), out_dir=tmp_path / "ft",
                     init=base)
    fresh = fb.train("gmm_linear", cfg, key=jax.random.key(7))
    for x, y in zip(_params(tuned), _params(base)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert max(np.abs(y - z).max() for y, z in zip(_params(base), _params(fresh))) > 1e-2
    header = read_header(tmp_path / "ft" / "ckpt_00000002.safetensors")
    assert header["init_sha256"] == params_digest(base.network) != params_digest(fresh.network)
    with pytest.raises(CheckpointError, match="other starting weights"):
        fb.train("gmm_linear", cfg, key=jax.random.key(7), out_dir=tmp_path / "ft",
                 resume=True, init=fresh)
    with pytest.raises(ValueError, match="network of shape"):
        fb.train("gmm_linear", fb.TrainConfig(steps=1, d_model=32, n_layers=1, n_heads=2),
                 key=jax.random.key(7), init=base)
    with pytest.raises(ValueError, match="task 'gmm_linear' with parameters"):
        fb.train(GMMLinear(noise_sd=1.25), cfg, key=jax.random.key(7), init=base)
    with pytest.raises(TypeError, match="AmortizedPosterior"):
        fb.train("gmm_linear", cfg, key=jax.random.key(7), init=str(tiny_model_path))


class _NaNTask(GMMLinear):
    """gmm_linear whose simulator returns NaN data with probability `p_bad` per batch."""

    def __init__(self, p_bad):
        super().__init__()
        self.p_bad = p_bad
        self.name = "gmm_linear"

    def sample_batch(self, key, batch_size, state=None):
        batch = super().sample_batch(key, batch_size, state)
        bad = jax.random.uniform(jax.random.fold_in(key, 99)) < self.p_bad
        return type(batch)(batch.weights, batch.means, batch.scale_tril, batch.cmask,
                           jnp.where(bad, jnp.nan, batch.data), batch.dmask, batch.theta)


def test_nan_guard_stops_and_keeps_weights():
    cfg = fb.TrainConfig(steps=10, batch_size=8, d_model=16, n_layers=1, n_heads=2,
                         max_bad_steps=3, log_every=1)
    events = []
    with pytest.raises(TrainingError, match="3 consecutive non-finite"):
        fb.train(_NaNTask(1.0), cfg, key=jax.random.key(0), callback=events.append)
    assert events and all("non-finite" in e.message for e in events)


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_nan_steps_leave_weights_exactly_as_initialised():
    from flashbayes.amortized import DistributionTransformer

    cfg = fb.TrainConfig(steps=5, batch_size=8, d_model=16, n_layers=1, n_heads=2,
                         max_bad_steps=100, log_every=1)
    task = _NaNTask(1.0)
    model = fb.train(task, cfg, key=jax.random.key(0))
    init = DistributionTransformer(cfg.model_config(task),
                                   key=jax.random.split(jax.random.key(0), 3)[0])
    for x, y in zip(_params(model), [np.asarray(a) for a in jax.tree_util.tree_leaves(
            eqx.filter(init, eqx.is_array))]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_nan_guard_skips_bad_steps_without_corrupting_weights():
    cfg = fb.TrainConfig(steps=30, batch_size=8, d_model=16, n_layers=1, n_heads=2,
                         max_bad_steps=30, log_every=1)
    events = []
    model = fb.train(_NaNTask(0.3), cfg, key=jax.random.key(0), callback=events.append)
    skipped = [e for e in events if e.message]
    assert 0 < len(skipped) < 30
    assert all(np.all(np.isfinite(p)) for p in _params(model))
    prob = model.task.sample_problem(jax.random.key(1), n=5)
    assert np.all(np.isfinite(np.asarray(model.posterior(prob.prior, prob.data).means)))


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        fb.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="grad_clip"):
        fb.TrainConfig(grad_clip=-1.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        fb.TrainConfig(mlp_ratio=True)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        fb.TrainConfig(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="unknown"):
        fb.TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(TypeError, match="TrainConfig"):
        fb.train("gmm_linear", {"steps": 3}, key=jax.random.key(0))
