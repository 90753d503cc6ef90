# Triton reads TRITON_INTERPRET when it is first imported: set it before anything imports triton, so kernels
# run on CPU tensors in the interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the suite's models are tiny, and on a shared, busy machine two OpenMP threads fighting for cores
# made a small CNN's training step about 50x slower than one thread (measured under load 5 on 2 cores).
torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
