"""Data-parallel purification: two gloo processes on CPU compute what one process computes on the same data."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tsc_fast.models import DigitsCNN
from tsc_fast.batches import random_translate
from tsc_fast.distributed import ShardedBatchSampler
from tsc_fast.spec import discover
from tsc_fast.stats import cross_correlations, self_correlations
from tsc_fast.tsc import TSCConfig, purify

# 44 examples at batch 16: the last global batch (12) splits 6 + 6; stats batches of 32: 32 + 12 (16+16, 6+6).
CONFIG = TSCConfig(rounds=2, curve_steps=12, batch_size=16, finetune_epochs=2, stats_batch_size=32, progress=False,
                   warn_below_steps=0)
WORLD = 2


def _data():
    """44 digits images: real structure keeps the assignments free of exact ties (dead units on noise data tie,
    and any of their orders is optimal, so two correct runs may legitimately differ there)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:44], dtype=torch.float32).unsqueeze(1) / 16.0
    return torch.utils.data.TensorDataset(x, torch.tensor(digits.target[:44]))


def _model(seed=0):
    torch.manual_seed(seed)
    model = DigitsCNN()
    for m in model.modules():  # non-trivial BatchNorm state (mild: a large mean shift kills units, whose ties
        # make several assignments optimal), so global statistics matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.02, 0.02)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _correlations(rank=0, world=1):
    """Self- and cross-correlations of the same data, computed on this rank's share of every batch."""
    model, other = _model(0), _model(1)
    spec = discover(model, torch.rand(2, 1, 8, 8))
    sampler = ShardedBatchSampler(44, 32, shuffle=False, rank_=rank, world=world)
    batches = torch.utils.data.DataLoader(_data(), batch_sampler=sampler)
    return self_correlations(model, spec, batches), cross_correlations(model, other, spec, batches)


def _worker(rank, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        own, cross = _correlations(rank, WORLD)
        result = purify(_model(), _data(), config=CONFIG)
        torch.save({"state": result.model.state_dict(), "history": result.history,
                    "perms": [{g: torch.as_tensor(p) for g, p in ps.items()} for ps in result.perms],
                    "self": own, "cross": cross}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(f"file://{folder}/rendezvous", str(folder / "out")), nprocs=WORLD)
    return [torch.load(folder / f"out.{r}", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_rank():
    return purify(_model(), _data(), config=CONFIG)


def test_pooled_statistics_match_one_process(two_ranks):
    own, cross = _correlations()
    for ranked in two_ranks:
        for single, pooled in ((own, ranked["self"]), (cross, ranked["cross"])):
            assert single.keys() == pooled.keys()
            for group in single:
                torch.testing.assert_close(pooled[group], single[group], rtol=0, atol=1e-10)


def test_permutations_match_one_process(two_ranks, one_rank):
    for ranked in two_ranks:
        assert len(ranked["perms"]) == len(one_rank.perms) == 2 * CONFIG.rounds
        for got, want in zip(ranked["perms"], one_rank.perms):
            assert got.keys() == want.keys()
            for group in want:
                np.testing.assert_array_equal(got[group].numpy(), want[group])


def test_curve_and_finetune_losses_match_one_process(two_ranks, one_rank):
    for ranked in two_ranks:
        for got, want in zip(ranked["history"], one_rank.history):
            np.testing.assert_allclose(got["curve_losses"], want["curve_losses"], rtol=1e-5)
            if "finetune_losses" in want:
                np.testing.assert_allclose(got["finetune_losses"], want["finetune_losses"], rtol=1e-5)


def test_purified_weights_and_bn_statistics_match_one_process(two_ranks, one_rank):
    want = one_rank.model.state_dict()
    for ranked in two_ranks:
        assert ranked["state"].keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(ranked["state"][name].to(value.dtype), value, rtol=1e-4, atol=1e-5,
                                       msg=name)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_batches_partition_the_single_process_batches(shuffle, world):
    single = ShardedBatchSampler(51, 16, shuffle=shuffle, seed=3, rank_=0, world=1)
    shards = [ShardedBatchSampler(51, 16, shuffle=shuffle, seed=3, rank_=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        for sampler in (single, *shards):
            sampler.set_epoch(epoch)
        batches = list(single)
        assert all(len(s) == len(batches) == 4 for s in shards)
        for k, batch in enumerate(batches):
            assert sorted(i for s in shards for i in list(s)[k]) == sorted(batch)
            assert list(shards[0])[k] == batch[0::world]
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert (list(single) != first) == shuffle


def test_sampler_refuses_a_batch_too_small_to_share():
    with pytest.raises(ValueError, match="cannot give each of 2 processes"):
        ShardedBatchSampler(33, 16, shuffle=False, rank_=0, world=2)


def test_translation_of_shards_equals_translation_of_the_whole_batch():
    x = torch.rand(7, 2, 6, 6)
    whole = random_translate(x, 2, torch.Generator().manual_seed(5))
    for rank in range(3):
        part = random_translate(x[rank::3], 2, torch.Generator().manual_seed(5), shard=(rank, 3, 7))
        torch.testing.assert_close(part, whole[rank::3], rtol=0, atol=0)
