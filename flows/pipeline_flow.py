"""The Prefect flows: ``mlp-pipeline`` (the whole workflow) and ``cv`` (the sweep only).

data -> train_fold for every (lambda, fold), in parallel -> CV table and lambda -> final model on
all training data -> test evaluation. Every result goes to the run record as it arrives
(:mod:`pipeline.record`), which MLflow mirrors (:mod:`pipeline.tracking.publish`). Workers
return small :class:`~pipeline.results.FoldResult` records; only the flow process writes.
"""

from __future__ import annotations

import time
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.runners import check_scheduler_reachable, task_runner
from flows.tasks import step, train_fold_task
from pipeline.config import PipelineConfig
from pipeline.data import Dataset, fingerprint_test_set
from pipeline.errors import PipelineError
from pipeline.progress import reporter
from pipeline.record import FoldCache, RunRecord, check_cache_dir, fold_key
from pipeline.results import FoldResult
from pipeline.selection import cv_table, select_lambda
from pipeline.threads import cpu_count, set_blas_threads
from pipeline.tracking.publish import LivePublisher, recorded
from pipeline.training import load_data_checked, predict_test, train_final


class WorkersLost(PipelineError):
    """Worker processes kept dying past ``execution.retries`` (exit code 1: not bad input)."""

    exit_code = 1


@dataclass
class Sweep:
    """Every (lambda, fold) result, and how many were trained now vs. reused from the cache."""

    results: list[FoldResult]
    trained: int
    cached: int
    worker_restarts: int


load_data = step(load_data_checked, name="load_data")
cv_table_task = step(cv_table, name="cv_table")
select_lambda_task = step(select_lambda, name="select_lambda")
train_final_task = step(train_final, name="train_final")
evaluate_task = step(predict_test, name="evaluate")


def run_sweep(
    config: PipelineConfig, dataset: Dataset, record: RunRecord, publisher: LivePublisher
) -> Sweep:
    """Train every (lambda, fold) not in the fold cache; record each result as it arrives.

    A worker process that dies breaks its whole pool and bypasses Prefect's retries, so the
    unfinished trainings are resubmitted to a fresh runner, up to ``execution.retries`` times.
    """
    logger = get_run_logger()
    cache = FoldCache(config.execution.cache_dir)
    keys = {
        (l2_lambda, fold): fold_key(config, dataset.fingerprint, l2_lambda, fold)
        for l2_lambda in config.cv.l2_lambdas
        for fold in range(config.cv.folds)
    }
    done: dict[tuple[float, int], FoldResult] = {}
    reporter().sweep_started(len(keys))
    for item, key in keys.items():
        hit = cache.get(key) if config.execution.resume else None
        # An entry copied under another key is sealed but not this training's result.
        if hit is not None and (hit.l2_lambda, hit.fold) == item:
            done[item] = hit
            record.add_fold(hit)
            reporter().fold_finished(hit, cached=True)
    cached = len(done)
    if cached:
        logger.info("%d of %d trainings reused from the fold cache", cached, len(keys))
        publisher.request()
    pending = [item for item in keys if item not in done]
    blas = config.execution.resolved_blas_threads(cpu_count())
    restarts = 0
    while pending:
        try:
            with task_runner(config.execution, config.data) as runner:
                futures = {
                    runner.submit(
                        train_fold_task,
                        parameters={
                            "config": config,
                            "ref": dataset.ref,
                            "l2_lambda": l2_lambda,
                            "fold": fold,
                            "blas_threads": blas,
                        },
                    ): (l2_lambda, fold)
                    for l2_lambda, fold in pending
                }
                for future in as_completed(list(futures)):
                    result: FoldResult = future.result()
                    item = futures[future]
                    cache.put(keys[item], result)
                    record.add_fold(result)
                    publisher.request()
                    done[item] = result
                    reporter().fold_finished(result, cached=False)
                    logger.info(
                        "lambda=%g fold %d: val accuracy %.4f (%.1f s)",
                        result.l2_lambda, result.fold, result.val_accuracy, result.seconds,
                    )  # fmt: skip
            pending = []
        except BrokenExecutor as exc:
            pending = [item for item in pending if item not in done]
            restarts += 1
            if restarts > config.execution.retries:
                raise WorkersLost(
                    f"a worker process died {restarts} time{'s' if restarts > 1 else ''} ({exc}); "
                    f"{len(pending)} trainings unfinished"
                ) from None
            logger.warning(
                "a worker process died; resubmitting %d unfinished trainings to a fresh pool",
                len(pending),
            )
    results = [done[item] for item in sorted(done)]
    return Sweep(results, len(keys) - cached, cached, restarts)


def prepare_run(config: PipelineConfig) -> None:
    """Fail in one line, before any flow run, on what the flow would find only later.

    The cache folder, the dataset (memoized: the flow's own load then costs nothing), a Dask
    scheduler's address, and the MLflow store (its first use creates its tables).
    """
    from pipeline.tracking.store import default_tracking_uri, open_store

    check_cache_dir(config.execution.cache_dir)
    load_data_checked(config)
    if config.execution.runner == "dask" and config.execution.dask_address:
        check_scheduler_reachable(config.execution.dask_address)
    open_store(default_tracking_uri(config.tracking.tracking_uri), config.tracking.experiment)


def run_pipeline(config: PipelineConfig, flow_name: str, final_model: bool) -> dict[str, Any]:
    """The body of both flows: the sweep and the choice, then (``final_model``) the final model.

    Returns the summary the command line prints.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    check_cache_dir(config.execution.cache_dir)
    dataset = load_data(config)
    logger.info(
        "dataset %s: %d training and %d test images",
        dataset.name, len(dataset.y_train), len(dataset.y_test),
    )  # fmt: skip
    prefect_run = {"id": str(flow_run.get_id() or ""), "name": str(flow_run.get_name() or "")}
    with recorded(
        config,
        flow=flow_name,
        dataset={"name": dataset.name, "fingerprint": dataset.fingerprint},
        prefect_flow_run=prefect_run,
    ) as (record, publisher):
        sweep = run_sweep(config, dataset, record, publisher)
        table = cv_table_task(sweep.results)
        best = select_lambda_task(table)
        record.add_cv(table, best)
        publisher.request()
        logger.info("chosen lambda %g", best)
        summary: dict[str, Any] = {
            "best_l2_lambda": best,
            "cv_table": table.to_dict(orient="records"),
            "trained_folds": sweep.trained,
            "cached_folds": sweep.cached,
            "worker_restarts": sweep.worker_restarts,
        }
        if final_model:
            # The pool is gone now: the final model may use every core.
            set_blas_threads(config.execution.resolved_final_blas_threads(cpu_count()))
            reporter().final_started(config.training.resolved_final_epochs, best)
            final = train_final_task(config, dataset, best, callback=reporter().final_epoch)
            evaluation, predicted = evaluate_task(final, dataset)
            logger.info("test accuracy %.4f (lambda %g)", evaluation.accuracy, best)
            test_set = fingerprint_test_set(dataset.X_test, dataset.y_test)
            record.add_final(final, evaluation, dataset.X_test, dataset.y_test, predicted, test_set)
            summary.update(test_accuracy=evaluation.accuracy, test_loss=evaluation.loss)
        summary["wall_seconds"] = time.perf_counter() - started
        record.finish("FINISHED", summary=summary)
    return {**summary, "record": str(record.folder), "published": publisher.published}


@flow(name="cv", log_prints=False)
def cv_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008
    """Cross-validate every lambda and record the CV table (no final model)."""
    return run_pipeline(config, "cv", final_model=False)


@flow(name="mlp-pipeline", log_prints=False)
def mlp_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008
    """The whole workflow: cross-validated lambda, final model, test evaluation, MLflow record."""
    return run_pipeline(config, "mlp-pipeline", final_model=True)
