"""The final model in MLflow: packaged as a pyfunc model, and read back without running code.

The package is :mod:`pipeline.tracking.pyfunc_model` ("models from code") with the engine's code
beside it, so ``mlflow models serve`` needs only numpy and mlflow, not this project. Loading a
pyfunc model runs the code stored with it: that is MLflow's design, so the pipeline itself never
does it. :func:`load_network` reads the weights and normalizer files of a logged model instead.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mlp import MLP, MLPError
from pipeline.errors import PipelineError
from pipeline.normalize import Normalizer
from pipeline.tracking.store import one_line

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# What the logged model imports: the engine, and of the pipeline the normalizer and its errors.
_PIPELINE_FILES = ("__init__.py", "errors.py", "normalize.py")


MODEL_NAME = "model"  # the logged model's name: runs:/<run id>/model


def logged_model(client: Any, run: Any) -> Any:
    """The logged model ``run`` is the source of (None before it is logged)."""
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{MODEL_NAME}'",
    )
    return found[0] if found else None


def build_pyfunc(
    final_dir: Path, input_example: list[Any], destination: Path, logged: Any = None
) -> Path:
    """Write the pyfunc model of the weights and normalizer in ``final_dir`` to ``destination``.

    ``logged``: the MLflow logged model it will be uploaded to (its id goes into ``MLmodel``).
    """
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    import mlp

    with tempfile.TemporaryDirectory(prefix="mlp-pipeline-code-") as tmp:
        code = Path(tmp)
        packages = {
            "mlp": sorted(Path(mlp.__file__).parent.glob("*.py")),
            "pipeline": [Path(__file__).parents[1] / name for name in _PIPELINE_FILES],
        }
        for package, files in packages.items():
            (code / package).mkdir()
            for file in files:
                shutil.copy2(file, code / package / file.name)
        mlflow.pyfunc.save_model(
            str(destination),
            python_model=str(MODEL_CODE),
            # Copies in the temporary folder: MLflow decodes a '%' in an artifact's path (the
            # record's folder may have one), and passes file: URIs on unread when it infers
            # the signature.
            artifacts={
                name: str(shutil.copy2(final_dir / file, code / file))
                for name, file in (("weights", "weights.npz"), ("normalizer", "normalizer.json"))
            },
            code_paths=[str(code / package) for package in packages],
            input_example=np.asarray(input_example, dtype=np.float32),
            # No input schema: a tensor schema fixes one shape and dtype, and the model takes
            # flattened or square images of any numeric dtype (it checks them itself). The
            # params schema is what lets MLflow pass ``probabilities`` through to predict.
            signature=ModelSignature(
                inputs=None,
                params=ParamSchema([ParamSpec("probabilities", "boolean", False)]),
            ),
            pip_requirements=[f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"],
            mlflow_model=None
            if logged is None
            else Model(
                artifact_path=logged.artifact_location,
                run_id=logged.source_run_id,
                model_id=logged.model_id,
            ),
        )
    return destination


class TrainedOn(NamedTuple):
    """The data a model was trained on, as its run's params say (None: they do not)."""

    dataset: str | None
    data_dir: str | None  # the folder its files were read from


def load_network(model_uri: str, tracking_uri: str) -> tuple[MLP, Normalizer, TrainedOn]:
    """The network and normalizer of a logged model, and the data it was trained on.

    ``model_uri``: ``runs:/<run id>/model``, ``models:/<name>/<version>`` or
    ``models:/<name>@<alias>``. Reads the model's weights (``.npz``, no pickle) and normalizer
    (JSON) files: no code of the model is run. The data are its run's ``dataset.name`` and
    ``dataset.data_dir`` params.

    Raises
    ------
    PipelineError
        One line when the model does not exist or its files are not a model of this pipeline.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="mlp-pipeline-model-") as tmp:
        try:
            source, run_id = _resolve(client, model_uri)
            folder = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{source.rstrip('/')}/artifacts",
                    dst_path=tmp,
                    tracking_uri=tracking_uri,
                )
            )
            network = MLP.load(folder / "weights.npz")
            normalizer = Normalizer.from_dict(
                json.loads((folder / "normalizer.json").read_text(encoding="utf-8"))
            )
            params = client.get_run(run_id).data.params if run_id else {}
            trained_on = TrainedOn(params.get("dataset.name"), params.get("dataset.data_dir"))
        except (MLPError, PipelineError) as exc:
            raise PipelineError(f"model {model_uri!r} cannot be read: {exc}") from None
        except Exception as exc:  # MlflowException, OSError, ValueError of a foreign model
            raise PipelineError(f"cannot load model {model_uri!r}: {one_line(exc)}") from None
    return network, normalizer, trained_on


def _resolve(client: Any, model_uri: str) -> tuple[str, str | None]:
    """Where a model URI's files are, and the run that logged them."""
    scheme, _, rest = model_uri.partition(":/")
    rest = rest.strip("/")
    if scheme == "runs":
        run_id, _, path = rest.partition("/")
        model = logged_model(client, client.get_run(run_id)) if path == MODEL_NAME else None
        # Models logged before they were logged models are the run's artifacts.
        return (model_uri if model is None else _files(model)), run_id
    if scheme != "models":
        return model_uri, None
    name, at, alias = rest.partition("@")
    if at:
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in name:
        name, _, number = name.rpartition("/")
        version = client.get_model_version(name, number)
    elif name.startswith("m-"):  # models:/<logged model id>
        model = client.get_logged_model(name)
        return _files(model), model.source_run_id
    else:
        raise PipelineError(
            "name a version (models:/NAME/VERSION) or an alias (models:/NAME@ALIAS)"
        )
    source = version.source
    if source.startswith("models:/"):  # a logged model's version (versions from before: a path)
        source = _files(client.get_logged_model(source.removeprefix("models:/")))
    return source, version.run_id


def _files(model: Any) -> str:
    """Where a logged model's files are; PipelineError if they are not all there yet."""
    if str(model.status) != "READY":
        raise PipelineError(
            f"logged model {model.model_id} is {model.status}: its upload did not finish "
            "(`mlp-pipeline publish` on its run record finishes it)"
        )
    return model.artifact_location


def accuracy(network: MLP, normalizer: Normalizer, images: np.ndarray, labels: np.ndarray):
    """Accuracy of a network on raw test pixels, shape (n, 784), and their labels."""
    predicted = network.predict(normalizer.transform(images, dtype=network.dtype))
    return float(np.mean(predicted == labels))
