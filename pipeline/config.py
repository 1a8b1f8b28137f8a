"""One typed configuration for the whole pipeline.

A :class:`PipelineConfig` is built from a preset (``notebook``, ``default``, ``quick``), then a TOML
file (``--config``), then ``--set section.key=value`` overrides and CLI flags, in that order. It is
validated once, here, into frozen objects that forbid unknown keys; everything downstream takes
plain typed values. It is also the Prefect flow's parameter, so the Prefect UI renders it as a form.
"""

from __future__ import annotations

import json
import os
import posixpath
import string
import tomllib
import typing
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError

# The torchvision ones (pipeline.torchvision_datasets.NAMES) need the torchvision extra.
DatasetName = Literal[
    "mnist",
    "fashion-mnist",
    "kmnist",
    "qmnist",
    "emnist-digits",
    "emnist-mnist",
    "emnist-letters",
    "emnist-balanced",
    "emnist-bymerge",
    "emnist-byclass",
    "mnist-sample",
]
RunnerName = Literal["sequential", "thread", "process", "dask"]

# Upper bounds on counts. Python ints are unbounded, NumPy's are not: a value past these would
# pass validation and fail later, inside a training, with a NumPy overflow error.
MAX_COUNT = 10**9  # samples, batch size, folds
MAX_EPOCHS = 10**6
MAX_UNITS = 10**6  # units of one hidden layer
MAX_WORKERS = 1024  # workers and BLAS threads: every process worker is started up front
MAX_SEED = 2**32 - 1  # the range scikit-learn and NumPy's legacy seeding accept
# Query parameters whose values are secrets in database and server URIs.
_SECRET_QUERY_KEYS = {"password", "passwd", "pwd", "token", "access_token", "secret", "api_key"}
# Settings that changed name: an old file or --set gets the new name in its error.
RENAMED = {"cv.lambdas": "cv.l2_lambdas"}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax validation reads true as 1: `lr = true` in a TOML file or --set is a typo, not 1.0.
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, bool) for item in items) and _is_numeric(
            cls.model_fields[info.field_name].annotation
        ):
            raise ValueError(f"expected a number, not a boolean (got {value!r})")
        return value


def _is_numeric(annotation: Any) -> bool:
    """Whether a field's type is int or float (possibly optional, or a list of them)."""
    if annotation in (int, float):
        return True
    return any(_is_numeric(arg) for arg in typing.get_args(annotation))


class DataConfig(_Section):
    """Which dataset, where it lives, how it is normalized and subset."""

    dataset: DatasetName = Field(
        "mnist",
        description="mnist, fashion-mnist, the bundled mnist-sample; with the torchvision extra "
        "kmnist, qmnist or emnist-<split> (digits, mnist, letters, balanced, bymerge, byclass)",
    )
    data_dir: str | None = Field(
        None, description="Folder holding the IDX files (default: $MLP_PIPELINE_DATA_DIR or ./data)"
    )
    normalization: Literal["scale", "standardize", "standardize-pixel"] = Field(
        "standardize",
        description="scale: x/255; standardize: z-score with the training part's mean and std; "
        "standardize-pixel: per-pixel z-score",
    )
    limit_train: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Use a stratified subset of the training set"
    )
    limit_test: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Use a stratified subset of the test set"
    )
    download: bool = Field(True, description="Download missing files from the public mirrors")


class ModelConfig(_Section):
    """The network's architecture."""

    hidden_sizes: list[int] = Field(
        [256, 128], min_length=1, description="Units of each hidden layer"
    )
    activation: Literal["relu", "tanh", "sigmoid"] = "relu"
    # Glorot's, as scikit-learn's MLPClassifier: the validation folds of the default preset favour
    # it over He's at every L2 strength (benchmarks/README.md, "model.init on validation folds").
    init: Literal["he", "glorot", "notebook"] = "glorot"
    dtype: Literal["float32", "float64"] = "float32"

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_layers(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError(f"every hidden layer needs at least 1 unit (got {sizes})")
        if any(size > MAX_UNITS for size in sizes):
            raise ValueError(f"a hidden layer has at most {MAX_UNITS:,} units (got {sizes})")
        return sizes


class TrainingConfig(_Section):
    """How each network is optimized."""

    optimizer: Literal["gd", "sgd", "momentum", "nesterov", "adam"] = "nesterov"
    lr: float = Field(0.05, gt=0, allow_inf_nan=False, description="Base learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="For momentum and nesterov")
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    step_size: int = Field(
        10, gt=0, le=MAX_EPOCHS, description="Epochs between decays (step schedule)"
    )
    gamma: float = Field(0.5, gt=0, le=1, description="Decay factor (step schedule)")
    batch_size: int | None = Field(
        128, gt=0, le=MAX_COUNT, description="Mini-batch size; null = full-batch GD"
    )
    epochs: int = Field(
        10, gt=0, le=MAX_EPOCHS, description="Epochs of each cross-validation training"
    )
    final_epochs: int | None = Field(
        None, gt=0, le=MAX_EPOCHS, description="Epochs of the final model (default: same as epochs)"
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    l2_lambda: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="L2 strength of one training; the search sets it from cv.l2_lambdas",
    )
    early_stopping: int | None = Field(
        None,
        gt=0,
        le=MAX_EPOCHS,
        description="Patience in epochs on the validation fold (CV trainings only)",
    )

    @property
    def resolved_final_epochs(self) -> int:
        return self.final_epochs if self.final_epochs is not None else self.epochs


class AugmentConfig(_Section):
    """Random distortions of the training images (never of validation or test images).

    Each training batch is distorted afresh: with ``flip``, a left-right mirror of half the
    images; a random affine map per image; with ``elastic_alpha`` > 0, an elastic distortion
    (Simard et al. 2003). All 0 and no flip: no augmentation.
    """

    degrees: float = Field(
        0.0, ge=0, le=180, description="Rotate by an angle drawn from [-degrees, degrees]"
    )
    zoom: float = Field(0.0, ge=0, lt=1, description="Zoom by a factor drawn from [1-zoom, 1+zoom]")
    shift: float = Field(
        0.0, ge=0, le=100, description="Shift by up to this many pixels along each axis"
    )
    elastic_alpha: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Scale of the elastic displacement field (Simard's alpha; 0: none): a "
        "displacement of about alpha * 0.16 / elastic_sigma pixels (standard deviation)",
    )
    elastic_sigma: float = Field(
        4.0, gt=0, le=100, description="Smoothness of the elastic distortion in pixels"
    )
    flip: bool = Field(
        False,
        description="Mirror each image left-right with probability 1/2 (garments, not digits)",
    )
    strength: float = Field(
        1.0,
        ge=0,
        le=10,
        description="Scales degrees, zoom, shift and elastic_alpha together; 0 turns every "
        "distortion off (flip too): search it to let cross-validation decide",
    )

    @model_validator(mode="after")
    def _zoom_below_one(self) -> AugmentConfig:
        if self.zoom * self.strength >= 1:
            raise ValueError(f"zoom * strength must be below 1 (got {self.zoom} * {self.strength})")
        return self

    @property
    def enabled(self) -> bool:
        """Whether any distortion is on."""
        magnitudes = (self.degrees, self.zoom, self.shift, self.elastic_alpha)
        return self.strength > 0 and (any(magnitudes) or self.flip)

    def scaled(self) -> AugmentConfig:
        """The same distortions with ``strength`` folded into their magnitudes (strength 1)."""
        s = self.strength
        return self.model_copy(update={
            "degrees": self.degrees * s, "zoom": self.zoom * s, "shift": self.shift * s,
            "elastic_alpha": self.elastic_alpha * s, "flip": self.flip and s > 0, "strength": 1.0,
        })  # fmt: skip


class CVConfig(_Section):
    """The k-fold cross-validation: the L2 strengths it compares, its folds and its choice."""

    l2_lambdas: list[float] = Field(
        # On MNIST (benchmarks/README.md) 1e-5 acts like 0 and 1e-2 underfits.
        [1e-4, 3e-4, 1e-3, 3e-3],
        min_length=1,
        description="L2 strengths (lambda) to compare: the grid over training.l2_lambda, "
        "unless search.space names that key",
    )
    folds: int = Field(4, ge=2, le=MAX_COUNT)
    shuffle: bool = Field(True, description="Shuffle before splitting (false: contiguous folds)")
    stratify: bool = Field(True, description="Keep class proportions in every fold")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seeds folds, initializations and batch order"
    )
    selection: Literal["best", "one-se"] = Field(
        "best",
        description="best: the highest mean validation accuracy; one-se: the most regularized "
        "candidate within one standard error of it",
    )

    @field_validator("l2_lambdas")
    @classmethod
    def _valid_l2_lambdas(cls, l2_lambdas: list[float]) -> list[float]:
        bad = [value for value in l2_lambdas if not (value >= 0 and value < float("inf"))]
        if bad:
            raise ValueError(f"L2 strengths must be finite and >= 0 (got {bad})")
        if len(set(l2_lambdas)) != len(l2_lambdas):
            raise ValueError(f"L2 strengths must be distinct (got {l2_lambdas})")
        return sorted(l2_lambdas)


# Distributions a random search samples from: {name = [arguments]}.
DISTRIBUTIONS = {"log_uniform": 2, "uniform": 2, "int": 2, "choice": None}
# Settings a search may vary: the network, its training and the distortions, by section. Not
# the final model's epochs (no cross-validation training uses them).
SEARCHABLE_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "augment": AugmentConfig,
}
NOT_SEARCHABLE = {"training.final_epochs"}


class SearchConfig(_Section):
    """Which settings the cross-validation compares, and how it explores them."""

    strategy: Literal["grid", "random", "halving"] = Field(
        "grid",
        description="grid: every combination; random: search.n_candidates samples; halving: "
        "successive halving over epochs, the best 1/eta going on at each rung",
    )
    space: dict[str, list[Any] | dict[str, list[Any]]] = Field(
        {},
        description="Dotted model.*, training.* and augment.* settings and the values to try: "
        "a list, or "
        "a distribution {log_uniform | uniform | int = [low, high]} or {choice = [...]}; "
        "training.l2_lambda defaults to cv.l2_lambdas",
    )
    n_candidates: int = Field(
        10, ge=1, le=10_000, description="Candidates sampled when the space has distributions"
    )
    eta: int = Field(3, ge=2, le=100, description="Halving: 1/eta of the candidates go on")
    min_epochs: int | None = Field(
        None,
        gt=0,
        le=MAX_EPOCHS,
        description="Halving: epochs of the first rung (default: training.epochs / eta^(rungs-1))",
    )

    @field_validator("space")
    @classmethod
    def _known_settings(cls, space: dict[str, Any]) -> dict[str, Any]:
        for key, values in space.items():
            section, _, name = key.partition(".")
            fields = SEARCHABLE_SECTIONS.get(section)
            if fields is None or name not in fields.model_fields or key in NOT_SEARCHABLE:
                raise ValueError(
                    f"{key!r} cannot be searched: search model.*, training.* and augment.* "
                    "settings (not training.final_epochs)"
                )
            if isinstance(values, list):
                if not values:
                    raise ValueError(f"{key}: no values to try")
                if any(value is None for value in values):
                    raise ValueError(f"{key}: null cannot be searched (got {values!r})")
                continue
            if len(values) != 1 or next(iter(values)) not in DISTRIBUTIONS:
                raise ValueError(
                    f"{key}: a distribution is one of {', '.join(DISTRIBUTIONS)} (got {values!r})"
                )
            ((kind, arguments),) = values.items()
            if kind == "choice" and not arguments:
                raise ValueError(f"{key}: choice needs values")
            if kind == "choice" and any(value is None for value in arguments):
                raise ValueError(f"{key}: null cannot be searched (got {arguments!r})")
            if kind != "choice" and not (
                len(arguments) == 2
                and all(_is_number(bound) and abs(bound) <= 2**53 for bound in arguments)
                and arguments[0] <= arguments[1]
                and (kind != "log_uniform" or arguments[0] > 0)
                and (kind != "int" or all(isinstance(bound, int) for bound in arguments))
            ):
                raise ValueError(
                    f"{key}: {kind} needs [low, high] with low <= high, |bounds| <= 2**53"
                    + (" and low > 0" if kind == "log_uniform" else "")
                    + (", whole numbers" if kind == "int" else "")
                    + f" (got {arguments!r})"
                )
        return space

    @property
    def sampled(self) -> bool:
        """Whether the space holds a distribution (then candidates are drawn, not listed)."""
        return any(isinstance(values, dict) for values in self.space.values())


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and float("-inf") < value < float("inf")
    )


class ExecutionConfig(_Section):
    """Where and how the (lambda, fold) trainings run."""

    runner: RunnerName = Field("process", description="sequential, thread, process or dask")
    workers: int | None = Field(
        None, gt=0, le=MAX_WORKERS, description="Parallel workers (default: CPU cores)"
    )
    blas_threads: int | None = Field(
        None,
        gt=0,
        le=MAX_WORKERS,
        description="BLAS threads per worker (default: cores // workers, at least 1)",
    )
    final_blas_threads: int | None = Field(
        None,
        gt=0,
        le=MAX_WORKERS,
        description="BLAS threads of the final model (default: every core)",
    )
    dask_address: str | None = Field(
        None, description="tcp://host:port of an existing Dask scheduler"
    )
    retries: int = Field(2, ge=0, le=100, description="Retries of a training whose worker died")
    resume: bool = Field(True, description="Reuse fold results already computed by an earlier run")
    cache_dir: str = Field(
        ".mlp-pipeline",
        min_length=1,
        description="The pipeline's own files: run records (runs/) and the fold cache (folds/)",
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand_user(cls, folder: str) -> str:
        return str(Path(folder).expanduser())

    @model_validator(mode="after")
    def _dask_address_needs_dask(self) -> ExecutionConfig:
        if self.dask_address is not None and self.runner != "dask":
            raise ValueError(
                f"dask_address is set but runner is {self.runner!r}; use runner 'dask'"
            )
        return self

    def resolved_workers(self, cores: int | None = None) -> int:
        cores = cores or os.cpu_count() or 1
        if self.runner == "sequential":
            return 1
        return self.workers or cores

    def resolved_blas_threads(self, cores: int | None = None) -> int:
        cores = cores or os.cpu_count() or 1
        if self.blas_threads is not None:
            return self.blas_threads
        # Oversubscribed cores (workers x threads > cores) slow matmuls down (benchmarks/).
        return max(1, cores // self.resolved_workers(cores))

    def resolved_final_blas_threads(self, cores: int | None = None) -> int:
        """The final model trains alone, after the sweep's pool is gone: every core by default."""
        return self.final_blas_threads or cores or os.cpu_count() or 1


class TrackingConfig(_Section):
    """Where MLflow records the runs."""

    tracking_uri: str | None = Field(
        None, description="Default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db"
    )
    experiment: str = Field("mlp-pipeline", min_length=1)
    registered_model: str | None = Field(
        "mlp-{dataset}",
        min_length=1,
        description="Registry name of the final model; {dataset} is replaced by the dataset's "
        "name (mlp-mnist, mlp-fashion-mnist). null: don't register",
    )
    system_metrics: bool = Field(
        False,
        description="Record the machine's CPU, memory, disk and network use on the parent run "
        "while it runs (MLflow's system metrics, every 10 s)",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _parsable(cls, value: str | None) -> str | None:
        if value and (why := uri_parse_error(value)):
            raise ValueError(f"cannot parse {redact_uri(value)} ({why})")
        return value

    @field_validator("registered_model")
    @classmethod
    def _only_the_dataset_placeholder(cls, value: str | None) -> str | None:
        # A champion is compared with the versions of its own name: one name per dataset by
        # default, so a Fashion-MNIST model never competes with (or replaces) a digit model.
        if value is None:
            return value
        try:
            fields = [
                (field, spec, conversion)
                for _, field, spec, conversion in string.Formatter().parse(value)
                if field is not None
            ]
        except ValueError as exc:
            raise ValueError(f"{exc} in {value!r}") from None
        if any(field != ("dataset", "", None) for field in fields):
            raise ValueError(f"only {{dataset}} may stand in braces (got {value!r})")
        # MLflow's rule for registry names, checked here so a bad one fails before training.
        name = value.format(dataset="mnist")
        normal = posixpath.normpath(name)
        if (
            not name.strip()
            or {"/", ":"} & set(name)
            or normal != name
            or normal == "."
            or normal.startswith("..")
        ):
            raise ValueError(
                f"{value!r} is not a valid MLflow model name: not blank, no '/' or ':', "
                "not '.' or starting with '..'"
            )
        return value

    def registered_model_for(self, dataset: str) -> str | None:
        """The registry name for a model trained on ``dataset`` (None: don't register)."""
        if self.registered_model is None:
            return None
        return self.registered_model.format(dataset=dataset)


class PipelineConfig(_Section):
    """Everything one pipeline execution needs; the flow's single parameter."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    augment: AugmentConfig = AugmentConfig()
    cv: CVConfig = CVConfig()
    search: SearchConfig = SearchConfig()
    execution: ExecutionConfig = ExecutionConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _search_fits_training(self) -> PipelineConfig:
        search = self.search
        if search.strategy == "grid" and search.sampled:
            raise ValueError(
                "search.space has a distribution: sample it with search.strategy random or halving"
            )
        if search.strategy == "halving":
            if self.training.early_stopping is not None:
                raise ValueError(
                    "search.strategy halving and training.early_stopping both stop trainings "
                    "early: choose one"
                )
            if "training.epochs" in search.space:
                raise ValueError("search.strategy halving spends training.epochs: don't search it")
            if (search.min_epochs or 0) > self.training.epochs:
                raise ValueError(
                    f"search.min_epochs={search.min_epochs} is more than "
                    f"training.epochs={self.training.epochs}"
                )
        return self

    @model_validator(mode="after")
    def _augment_needs_shared_statistics(self) -> PipelineConfig:
        # Per-pixel statistics give every pixel its own scale: a stroke moved onto a border
        # pixel (std floored at 0.001) would become a value in the hundreds.
        searched = any(key.startswith("augment.") for key in self.search.space)
        augmented = self.augment.enabled or searched
        if augmented and self.data.normalization == "standardize-pixel":
            raise ValueError(
                "augment needs data.normalization scale or standardize (one scale for all "
                "pixels), not standardize-pixel"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """The config as ``{"section.key": value}`` (for MLflow params and tables), redacted."""
        return dict(_flatten(self.redacted()))

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-ready data, every URI in it without credentials."""
        return {
            section: {
                key: redact_uri(value) if isinstance(value, str) and "://" in value else value
                for key, value in values.items()
            }
            for section, values in self.model_dump(mode="json").items()
        }

    def replace(self, overrides: Mapping[str, Any]) -> PipelineConfig:
        """A new, validated config with dotted-key overrides applied."""
        return build_config(base=self, overrides=overrides)


PRESETS: dict[str, dict[str, Any]] = {
    # The homework's exact protocol: 784-64-10 ReLU, full-batch GD at lr 0.05, 4 contiguous folds,
    # 200 steps per fold, 300 for the final model, inputs scaled to [0, 1], float64 as in NumPy.
    "notebook": {
        "data": {"dataset": "mnist", "normalization": "scale"},
        "model": {
            "hidden_sizes": [64],
            "activation": "relu",
            "init": "notebook",
            "dtype": "float64",
        },
        "training": {
            "optimizer": "gd",
            "lr": 0.05,
            "schedule": "constant",
            "batch_size": None,
            "epochs": 200,
            "final_epochs": 300,
        },
        "cv": {
            "l2_lambdas": [1e-1, 1e-2, 1e-3, 1e-4],
            "folds": 4,
            "shuffle": False,
            "stratify": False,
        },
    },
    # Accurate and fast: the defaults of every section.
    "default": {},
    # Toward the best published fully connected results (Simard et al. 2003: 99.3 % with elastic
    # distortions): a wide network, dropout and distorted training images, trained 3x longer.
    # Distortions that help digits hurt garments, so cross-validation decides: it compares the
    # distortions on and off (augment.strength 1 or 0) at two L2 strengths. Successive halving
    # over 2 folds keeps the run short: the 8 first-rung trainings run 11 epochs, the best
    # candidate's 2 folds go on to 45, and the final model trains 45 epochs on all the images.
    # Two folds, not three: on 2 cores the pool trains them side by side (a third trained alone,
    # one core idle), and at 11 epochs 30,000 validation images a fold already tell the
    # distortions on from off, the choice that matters.
    "accurate": {
        # He's initialization: the preset's figures were measured with it, and no validation run
        # has compared Glorot's on this network with dropout.
        "model": {"hidden_sizes": [1024, 1024], "init": "he"},
        "training": {"epochs": 45, "dropout": 0.2},
        "augment": {
            "degrees": 8,
            "zoom": 0.08,
            "shift": 1.5,
            "elastic_alpha": 10,
            "elastic_sigma": 3,
        },
        "cv": {"l2_lambdas": [1e-4, 3e-4], "folds": 2},
        "search": {"strategy": "halving", "eta": 4, "space": {"augment.strength": [0.0, 1.0]}},
    },
    # A smoke run in seconds on the bundled sample.
    "quick": {
        "data": {"dataset": "mnist-sample"},
        "model": {"hidden_sizes": [64]},
        "training": {"epochs": 4, "lr": 0.1},
        "cv": {"l2_lambdas": [1e-4, 1e-3], "folds": 2},
        "execution": {"runner": "thread"},
    },
}


def uri_parse_error(uri: str) -> str | None:
    """Why ``uri`` cannot be parsed (a port out of range or not a number, a bad IPv6 host)."""
    try:
        urllib.parse.urlsplit(uri).port  # noqa: B018 -- the port is parsed on access
    except ValueError as exc:
        return str(exc)
    return None


def redact_uri(uri: str) -> str:
    """``uri`` without credentials (``user:password@`` and secret query parameters), for logs."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    redacted = uri
    if "@" in parts.netloc:
        redacted = redacted.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        kept = [(key, value) for key, value in pairs if key.lower() not in _SECRET_QUERY_KEYS]
        if len(kept) != len(pairs):
            query = urllib.parse.urlencode(kept)
            redacted = redacted.replace("?" + parts.query, "?" + query if query else "", 1)
    return redacted


def preset(name: str) -> PipelineConfig:
    """The named preset as a validated config."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return build_config(overrides=PRESETS[name], nested=True)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a nested dict (errors become one-line ConfigErrors)."""
    from pipeline.idx import require_regular_file

    path = Path(path)
    try:
        require_regular_file(path, ConfigError, "cannot read the config file")  # not a FIFO
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def resolve_config(
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> PipelineConfig:
    """Preset, then TOML file, then dotted overrides: the precedence the CLI documents.

    A TOML file may name its own base with a top-level ``preset = "..."`` key; an explicit
    ``preset_name`` wins over it. The layers are merged first and validated once, so an override
    can complete a file that is not valid on its own (a ``dask_address`` in the file, ``--runner
    dask`` on the command line).
    """
    file_values: dict[str, Any] = load_toml(config_file) if config_file else {}
    file_preset = file_values.pop("preset", None)
    if file_preset is not None and not isinstance(file_preset, str):
        raise ConfigError(f"config file {config_file}: preset must be a string")
    base = preset(preset_name or file_preset or "default")
    if not file_values and not overrides:
        return base
    values = base.model_dump(mode="python")
    from_file = set()
    for dotted, value in _flatten(file_values):
        _assign(values, dotted, value, config_file)
        from_file.add(dotted)
    for dotted, value in (overrides or {}).items():
        _assign(values, dotted, value, None)
        from_file.discard(dotted)
    for layer, where in ((file_values, config_file), (overrides or {}, None)):
        named = dict(_flatten(layer)) if layer is file_values else dict(layer)
        space = values["search"]["space"] or {}
        if "cv.l2_lambdas" in named and isinstance(space, dict) and "training.l2_lambda" in space:
            source = f"config file {where}: " if where else ""
            raise ConfigError(
                f"{source}cv.l2_lambdas and search.space's training.l2_lambda both set the L2 "
                "strengths to try: keep one"
            )
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as exc:
        # Name the file only when the file alone set what is wrong.
        blamed = all(
            any(_within(key, error["loc"]) for key in from_file)
            and not any(_within(key, error["loc"]) for key in (overrides or {}))
            for error in exc.errors()
        )
        raise ConfigError(_describe(exc, config_file if blamed else None)) from None


def _within(dotted: str, location: tuple[Any, ...]) -> bool:
    """Whether setting ``dotted`` touches a validation error at ``location``.

    A field's error (``("training", "lr", ...)``) is touched by its own key; a section's own
    check (``("execution",)``) by any key of the section.
    """
    parts = dotted.split(".")
    loc = [str(part) for part in location]
    return parts[: len(loc)] == loc[: len(parts)]


def parse_set_options(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (``--set training.epochs=3``); values are JSON if they parse."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        parsed[key] = _parse_value(raw.strip())
    return parsed


def _parse_value(raw: str) -> Any:
    if raw.lower() in {"null", "none"}:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        # Bare words (relu, mnist) and comma lists (1e-3,1e-4) as users type them in a shell.
        if "," in raw:
            parts = [part.strip() for part in raw.split(",")]
            if not all(parts):
                raise ConfigError(f"empty item in the list {raw!r}") from None
            return [_parse_value(part) for part in parts]
        return raw


def build_config(
    base: PipelineConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    nested: bool = False,
    source: str | Path | None = None,
) -> PipelineConfig:
    """Apply overrides (dotted keys, or a nested mapping with ``nested=True``) and validate."""
    values = (base or PipelineConfig()).model_dump(mode="python")
    flat_overrides = dict(_flatten(overrides or {})) if nested else dict(overrides or {})
    for dotted, value in flat_overrides.items():
        _assign(values, dotted, value, source)
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _assign(values: dict[str, Any], dotted: str, value: Any, source: str | Path | None) -> None:
    where = f"config file {source}: " if source else ""
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in values:
        sections = ", ".join(PipelineConfig.model_fields)
        raise ConfigError(
            f"{where}unknown setting {dotted!r} (expected section.key; sections: {sections})"
        )
    section, key = parts
    if key not in values[section]:
        known = ", ".join(type(getattr(PipelineConfig(), section)).model_fields)
        renamed = f" (renamed {RENAMED[dotted]})" if dotted in RENAMED else ""
        raise ConfigError(f"{where}unknown setting {dotted!r}{renamed}; {section} has: {known}")
    if (
        source is None  # a TOML file writes its lists as lists
        and isinstance(values[section][key], list)
        and value is not None
        and not isinstance(value, list)
    ):
        value = [value]  # --set cv.l2_lambdas=1e-3 or model.hidden_sizes=64: a list of one
    values[section][key] = value


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not prefix:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _describe(exc: ValidationError, source: str | Path | None) -> str:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error":  # our own validators already quote the bad value
            message += f" (got {error.get('input')!r})"
        problems.append(f"{location}: {message}" if location else message)
    where = f"config file {source}: " if source else "invalid configuration: "
    return where + "; ".join(problems)
