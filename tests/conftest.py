import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A small random checkpoint in THUDM's layout (single pytorch_model.bin, fp16 tensors)."""
    from glmpool.engine.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=1)


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    from glmpool.engine import load
    return load(tiny_dir, progress=False)
