"""Reliability figures: the bad-input catalogue and the fault injections, counted.

Runs the test modules that inject bad inputs and real faults (SIGKILL, SIGINT, SIGTERM, SIGHUP,
a tracking server that disappears, MLflow failing mid-publish, the temporary Prefect server
lost, diverging training, two pipelines on one store) and prints:

- bad inputs tried / handled cleanly (``tests/test_bad_inputs.py`` cases and IDX fuzzing),
- faults injected / survived,
- finished results lost (must be 0),
- folds retrained after a resume (must be 0).

Usage::

    python benchmarks/reliability.py            # about 10 minutes on 2 cores

Exit status 0 only when every figure meets its target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = ["tests/test_bad_inputs.py", "tests/pipeline/test_idx_fuzz.py"]
# The hardening round (hostile files, dead or silent servers, full disks, odd paths, secrets),
# one line per class: (class, test selections).
HARDENING = {
    "files: resealed records and cache entries, FIFOs, oversized IDX headers, full disks":
        ["tests/pipeline/test_hardening_files.py"],
    "Prefect API silent or refusing, first runs at once, read-only home, served failures":
        ["tests/flows/test_prefect_api_faults.py"],
    "credentials only MLflow reads from the URI; serve and trigger refuse secrets":
        ["tests/flows/test_cli.py::test_a_secret_only_mlflow_reads_from_the_uri_travels_in_the_environment",
         "tests/flows/test_deployments.py::test_serve_refuses_a_tracking_uri_with_credentials",
         "tests/flows/test_deployments.py::test_a_triggered_run_takes_no_credentials_in_its_tracking_uri"],
    "champion tags edited into nonsense; a sealed cache entry under another key":
        ["tests/pipeline/test_publish.py::test_a_champion_whose_recorded_figure_is_nonsense_is_scored_from_its_weights",
         "tests/flows/test_pipeline_flow.py::test_a_sealed_entry_copied_under_another_key_is_trained_again"],
    "full artifact disk (the parent ends FAILED, a later publish finishes it); store locked":
        ["tests/pipeline/test_publish.py::test_a_full_artifact_disk_ends_the_parent_failed_and_a_later_publish_finishes_it",
         "tests/pipeline/test_publish.py::test_a_store_locked_for_seconds_mid_run_delays_the_publish_and_loses_nothing"],
    "paths with URI characters; networks that cannot fit in memory":
        ["tests/test_security.py::test_a_project_folder_with_uri_characters_keeps_its_store_inside",
         "tests/pipeline/test_training.py::test_a_network_that_cannot_fit_in_memory_is_refused_before_training"],
    "lambda ties whatever the fold order; a lambda with a missing fold":
        ["tests/pipeline/test_selection.py::test_fold_values_in_any_order_give_the_same_mean_so_a_tie_stays_a_tie",
         "tests/pipeline/test_selection.py::test_a_lambda_with_a_missing_fold_is_not_eligible"],
}  # fmt: skip
# Every test here injects one fault and logs one line (the ``reliability_log`` fixture): whole
# files of fault tests, and the publish tests that make MLflow fail once mid-publish.
PUBLISH = "tests/pipeline/test_publish.py"
FAULTS = [
    "tests/flows/test_faults.py",
    "tests/flows/test_interrupt.py",
    "tests/flows/test_tracking_faults.py",
    f"{PUBLISH}::test_a_retried_final_record_resumes_where_it_failed",
    f"{PUBLISH}::test_a_retried_cv_record_resumes_where_it_failed",
    f"{PUBLISH}::test_a_lost_reply_creates_nothing_twice",
    f"{PUBLISH}::test_a_failed_alias_read_does_not_crown_a_worse_model",
    f"{PUBLISH}::test_a_retry_after_the_alias_moved_reports_the_new_champion",
]


def _run(paths: list[str], junit: Path, env: dict[str, str]) -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths]
    return subprocess.call([*command, f"--junitxml={junit}"], cwd=REPO, env=env)


def _cases(junit: Path, file_part: str) -> tuple[int, int]:
    """(tried, passed) among the test cases of files whose path contains ``file_part``."""
    tried = passed = 0
    for case in ET.parse(junit).iter("testcase"):
        if file_part not in (case.get("classname", "") + case.get("file", "")):
            continue
        outcome = {child.tag for child in case}
        if "skipped" in outcome and not any(
            "xfail" in (child.get("type", "") + child.get("message", "")) for child in case
        ):
            continue  # skipped cases were not tried
        tried += 1
        passed += not outcome & {"failure", "error", "skipped"}
    return tried, passed


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mlp-reliability-") as tmp:
        log = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "MLP_PIPELINE_RELIABILITY_LOG": str(log)}
        catalogue_xml, faults_xml = Path(tmp) / "catalogue.xml", Path(tmp) / "faults.xml"
        _run(CATALOGUE, catalogue_xml, env)
        _run(FAULTS, faults_xml, env)
        hardening = {}
        for number, (name, paths) in enumerate(HARDENING.items()):
            junit = Path(tmp) / f"hardening-{number}.xml"
            _run(paths, junit, env)
            hardening[name] = _cases(junit, "tests")

        bad_tried, bad_clean = _cases(catalogue_xml, "test_bad_inputs")
        fuzz_tried, fuzz_clean = _cases(catalogue_xml, "test_idx_fuzz")
        fault_tried, fault_passed = _cases(faults_xml, "tests")
        lines = log.read_text().splitlines() if log.exists() else []
        records = [json.loads(line) for line in lines]

    lost = sum(r.get("results_lost", 0) for r in records)
    retrained = sum(r.get("folds_retrained", 0) for r in records)
    print("\nbad inputs")
    print(f"  catalogue cases tried / handled cleanly: {bad_tried} / {bad_clean}")
    print(f"  IDX fuzzing properties (200 examples each): {fuzz_tried} / {fuzz_clean}")
    print("faults injected (one line per fault test that got to the end)")
    for record in records:
        figures = ", ".join(f"{k}={v}" for k, v in record.items() if k != "fault")
        print(f"  - {record['fault']}: {figures}")
    print(f"  fault tests run / passed: {fault_tried} / {fault_passed}")
    print(f"  faults survived: {sum(bool(r.get('survived')) for r in records)} / {fault_tried}")
    print("hardening classes (cases tried / handled)")
    for name, (tried, handled) in hardening.items():
        print(f"  - {name}: {tried} / {handled}")
    print(f"finished results lost: {lost} (target 0)")
    print(f"folds retrained after a resume: {retrained} (target 0)")
    ok = (
        bad_tried == bad_clean
        and fuzz_tried == fuzz_clean
        and fault_tried == fault_passed == len(records)
        and lost == 0
        and retrained == 0
        and all(tried == handled > 0 for tried, handled in hardening.values())
    )
    print("PASS" if ok else "MISS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
