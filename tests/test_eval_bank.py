"""``eval.bank_size``: a seeded subset of the training split as the kNN bank and the probe's
training set (for training sets too large to encode whole, e.g. 10^8 images)."""

from __future__ import annotations

import tracemalloc

import torch
from hydra.utils import instantiate

from pic.config import compose_config
from pic.engine.features import evaluate
from pic.engine.knn import KNN
from pic.engine.probe import FeatureProbe


class Recorded(torch.utils.data.Dataset):
    """n one-view items (image = the index as 4 values, label = index % 3); records reads."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.read: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.read.append(i)
        g = torch.Generator().manual_seed(i)
        return {"crops": [torch.randn(4, generator=g)], "label": i % 3}


def indices(bank) -> list[int]:
    return list(bank.indices)


def test_default_bank_is_the_whole_train_split() -> None:
    data = Recorded(50)
    assert KNN().bank(data) is data
    assert KNN(bank_size=50).bank(data) is data
    assert compose_config(["name=test"]).eval.bank_size is None


def test_bank_subset_is_seeded_and_deterministic() -> None:
    data = Recorded(1000)
    a = indices(KNN(bank_size=40, bank_seed=3).bank(data))
    assert a == indices(KNN(bank_size=40, bank_seed=3).bank(data))
    assert a != indices(KNN(bank_size=40, bank_seed=4).bank(data))
    assert len(set(a)) == 40 and a == sorted(a) and 0 <= a[0] and a[-1] < 1000
    cfg = compose_config(["name=test", "eval.bank_size=40", "eval.bank_seed=3"])
    assert indices(instantiate(cfg.eval).bank(data)) == a


def test_bank_of_a_huge_split_costs_its_size_not_n() -> None:
    data = Recorded(10**8)
    tracemalloc.start()
    bank = KNN(bank_size=1000).bank(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(bank) == 1000 and len(set(indices(bank))) == 1000
    assert peak < 1000 * 1024, peak  # a permutation of N would be 800 MB


def test_evaluation_reads_and_scores_only_the_bank() -> None:
    train, val = Recorded(300), Recorded(30)
    knn = KNN(k=[5], temperature=[0.1], bank_size=60, bank_seed=1)
    probe = FeatureProbe(epochs=2, lr=[0.1], weight_decay=[0.0])
    scores, _, _ = evaluate(torch.nn.Identity(), train, val, knn, probe, 3, torch.device("cpu"))
    chosen = indices(knn.bank(train))
    assert sorted(train.read) == chosen
    # The same scores from the bank's features computed here.
    bank_f = torch.stack([train[i]["crops"][0] for i in chosen])
    bank_y = torch.tensor([i % 3 for i in chosen])
    val_f = torch.stack([val[i]["crops"][0] for i in range(30)])
    val_y = torch.arange(30) % 3
    assert scores["knn"] == knn.score(bank_f, bank_y, val_f, val_y, 3)
    assert scores["probe"] == probe.fit(bank_f, bank_y, val_f, val_y, 3)
