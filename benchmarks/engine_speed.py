"""Epoch time of our engine against PyTorch and scikit-learn on the same network.

The network is 784-256-128-10 ReLU, trained on the 60,000 MNIST training images scaled to
[0, 1], float32, batch 128, SGD with (heavy-ball) momentum 0.9 and lr 0.05, one new random
order per epoch. The machine is shared, so absolute times drift: the contenders run in
ONE process, one epoch each in turn (the order rotates every round), and every figure is
the median over rounds. The ratio ours/peer is the median of the per-round ratios.

FLOP count: a dense layer of fan_in x fan_out costs 2 * n * fan_in * fan_out flops forward
and twice that backward (dW and dX), hence the conventional ``6 * n * sum(fan_in * fan_out)``
per epoch. Our engine skips the first layer's dX (nobody needs it), so the matmul flops it
really executes are ``6 n sum - 2 n 784 256``; both are printed, the conventional one is used
for the GFLOP/s target. Elementwise work (bias, ReLU, softmax, optimizer) is not counted.

The GEMM peak is measured in the same run: the median of ``np.matmul`` on 2048x2048 float32
matrices, and at the batch-128 training shapes.

Run::

    python benchmarks/engine_speed.py                 # 1 warm-up + 5 rounds, all cores
    python benchmarks/engine_speed.py --threads 1     # single-thread (pipeline worker setting)
    python benchmarks/engine_speed.py --profile       # where one batch's time goes in our engine
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from _common import default_data_dir  # benchmarks/ is on sys.path when a script runs
from threadpoolctl import threadpool_limits

from mlp import MLP, fit
from mlp.optimizers import SGD
from mlp.workspace import Workspace
from pipeline.data import load_dataset

SIZES = (784, 256, 128, 10)
BATCH = 128
LR = 0.05
MOMENTUM = 0.9
TARGETS = {"torch": 0.8, "sklearn": 0.5}  # our epoch time / theirs must be at most this
GEMM_SHARE_TARGET = 0.5


def epoch_flops(n: int) -> tuple[float, float]:
    """(conventional 6 n sum(fan_in fan_out), flops our engine's matmuls really execute)."""
    macs = sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:], strict=True))
    conventional = 6.0 * n * macs
    return conventional, conventional - 2.0 * n * SIZES[0] * SIZES[1]


def gemm_gflops(m: int, k: int, n: int, repeats: int, rng: np.random.Generator) -> float:
    """Median GFLOP/s of ``np.matmul`` for (m x k) @ (k x n) float32, output preallocated."""
    A = rng.standard_normal((m, k), dtype=np.float32)
    B = rng.standard_normal((k, n), dtype=np.float32)
    C = np.empty((m, n), np.float32)
    np.matmul(A, B, out=C)
    # Small shapes run in microseconds: time a loop long enough (~20 ms) per sample.
    inner = max(1, int(2e7 / (2.0 * m * k * n) * 50))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            np.matmul(A, B, out=C)
        samples.append((time.perf_counter() - t) / inner)
    return 2.0 * m * k * n / statistics.median(samples) / 1e9


def measure_gemm(repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    shapes = {
        "2048x2048 @ 2048x2048": (2048, 2048, 2048),
        "fwd L1 (128x784)@(784x256)": (BATCH, 784, 256),
        "dW L1 (784x128)@(128x256)": (784, BATCH, 256),
        "fwd L2 (128x256)@(256x128)": (BATCH, 256, 128),
    }
    return {name: gemm_gflops(*shape, repeats, rng) for name, shape in shapes.items()}


# ----------------------------------------------------------------------------- contenders
class Ours:
    name = "ours"

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int) -> None:
        self.X, self.y = X, y
        self.net = MLP(SIZES[0], list(SIZES[1:-1]), SIZES[-1], "relu", "he", "float32", seed)
        # One optimizer object across calls keeps the velocities (fit runs one epoch per call).
        self.opt = SGD(LR, momentum=MOMENTUM)
        self.epoch = 0

    def run_epoch(self) -> None:
        self.epoch += 1
        fit(self.net, self.X, self.y, epochs=1, optimizer=self.opt, lr=LR, batch_size=BATCH,
            seed=self.epoch)  # fmt: skip

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return self.net.score(X, y)


class Torch:
    name = "torch"

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int) -> None:
        import torch

        self.torch = torch
        torch.manual_seed(seed)
        self.X = torch.from_numpy(X)
        self.y = torch.from_numpy(y.astype(np.int64))
        layers: list = []
        for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
            layers.append(torch.nn.Linear(a, b))
            if i < len(SIZES) - 2:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.loss = torch.nn.CrossEntropyLoss()
        self.gen = torch.Generator().manual_seed(seed)

    def run_epoch(self) -> None:
        torch = self.torch
        n = self.X.shape[0]
        order = torch.randperm(n, generator=self.gen)
        self.model.train()
        for lo in range(0, n, BATCH):
            idx = order[lo : lo + BATCH]
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(self.model(self.X[idx]), self.y[idx])
            loss.backward()
            self.opt.step()

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        with self.torch.no_grad():
            pred = self.model(self.torch.from_numpy(X)).argmax(1).numpy()
        return float(np.mean(pred == y))


class Sklearn:
    name = "sklearn"

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int) -> None:
        from sklearn.neural_network import MLPClassifier

        self.X, self.y = X, y
        self.classes = np.unique(y)
        self.model = MLPClassifier(
            hidden_layer_sizes=SIZES[1:-1],
            activation="relu",
            solver="sgd",
            batch_size=BATCH,
            momentum=MOMENTUM,
            nesterovs_momentum=False,
            learning_rate_init=LR,
            learning_rate="constant",
            alpha=1e-8,
            shuffle=True,
            random_state=seed,
        )

    def run_epoch(self) -> None:
        # partial_fit = exactly one pass over the data (no convergence checks).
        self.model.partial_fit(self.X, self.y, classes=self.classes)

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(self.model.score(X, y))


def make_contenders(names: list[str], X, y, seed: int) -> list:
    out = []
    for name in names:
        cls = {"ours": Ours, "torch": Torch, "sklearn": Sklearn}[name]
        try:
            out.append(cls(X, y, seed))
        except ImportError as exc:
            print(f"skipping {name}: {exc}")
    return out


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- profile
def profile_ours(X: np.ndarray, y: np.ndarray, batches: int) -> dict[str, float]:
    """Replay our engine's train_step op by op with timers: seconds per batch per category.

    Mirrors ``mlp.workspace.train_step`` + ``SGD._update_one`` (momentum) for ReLU without
    dropout and l2 = 0; the timers add a little overhead of their own (~0.1 us each).
    """
    from mlp.losses import softmax_cross_entropy_grad_

    net = MLP(SIZES[0], list(SIZES[1:-1]), SIZES[-1], "relu", "he", "float32", 0)
    ws = Workspace(net, BATCH, 0.0, gather=True)
    opt = SGD(LR, momentum=MOMENTUM)
    params = net.params
    W, b = net.weights, net.biases
    L = len(W)
    acc: dict[str, float] = defaultdict(float)
    rng = np.random.default_rng(0)
    order = rng.permutation(X.shape[0])
    clock = time.perf_counter
    n_done = 0
    for step in range(batches):
        lo = (step * BATCH) % (X.shape[0] - BATCH)
        idx = order[lo : lo + BATCH]
        t0 = clock()
        np.take(X, idx, axis=0, out=ws.X, mode="clip")
        np.take(y, idx, out=ws.y, mode="clip")
        t1 = clock()
        acc["gather (np.take X, y)"] += t1 - t0
        inp = ws.X
        for layer in range(L):
            Z = ws.A[layer]
            t0 = clock()
            np.matmul(inp, W[layer], out=Z)
            t1 = clock()
            Z += b[layer]
            if layer < L - 1:
                np.maximum(Z, 0, out=Z)
            t2 = clock()
            acc["matmul forward"] += t1 - t0
            acc["elementwise: bias + relu"] += t2 - t1
            inp = Z
        t0 = clock()
        softmax_cross_entropy_grad_(ws.A[-1], ws.y)
        acc["softmax + CE + grad (fused)"] += clock() - t0
        dZ = ws.A[-1]
        for layer in range(L - 1, -1, -1):
            inp = ws.X if layer == 0 else ws.A[layer - 1]
            t0 = clock()
            np.matmul(inp.T, dZ, out=ws.dW[layer])
            t1 = clock()
            np.sum(dZ, axis=0, out=ws.db[layer])
            t2 = clock()
            acc["matmul backward dW"] += t1 - t0
            acc["db (column sums)"] += t2 - t1
            if layer == 0:
                break
            dA = ws.dZ[layer - 1]
            t0 = clock()
            np.matmul(dZ, W[layer].T, out=dA)
            t1 = clock()
            np.multiply(dA, ws.A[layer - 1] > 0, out=dA)
            t2 = clock()
            acc["matmul backward dX"] += t1 - t0
            acc["elementwise: relu backward"] += t2 - t1
            dZ = dA
        t0 = clock()
        opt.update(params, ws.grads, LR)
        acc["optimizer update"] += clock() - t0
        n_done += 1
    return {k: v / n_done for k, v in acc.items()}


def profile_alternatives(X: np.ndarray, rounds: int) -> dict[str, float]:
    """Seconds per batch of cheaper variants of two non-GEMM steps, timed side by side.

    * optimizer: today's per-parameter ``SGD.update`` (4 ufunc passes x 6 arrays) against one
      flat float32 buffer holding every parameter (params as views into it): 3 passes, 3 calls.
    * gather: ``np.take`` of 128 random rows against a contiguous slice of X permuted once per
      epoch (the permutation copy is amortized over the epoch's batches).
    """
    net = MLP(SIZES[0], list(SIZES[1:-1]), SIZES[-1], "relu", "he", "float32", 0)
    params = net.params
    grads = [np.full_like(p, 1e-6) for p in params]
    opt = SGD(LR, momentum=MOMENTUM)
    size = sum(p.size for p in params)
    flat_p = np.zeros(size, np.float32)
    flat_g = np.full(size, 1e-6, np.float32)
    flat_v = np.zeros(size, np.float32)
    flat_t = np.empty(size, np.float32)

    def per_param() -> None:
        opt.update(params, grads, LR)

    def flat() -> None:
        np.multiply(flat_g, LR, out=flat_t)
        np.multiply(flat_v, MOMENTUM, out=flat_v)
        np.subtract(flat_v, flat_t, out=flat_v)
        np.add(flat_p, flat_v, out=flat_p)

    n = X.shape[0]
    order = np.random.default_rng(0).permutation(n)
    buf = np.empty((BATCH, X.shape[1]), np.float32)
    n_batches = n // BATCH

    def take() -> None:
        for lo in range(0, n_batches * BATCH, BATCH):
            np.take(X, order[lo : lo + BATCH], axis=0, out=buf, mode="clip")

    def permute_then_slice() -> None:
        Xp = np.take(X, order, axis=0)
        for lo in range(0, n_batches * BATCH, BATCH):
            buf[...] = Xp[lo : lo + BATCH]

    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, fn, calls in (
            ("optimizer: per-parameter SGD.update", per_param, 200),
            ("optimizer: one flat buffer", flat, 200),
        ):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t) / calls)
        for name, fn in (
            ("gather: np.take per batch", take),
            ("gather: permute once + slice", permute_then_slice),
        ):
            samples[name].append(timed(fn) / n_batches)
    return {k: statistics.median(v) for k, v in samples.items()}


def profile_loop(X: np.ndarray, y: np.ndarray, rounds: int) -> tuple[float, float]:
    """(seconds per batch of a whole fit epoch, seconds per batch of fit's non-loop overhead)."""
    net = MLP(SIZES[0], list(SIZES[1:-1]), SIZES[-1], "relu", "he", "float32", 0)
    opt = SGD(LR, momentum=MOMENTUM)
    per_epoch, in_loop = [], []
    for r in range(rounds):
        t = time.perf_counter()
        h = fit(net, X, y, epochs=1, optimizer=opt, lr=LR, batch_size=BATCH, seed=r)
        per_epoch.append(time.perf_counter() - t)
        in_loop.append(h.records[0]["seconds"])
    nb = -(-X.shape[0] // BATCH)
    return statistics.median(in_loop) / nb, statistics.median(per_epoch) / nb


# ----------------------------------------------------------------------------- main
def versions() -> str:
    parts = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for mod in ("torch", "sklearn"):
        with contextlib.suppress(ImportError):
            parts.append(f"{mod} {__import__(mod).__version__}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per contender per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--contenders", default="ours,torch,sklearn")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--profile", action="store_true", help="also profile our engine per op")
    parser.add_argument("--gemm-repeats", type=int, default=7)
    args = parser.parse_args(argv)

    ds = load_dataset("mnist", args.data_dir, download=False)
    X = (ds.X_train.astype(np.float32) / np.float32(255.0))[: args.limit]
    y = ds.y_train.astype(np.intp)[: args.limit]
    X_test = ds.X_test.astype(np.float32) / np.float32(255.0)
    y_test = ds.y_test.astype(np.intp)
    n = X.shape[0]
    conventional, executed = epoch_flops(n)

    print(
        f"date {time.strftime('%Y-%m-%d %H:%M %Z')}; {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}; {versions()}"
    )
    print(
        f"network {'-'.join(map(str, SIZES))} relu float32, batch {BATCH}, SGD momentum "
        f"{MOMENTUM} lr {LR}, n={n}, threads={args.threads}, rounds={args.rounds} x "
        f"{args.epochs} epoch(s) per contender"
    )

    with threadpool_limits(limits=args.threads):
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
        contenders = make_contenders(args.contenders.split(","), X, y, seed=0)
        times: dict[str, list[float]] = {c.name: [] for c in contenders}
        gemm_runs: list[dict[str, float]] = []
        for rnd in range(args.rounds + 1):  # round 0 is the warm-up
            # Rotate the order so no contender always runs right after the same other one.
            shift = rnd % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                seconds = sum(timed(c.run_epoch) for _ in range(args.epochs)) / args.epochs
                if rnd:
                    times[c.name].append(seconds)
            # The GEMM peak is sampled between rounds too, under the same load.
            gemm_runs.append(measure_gemm(max(3, args.gemm_repeats // 2)))
            label = "warm-up" if rnd == 0 else f"round {rnd}"
            print(f"  {label}: " + ", ".join(
                f"{name} {ts[-1]:.2f}s" for name, ts in times.items() if ts and rnd
            ) + f" | gemm2048 {gemm_runs[-1]['2048x2048 @ 2048x2048']:.1f} GFLOP/s",
                flush=True)  # fmt: skip

        gemm = {
            k: statistics.median(g[k] for g in gemm_runs[1:] or gemm_runs) for k in gemm_runs[0]
        }

        print("\nseconds per epoch (median over rounds; min-max):")
        med = {}
        for name, ts in times.items():
            med[name] = statistics.median(ts)
            print(f"  {name:8s} {med[name]:7.3f}  ({min(ts):.3f}-{max(ts):.3f})")
        print("\ntest accuracy after all epochs (sanity): " + ", ".join(
            f"{c.name} {100 * c.accuracy(X_test, y_test):.2f}%" for c in contenders))  # fmt: skip

        print("\nratios ours/peer (median of per-round ratios):")
        results = []
        if "ours" in times:
            for peer, limit in TARGETS.items():
                if peer not in times:
                    continue
                ratio = statistics.median(
                    o / p for o, p in zip(times["ours"], times[peer], strict=True)
                )
                verdict = "PASS" if ratio <= limit else "MISS"
                results.append(verdict)
                print(f"  ours/{peer:8s} {ratio:5.2f}x  (target <= {limit}x)  {verdict}")

        print("\nGEMM float32 peak (np.matmul, median):")
        for name, g in gemm.items():
            print(f"  {name:30s} {g:7.1f} GFLOP/s")
        if "ours" in med:
            ours_conv = conventional / med["ours"] / 1e9
            ours_exec = executed / med["ours"] / 1e9
            peak = gemm["2048x2048 @ 2048x2048"]
            small = statistics.median(v for k, v in gemm.items() if not k.startswith("2048"))
            # The verdict uses the flops really executed: the conventional count credits us
            # with the first layer's dX we never compute and can exceed 100% of peak.
            share = ours_exec / peak
            verdict = "PASS" if share >= GEMM_SHARE_TARGET else "MISS"
            results.append(verdict)
            print(
                f"\nours: {conventional / 1e9:.1f} GFLOP/epoch counted as 6*n*sum(fan_in*fan_out)"
                f" -> {ours_conv:.1f} GFLOP/s; matmul flops really executed "
                f"{executed / 1e9:.1f} GFLOP -> {ours_exec:.1f} GFLOP/s"
            )
            print(
                f"  share of 2048^2 GEMM peak: executed {100 * share:.0f}% (target >= "
                f"{100 * GEMM_SHARE_TARGET:.0f}%)  {verdict}; conventional "
                f"{100 * ours_conv / peak:.0f}%"
            )
            print(
                f"  share of batch-128-shape GEMM rate (median of 3 shapes, {small:.1f} GFLOP/s):"
                f" executed {100 * ours_exec / small:.0f}%, conventional "
                f"{100 * ours_conv / small:.0f}%"
            )
            for name in ("torch", "sklearn"):
                if name in med:
                    print(f"  {name}: {conventional / med[name] / 1e9:.1f} GFLOP/s (same count)")

        if args.profile:
            nb = 300
            prof = profile_ours(X, y, nb)
            in_loop, whole = profile_loop(X, y, 3)
            total = sum(prof.values())
            print(
                f"\nprofile of our engine, microseconds per batch of {BATCH} "
                f"(mean over {nb} batches):"
            )
            for k, v in sorted(prof.items(), key=lambda kv: -kv[1]):
                print(f"  {k:32s} {1e6 * v:8.1f} us  {100 * v / total:5.1f}%")
            print(f"  {'sum of the parts':32s} {1e6 * total:8.1f} us")
            print(
                f"  fit(): {1e6 * in_loop:.1f} us/batch inside the epoch loop, "
                f"{1e6 * whole:.1f} us/batch including fit's checks (check_X, isfinite)"
            )
            print("\nalternatives, microseconds per batch (median of 5, side by side):")
            for k, v in profile_alternatives(X, 5).items():
                print(f"  {k:38s} {1e6 * v:8.1f} us")
    return 0 if all(v == "PASS" for v in results) else 1


if __name__ == "__main__":
    sys.exit(main())
