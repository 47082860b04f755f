"""Fixtures of the trainer tests."""
import pytest
from trainer_helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))
