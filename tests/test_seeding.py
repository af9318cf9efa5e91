"""Training batches (order and random augmentation) depend on (seed, epoch) only: not on the global
generators' history, nor on the number of data-loader workers (persistent or not)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from neuroguide.data.loaders import train_loader
from neuroguide.utils.seeding import derive_seed


class RandomAugment(Dataset):
    """Sample i: (i, a torch draw, a numpy draw), as an augmentation drawing from the global generators."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item(), float(np.random.rand())])


def _epochs(num_workers, seed=0, n_epochs=2):
    loader = train_loader(RandomAugment(), batch_size=4, num_workers=num_workers, seed=seed)
    out = []
    for epoch in range(n_epochs):
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(1000 + 7 * epoch * num_workers)  # a different history of the global generators
        out.append(torch.cat(list(loader)))
    return out


def test_batches_depend_on_seed_and_epoch_only():
    ref = _epochs(0)
    for got in (_epochs(0), _epochs(2)):
        for a, b in zip(ref, got):
            assert torch.equal(a, b)
    assert not torch.equal(ref[0], ref[1])  # another epoch: another order and other draws
    first = {int(r[0]): r for r in ref[0]}
    second = {int(r[0]): r for r in ref[1]}
    assert all(not torch.equal(first[i], second[i]) for i in first)
    assert not torch.equal(_epochs(0, seed=1)[0], ref[0])


def test_a_sample_does_not_disturb_the_global_generators():
    loader = train_loader(RandomAugment(), batch_size=4, seed=0)
    torch.manual_seed(3)
    list(loader)
    after = torch.rand(())
    torch.manual_seed(3)
    torch.empty((), dtype=torch.int64).random_()  # the loader iterator's own base-seed draw
    assert after == torch.rand(())


def test_derive_seed_is_stable_and_mixed():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, e, i) for e in range(5) for i in range(50)}) == 250
    assert 0 <= derive_seed(-1, 0, 0) < 2**63
