"""A search over more than lambda, run by the real flow: successive halving on the bundled
sample, its record, its fold cache and its MLflow runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from threadpoolctl import threadpool_limits

from flows.pipeline_flow import cv_flow, mlp_pipeline
from pipeline.config import preset
from pipeline.record import FoldCache, RunRecord, fold_key
from pipeline.search import L2_KEY, candidates, rungs
from pipeline.selection import cv_table, ranked, select_candidate
from pipeline.threads import cpu_count
from pipeline.training import load_configured_dataset, train_fold

SPACE = {"training.lr": [0.05, 0.2], "model.hidden_sizes": [[8], [16]]}
EPOCHS = 6  # 8 candidates, eta 3: a rung of 2 epochs for all, then 6 for the best 3


@pytest.fixture(scope="module")
def halving(prefect_api_url, tmp_path_factory, _empty_store, sample_flow_config):
    folder = tmp_path_factory.mktemp("search")
    database = folder / "mlruns" / "mlflow.db"
    database.parent.mkdir(parents=True)
    shutil.copyfile(_empty_store, database)
    uri = f"sqlite:///{database}"
    config = sample_flow_config(
        folder / "cache",
        uri,
        **{
            "search.strategy": "halving",
            "search.space": SPACE,
            "training.epochs": EPOCHS,
        },  # fmt: skip
    )
    summary = mlp_pipeline(config)
    return config, summary, RunRecord(summary["record"]), MlflowClient(tracking_uri=uri)


def test_the_plan_is_two_rungs(halving):
    config, *_ = halving

    assert rungs(config, len(candidates(config))) == [(2, 8), (6, 3)]


def test_the_cv_table_has_every_candidate_with_the_epochs_it_reached(halving):
    config, summary, record, _ = halving
    table = pd.DataFrame(summary["cv_table"])

    assert len(table) == 8, table
    assert sorted(table["budget"]) == [2] * 5 + [6] * 3, table["budget"]
    assert {"training.lr", "model.hidden_sizes", "parameters"} <= set(table.columns), table.columns
    assert summary["trained_folds"] == (8 + 3) * config.cv.folds, summary
    assert summary["best"] == select_candidate(table), summary["best"]
    assert summary["best"] in [
        {L2_KEY: row.l2_lambda, "model.hidden_sizes": row["model.hidden_sizes"],
         "training.lr": row["training.lr"]}
        for _, row in table[table["budget"] == EPOCHS].iterrows()
    ], summary["best"]  # fmt: skip


def test_the_survivors_are_the_best_three_of_the_first_rung(halving):
    # Arrange: the first rung's results of every candidate, from the fold cache.
    config, summary, record, _ = halving
    dataset = load_configured_dataset(config.data)
    cache = FoldCache(config.execution.cache_dir)
    first = [
        cache.get(fold_key(config, dataset.fingerprint, candidate, fold, 2))
        for candidate in candidates(config)
        for fold in range(config.cv.folds)
    ]
    assert all(result is not None and result.budget == 2 for result in first), first

    # Act
    expected = set(ranked(cv_table(first))["candidate"][:3])

    # Assert
    table = pd.DataFrame(summary["cv_table"])
    assert set(table.loc[table["budget"] == EPOCHS, "candidate"]) == expected, table


def test_a_survivor_continued_across_rungs_equals_one_training_straight_through(halving):
    # Arrange
    config, summary, record, _ = halving
    continued = next(r for r in record.folds() if r.budget == EPOCHS)
    dataset = load_configured_dataset(config.data)

    # Act: with the BLAS threads of the flow's workers (float sums depend on them).
    with threadpool_limits(config.execution.resolved_blas_threads(cpu_count())):
        straight = train_fold(config, dataset, continued.candidate, continued.fold)

    # Assert: the same weights give the same metrics, epoch by epoch.
    for column in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert continued.history[column] == straight.history[column], column
    assert (continued.seed, continued.epochs) == (straight.seed, straight.epochs)


def test_a_survivor_resumed_from_its_first_rung_instead_of_training_again(halving):
    # Arrange: each survivor's first-rung result (cache) and its final one (record).
    config, summary, record, _ = halving
    dataset = load_configured_dataset(config.data)
    cache = FoldCache(config.execution.cache_dir)
    survivors = [r for r in record.folds() if r.budget == EPOCHS]

    # Act
    first = [cache.get(fold_key(config, dataset.fingerprint, r.candidate, r.fold, 2))
             for r in survivors]  # fmt: skip

    # Assert: the first two epochs are the very ones of the first rung, when they ended
    # included; a training started again would have ended them later.
    assert len(survivors) == 3 * config.cv.folds
    for final, rung in zip(survivors, first, strict=True):
        assert final.history["wall_time"][:2] == rung.history["wall_time"], final.candidate
        assert final.history["wall_time"][2] > rung.history["wall_time"][-1]


def test_mlflow_has_a_child_per_candidate_and_fold_with_its_values(halving):
    config, summary, _, client = halving
    parent = client.get_run(summary["published"].run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    folds = [run for run in children if run.data.tags["stage"] == "cv"]

    assert len(folds) == 8 * config.cv.folds, len(folds)
    pruned = [run for run in folds if "pruned_at_epoch" in run.data.tags]
    assert len(pruned) == 5 * config.cv.folds, [run.data.tags for run in folds]
    assert {run.data.tags["pruned_at_epoch"] for run in pruned} == {"2"}
    assert all({"training.lr", "model.hidden_sizes", "l2_lambda"} <= set(run.data.params)
               for run in folds), [run.data.params for run in folds]  # fmt: skip
    assert all(run.info.run_name.startswith("cv lambda=") for run in folds)
    best = {f"best.{key}": str(value) for key, value in summary["best"].items()}
    assert {key: parent.data.params[key] for key in best} == best, parent.data.params


@pytest.mark.slow
def test_a_second_run_trains_nothing(halving, tmp_path):
    config, summary, *_ = halving

    again = mlp_pipeline(config)

    assert (again["trained_folds"], again["cached_folds"]) == (0, 11 * config.cv.folds), again
    assert again["best"] == summary["best"]
    assert again["test_accuracy"] == summary["test_accuracy"]


def test_a_grid_over_the_epoch_count_prunes_nothing_and_resumes_from_the_cache(
    prefect_api_url, tmp_path, _empty_store, sample_flow_config
):
    """Each candidate's full budget is its own ``training.epochs``: the shorter one is neither
    pruned (table, MLflow tags) nor trained again by the same command."""
    database = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_store, database)
    uri = f"sqlite:///{database}"
    config = sample_flow_config(tmp_path / "cache", uri, **{
        "cv.l2_lambdas": [1e-4], "search.space": {"training.epochs": [1, 3]}})  # fmt: skip

    first = cv_flow(config)
    again = cv_flow(config)

    table = pd.DataFrame(first["cv_table"])
    assert sorted(table["budget"]) == [1, 3], table
    # Both candidates competed: the choice is the more accurate of the two, by the table.
    best_row = table.loc[table["mean_val_accuracy"].idxmax()]
    assert first["best"]["training.epochs"] == best_row["training.epochs"], table
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(first["published"].run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2 * config.cv.folds, children
    assert not [run.data.tags for run in children if "pruned_at_epoch" in run.data.tags]
    assert (again["trained_folds"], again["cached_folds"]) == (0, 2 * config.cv.folds), again


def test_the_record_folder_names_every_candidate(halving):
    *_, record, _ = halving

    names = sorted(path.name for path in (Path(record.folder) / "folds").iterdir())

    assert len(names) == 16 and len(set(names)) == 16, names


@pytest.mark.slow
def test_the_accurate_preset_runs_end_to_end_on_the_sample(
    prefect_api_url, tmp_path, _empty_store, sample_flow_config
):
    # The preset's own protocol (halving over its lambdas and distortions, its folds, two hidden
    # layers), shrunk to the bundled sample and a few epochs.
    database = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_store, database)
    accurate = preset("accurate")
    config = sample_flow_config(
        tmp_path / "cache",
        f"sqlite:///{database}",
        **{
            "model.hidden_sizes": [32, 32],
            "training.epochs": 3,
            "training.final_epochs": 3,
            "training.dropout": accurate.training.dropout,
            **{f"augment.{key}": value for key, value in accurate.augment.model_dump().items()},
            "cv.l2_lambdas": accurate.cv.l2_lambdas,
            "cv.folds": accurate.cv.folds,
            "search.strategy": accurate.search.strategy,
            "search.eta": accurate.search.eta,
            "search.space": accurate.search.space,
        },
    )
    assert config.augment.enabled and config.search.strategy == "halving"

    summary = mlp_pipeline(config)

    table = pd.DataFrame(summary["cv_table"])
    # 2 lambdas x distortions on and off, eta 4: one goes on.
    assert sorted(table["budget"]) == [1, 1, 1, 3], table
    assert sorted(zip(table["l2_lambda"], table["augment.strength"], strict=True)) == [
        (lam, strength) for lam in accurate.cv.l2_lambdas for strength in (0.0, 1.0)
    ], table
    survivor = table.loc[table["budget"] == 3].iloc[0]
    assert summary["best"] == {
        L2_KEY: survivor["l2_lambda"],
        "augment.strength": survivor["augment.strength"],
    }, summary["best"]
    assert summary["test_accuracy"] > 0.8, summary["test_accuracy"]
    params = MlflowClient(f"sqlite:///{database}").get_run(summary["published"].run_id).data.params
    assert params["augment.elastic_alpha"] == str(accurate.augment.elastic_alpha), params
    recorded = RunRecord(summary["record"]).run()["config"]["augment"]
    assert recorded == config.augment.model_dump(mode="json"), recorded
