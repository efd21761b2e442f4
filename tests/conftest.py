import os

# The tests run without JAX's persistent compilation cache (here and in the processes they start):
# serialising some executables to it has crashed the interpreter (a segmentation fault inside
# jax's compilation_cache.put_executable_and_time) in long sessions. The cache itself is tested on
# its own folder in test_reference.py.
os.environ.setdefault("FLASHBAYES_CACHE_DIR", "off")

import jax  # noqa: E402
import pytest  # noqa: E402

import flashbayes as fb  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    return fb.TrainConfig(steps=4, batch_size=8, d_model=16, n_layers=1, n_heads=2,
                          checkpoint_every=2, log_every=1, warmup_steps=2)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, tiny_cfg):
    out = tmp_path_factory.mktemp("tiny")
    model = fb.train("gmm_linear", tiny_cfg, key=jax.random.key(0), out_dir=out)
    return model.save(out / "model.safetensors")
