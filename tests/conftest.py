import atexit
import os
import shutil
import tempfile

# One fresh persistent compilation cache for this test session (and the processes it starts),
# so that programs compiled by other jobs on the machine are never read back into the tests.
if "FLASHBAYES_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="flashbayes-test-cache-")
    os.environ["FLASHBAYES_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

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
