import os

import torch

# Without a GPU, Triton kernels run under Triton's interpreter (on CPU tensors, slowly) so their
# logic is tested in CI. The flag is read when kernels are decorated: set it before fxrec imports.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

import fxrec  # noqa: E402,F401

# "ci" (the default) draws the same examples on every run, so a green run here is a green run on
# CI; "thorough" draws 1000 fresh random examples per test, to hunt for new failures.
hypothesis.settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
