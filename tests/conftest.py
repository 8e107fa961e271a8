"""Test setup: 8 simulated CPU devices (for the mesh tests) and exact float32 matmuls; the
fixtures shared across test modules (tokenizer, tiny_model, demo_dir)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from tests.data_fixtures import load_tokenizer  # noqa: E402
from tests.infer_fixtures import random_model, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The demo tokenizer (qilin_jax/demo_data/tokenizer; see tests/data_fixtures.py for the fallback)."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random QilinMedVL whose vocabulary fits the demo tokenizer."""
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small demo data set: 10 held-out samples (2 per question type), 6 CSV rows."""
    from qilin_jax.demo_data.make_demo import generate

    out = tmp_path_factory.mktemp("demo")
    generate(out, seed=0, n_align=0, n_instruct=0, n_heldout=10, n_csv=6)
    return out
