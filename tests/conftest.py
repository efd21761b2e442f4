import jax
import pytest

import flashbayes as fb


@pytest.fixture(scope="session")
def tiny_cfg():
    return fb.TrainConfig(steps=4, batch_size=8, d_model=16, n_layers=1, n_heads=2,
                          checkpoint_every=2, log_every=1, warmup_steps=2)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, tiny_cfg):
    out = tmp_path_factory.mktemp("tiny")
    model = fb.train("gmm_linear", tiny_cfg, key=jax.random.key(0), out_dir=out)
    return model.save(out / "model.safetensors")
