"""The homework notebook's published figures, printed beside ours when a run follows its protocol.

From ``../shared/reference/homework-notebook.txt``: mean 4-fold CV accuracy and loss per lambda
after 200 full-batch steps (784-64-10), the lambda it chose, and the test accuracy of its final
one-hidden-layer model (300 steps) and of its two-hidden-layer model (784-128-64-10, 500 steps).
"""

from __future__ import annotations

from typing import Any

# Mean CV accuracy (%) and loss per lambda, as the notebook printed them.
CV_ACCURACY_PERCENT = {1e-1: 81.3667, 1e-2: 85.2667, 1e-3: 85.7217, 1e-4: 85.5367}
CV_LOSS = {1e-1: 1.0718, 1e-2: 0.4873, 1e-3: 0.4767, 1e-4: 0.4872}
BEST_LAMBDA = 1e-3
TEST_ACCURACY_ONE_HIDDEN_PERCENT = 88.39
TEST_ACCURACY_TWO_HIDDEN_PERCENT = 96.43

# What makes a run the notebook's protocol: the data it sees, the network, the training and the
# folds. Where the data lives, how the work is spread and where it is recorded do not matter;
# nor does the seed (the notebook's init was not seeded).
_PROTOCOL_DATA = ("dataset", "normalization", "limit_train", "limit_test")
_PROTOCOL_SECTIONS = ("model", "training", "cv")


def follows_protocol(config: Any) -> bool:
    """True when ``config`` runs the notebook's protocol (the ``notebook`` preset's settings)."""
    from pipeline.config import preset

    return _protocol(config) == _protocol(preset("notebook"))


def _protocol(config: Any) -> dict[str, Any]:
    dumped = config.model_dump(mode="json")
    key = {section: dumped[section] for section in _PROTOCOL_SECTIONS}
    key["cv"] = {name: value for name, value in key["cv"].items() if name != "seed"}
    key["data"] = {name: dumped["data"][name] for name in _PROTOCOL_DATA}
    return key
