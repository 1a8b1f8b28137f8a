"""The Prefect flows: ``mlp-pipeline`` (the whole workflow) and ``cv`` (the sweep only).

data -> folds -> train_fold for every (lambda, fold) in parallel -> CV table and lambda ->
final model on all training data -> test evaluation -> MLflow record. The flow process is the
only MLflow writer: workers return small :class:`~pipeline.results.FoldResult` records.
"""

from __future__ import annotations

import time
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.runners import task_runner
from flows.tasks import configured_fold_task, step
from pipeline.cache import check_cache_dir
from pipeline.config import PipelineConfig
from pipeline.data import Dataset
from pipeline.errors import PipelineError
from pipeline.progress import reporter
from pipeline.recording import ResilientRecorder, report_folder
from pipeline.resources import cpu_count, set_blas_threads
from pipeline.results import FoldResult
from pipeline.selection import cv_table, select_lambda
from pipeline.tracking import PipelineRecorder
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


def run_sweep(config: PipelineConfig, dataset: Dataset, recorder: ResilientRecorder) -> Sweep:
    """Submit ``train_fold`` for every (lambda, fold) and record each result as it arrives.

    A worker process that dies breaks its whole pool and bypasses Prefect's retries, so the
    unfinished trainings are resubmitted to a fresh runner, up to ``execution.retries`` times.
    """
    logger = get_run_logger()
    fold_task = configured_fold_task(config)
    blas = config.execution.resolved_blas_threads(cpu_count())
    pending = [(lam, fold) for lam in config.cv.lambdas for fold in range(config.cv.folds)]
    done: dict[tuple[float, int], FoldResult] = {}
    trained = cached = restarts = 0
    reporter().sweep_started(len(pending))
    while pending:
        try:
            with task_runner(config.execution, config.data) as runner:
                futures = {
                    runner.submit(
                        fold_task,
                        parameters={
                            "config": config,
                            "ref": dataset.ref,
                            "l2_lambda": lam,
                            "fold": fold,
                            "blas_threads": blas,
                        },
                    ): (lam, fold)
                    for lam, fold in pending
                }
                for future in as_completed(list(futures)):
                    result: FoldResult = future.result()
                    was_cached = future.state.name == "Cached"
                    cached += was_cached
                    trained += not was_cached
                    done[futures[future]] = result
                    recorder.log_fold(result)
                    reporter().fold_finished(result, cached=was_cached)
            pending = []
        except BrokenExecutor as exc:
            pending = [key for key in pending if key not in done]
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
    results = [done[key] for key in sorted(done)]
    logger.info("sweep done: %d trained, %d reused from the cache", trained, cached)
    return Sweep(results, trained, cached, restarts)


def _recorder(config: PipelineConfig) -> ResilientRecorder:
    return ResilientRecorder(PipelineRecorder(config.tracking))


def _finish_offline(
    recorder: ResilientRecorder, config: PipelineConfig, summary: dict[str, Any], final: Any = None
) -> dict[str, Any]:
    """Return the summary, or, if MLflow stayed away, save a local report and fail loudly."""
    if not recorder.offline:
        return summary
    folder = recorder.write_report(
        report_folder(config.execution.cache_dir, flow_run.get_name()), summary, final
    )
    raise recorder.not_recorded(folder)


def _flow_tags() -> dict[str, str]:
    return {
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
        "prefect.flow_run_name": str(flow_run.get_name() or ""),
    }


def _cross_validate(
    config: PipelineConfig, dataset: Dataset, recorder: ResilientRecorder, flow_name: str
) -> tuple[str, Sweep, pd.DataFrame, float]:
    """Open the parent run, sweep every (lambda, fold), aggregate, choose lambda, record."""
    parent = recorder.start(
        config, dataset.name, dataset.fingerprint, tags={**_flow_tags(), "flow": flow_name}
    )
    recorder.warm_up(final_model=flow_name == "mlp-pipeline")
    sweep = run_sweep(config, dataset, recorder)
    table = cv_table_task(sweep.results)
    best = select_lambda_task(table)
    get_run_logger().info("best lambda %g", best)
    recorder.log_cv_summary(table, best)
    return parent, sweep, table, best


def _summary(
    parent: str, sweep: Sweep, table: pd.DataFrame, best: float, wall: float, **extra: Any
) -> dict[str, Any]:
    return {
        "mlflow_run_id": parent,
        "best_l2_lambda": best,
        "cv_table": table.to_dict(orient="records"),
        **extra,
        "trained_folds": sweep.trained,
        "cached_folds": sweep.cached,
        "worker_restarts": sweep.worker_restarts,
        "wall_seconds": wall,
    }


@flow(name="cv", log_prints=False)
def cv_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008
    """Cross-validate every lambda and record the CV table (no final model)."""
    started = time.perf_counter()
    check_cache_dir(config.execution.cache_dir)
    dataset = load_data(config)
    with _recorder(config) as recorder:
        parent, sweep, table, best = _cross_validate(config, dataset, recorder, "cv")
        wall = time.perf_counter() - started
        recorder.log_metrics_summary(wall)
    return _finish_offline(recorder, config, _summary(parent, sweep, table, best, wall))


@flow(name="mlp-pipeline", log_prints=False)
def mlp_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008
    """The whole workflow: cross-validated lambda, final model, test evaluation, MLflow record."""
    started = time.perf_counter()
    check_cache_dir(config.execution.cache_dir)
    dataset = load_data(config)
    with _recorder(config) as recorder:
        parent, sweep, table, best = _cross_validate(config, dataset, recorder, "mlp-pipeline")
        # The pool is gone now: the final model may use every core.
        set_blas_threads(config.execution.resolved_final_blas_threads(cpu_count()))
        reporter().final_started(config.training.resolved_final_epochs, best)
        final = train_final_task(config, dataset, best, callback=reporter().final_epoch)
        evaluation, predicted = evaluate_task(final, dataset)
        get_run_logger().info("test accuracy %.4f", evaluation.accuracy)
        record = recorder.log_final(
            final.network,
            final.normalizer,
            final.history,
            evaluation,
            dataset.X_test,
            dataset.y_test,
            predicted,
            l2_lambda=best,
        )
        wall = time.perf_counter() - started
        recorder.log_metrics_summary(wall)
    summary = _summary(
        parent,
        sweep,
        table,
        best,
        wall,
        test_accuracy=evaluation.accuracy,
        test_loss=evaluation.loss,
        model_uri=record.model_uri if record else None,
        registered_model=record.registered_model if record else None,
        registered_version=record.registered_version if record else None,
        champion=record.champion if record else False,
        champion_note=record.champion_note if record else "",
    )
    return _finish_offline(recorder, config, summary, final)
