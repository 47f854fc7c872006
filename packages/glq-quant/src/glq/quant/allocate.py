"""Per-layer bit allocation for fractional targets (2.5, 3.5, ...).

Pass 1 measures each layer's proxy loss tr(ΔW H ΔWᵀ) at every candidate rate; pass 2
starts every layer at ``min_bpw`` and repeatedly gives one more bit per weight to the
layer whose loss drops most per extra bit spent, one step at a time, while the
size-weighted mean stays within the target. The result is written as
``bpw_allocation.json`` and can be passed back (``bpw_map``) to skip profiling.
"""

from __future__ import annotations

import json
from pathlib import Path


def greedy_allocation(losses: dict[str, dict[int, float]], sizes: dict[str, int], target: float,
                      min_bpw: int, max_bpw: int) -> dict[str, int]:
    """Rates per layer whose size-weighted mean is the largest value <= ``target``.

    ``losses[name][bpw]`` is the layer's proxy loss at that rate; ``sizes[name]`` its
    weight count. Upgrades are taken best-first by loss decrease per added bit; an
    upgrade that would overshoot the budget is skipped while smaller ones may still fit.
    """
    if not min_bpw <= target <= max_bpw:
        raise ValueError(f"target bpw {target} is outside [min_bpw={min_bpw}, max_bpw={max_bpw}]")
    rates = {name: min_bpw for name in losses}
    budget = target * sum(sizes.values()) - min_bpw * sum(sizes.values())
    while True:
        best, best_gain = None, 0.0
        for name, r in rates.items():
            if r >= max_bpw or sizes[name] > budget + 1e-9:
                continue
            gain = (losses[name][r] - losses[name][r + 1]) / sizes[name]
            if best is None or gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return rates
        rates[best] += 1
        budget -= sizes[best]


def mean_bpw(rates: dict[str, int], sizes: dict[str, int]) -> float:
    return sum(rates[n] * sizes[n] for n in rates) / sum(sizes[n] for n in rates)


def write_allocation(path: Path, rates: dict[str, int], sizes: dict[str, int], target: float,
                     losses: dict[str, dict[int, float]] | None = None) -> None:
    doc = {
        "target_bpw": target,
        "mean_bpw": mean_bpw(rates, sizes),
        "layers": {n: {"bpw": rates[n], "weights": sizes[n],
                       **({"proxy_loss": {str(k): v for k, v in losses[n].items()}} if losses else {})}
                   for n in rates},
    }
    Path(path).write_text(json.dumps(doc, indent=1))


def read_allocation(source: str | Path | dict, layer_names: list[str]) -> dict[str, int]:
    """Rates from a ``bpw_allocation.json`` (path or parsed), checked against the model's layers."""
    doc = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    layers = doc.get("layers", doc)
    rates = {n: int(v["bpw"] if isinstance(v, dict) else v) for n, v in layers.items()}
    missing = sorted(set(layer_names) - set(rates))
    extra = sorted(set(rates) - set(layer_names))
    if missing or extra:
        raise ValueError(
            f"bpw map does not match the model: {len(missing)} layers missing"
            f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(extra)} unknown"
            f"{' (e.g. ' + extra[0] + ')' if extra else ''}"
        )
    bad = {n: r for n, r in rates.items() if not 2 <= r <= 8}
    if bad:
        name, r = next(iter(bad.items()))
        raise ValueError(f"bpw map gives {name} bpw={r}; allowed rates are 2..8")
    return rates
