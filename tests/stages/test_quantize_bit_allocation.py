"""The integer program equals brute force on random small instances, for both objectives, and an
infeasible constraint names the smallest feasible value."""

import itertools

import numpy as np
import pytest

from deploypipe.stages.quantize.bit_allocation import InfeasibleBudget, allocate_bits

PRECISIONS = (2, 4, 8)


def random_instance(seed: int, layers: int):
    rng = np.random.default_rng(seed)
    dloss, cost = {}, {}
    for i in range(layers):
        params = int(rng.integers(100, 5000))
        sens = rng.uniform(0.01, 1.0)
        # fewer bits: cheaper, and (mostly) worse; some noise so the instance is not trivially ordered
        dloss[f"l{i}"] = {b: float(sens * 2.0 ** (-b) * 64 + rng.normal(0, 0.02)) for b in PRECISIONS}
        cost[f"l{i}"] = {b: float(params * b) for b in PRECISIONS}
    return dloss, cost


def brute_force(dloss, cost, budget=None, max_loss=None):
    names = list(dloss)
    best = None
    for combo in itertools.product(PRECISIONS, repeat=len(names)):
        loss = sum(dloss[n][b] for n, b in zip(names, combo))
        c = sum(cost[n][b] for n, b in zip(names, combo))
        if budget is not None and c <= budget + 1e-9:
            key = loss
        elif max_loss is not None and loss <= max_loss + 1e-9:
            key = c
        else:
            continue
        best = key if best is None else min(best, key)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_primal_equals_brute_force(seed):
    layers = 3 + seed % 6  # 3..8 layers x 3 precisions
    dloss, cost = random_instance(seed, layers)
    lo = sum(min(c.values()) for c in cost.values())
    hi = sum(max(c.values()) for c in cost.values())
    budget = lo + (hi - lo) * np.random.default_rng(100 + seed).uniform(0.05, 0.9)
    a = allocate_bits(dloss, cost, budget=budget)
    assert a.status == "Optimal" and a.cost <= budget + 1e-6
    assert a.delta_loss == pytest.approx(brute_force(dloss, cost, budget=budget), abs=1e-6)
    assert a.delta_loss == pytest.approx(sum(dloss[n][p] for n, p in a.choice.items()))


@pytest.mark.parametrize("seed", range(12))
def test_dual_equals_brute_force(seed):
    layers = 3 + seed % 6
    dloss, cost = random_instance(1000 + seed, layers)
    lo = sum(min(d.values()) for d in dloss.values())
    hi = sum(max(d.values()) for d in dloss.values())
    max_loss = lo + (hi - lo) * np.random.default_rng(seed).uniform(0.05, 0.9)
    a = allocate_bits(dloss, cost, max_loss=max_loss)
    assert a.delta_loss <= max_loss + 1e-6
    assert a.cost == pytest.approx(brute_force(dloss, cost, max_loss=max_loss), abs=1e-6)


def test_infeasible_budget_names_the_smallest_feasible_one():
    dloss, cost = random_instance(7, 5)
    smallest = sum(min(c.values()) for c in cost.values())
    with pytest.raises(InfeasibleBudget) as e:
        allocate_bits(dloss, cost, budget=smallest - 1)
    assert e.value.smallest == pytest.approx(smallest) and f"{smallest:.6g}" in str(e.value)
    a = allocate_bits(dloss, cost, budget=smallest)  # exactly the smallest is feasible: all cheapest
    assert a.choice == {n: 2 for n in dloss}
    with pytest.raises(InfeasibleBudget, match="max_loss"):
        allocate_bits(dloss, cost, max_loss=sum(min(d.values()) for d in dloss.values()) - 0.5)


def test_labels_and_argument_checks():
    dloss = {"conv1": {8: 0.0, "fp16": -0.001}, "fc": {4: 0.3, 8: 0.01}}
    cost = {"conv1": {8: 8.0, "fp16": 16.0}, "fc": {4: 4.0, 8: 8.0}}
    a = allocate_bits(dloss, cost, budget=24)
    assert a.choice == {"conv1": "fp16", "fc": 8} and a.solve_seconds < 5
    with pytest.raises(ValueError, match="exactly one"):
        allocate_bits(dloss, cost)
    with pytest.raises(ValueError, match="same, non-empty set"):
        allocate_bits(dloss, {"conv1": {8: 8.0}, "fc": cost["fc"]}, budget=10)
