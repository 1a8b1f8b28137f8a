"""mlp: a from-scratch NumPy multilayer perceptron.

Math: forward pass ``MLP.forward``, fused forward+backward kernel ``mlp/workspace.py:train_step``.

>>> from mlp import MLP, fit
>>> net = MLP(n_features=784, hidden_sizes=[256, 128], n_classes=10, seed=0)
>>> history = fit(net, X, y, epochs=10, optimizer="sgd", lr=0.1)  # doctest: +SKIP
"""

from mlp.errors import DivergenceError, MLPError, ModelFileError
from mlp.network import MLP, Loss, load, save
from mlp.optimizers import SGD, Adam, Optimizer, make_optimizer
from mlp.schedules import make_schedule
from mlp.training import History, TrainingState, fit

__all__ = [
    "MLP",
    "SGD",
    "Adam",
    "DivergenceError",
    "History",
    "Loss",
    "MLPError",
    "ModelFileError",
    "Optimizer",
    "TrainingState",
    "fit",
    "load",
    "make_optimizer",
    "make_schedule",
    "save",
]
