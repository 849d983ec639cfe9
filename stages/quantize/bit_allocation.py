"""Per-layer precision choice by integer programming (Hubara et al. 2021, §4), solved with PuLP + CBC.

Binary x[l, p] = 1 when layer l runs at precision p (bits, or a label such as "fp16"):

    exactly one precision per layer:   sum_p x[l, p] = 1
    primal:  minimise sum x[l, p] * dloss[l, p]   subject to  sum x[l, p] * cost[l, p] <= budget
    dual:    minimise sum x[l, p] * cost[l, p]    subject to  sum x[l, p] * dloss[l, p] <= max_loss

dloss[l, p] is the calibration loss increase measured with only layer l at precision p (the
degradations are assumed to add up); cost is parameter bits, BOPs or a measured latency table.
An infeasible constraint is reported with the smallest value that would be feasible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional

import pulp

Table = Mapping[str, Mapping[Hashable, float]]


class InfeasibleBudget(ValueError):
    """The constraint cannot be met by any choice; ``smallest`` is the tightest feasible value."""

    def __init__(self, what: str, given: float, smallest: float):
        super().__init__(f"{what} {given:.6g} is infeasible: the smallest feasible {what} is {smallest:.6g} — fix: "
                         f"raise {what} to at least {smallest:.6g}")
        self.what, self.given, self.smallest = what, given, smallest


@dataclass(frozen=True)
class Allocation:
    choice: dict[str, Hashable]  # layer -> precision
    delta_loss: float            # sum of the chosen dloss
    cost: float                  # sum of the chosen cost
    status: str                  # CBC's status ("Optimal")
    solve_seconds: float


def _check_tables(dloss: Table, cost: Table) -> list[str]:
    layers = list(dloss)
    if not layers:
        raise ValueError("no layers to allocate")
    for name in layers:
        if name not in cost or set(cost[name]) != set(dloss[name]) or not dloss[name]:
            raise ValueError(f"layer {name!r}: dloss and cost must list the same, non-empty set of precisions")
    return layers


def allocate_bits(dloss: Table, cost: Table, *, budget: Optional[float] = None, max_loss: Optional[float] = None,
                  time_limit: Optional[float] = None) -> Allocation:
    """Choose one precision per layer: least total dloss within ``budget`` (primal), or least total
    cost with total dloss at most ``max_loss`` (dual). Exactly one of the two must be given.

    >>> from deploypipe import allocate_bits
    >>> dloss = {"conv1": {4: 0.30, 8: 0.0}, "conv2": {4: 0.01, 8: 0.0}}   # loss increase per precision
    >>> cost = {"conv1": {4: 400, 8: 800}, "conv2": {4: 4000, 8: 8000}}    # bits of storage
    >>> allocate_bits(dloss, cost, budget=5000).choice                      # the sensitive layer keeps 8 bits
    {'conv1': 8, 'conv2': 4}
    """
    if (budget is None) == (max_loss is None):
        raise ValueError("give exactly one of budget (minimise loss) or max_loss (minimise cost)")
    layers = _check_tables(dloss, cost)
    if budget is not None:
        smallest = sum(min(cost[name].values()) for name in layers)
        if budget < smallest - 1e-9 * max(1.0, abs(smallest)):
            raise InfeasibleBudget("budget", budget, smallest)
    else:
        smallest = sum(min(dloss[name].values()) for name in layers)
        if max_loss < smallest - 1e-9 * max(1.0, abs(smallest)):
            raise InfeasibleBudget("max_loss", max_loss, smallest)

    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = {(name, p): pulp.LpVariable(f"x_{i}_{j}", cat="Binary")
         for i, name in enumerate(layers) for j, p in enumerate(dloss[name])}
    total_loss = pulp.lpSum(v * dloss[name][p] for (name, p), v in x.items())
    total_cost = pulp.lpSum(v * cost[name][p] for (name, p), v in x.items())
    if budget is not None:
        prob += total_loss
        prob += total_cost <= budget, "budget"
    else:
        prob += total_cost
        prob += total_loss <= max_loss, "max_loss"
    for i, name in enumerate(layers):
        prob += pulp.lpSum(x[name, p] for p in dloss[name]) == 1, f"one_precision_{i}"
    t0 = time.perf_counter()
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    seconds = time.perf_counter() - t0
    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        raise RuntimeError(f"CBC did not find an optimal allocation (status {status})")
    choice = {name: next(p for p in dloss[name] if x[name, p].value() > 0.5) for name in layers}
    return Allocation(choice=choice, delta_loss=sum(dloss[n][p] for n, p in choice.items()),
                      cost=sum(cost[n][p] for n, p in choice.items()), status=status, solve_seconds=seconds)
