"""The Prefect flows: ``mlp-pipeline`` (the whole workflow) and ``cv`` (the sweep only).

data -> train_fold for every (candidate, fold) of the search, in parallel (rung by rung in
successive halving) -> CV table and the chosen candidate -> final model on all training data ->
test evaluation. Every result goes to the run record as it arrives
(:mod:`pipeline.record`), which MLflow mirrors (:mod:`pipeline.tracking.publish`). Workers
return small :class:`~pipeline.results.FoldResult` records; only the flow process writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId, TaskRunFilterStartTime
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from flows.artifacts import FlowArtifacts
from flows.runners import check_scheduler_reachable, task_runner
from flows.tasks import step, train_fold_task
from pipeline.config import PipelineConfig
from pipeline.data import Dataset, fingerprint_test_set
from pipeline.errors import PipelineError
from pipeline.progress import reporter
from pipeline.record import FoldCache, RunRecord, check_cache_dir, fold_key
from pipeline.results import FoldResult
from pipeline.search import (
    L2_KEY,
    candidate_config,
    candidate_id,
    candidates,
    full_epochs,
    label,
    rungs,
)
from pipeline.selection import cv_table, ranked, select_candidate
from pipeline.threads import cpu_count, set_blas_threads
from pipeline.tracking.publish import LivePublisher, recorded
from pipeline.tracking.store import ui_command
from pipeline.training import (
    Checkpoint,
    load_data_checked,
    parameter_count,
    predict_test,
    train_final,
)


class WorkersLost(PipelineError):
    """Worker processes kept dying past ``execution.retries`` (exit code 1: not bad input)."""

    exit_code = 1


@dataclasses.dataclass
class Sweep:
    """Fold results (each candidate's last rung's), and how they were obtained.

    ``parameters``: each candidate's network size, for the whole sweep (not for one rung).
    """

    results: list[FoldResult]
    trained: int
    cached: int
    worker_restarts: int
    parameters: dict[str, int] = dataclasses.field(default_factory=dict)


load_data = step(load_data_checked, name="load_data")
cv_table_task = step(cv_table, name="cv_table")
select_candidate_task = step(select_candidate, name="select_candidate")
train_final_task = step(train_final, name="train_final")
evaluate_task = step(predict_test, name="evaluate")

Item = tuple[str, int]  # (candidate id, fold)


def run_sweep(
    config: PipelineConfig,
    dataset: Dataset,
    record: RunRecord,
    publisher: LivePublisher,
    artifacts: FlowArtifacts,
) -> Sweep:
    """Train every (candidate, fold) of the search; record each result once it is final.

    One rung for ``grid`` and ``random``; successive halving trains every candidate for the
    first rung's epochs, then only the best ``1/eta`` go on, continuing from their weights and
    optimizer state (:func:`pipeline.search.rungs`). A pruned candidate's results are recorded
    when it is pruned; the last rung's as they arrive. Results come from the fold cache when
    they are there.
    """
    logger = get_run_logger()
    searched = {candidate_id(c): c for c in candidates(config)}
    plan = rungs(config, len(searched))
    folds = range(config.cv.folds)
    halving = len(plan) > 1
    logger.info(
        "search: %d candidate(s) x %d folds (%s)%s", len(searched), config.cv.folds,
        config.search.strategy,
        "; rungs (epochs, candidates): " + ", ".join(map(str, plan)) if halving else "",
    )  # fmt: skip
    total = sum(count for _, count in plan) * config.cv.folds
    reporter().sweep_started(total)
    artifacts.sweep_started(total)
    parameters = {
        key: parameter_count(candidate_config(config, c), dataset.n_features, dataset.n_classes)
        for key, c in searched.items()
    }
    alive = list(searched)
    checkpoints: dict[Item, Checkpoint] = {}
    results: list[FoldResult] = []  # each candidate's last rung
    trained = cached = restarts = 0
    with Runners(config) as runners:  # one pool for every rung
        for number, (epochs, _) in enumerate(plan):
            last = number == len(plan) - 1
            stop = epochs if halving and not last else None  # the last rung: to the end
            jobs = {(key, fold): searched[key] for key in alive for fold in folds}
            rung = _train_rung(config, dataset, jobs, stop, checkpoints, record, last,
                               publisher, runners, artifacts)  # fmt: skip
            trained, cached = trained + rung.trained, cached + rung.cached
            restarts += rung.worker_restarts
            if last:
                results += rung.results
                break
            table = cv_table(rung.results, parameters)
            keep = plan[number + 1][1]
            alive = list(ranked(table)["candidate"][:keep])
            for result in rung.results:
                if candidate_id(result.candidate) not in alive:
                    record.add_fold(result)  # pruned here: its final result
                    results.append(result)
                    checkpoints.pop((candidate_id(result.candidate), result.fold), None)
            publisher.request()
            logger.info("rung %d (%d epochs): %d of %d candidates go on", number + 1, epochs,
                        len(alive), len(table))  # fmt: skip
    return Sweep(results, trained, cached, restarts, parameters)


class Runners:
    """The sweep's task runner, opened when first needed and kept across halving rungs.

    ``renew`` closes a runner a dead worker broke; the next ``current`` opens a fresh one.
    """

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self._open: contextlib.ExitStack | None = None
        self._runner: Any = None

    def current(self) -> Any:
        if self._open is None:
            self._open = contextlib.ExitStack()
            self._runner = self._open.enter_context(
                task_runner(self.config.execution, self.config.data)
            )
        return self._runner

    def renew(self, broken: BaseException) -> None:
        opened, self._open = self._open, None
        if opened is not None:
            opened.__exit__(type(broken), broken, broken.__traceback__)

    def __enter__(self) -> Runners:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        opened, self._open = self._open, None
        if opened is not None:
            opened.__exit__(*exc_info)  # an interruption reaches the runner (stop flag)


def _train_rung(
    config: PipelineConfig,
    dataset: Dataset,
    jobs: dict[Item, dict[str, Any]],
    stop: int | None,
    checkpoints: dict[Item, Checkpoint],
    record: RunRecord,
    last: bool,
    publisher: LivePublisher,
    runners: Runners,
    artifacts: FlowArtifacts,
) -> Sweep:
    """Train ``jobs`` (up to epoch ``stop``), from the fold cache where it has them.

    ``record`` gets when each training starts (its MLflow run exists from then) and, in the
    ``last`` rung, each result as it arrives. A worker process that dies breaks its whole pool
    and bypasses Prefect's retries, so the unfinished trainings are resubmitted to a fresh
    runner, up to ``execution.retries`` times.
    """
    logger = get_run_logger()
    cache = FoldCache(config.execution.cache_dir)
    keys = {
        item: fold_key(config, dataset.fingerprint, candidate, item[1], stop)
        for item, candidate in jobs.items()
    }
    done: dict[Item, FoldResult] = {}

    def finished(item: Item, result: FoldResult, cached: bool) -> None:
        done[item] = result
        if last:
            record.add_fold(result)
            publisher.request()
        reporter().fold_finished(result, cached=cached)
        artifacts.training_finished()

    def started(item: Item, at: int) -> None:
        record.add_fold_start(jobs[item], item[1], at)
        publisher.request()

    for item, key in keys.items():
        full = full_epochs(config, jobs[item])
        budget = stop or full
        hit = cache.get(key) if config.execution.resume else None
        if hit is not None and hit.budget is None:  # written before halving existed: all epochs
            hit = dataclasses.replace(hit, budget=full)
        # An entry copied under another key is sealed but not this training's result.
        if hit is not None and (candidate_id(hit.candidate), hit.fold, hit.budget) == (
            *item,
            budget,
        ):
            checkpoints.pop(item, None)  # a later rung starts again from this rung's epochs
            finished(item, hit, cached=True)
    cached = len(done)
    if cached:
        logger.info("%d of %d trainings reused from the fold cache", cached, len(keys))
    pending = [item for item in keys if item not in done]
    blas = config.execution.resolved_blas_threads(cpu_count())
    restarts = 0
    while pending:
        try:
            runner = runners.current()
            futures: dict[PrefectFuture, Item] = {
                runner.submit(
                    train_fold_task,
                    parameters={
                        "config": config,
                        "ref": dataset.ref,
                        "candidate": jobs[item],
                        "fold": item[1],
                        "blas_threads": blas,
                        "stop_epoch": stop,
                        "resume": checkpoints.get(item),
                    },
                ): item
                for item in pending
            }
            for future in _as_completed(futures, started):
                result, checkpoint = future.result()
                item = futures[future]
                cache.put(keys[item], result)
                if checkpoint is not None:
                    checkpoints[item] = checkpoint
                finished(item, result, cached=False)
                logger.info(
                    "%s fold %d: val accuracy %.4f (%.1f s)",
                    label(result.candidate), result.fold, result.val_accuracy, result.seconds,
                )  # fmt: skip
            pending = []
        except BrokenExecutor as exc:
            runners.renew(exc)
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
    return Sweep([done[item] for item in keys], len(keys) - cached, cached, restarts)


#: How often the sweep asks Prefect which of its trainings have started (seconds).
START_POLL = 1.0


def _as_completed(
    futures: dict[PrefectFuture, Item], on_start: Callable[[Item, int], None]
) -> Iterator[PrefectFuture]:
    """The futures as they complete; meanwhile ``on_start(item, epoch ms)`` once per training
    seen running.

    A training starts when a worker takes its task run, not when it is submitted (a pool runs
    as many at once as it has workers): Prefect's task runs say when, asked every
    :data:`START_POLL` seconds however often results arrive.
    """
    completed: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(completed.put)
    waiting = list(futures)  # not seen running yet, in submission order
    next_poll = time.monotonic() + START_POLL
    for _ in futures:
        while True:
            try:
                future = completed.get(timeout=max(0.0, next_poll - time.monotonic()))
                break
            except queue.Empty:
                for started, at in _started(waiting).items():
                    on_start(futures[started], at)
                    waiting.remove(started)
                next_poll = time.monotonic() + START_POLL
        if future in waiting:  # done before a poll saw it run: its result says when
            waiting.remove(future)
        yield future


def _started(futures: list[PrefectFuture]) -> dict[PrefectFuture, int]:
    """Which of ``futures`` have started running, and when (epoch milliseconds).

    One query to the Prefect API; if it fails, none is reported this time.
    """
    by_id = {future.task_run_id: future for future in futures[:200]}  # the API's page size
    if not by_id:
        return {}
    query = TaskRunFilter(id=TaskRunFilterId(any_=list(by_id)),
                          start_time=TaskRunFilterStartTime(is_null_=False))  # fmt: skip
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(task_run_filter=query, limit=len(by_id))
    except Exception:  # a missed poll only delays a run's appearance in MLflow
        return {}
    return {by_id[run.id]: int(run.start_time.timestamp() * 1000) for run in runs}


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
    reporter().run_started(prefect_run["name"], url_for("flow-run", obj_id=prefect_run["id"]))
    with recorded(
        config,
        flow=flow_name,
        dataset=dataset.summary(),
        prefect_flow_run=prefect_run,
    ) as (record, publisher):
        artifacts = FlowArtifacts()
        sweep = run_sweep(config, dataset, record, publisher, artifacts)
        table = cv_table_task(sweep.results, sweep.parameters)
        best = select_candidate_task(table, config.cv.selection)
        record.add_cv(table, best)
        publisher.request()
        logger.info("chosen: %s (%s rule)", label(best), config.cv.selection)
        artifacts.cv_table(table, f"cross-validation, {config.cv.folds} folds, "
                                  f"{config.search.strategy}; chosen {label(best)}")  # fmt: skip
        summary: dict[str, Any] = {
            "best_l2_lambda": best[L2_KEY],
            "best": best,
            "cv_table": table.to_dict(orient="records"),
            "trained_folds": sweep.trained,
            "cached_folds": sweep.cached,
            "worker_restarts": sweep.worker_restarts,
        }
        if final_model:
            # The pool is gone now: the final model may use every core.
            set_blas_threads(config.execution.resolved_final_blas_threads(cpu_count()))
            reporter().final_started(config.training.resolved_final_epochs, label(best, "λ"))
            live = publisher.final_epochs(best, also=reporter().final_epoch)
            final = train_final_task(config, dataset, best, callback=live)
            logger.info(
                "final model: %d epochs on %d images (%.1f s)",
                len(final.history["epoch"]), len(dataset.y_train), final.seconds,
            )  # fmt: skip
            evaluation, predicted = evaluate_task(final, dataset)
            logger.info("test accuracy %.4f (%s)", evaluation.accuracy, label(best))
            test_set = fingerprint_test_set(dataset.X_test, dataset.y_test)
            record.add_final(final, evaluation, dataset.X_test, dataset.y_test, predicted,
                             test_set, dataset.class_names)  # fmt: skip
            summary.update(test_accuracy=evaluation.accuracy, test_loss=evaluation.loss)
        summary["wall_seconds"] = time.perf_counter() - started
        record.finish("FINISHED", summary=summary)
    result = {**summary, "record": str(record.folder), "published": publisher.published}
    # Published: ``recorded`` raised otherwise (NotPublishedError names the record's folder).
    published = publisher.published
    logger.info("run record %s; MLflow run %s", record.folder, published.run_id)
    artifacts.run_summary(result, flow_name, dataset.name, ui_command(published.tracking_uri))
    return result


@flow(name="cv", log_prints=False)
def cv_flow(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008
    """Cross-validate every candidate and record the CV table (no final model)."""
    return run_pipeline(config, "cv", final_model=False)


@flow(name="mlp-pipeline", log_prints=False)
def mlp_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:  # noqa: B008
    """The whole workflow: cross-validated search, final model, test evaluation, MLflow record."""
    return run_pipeline(config, "mlp-pipeline", final_model=True)
