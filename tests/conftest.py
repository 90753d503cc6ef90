# Triton reads TRITON_INTERPRET when it is first imported: set it before anything imports triton, so kernels
# run on CPU tensors in the interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
