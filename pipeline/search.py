"""The search: the candidates a cross-validation compares, and the rungs of successive halving.

A candidate is a mapping of dotted settings to values, always with the L2 strength::

    {"training.l2_lambda": 1e-4, "model.hidden_sizes": [256, 128], "training.lr": 0.05}

``search.space`` lists the values of each setting (``grid``, every combination) or draws them
from distributions (``random``; ``halving`` too when the space has one). Without
``training.l2_lambda`` in the space, ``cv.l2_lambdas`` is its grid, so a search over lambda alone
is the pipeline's original cross-validation, with the same seeds and fold-cache keys.

Every candidate is checked as a whole configuration before any training (:func:`candidates`).
A candidate is named by its values only (:func:`candidate_id`), never by its position in the
search, so adding a candidate changes no other candidate's results.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError

L2_KEY = "training.l2_lambda"
EPOCHS_KEY = "training.epochs"
MAX_CANDIDATES = 10_000  # each is validated as a whole config, and trained on every fold
Candidate = dict[str, Any]


def space(config: PipelineConfig) -> dict[str, Any]:
    """The search space, the L2 strength first (``cv.l2_lambdas`` unless the space has it)."""
    searched = dict(config.search.space)
    return {L2_KEY: searched.pop(L2_KEY, list(config.cv.l2_lambdas)), **searched}


def candidates(config: PipelineConfig) -> list[Candidate]:
    """Every candidate of the search, each checked as a whole configuration.

    ``grid`` (and ``halving`` over lists): every combination, in the order of the space's
    values. With a distribution in the space (``random``, ``halving``): ``search.n_candidates``
    distinct draws seeded by ``cv.seed``; ``random`` over lists only draws that many distinct
    combinations (all of them if there are fewer), as scikit-learn's ``ParameterSampler`` does.
    A grid of more than ``MAX_CANDIDATES`` combinations is refused, unless drawn from.

    Raises
    ------
    ConfigError
        A candidate is not a valid configuration (the message names it), or two are equal.
    """
    searched = space(config)
    grid = not config.search.sampled
    size = math.prod(len(values) for values in searched.values()) if grid else 0
    if size > MAX_CANDIDATES and config.search.strategy != "random":
        raise ConfigError(
            f"the search space has {size:,} combinations, more than {MAX_CANDIDATES:,}: "
            "draw some with search.strategy = 'random' and search.n_candidates"
        )
    if size > MAX_CANDIDATES:  # random over a large grid: draw, without listing it
        grid = False
    if grid:
        combos = [dict(zip(searched, values, strict=True))
                  for values in itertools.product(*searched.values())]  # fmt: skip
        if config.search.strategy == "random" and config.search.n_candidates < len(combos):
            rng = np.random.default_rng(config.cv.seed)
            picked = rng.choice(len(combos), size=config.search.n_candidates, replace=False)
            combos = [combos[i] for i in sorted(picked)]
    else:
        combos = _draw(searched, config.search.n_candidates, config.cv.seed)
    found: dict[str, Candidate] = {}
    for number, combo in enumerate(combos, start=1):
        candidate = _checked(config, combo, number)
        key = candidate_id(candidate)
        if key in found:
            raise ConfigError(
                f"candidates {list(found).index(key) + 1} and {number} are the same "
                f"({label(candidate)}): list each value once"
            )
        found[key] = candidate
    return list(found.values())


def _draw(searched: Mapping[str, Any], n: int, seed: int) -> list[Candidate]:
    """``n`` distinct candidates drawn from lists (uniformly) and distributions."""
    rng = np.random.default_rng(seed)
    drawn: dict[str, Candidate] = {}
    for _ in range(100 * n):  # a small discrete space may hold fewer than n distinct ones
        if len(drawn) == n:
            break
        # Drawn in key order (as scikit-learn's ParameterSampler): the draws do not depend on
        # the order the space was written in.
        drawn_values = {key: _sample(searched[key], rng) for key in sorted(searched)}
        combo = {key: drawn_values[key] for key in searched}
        drawn.setdefault(_canonical(combo), combo)
    return list(drawn.values())


def _sample(values: Any, rng: np.random.Generator) -> Any:
    if isinstance(values, list):
        return values[int(rng.integers(len(values)))]
    ((kind, arguments),) = values.items()
    if kind == "choice":
        return arguments[int(rng.integers(len(arguments)))]
    low, high = arguments
    if kind == "int":
        return int(rng.integers(low, high, endpoint=True))
    if kind == "uniform":
        return float(rng.uniform(low, high))
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))  # log_uniform


def _checked(config: PipelineConfig, combo: Candidate, number: int) -> Candidate:
    """The candidate's values as its validated config holds them (``lr = 1`` becomes 1.0)."""
    try:
        resolved = config.replace(combo)
    except ConfigError as exc:
        why = str(exc).removeprefix("invalid configuration: ")
        raise ConfigError(f"candidate {number} ({label(combo)}) is not valid: {why}") from None
    values = resolved.model_dump(mode="json")
    return {key: values[key.split(".")[0]][key.split(".")[1]] for key in combo}


def candidate_config(config: PipelineConfig, candidate: Candidate) -> PipelineConfig:
    """The configuration one candidate trains with: ``config`` with its values set."""
    return config.replace(candidate)


def candidate_id(candidate: Candidate) -> str:
    """A short name for the candidate, from its values alone (for file names and MLflow tags)."""
    return hashlib.sha256(_canonical(candidate).encode()).hexdigest()[:12]


def full_epochs(config: PipelineConfig, candidate: Candidate) -> int:
    """The epochs a candidate trains in all: its own when the space searches them."""
    return int(candidate.get(EPOCHS_KEY, config.training.epochs))


def other_settings(candidate: Candidate) -> Candidate:
    """The candidate without its L2 strength (the settings a fold result carries beside it)."""
    return {key: value for key, value in candidate.items() if key != L2_KEY}


def label(candidate: Mapping[str, Any], l2_name: str = "lambda") -> str:
    """``lambda=0.0001 lr=0.05 hidden_sizes=256,128``: the values, for names and logs.

    ASCII by default (Prefect's run graph drops a ``λ``); ``l2_name="λ"`` for the console.
    """
    parts = []
    for key, value in candidate.items():
        name = l2_name if key == L2_KEY else key.split(".")[-1]
        if isinstance(value, list):
            text = ",".join(map(str, value))
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value)
        parts.append(f"{name}={text}")
    return " ".join(parts)


def _canonical(values: Mapping[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


# -------------------------------------------------------------------------- halving rungs
def rungs(config: PipelineConfig, n_candidates: int) -> list[tuple[int, int]]:
    """The rungs of successive halving: ``(epochs, candidates)`` each, the last at full budget.

    As scikit-learn's ``HalvingGridSearchCV``: ``1 + floor(log_eta(n))`` rungs, rung ``i``
    keeping ``ceil(n / eta**i)`` candidates; the epochs grow by ``eta`` per rung up to
    ``training.epochs`` (from ``search.min_epochs`` when set). Fewer rungs when the budget has
    too few epochs to give each rung more than the one before. Other strategies: one rung.
    """
    budget = config.training.epochs
    if config.search.strategy != "halving":
        return [(budget, n_candidates)]
    eta, first = config.search.eta, config.search.min_epochs
    count = 1
    while eta**count <= n_candidates:
        count += 1
    if first is not None:
        while count > 1 and first * eta ** (count - 1) > budget:
            count -= 1
    while count > 1:
        if first is not None:
            epochs = [first * eta**i for i in range(count - 1)] + [budget]
        else:
            epochs = [max(1, round(budget / eta ** (count - 1 - i))) for i in range(count)]
        if all(a < b for a, b in itertools.pairwise(epochs)):
            break
        count -= 1
    else:
        epochs = [budget]
    return [(e, math.ceil(n_candidates / eta**i)) for i, e in enumerate(epochs)]
