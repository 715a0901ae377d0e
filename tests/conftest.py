"""Shared pytest set-up: quiet TensorFlow, a fresh Keras session per test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture
def _fresh_keras_session():
    yield
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
