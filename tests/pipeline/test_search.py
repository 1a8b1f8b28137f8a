"""The search space: candidates of each strategy, their checks, names and seeds, the rungs of
successive halving, and the choice among candidates (best, one standard error)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest

from pipeline.config import build_config, resolve_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.folds import fold_seed
from pipeline.record import _canonical, fold_key, package_version
from pipeline.results import FoldResult
from pipeline.search import L2_KEY, candidate_id, candidates, label, rungs
from pipeline.selection import cv_table, pruned, select_candidate

LAMBDAS = [1e-4, 1e-3]


def _config(**overrides):
    return build_config(overrides={"cv.l2_lambdas": LAMBDAS, **overrides})


# -------------------------------------------------------------------------------- candidates
def test_a_grid_is_every_combination_with_the_lambdas_of_cv():
    config = _config(**{"search.space": {"training.lr": [0.05, 0.1], "model.hidden_sizes": [[8]]}})

    found = candidates(config)

    assert found == [
        {L2_KEY: lam, "training.lr": lr, "model.hidden_sizes": [8]}
        for lam in LAMBDAS
        for lr in (0.05, 0.1)
    ], found


def test_without_a_space_the_search_is_over_lambda_alone():
    assert candidates(_config()) == [{L2_KEY: lam} for lam in LAMBDAS]


def test_a_space_naming_lambda_replaces_the_lambdas_of_cv():
    config = build_config(overrides={"search.space": {L2_KEY: [0.0, 0.5]}})

    assert candidates(config) == [{L2_KEY: 0.0}, {L2_KEY: 0.5}]


def test_lambda_in_both_places_is_refused():
    with pytest.raises(ConfigError, match="keep one"):
        resolve_config(None, None, {"cv.l2_lambdas": [1e-3], "search.space": {L2_KEY: [0.1]}})


def test_values_are_the_validated_ones():
    # An int learning rate is the float the config holds: one candidate, one id, one seed.
    config = _config(**{"search.space": {"training.lr": [1]}})

    assert candidates(config)[0]["training.lr"] == 1.0
    assert isinstance(candidates(config)[0]["training.lr"], float)


def test_random_over_lists_draws_distinct_grid_points_seeded_by_cv_seed():
    space = {"training.lr": [0.01, 0.02, 0.05, 0.1], "model.hidden_sizes": [[8], [16], [32]]}
    config = _config(**{"search.space": space, "search.strategy": "random",
                        "search.n_candidates": 5})  # fmt: skip
    grid = candidates(config.replace({"search.strategy": "grid"}))

    drawn = candidates(config)

    assert len(drawn) == 5 and len({candidate_id(c) for c in drawn}) == 5, drawn
    assert all(c in grid for c in drawn), drawn
    assert drawn == candidates(config), "not reproducible"
    assert drawn != candidates(config.replace({"cv.seed": 1})), "the seed changes nothing"


def test_random_from_distributions_stays_within_bounds():
    space = {
        L2_KEY: {"log_uniform": [1e-5, 1e-1]},
        "training.lr": {"uniform": [0.01, 0.2]},
        "training.batch_size": {"int": [32, 256]},
        "model.activation": {"choice": ["relu", "tanh"]},
    }
    config = build_config(overrides={"search.space": space, "search.strategy": "random",
                                     "search.n_candidates": 40})  # fmt: skip

    drawn = candidates(config)

    assert len(drawn) == 40
    assert all(1e-5 <= c[L2_KEY] <= 1e-1 for c in drawn)
    assert all(0.01 <= c["training.lr"] <= 0.2 for c in drawn)
    assert all(isinstance(c["training.batch_size"], int) and 32 <= c["training.batch_size"] <= 256
               for c in drawn)  # fmt: skip
    assert {c["model.activation"] for c in drawn} == {"relu", "tanh"}
    # log-uniform: about half the draws below the geometric middle (1e-3), not 1 % as uniform.
    below = sum(c[L2_KEY] < 1e-3 for c in drawn)
    assert 10 <= below <= 30, below


def test_draws_do_not_depend_on_the_order_the_space_is_written_in():
    space = {"training.lr": {"uniform": [0.01, 0.2]}, "model.hidden_sizes": [[8], [16], [32]],
             L2_KEY: {"log_uniform": [1e-5, 1e-1]}}  # fmt: skip
    shuffled = dict(reversed(list(space.items())))
    made = [
        candidates(build_config(overrides={"search.space": written, "search.strategy": "random"}))
        for written in (space, shuffled)
    ]

    assert [candidate_id(c) for c in made[0]] == [candidate_id(c) for c in made[1]]
    assert all(next(iter(c)) == L2_KEY for c in made[0]), "lambda comes first"


def test_a_distribution_needs_a_sampling_strategy():
    with pytest.raises(ConfigError, match="random or halving"):
        _config(**{"search.space": {"training.lr": {"uniform": [0.01, 0.1]}}})


@pytest.mark.parametrize(
    ("space", "words"),
    [
        ({"model.hidden_sizes": [[8], [0]]}, ["candidate 2", "hidden_sizes=0", "at least 1 unit"]),
        ({"training.lr": [0.1, -1.0]}, ["candidate 2", "lr=-1", "training.lr"]),
        ({"training.lr": [0.1, 0.1]}, ["candidates 1 and 2", "the same"]),
    ],
)
def test_an_invalid_candidate_is_refused_by_number_and_values(space, words):
    with pytest.raises(ConfigError) as info:
        candidates(build_config(overrides={"cv.l2_lambdas": [1e-3], "search.space": space}))

    message = str(info.value)
    assert all(word in message for word in words), message
    assert "\n" not in message


def test_a_grid_too_large_is_refused_and_random_draws_from_it():
    space = {"training.lr": [i / 1000 + 0.001 for i in range(200)],
             "training.batch_size": list(range(1, 101))}  # fmt: skip

    with pytest.raises(ConfigError, match="40,000 combinations"):
        candidates(_config(**{"search.space": space}))
    drawn = candidates(_config(**{"search.space": space, "search.strategy": "random"}))
    assert len(drawn) == 10


def test_a_candidate_is_named_by_its_values_not_its_position():
    a = {L2_KEY: 1e-3, "training.lr": 0.1}

    assert candidate_id(a) == candidate_id({"training.lr": 0.1, L2_KEY: 1e-3})
    assert candidate_id(a) != candidate_id({**a, "training.lr": 0.2})
    assert label(a) == "lambda=0.001 lr=0.1"


# ---------------------------------------------------------------------------- seeds and keys
def test_adding_a_candidate_changes_no_other_candidates_seed_or_cache_key():
    small = _config(**{"search.space": {"training.lr": [0.1]}})
    large = _config(**{"search.space": {"training.lr": [0.05, 0.1, 0.2]}})
    candidate = {L2_KEY: 1e-3, "training.lr": 0.1}

    assert fold_key(small, "f", candidate, 1) == fold_key(large, "f", candidate, 1)
    assert fold_seed(0, 1e-3, 1, {"training.lr": 0.1}) != fold_seed(0, 1e-3, 1), (
        "a searched setting must reach the seed"
    )


def test_a_search_over_lambda_alone_keeps_its_seeds_and_cache_keys():
    # The fold key as it was computed before searches over more settings (and the augment
    # section) existed: caches made then stay valid.
    config = _config()
    settings = config.model_dump(
        mode="json", exclude={"execution", "tracking", "search", "augment"}
    )
    for section, key in (
        ("cv", "l2_lambdas"),
        ("cv", "selection"),
        ("training", "final_epochs"),
        ("training", "l2_lambda"),
        ("data", "data_dir"),
        ("data", "download"),
    ):
        settings[section].pop(key)  # fmt: skip
    payload = {"dataset": "f", "settings": settings, "l2_lambda": (1e-3).hex(), "fold": 1,
               "version": package_version()}  # fmt: skip
    before = "fold-" + hashlib.sha256(_canonical(payload)).hexdigest()[:32]

    assert fold_key(config, "f", {L2_KEY: 1e-3}, 1) == before
    assert fold_key(config, "f", {L2_KEY: 1e-3}, 1, budget=config.training.epochs) == before
    assert fold_key(config, "f", {L2_KEY: 1e-3}, 1, budget=1) != before
    assert fold_seed(0, 1e-3, 1, {}) == fold_seed(0, 1e-3, 1)
    assert json.dumps(settings)  # plain JSON


# ------------------------------------------------------------------------------------ rungs
@pytest.mark.parametrize(
    ("n", "epochs", "min_epochs", "expected"),
    [
        (12, 10, None, [(1, 12), (3, 4), (10, 2)]),
        (12, 10, 2, [(2, 12), (10, 4)]),
        (12, 4, None, [(1, 12), (4, 4)]),
        (2, 10, None, [(10, 2)]),
        (27, 27, None, [(1, 27), (3, 9), (9, 3), (27, 1)]),
        (12, 1, None, [(1, 12)]),
    ],
)
def test_halving_rungs(n, epochs, min_epochs, expected):
    config = _config(**{"search.strategy": "halving", "training.epochs": epochs,
                        "search.min_epochs": min_epochs})  # fmt: skip

    assert rungs(config, n) == expected


def test_grid_and_random_have_one_rung():
    assert rungs(_config(**{"training.epochs": 7}), 12) == [(7, 12)]


def test_halving_refuses_early_stopping_and_a_searched_epoch_count():
    with pytest.raises(ConfigError, match="choose one"):
        _config(**{"search.strategy": "halving", "training.early_stopping": 2})
    with pytest.raises(ConfigError, match="epochs"):
        _config(**{"search.strategy": "halving", "search.space": {"training.epochs": [2, 4]}})


# ---------------------------------------------------------------------------------- choice
def _result(candidate: dict, fold: int, acc: float, budget: int = 10) -> FoldResult:
    settings = {k: v for k, v in candidate.items() if k != L2_KEY}
    return FoldResult(candidate[L2_KEY], fold, 0, acc, 0.3, acc, 0.2, budget, 1.0,
                      settings=settings, budget=budget)  # fmt: skip


def _table(values: dict[tuple, list[float]], parameters=None):
    """``{(lambda, hidden): fold accuracies}`` as a CV table."""
    results = [
        _result({L2_KEY: lam, "model.hidden_sizes": list(hidden)}, fold, acc)
        for (lam, hidden), accs in values.items()
        for fold, acc in enumerate(accs)
    ]
    counts = None
    if parameters:
        counts = {candidate_id(r.candidate): parameters[r.settings["model.hidden_sizes"][0]]
                  for r in results}  # fmt: skip
    return cv_table(results, counts)


def test_best_ties_go_to_the_larger_lambda_then_to_fewer_parameters():
    same = [0.95, 0.96, 0.94, 0.95]
    table = _table(
        {(1e-4, (64,)): same, (1e-3, (64,)): same, (1e-3, (16,)): same, (1e-5, (16,)): same},
        parameters={64: 50_890, 16: 12_730},
    )

    assert select_candidate(table) == {L2_KEY: 1e-3, "model.hidden_sizes": [16]}


def test_one_se_takes_the_most_regularized_within_one_standard_error():
    # Best mean 0.9600, std 0.0082 over 4 folds: one standard error 0.0041.
    best = [0.95, 0.96, 0.97, 0.96]
    close = [0.955, 0.955, 0.96, 0.955]  # mean 0.95625: within 0.0041 of the best
    far = [0.94, 0.95, 0.95, 0.95]  # mean 0.9475: not
    table = _table({(1e-4, (64,)): best, (1e-3, (64,)): close, (1e-2, (64,)): far})
    se = (sum((a - 0.96) ** 2 for a in best) / 3) ** 0.5 / math.sqrt(4)
    assert 0.96 - se < 0.95625, "the test's numbers must put the close candidate inside"

    assert select_candidate(table)[L2_KEY] == 1e-4
    assert select_candidate(table, "one-se")[L2_KEY] == 1e-3


def test_a_candidate_pruned_before_the_last_rung_is_never_chosen():
    high, low = {L2_KEY: 1e-3, "training.lr": 0.1}, {L2_KEY: 1e-3, "training.lr": 0.2}
    results = [_result(high, f, 0.99, budget=2) for f in range(2)]
    results += [_result(low, f, 0.90, budget=6) for f in range(2)]

    assert select_candidate(cv_table(results)) == low


def test_survivors_that_all_diverged_are_named_as_the_last_rung():
    pruned_one = _result({L2_KEY: 1e-3, "training.lr": 0.1}, 0, 0.9, budget=2)
    survivor = {L2_KEY: 1e-3, "training.lr": 0.2}
    diverged = dataclasses.replace(_result(survivor, 0, 0.9, budget=6), diverged=True)

    with pytest.raises(PipelineError, match="every candidate of the last rung diverged"):
        select_candidate(cv_table([pruned_one, diverged]))


def test_a_searched_epoch_count_is_no_pruning_the_most_accurate_is_chosen():
    """Grid over ``training.epochs``: each candidate's budget is its own epochs, none pruned."""
    short, long = {L2_KEY: 1e-3, "training.epochs": 5}, {L2_KEY: 1e-3, "training.epochs": 10}
    results = [_result(short, f, 0.99, budget=5) for f in range(2)]
    results += [_result(long, f, 0.90, budget=10) for f in range(2)]
    table = cv_table(results)

    assert not pruned(table).any(), table[["training.epochs", "budget"]]
    assert select_candidate(table) == short


def test_the_cv_table_has_one_column_per_searched_setting():
    table = _table({(1e-4, (64,)): [0.9, 0.91], (1e-3, (16,)): [0.92, 0.93]})

    assert list(table["model.hidden_sizes"]) == [[64], [16]]
    assert list(table["l2_lambda"]) == [1e-4, 1e-3]
    assert table["mean_val_accuracy"].tolist() == pytest.approx([0.905, 0.925])


def test_random_over_a_huge_grid_draws_without_listing_it():
    space = {
        "training.lr": [i / 1e4 + 1e-4 for i in range(1000)],
        "training.batch_size": list(range(1, 1001)),
        "training.momentum": [i / 1000 for i in range(900)],
    }
    config = _config(**{"search.space": space, "search.strategy": "random",
                        "search.n_candidates": 7})  # fmt: skip

    drawn = candidates(config)  # 1.8e9 combinations: listing them would not end

    assert len(drawn) == 7 and len({candidate_id(c) for c in drawn}) == 7, drawn
    assert all(c["training.lr"] in space["training.lr"] for c in drawn), drawn
