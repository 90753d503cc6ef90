"""Safe checkpoint saving and loading (tsc_fast.model_io)."""
import os
import pickle

import pytest
import torch
import torch.nn as nn

from tsc_fast.models import DigitsCNN
from tsc_fast.model_io import WeightsFileError, load_into, load_state_dict, save_model


def trained_looking_cnn(seed: int = 0) -> DigitsCNN:
    """A DigitsCNN whose BN running statistics and counters differ from a fresh one."""
    torch.manual_seed(seed)
    model = DigitsCNN().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 8, 8))
    return model.eval()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_safetensors_round_trip_keeps_buffers_and_function(tmp_path):
    model = trained_looking_cnn()
    path = save_model(model, tmp_path / "sub" / "model.safetensors")
    assert path.is_file()
    loaded = load_into(DigitsCNN(), path).eval()
    assert_same_state(model, loaded)
    assert int(loaded.bn1.num_batches_tracked) == 3
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))


class TiedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4, bias=False)
        self.decoder = nn.Linear(4, 4, bias=False)
        self.decoder.weight = self.encoder.weight  # shared storage: safetensors refuses it unless copied


def test_save_handles_shared_and_non_contiguous_tensors(tmp_path):
    model = TiedLinear()
    load_into(TiedLinear(), save_model(model, tmp_path / "tied.safetensors"))
    transposed = {"w": torch.arange(6.0).reshape(2, 3).t()}
    assert not transposed["w"].is_contiguous()
    state = load_state_dict(save_model(transposed, tmp_path / "t.safetensors"))
    assert torch.equal(state["w"], transposed["w"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"epoch": 7, "state_dict": s},
        lambda s: {"model": {"module." + k: v for k, v in s.items()}, "optimizer": {"lr": 0.1}},
        lambda s: {"net": {"_orig_mod." + k: v for k, v in s.items()}},
    ],
    ids=["plain", "state_dict", "model+module", "net+compile"],
)
def test_torch_checkpoints_are_unwrapped(tmp_path, wrap):
    model = trained_looking_cnn(1)
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(model.state_dict()), path)
    assert_same_state(model, load_into(DigitsCNN(), path))


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_into(DigitsCNN(), missing)


@pytest.mark.parametrize("name, content", [("junk.pt", os.urandom(64)), ("junk.safetensors", os.urandom(64)),
                                           ("empty.pt", b""), ("text.pt", b"hello, not a checkpoint")])
def test_invalid_files_raise_value_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=name):
        load_state_dict(path)


def test_non_tensor_entries_are_rejected(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(2), "note": "hello"}, path)
    with pytest.raises(WeightsFileError, match="note"):
        load_state_dict(path)


def test_architecture_mismatch_lists_the_problems(tmp_path):
    path = save_model(DigitsCNN(width=16), tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatches: .*bn1\.bias \(checkpoint \(16,\) vs model \(32,\)\)"):
        load_into(DigitsCNN(), path)
    state = DigitsCNN().state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: fc\.bias.*unexpected keys: extra\.weight"):
        load_into(DigitsCNN(), state)


def test_non_strict_tolerates_missing_keys_but_not_shapes(tmp_path):
    source = trained_looking_cnn(2)
    state = source.state_dict()
    del state["fc.bias"]
    target = DigitsCNN()
    fc_bias = target.fc.bias.detach().clone()
    load_into(target, state, strict=False)
    assert torch.equal(target.conv1.weight, source.conv1.weight) and torch.equal(target.fc.bias, fc_bias)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_into(DigitsCNN(), DigitsCNN(width=16).state_dict(), strict=False)


class Exploit:
    """Unpickling this would create a marker directory: the side effect a malicious checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "exploit_ran"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(2), "payload": Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    with pytest.raises(ValueError, match="refused"):
        load_into(nn.Linear(2, 1), path)
    assert not marker.exists()


def test_pickled_whole_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(DigitsCNN(), path)
    with pytest.raises(ValueError, match="refused"):
        load_state_dict(path)
