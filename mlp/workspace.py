"""Preallocated buffers for one batch size, and the training kernels that fill them.

The training loop calls :func:`train_step` hundreds of times per epoch; every array it
touches (batch copy, activations, dropout masks, gradients) lives in a :class:`Workspace`
allocated once per batch size, so a step allocates almost nothing.
"""

from __future__ import annotations

import numpy as np

from mlp.losses import softmax_cross_entropy_grad_


class Workspace:
    """Buffers for batches of exactly ``n`` rows of a given network.

    Attributes
    ----------
    X : ndarray, shape (n, n_features)
        Where the loop gathers the batch's inputs.
    y : ndarray of intp, shape (n,)
        The batch's labels.
    A : list of ndarray, A[l] shape (n, fan_out_l)
        Layer outputs (activation applied in place; the last one holds the logits, then
        the logits' gradient).
    dW, db : lists of ndarray shaped like the weights and biases
        Gradients of the objective (mean CE + l2/2 sum ||W||^2).
    grads : list of ndarray
        ``[dW0, db0, dW1, db1, ...]``, aligned with ``MLP.params``.
    """

    def __init__(self, net, n: int, dropout: float = 0.0, gather: bool = True) -> None:
        dt = net.dtype
        sizes = [W.shape[1] for W in net.weights]
        self.n = n
        self.dropout = float(dropout)
        # Batch copies, only when the loop gathers batches (full-batch steps read X itself).
        self.X: np.ndarray | None = None
        self.y: np.ndarray | None = None
        if gather:
            self.X = np.empty((n, net.weights[0].shape[0]), dt)
            self.y = np.empty(n, np.intp)
        self.A = _buffers(n, sizes, dt)
        hidden = sizes[:-1]
        # dZ of hidden layers; the output layer's dZ is written over its logits.
        self.dZ = _buffers(n, hidden, dt)
        if self.dropout:
            self.mask = _buffers(n, hidden, dt)
            self.keep = _buffers(n, hidden, bool)
            self.D = _buffers(n, hidden, dt)  # dropped-out outputs
        else:
            self.D = self.A[:-1]
        self.dW = [np.empty_like(W) for W in net.weights]
        self.db = [np.empty_like(b) for b in net.biases]
        self.grads = [g for pair in zip(self.dW, self.db, strict=True) for g in pair]
        self._l2_tmp = [np.empty_like(W) for W in net.weights]
        # db = ones @ dZ: a BLAS gemv, faster than np.sum(axis=0) on a (n, k) array.
        self._ones = np.ones(n, dt)


def _buffers(n: int, widths: list[int], dtype) -> list[np.ndarray]:
    """One uninitialised ``(n, k)`` array per width ``k``."""
    return [np.empty((n, k), dtype) for k in widths]


def train_step(
    net,
    ws: Workspace,
    X: np.ndarray,
    y: np.ndarray,
    l2: float,
    rng: np.random.Generator | None = None,
    grad_scale: float = 1.0,
) -> tuple[float, int]:
    """Forward and backward pass on one batch; gradients land in ``ws.dW``/``ws.db``.

    Parameters
    ----------
    net : MLP
    ws : Workspace
        Built for ``X.shape[0]`` rows.
    X : ndarray, shape (n, n_features)
    y : ndarray of intp, shape (n,)
    l2 : float
        Adds ``l2 * W`` to every ``dW`` (biases are not decayed).
    rng : Generator, optional
        Draws the dropout masks; needed when ``ws.dropout > 0``.
    grad_scale : float
        Multiply every gradient by this (the loop passes the learning rate for optimizers
        that take lr-folded gradients); applied once to the output layer's dZ, so it costs
        nothing and spares the optimizer a pass over the parameters.

    Returns
    -------
    loss_sum : float
        Sum of the batch's per-sample cross-entropies (no penalty).
    n_correct : int
        Correct predictions of this (dropout-perturbed) forward pass.
    """
    act = net._act
    W, b = net.weights, net.biases
    n_layers = len(W)
    keep_prob = 1.0 - ws.dropout

    # Forward.
    inp = X
    for layer in range(n_layers):
        Z = ws.A[layer]
        np.matmul(inp, W[layer], out=Z)
        Z += b[layer]
        if layer < n_layers - 1:
            act.forward(Z, out=Z)
            if ws.dropout:
                # Inverted dropout: scale kept units by 1/keep so inference needs no change.
                mask = ws.mask[layer]
                rng.random(dtype=mask.dtype, out=mask)
                np.less(mask, keep_prob, out=ws.keep[layer])
                np.multiply(ws.keep[layer], 1.0 / keep_prob, out=mask)
                np.multiply(Z, mask, out=ws.D[layer])
            inp = ws.D[layer]

    # Loss and dZ of the output layer, fused, in the logits buffer.
    loss_sum, n_correct = softmax_cross_entropy_grad_(ws.A[-1], y)
    if grad_scale != 1.0:
        ws.A[-1] *= grad_scale  # every gradient below is linear in this one
    l2 = l2 * grad_scale

    # Backward.
    dZ = ws.A[-1]
    for layer in range(n_layers - 1, -1, -1):
        inp = X if layer == 0 else ws.D[layer - 1]
        np.matmul(inp.T, dZ, out=ws.dW[layer])
        if l2:
            np.multiply(W[layer], l2, out=ws._l2_tmp[layer])
            ws.dW[layer] += ws._l2_tmp[layer]
        np.matmul(ws._ones, dZ, out=ws.db[layer])  # sum over the batch: one per unit
        if layer == 0:
            break  # no dX: nobody needs the input's gradient
        dA = ws.dZ[layer - 1]
        np.matmul(dZ, W[layer].T, out=dA)
        if ws.dropout:
            dA *= ws.mask[layer - 1]
        act.backward(ws.A[layer - 1], dA)
        dZ = dA
    return loss_sum, n_correct
