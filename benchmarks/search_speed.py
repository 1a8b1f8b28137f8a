"""Successive halving against the full grid, and against scikit-learn's two searches.

The space of the search issue on full MNIST: 3 L2 strengths x 2 architectures x 2 learning rates
(12 candidates), 4 folds, 10 epochs, the ``default`` preset otherwise. Parts, in this order:

- ``grid``: ``mlp-pipeline run`` with ``search.strategy = "grid"`` (48 trainings of 10 epochs);
- ``halving``: the same with ``"halving"``, eta 3 (rungs of 1, 3 and 10 epochs for 12, 4 and 2
  candidates; survivors continue from their weights);
- ``sk-grid``: ``GridSearchCV(MLPClassifier)`` on the same space and folds (``n_jobs=2``, one
  BLAS thread each, sklearn's ``alpha`` scaled to our L2 convention, constant learning rate:
  sklearn has no cosine schedule);
- ``sk-halving``: ``HalvingGridSearchCV`` with ``max_iter`` as the resource, factor 3, up to 10
  epochs (sklearn retrains each rung from scratch; its ``exhaust`` rungs are 1, 3 and 9 epochs).

For each: the search's wall seconds (ours: from the run's start to its CV record; sklearn:
``fit`` without its refit), the whole command's wall seconds, the chosen candidate and the test
accuracy of the model trained on all 60,000 training images with it. Every part runs in a fresh
process with a fresh fold cache and MLflow store. ``spread``: the test accuracy of the candidate
the searches chose, trained by us and by sklearn with several seeds (two BLAS threads).

Usage::

    python benchmarks/search_speed.py --data-dir ../shared/data
    python benchmarks/search_speed.py --parts grid,halving --epochs 2   # a quick check
    python benchmarks/search_speed.py --parts spread --seeds 0,1,2      # the chosen candidate's
                                                                        # test accuracy per seed

Run it on an otherwise idle machine: it takes about 40 minutes here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import default_data_dir  # benchmarks/ is on sys.path when a script runs
from pipeline_speed import run_cli, sklearn_data

SPACE = {
    "training.l2_lambda": [1e-4, 3e-4, 1e-3],
    "model.hidden_sizes": [[256, 128], [512, 256]],
    "training.lr": [0.05, 0.1],
}
PARTS = ("grid", "halving", "sk-grid", "sk-halving")


def run_ours(strategy: str, data_dir: str, epochs: int, workdir: Path, schedule: str) -> dict:
    """``mlp-pipeline run`` over :data:`SPACE` with ``strategy``, in a fresh ``workdir``."""
    from pipeline.record import RunRecord

    config = workdir / "search.toml"
    space = "\n".join(f'"{key}" = {json.dumps(values)}' for key, values in SPACE.items())
    config.write_text(
        f"[data]\ndata_dir = {json.dumps(data_dir)}\n"
        f'[training]\nepochs = {epochs}\nschedule = "{schedule}"\n'
        f'[search]\nstrategy = "{strategy}"\n[search.space]\n{space}\n'
    )
    result = run_cli(["run", "--config", str(config)], workdir)
    (folder,) = (workdir / ".mlp-pipeline" / "runs").iterdir()
    record = RunRecord(folder)
    run, cv = record.run(), record.cv()
    table = cv["table"]
    return {
        "search_seconds": (cv["time"] - run["start_time"]) / 1000,
        "wall_seconds": result["wall_seconds"],
        "peak_memory_mb": result["peak_memory_mb"],
        "test_accuracy": result["test_accuracy"],
        "chosen": cv["best"],
        "cv_accuracy": float(cv["chosen_row"]["mean_val_accuracy"]),
        "trainings": int(run["summary"]["trained_folds"]),
        "epochs_trained": int((table["budget"] * table["n_folds"]).sum()),
    }


def run_sklearn(halving: bool, data_dir: str, epochs: int) -> dict:
    """``(Halving)GridSearchCV(MLPClassifier)`` over :data:`SPACE` on our folds."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.experimental import enable_halving_search_cv  # noqa: F401 -- enables it
    from sklearn.model_selection import GridSearchCV, HalvingGridSearchCV, PredefinedSplit
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    from pipeline.config import build_config

    config = build_config(overrides={"data.data_dir": data_dir})
    dataset, X, X_test, test_fold = sklearn_data(config)
    cv, train = config.cv, config.training
    # sklearn adds alpha / (2 n_batch) ||W||^2 to each batch's mean loss: alpha = lambda * batch.
    grid = {
        "alpha": [lam * train.batch_size for lam in SPACE["training.l2_lambda"]],
        "hidden_layer_sizes": [tuple(sizes) for sizes in SPACE["model.hidden_sizes"]],
        "learning_rate_init": SPACE["training.lr"],
    }
    model = MLPClassifier(solver="sgd", momentum=train.momentum, nesterovs_momentum=True,
                          batch_size=train.batch_size, max_iter=epochs,
                          n_iter_no_change=epochs + 1, tol=0.0, random_state=cv.seed)  # fmt: skip
    split = PredefinedSplit(test_fold)
    if halving:
        search = HalvingGridSearchCV(model, grid, cv=split, factor=3, resource="max_iter",
                                     max_resources=epochs, n_jobs=2, refit=True,
                                     scoring="accuracy", random_state=cv.seed)  # fmt: skip
    else:
        search = GridSearchCV(model, grid, cv=split, n_jobs=2, refit=True, scoring="accuracy")
    started = time.perf_counter()
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X, dataset.y_train)
    wall = time.perf_counter() - started
    best = search.best_params_
    return {
        "search_seconds": wall - search.refit_time_,
        "wall_seconds": wall,
        "test_accuracy": float(search.score(X_test, dataset.y_test)),
        "chosen": {
            "training.l2_lambda": best["alpha"] / train.batch_size,
            "model.hidden_sizes": list(best["hidden_layer_sizes"]),
            "training.lr": best["learning_rate_init"],
            **({"epochs": best["max_iter"]} if halving else {}),
        },
        "cv_accuracy": float(search.best_score_),
        "trainings": len(search.cv_results_["params"]) * cv.folds,
    }


def run_spread(data_dir: str, epochs: int, seeds: list[int], schedule: str) -> dict:
    """The test accuracy of one candidate's final model, ours and sklearn's, seed by seed.

    The candidate both searches chose; the spread over seeds says how large a difference
    between two single-seed searches can be by chance.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    from pipeline.config import build_config
    from pipeline.training import predict_test, train_final

    candidate = {"training.l2_lambda": 1e-4, "model.hidden_sizes": [512, 256], "training.lr": 0.05}
    config = build_config(
        overrides={
            "data.data_dir": data_dir,
            "training.epochs": epochs,
            "training.schedule": schedule,
        }  # fmt: skip
    )
    dataset, X, X_test, _ = sklearn_data(config)
    ours, theirs = [], []
    for seed in seeds:
        with threadpool_limits(2):
            final = train_final(config.replace({"cv.seed": seed}), dataset, candidate)
            ours.append(predict_test(final, dataset)[0].accuracy)
            model = MLPClassifier((512, 256), solver="sgd", momentum=0.9, nesterovs_momentum=True,
                                  batch_size=128, max_iter=epochs, learning_rate_init=0.05,
                                  alpha=1e-4 * 128, n_iter_no_change=epochs + 1, tol=0.0,
                                  random_state=seed)  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X, dataset.y_train)
            theirs.append(float(model.score(X_test, dataset.y_test)))
    return {"seeds": seeds, "ours": ours, "sklearn": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the spread part")
    parser.add_argument(
        "--schedule", default="cosine", help="our learning-rate schedule (constant: sklearn's)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one sklearn part, in a new process
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    if args.child:
        print(json.dumps(run_sklearn(args.child == "sk-halving", data_dir, args.epochs)))
        return
    results = {}
    if args.parts == "spread":
        seeds = [int(seed) for seed in args.seeds.split(",")]
        print(json.dumps(run_spread(data_dir, args.epochs, seeds, args.schedule)))
        return
    for part in args.parts.split(","):
        print(f"{part} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"search-{part}-") as tmp:
            if part in ("grid", "halving"):
                results[part] = run_ours(part, data_dir, args.epochs, Path(tmp), args.schedule)
            else:
                started = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, __file__, "--child", part, "--data-dir", data_dir,
                     "--epochs", str(args.epochs)],
                    capture_output=True, text=True, check=True, env=os.environ,
                )  # fmt: skip
                results[part] = json.loads(done.stdout.strip().splitlines()[-1])
                results[part]["command_seconds"] = time.perf_counter() - started
        print(json.dumps(results[part]), flush=True)
    print("\npart        search s   wall s   test acc   chosen")
    for part, result in results.items():
        print(f"{part:<11} {result['search_seconds']:>8.1f} {result['wall_seconds']:>8.1f} "
              f"{100 * result['test_accuracy']:>9.2f}%   {result['chosen']}")  # fmt: skip
    if {"grid", "halving"} <= set(results):
        grid, halving = results["grid"], results["halving"]
        ratio = halving["search_seconds"] / grid["search_seconds"]
        points = 100 * (halving["test_accuracy"] - grid["test_accuracy"])
        print(f"halving / grid search time: {ratio:.2f}x; test accuracy {points:+.2f} points")
    for ours in ("grid", "halving"):
        for theirs in ("sk-grid", "sk-halving"):
            if {ours, theirs} <= set(results):
                a, b = results[ours], results[theirs]
                ratio = a["search_seconds"] / b["search_seconds"]
                points = 100 * (a["test_accuracy"] - b["test_accuracy"])
                print(f"{ours} vs {theirs}: {ratio:.2f}x the search time, test accuracy "
                      f"{points:+.2f} points")  # fmt: skip


if __name__ == "__main__":
    main()
