import pytest

from tools.random_checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 3-layer random Qwen3 with head_dim != hidden/heads and grouped-query attention."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), layers=3)
