"""The suite's shared fixtures: the device, dtype and seed every random test draws from; the
``cuda`` marker's skip; the real Omniglot data."""

import os
import random
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from maml_test_utils import DEVICES, DTYPES, SEED_VARIABLE, cuda_unavailable_reason


def pytest_report_header(config):
    replay = os.environ.get(SEED_VARIABLE)
    if replay:
        return f"random seeds: {SEED_VARIABLE}={replay} (every test replays it)"
    return f"random seeds: a fresh one per test (printed on failure; {SEED_VARIABLE} replays one)"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (directly, or through the ``device`` parameter "cuda") are collected
    everywhere and skipped, naming what is missing, where no GPU or no CUDA build is present."""
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """ "cpu" and "cuda"; the "cuda" case carries the ``cuda`` marker, so where no GPU (or no CUDA
    build) is present it is skipped with the reason."""
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request) -> torch.dtype:
    """float64 (where exactness is claimed) and float32."""
    return request.param


@pytest.fixture
def one_intra_op_thread():
    """torch at one intra-op thread for the test (restored after). For files of small tensors
    (``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``): on a busy 2-core machine
    two threads made such tests many times slower, and one costs nothing when it is quiet."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def seed(record_property) -> int:
    """A fresh seed per test (fresh random inputs on every run), or $MAML_TEST_SEED to replay one.
    torch, numpy and random are seeded with it, so models' initial weights and unseeded draws
    follow it too; tests that build their own generators take it as an argument. It is printed
    (shown with a failure's captured output) and recorded as the test's ``seed`` property (JUnit
    XML). Hypothesis tests draw their inputs' seeds as examples, which Hypothesis reports."""
    configured = os.environ.get(SEED_VARIABLE)
    value = int(configured) if configured else secrets.randbelow(2**31)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    record_property("seed", value)
    print(f"random seed {value}: {SEED_VARIABLE}={value} replays this test's draws")
    return value


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot archives: ``../shared/data/omniglot`` or ``$MAML_EXT_OMNIGLOT_DIR``.

    Absent data skips the test, except under CI (``CI=true``), where it is a failure.
    """
    configured = os.environ.get("MAML_EXT_OMNIGLOT_DIR")
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
    root = Path(configured) if configured else default
    if not root.is_dir():
        reason = (
            f"Omniglot data not found at {root} "
            f"(set MAML_EXT_OMNIGLOT_DIR to the folder holding the archives)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return root
