"""CRD's negatives (methods.md §1): RepDistiller's mode='exact' by default, the uniform draw as an option.

The released sampling (RepDistiller ``CIFAR100InstanceSample``, ``mode='exact'``): for an anchor of class y,
K indices from the training samples of the other classes, without replacement (with replacement only when K
exceeds that pool); column 0 is the anchor's own index. Checked here on the real CIFAR-100 labels (skipped
without the data) and, for the distribution, against inclusion probabilities computed in the test.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from ckd_study.losses import CRDMemory, CRDNegativeSampler, crd_loss
from ckd_study.methods import create_method
from ckd_study.models import create_model


def _other_class_pools(labels: torch.Tensor) -> dict[int, set[int]]:
    """Per class, the set of dataset indices of every *other* class (written independently of the sampler)."""
    lab = labels.tolist()
    return {c: {i for i, y in enumerate(lab) if y != c} for c in set(lab)}


def _check_exact_rows(contrast_index, index, labels, k, pools, allow_repeats=()):
    """Column 0 is the anchor; columns 1..K are in the anchor's other-class pool; no repeats unless the
    anchor's class is in ``allow_repeats``."""
    assert contrast_index.shape == (index.shape[0], k + 1)
    assert torch.equal(contrast_index[:, 0], index)
    for row, anchor in zip(contrast_index[:, 1:].tolist(), index.tolist()):
        y = int(labels[anchor])
        assert set(row) <= pools[y], "a negative outside the anchor's other-class pool"
        assert anchor not in row
        if y not in allow_repeats:
            assert len(set(row)) == k, "a repeated negative although the pool holds K samples"


# --------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def cifar_train_labels(cifar_root):
    from ckd_study.data import load_dataset

    return load_dataset("cifar100", root=cifar_root).y_train


def test_exact_negatives_on_cifar100_labels(cifar_train_labels):
    labels = cifar_train_labels
    n, k = labels.numel(), 16384
    assert n == 50_000
    sampler = CRDNegativeSampler(labels, k)
    assert sampler.max_pool == 49_500 and not sampler.any_with_replacement
    torch.manual_seed(0)
    index = torch.cat([torch.randperm(n)[:62], torch.tensor([0, n - 1])])
    ci = sampler(index)
    assert ci.shape == (64, k + 1) and ci.dtype == torch.int64
    assert torch.equal(ci[:, 0], index)
    neg = ci[:, 1:]
    assert int(neg.min()) >= 0 and int(neg.max()) < n
    # no same-class negative (hence no self), computed from the labels directly
    assert not (labels[neg] == labels[index][:, None]).any()
    assert not (neg == index[:, None]).any()
    # no duplicate within a row
    srt = neg.sort(dim=1).values
    assert (srt[:, 1:] != srt[:, :-1]).all()
    # every other class is represented about K/99 times per row (16384/99 = 165.5; a missing class, the
    # sign of a broken pool mapping, would show as 0)
    per_class = torch.stack([torch.bincount(labels[r], minlength=100) for r in neg])
    own = labels[index]
    assert (per_class[torch.arange(64), own] == 0).all()
    others = per_class.clone()
    others[torch.arange(64), own] = 165
    assert int(others.min()) > 100 and int(others.max()) < 240


# --------------------------------------------------------------------------------------------------- distribution


def test_exact_negatives_are_a_uniform_subset_of_the_other_classes():
    """Inclusion probabilities of a uniformly random K-subset of a pool of P: K/P for one sample,
    K(K-1)/(P(P-1)) for a pair -- both measured over many draws for one anchor."""
    labels = torch.arange(30) % 3  # pools of 20
    k, p, draws = 6, 20, 12_000
    sampler = CRDNegativeSampler(labels, k)
    torch.manual_seed(1)
    index = torch.zeros(draws, dtype=torch.long)  # anchor 0, class 0
    ci = sampler(index)
    _check_exact_rows(ci[:50], index[:50], labels, k, _other_class_pools(labels))
    neg = ci[:, 1:]
    hits = torch.zeros(draws, 30)
    hits.scatter_(1, neg, 1.0)
    freq = hits.mean(0)
    assert float(freq[labels == 0].max()) == 0.0
    single = k / p
    sd = math.sqrt(single * (1 - single) / draws)
    assert (freq[labels != 0] - single).abs().max() < 5 * sd
    pair = k * (k - 1) / (p * (p - 1))
    both = (hits[:, 1] * hits[:, 2]).mean()  # samples 1 and 2 are both in the pool of class 0
    assert abs(float(both) - pair) < 5 * math.sqrt(pair * (1 - pair) / draws)


def test_with_replacement_only_when_k_exceeds_the_pool():
    # classes of 14, 3, 3 and 5 samples: pools of 11, 22, 22 and 20. With K=12, class 0 (pool 11 < K) is drawn
    # with replacement, the others without; class 3's pool is smaller than the largest (uneven pools).
    sizes = [14, 3, 3, 5]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    k = 12
    sampler = CRDNegativeSampler(labels, k)
    assert sampler.any_with_replacement and sampler.any_without_replacement and sampler.max_pool == 22
    pools = _other_class_pools(labels)
    torch.manual_seed(2)
    index = torch.arange(25).repeat(200)
    ci = sampler(index)
    _check_exact_rows(ci, index, labels, k, pools, allow_repeats=(0,))
    # every sample of every pool is reachable (each is kept with probability K/pool per row: 12/20 or more)
    for c in range(4):
        assert set(ci[labels[index] == c, 1:].flatten().tolist()) == pools[c], c
    # with replacement: each of the 11 pool samples appears K/11 times per class-0 row on average
    rows0 = ci[labels[index] == 0, 1:]
    counts = torch.stack([(rows0 == j).sum(1) for j in sorted(pools[0])], 1).float()
    assert (counts.sum(1) == k).all()
    assert (counts.mean(0) - k / 11).abs().max() < 0.15
    assert (counts.max(1).values > 1).all()  # K > pool: every row repeats some sample


def test_with_replacement_everywhere_when_k_exceeds_every_pool():
    labels = torch.arange(12) % 3  # pools of 8
    k = 10
    sampler = CRDNegativeSampler(labels, k)
    torch.manual_seed(3)
    index = torch.arange(12).repeat(50)
    ci = sampler(index)
    _check_exact_rows(ci, index, labels, k, _other_class_pools(labels), allow_repeats=(0, 1, 2))


def test_sampling_uses_the_global_rng_so_a_restored_state_redraws_the_same():
    labels = torch.arange(40) % 4
    sampler = CRDNegativeSampler(labels, 7)
    index = torch.tensor([3, 9, 14])
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = sampler(index)
    second = sampler(index)
    assert not torch.equal(first, second)
    torch.set_rng_state(state)
    assert torch.equal(sampler(index), first)


# --------------------------------------------------------------------------------------------------- CRDMemory


def _embeds(b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1) for _ in range(2)]


def test_memory_default_draws_exact_negatives_and_scores_them():
    labels = torch.arange(30) % 3
    mem = CRDMemory(5, 30, nce_k=6, nce_t=0.2, generator=torch.Generator().manual_seed(0), labels=labels)
    assert mem.negatives == "exact"
    xs, xt = _embeds(4, 5)
    idx = torch.tensor([0, 7, 11, 29])
    twin = copy.deepcopy(mem)
    torch.manual_seed(9)
    out = mem(xs, xt, idx)
    torch.manual_seed(9)
    ci = mem.sampler(idx)
    _check_exact_rows(ci, idx, labels, 6, _other_class_pools(labels))
    expected = twin(xs, xt, idx, ci)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
    assert torch.isfinite(crd_loss(*out, 30))


def test_memory_uniform_option_is_the_old_randint_draw():
    mem = CRDMemory(5, 30, nce_k=6, nce_t=0.2, generator=torch.Generator().manual_seed(0), negatives="uniform")
    twin = copy.deepcopy(mem)
    xs, xt = _embeds(4, 5)
    idx = torch.tensor([0, 7, 11, 29])
    torch.manual_seed(4)
    out = mem(xs, xt, idx)
    torch.manual_seed(4)
    ci = torch.randint(0, 30, (4, 7))
    ci[:, 0] = idx
    for a, b in zip(out, twin(xs, xt, idx, ci)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call, fragment", [
    (lambda: CRDMemory(6, 10, negatives="random"), "'random'"),
    (lambda: CRDMemory(6, 10, labels=torch.arange(9) % 2), "one label per memory row"),
    (lambda: CRDMemory(6, 10, negatives="uniform", labels=torch.arange(10) % 2), "only used"),
    (lambda: CRDMemory(6, 10)(*_embeds(2, 6), torch.tensor([0, 1])), "labels"),
    (lambda: CRDNegativeSampler(torch.zeros(10, dtype=torch.long), 3), "single class"),
    (lambda: CRDNegativeSampler(torch.rand(10), 3), "integer"),
])
def test_bad_arguments_raise_value_error(call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------------- the method


def _pair():
    torch.manual_seed(0)
    return create_model("resnet14", 10).eval(), create_model("resnet8", 10)


def test_crd_method_uses_exact_negatives_given_the_training_labels():
    teacher, student = _pair()
    labels = torch.arange(64) % 10
    method = create_method("crd", student, teacher, num_train=64, train_labels=labels, nce_k=16)
    assert method.options.negatives == "exact"
    assert method.memory.negatives == "exact" and torch.equal(method.memory.sampler.labels, labels)
    # the sampler's buffers are derived from the labels: the method's state_dict (checkpoints) is unchanged
    assert not any("sampler" in key for key in method.state_dict())
    uniform = create_method("crd", student, teacher, num_train=64, train_labels=labels, nce_k=16,
                            negatives="uniform")
    assert uniform.memory.negatives == "uniform" and uniform.memory.sampler is None
    assert set(uniform.state_dict()) == set(method.state_dict())


def test_crd_method_without_labels_warns_and_falls_back_to_uniform():
    teacher, student = _pair()
    with pytest.warns(UserWarning, match="UNIFORMLY"):
        method = create_method("crd", student, teacher, num_train=64, nce_k=16)
    assert method.memory.negatives == "uniform"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_method("crd", student, teacher, num_train=64, nce_k=16, negatives="uniform")
