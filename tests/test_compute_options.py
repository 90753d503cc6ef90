"""The GPU speed options (bf16 autocast, channels-last batches) on CPU: same results up to their rounding."""
import numpy as np
import pytest
import torch

from tsc_fast.models import DigitsCNN
from tsc_fast.training import ComputeOptions
from tsc_fast.tsc import TSCConfig, purify


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:48], dtype=torch.float32).unsqueeze(1) / 16.0
    return torch.utils.data.TensorDataset(x, torch.tensor(digits.target[:48]))


def _run(**options):
    torch.manual_seed(0)
    config = TSCConfig(rounds=1, curve_steps=30, batch_size=16, progress=False, warn_below_steps=0, **options)
    return purify(DigitsCNN(), _data(), config=config)


@pytest.fixture(scope="module")
def plain():
    return _run()


def test_channels_last_changes_only_the_memory_layout(plain):
    fast = _run(channels_last=True)
    for h_fast, h_plain in zip(fast.history, plain.history):
        np.testing.assert_allclose(h_fast["curve_losses"], h_plain["curve_losses"], rtol=1e-4)
    for (name, a), b in zip(fast.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_bf16_autocast_trains_the_same_curves_to_bf16_accuracy(plain):
    fast = _run(autocast="bf16")
    for h_fast, h_plain in zip(fast.history, plain.history):
        # bf16 keeps 8 bits of mantissa: losses agree to a few percent, and they are not bit-identical
        np.testing.assert_allclose(h_fast["curve_losses"], h_plain["curve_losses"], rtol=0.05)
        assert h_fast["curve_losses"] != h_plain["curve_losses"]
    assert all(p.dtype == torch.float32 for p in fast.model.parameters())  # weights stay float32


def test_unknown_autocast_is_refused():
    with pytest.raises(ValueError, match="autocast"):
        ComputeOptions(autocast="fp8")
