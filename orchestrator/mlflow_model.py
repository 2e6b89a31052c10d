"""The sweep's winner as an MLflow model, and the sweep's data as MLflow dataset inputs.

`log_winner` logs, under the sweep's parent run, one `mlflow.pyfunc` model per dataset (its name is
the dataset's, so `runs:/<parent_run_id>/<dataset>` finds it). The model's artifacts are the exported
YAML, the head's `.safetensors` and the U-Net checkpoint; its python_model loads them with
`diffsweep.load`, so a served model runs the one `Classifier.forward` that `diffsweep predict` runs.

Request format (what `mlflow models serve` answers on /invocations): a DataFrame with one column
`image`, each cell the base64 of an image file's bytes (PNG, JPEG, ... anything Pillow reads):

    {"dataframe_records": [{"image": "iVBORw0KGgo..."}, ...]}

The answer is one record per image, in order: `label` (class name), `index` (class index), `prob`
(its softmax probability) and `error` (null, or why that image could not be read; the others are
then null), e.g. {"predictions": [{"label": "3", "index": 3, "prob": 0.91, "error": null}, ...]}.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml

SPLIT_CONTEXT = {"train": "train", "val": "validation", "test": "test"}
REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "safetensors", "pyyaml", "scikit-learn", "mlflow")


def encode_image(image: Any) -> str:
    """An image file (path), PIL image or uint8 array as the base64 string a request carries."""
    from PIL import Image
    import numpy as np

    if isinstance(image, (str, Path)):
        return base64.b64encode(Path(image).read_bytes()).decode("ascii")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(cell: Any):
    """A request cell -> PIL image, or the one-line reason it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = bytes(cell) if isinstance(cell, (bytes, bytearray)) else base64.b64decode(str(cell), validate=True)
    except (binascii.Error, ValueError, TypeError):
        return "not valid base64; send each image file's bytes base64-encoded"
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        return f"the base64 bytes are not an image Pillow can read ({type(e).__name__})"


class DiffsweepModel(mlflow.pyfunc.PythonModel):
    """The exported selection behind `mlflow.pyfunc`: `diffsweep.load` at load time, then
    `Classifier.predict` on the decoded images."""

    def load_context(self, context) -> None:
        import diffsweep

        art = context.artifacts
        doc = yaml.safe_load(Path(art["config"]).read_text())
        if "checkpoint" in art:  # the copy inside the model, not the path the sweep read it from
            doc["checkpoint"]["path"] = str(Path(art["checkpoint"]).resolve())
        with tempfile.TemporaryDirectory() as tmp:  # load_exported wants <name>.yaml + <name>.safetensors
            config = Path(tmp) / "model.yaml"
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            config.with_suffix(".safetensors").symlink_to(Path(art["head"]).resolve())
            self.clf = diffsweep.load(config, device=_device())  # read fully now

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """One dict per image: label, index, prob, error (None unless the image could not be read).
        A list of dicts, not a DataFrame, so the served JSON has nulls where a DataFrame has NaN."""
        if isinstance(model_input, pd.DataFrame):
            cells = list(model_input["image"] if "image" in model_input else model_input.iloc[:, 0])
        else:
            cells = list(model_input)
        decoded = [_decode(c) for c in cells]
        images = [d for d in decoded if not isinstance(d, str)]
        batch_size = int((params or {}).get("batch_size", 64))
        preds = iter(self.clf.predict(images, batch_size=batch_size) if images else [])
        rows = []
        for d in decoded:
            p = None if isinstance(d, str) else next(preds)
            error = d if p is None else p.error
            if error is not None:
                rows.append({"label": None, "index": None, "prob": None, "error": error})
            else:
                rows.append({"label": p.label, "index": p.index, "prob": p.top_k[0][1], "error": None})
        return rows


def _device() -> str:
    """DIFFSWEEP_DEVICE if set (e.g. `cpu`, `cuda:1`), else the first GPU if there is one, else the CPU."""
    import torch
    return os.environ.get("DIFFSWEEP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "label", required=False), ColSpec("long", "index", required=False),
                        ColSpec("double", "prob", required=False), ColSpec("string", "error", required=False)]),
        params=ParamSchema([ParamSpec("batch_size", "long", 64)]))


def _requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{name}=={metadata.version(name)}")
    return out


@contextlib.contextmanager
def _tracking(uri: str):
    """Point MLflow's fluent API at the sweep's store for the duration, then back to what it was
    (possibly unset, and MLFLOW_TRACKING_URI as it was); the sweep itself uses MlflowClient with
    explicit ids."""
    from mlflow.tracking._tracking_service import utils

    old, old_env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)  # None: unset again, resolved at each use
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def log_winner(uri: str, parent_run_id: str, dataset: str, yaml_path: Path, weights_path: Path,
               checkpoint: str | None, example_image: Any, registered_name: str | None = None):
    """Log the exported selection of `dataset` as a pyfunc model named `dataset` under the parent
    run (optionally registered as `registered_name`); returns MLflow's ModelInfo."""
    from mlflow.models import Model

    artifacts = {"config": str(yaml_path), "head": str(weights_path)}
    if checkpoint:
        artifacts["checkpoint"] = str(checkpoint)
    example = pd.DataFrame({"image": [encode_image(example_image)]})
    doc = yaml.safe_load(Path(yaml_path).read_text())
    sel, head_type = doc["selection"], doc["head"]["type"]
    with _tracking(uri):
        # Model.log is what mlflow.pyfunc.log_model calls, given the run and the model explicitly: the
        # model belongs to the parent run and its experiment without either becoming the process's
        # active run or experiment
        run = mlflow.MlflowClient(uri).get_run(parent_run_id)
        model = mlflow.initialize_logged_model(
            name=dataset, source_run_id=parent_run_id, experiment_id=run.info.experiment_id,
            params={k: str(sel[k]) for k in ("t", "block", "pool", "members") if k in sel} | {"head": str(head_type)},
            tags={"diffsweep.dataset": dataset})
        return Model.log(None, name=dataset, flavor=mlflow.pyfunc, run_id=parent_run_id, model_id=model.model_id,
                         python_model=DiffsweepModel(),
                         artifacts=artifacts, signature=signature(), input_example=example,
                         pip_requirements=_requirements(), registered_model_name=registered_name,
                         await_registration_for=0 if registered_name is None else 300,
                         metadata={"diffsweep_dataset": dataset})


def registered_name(name: str | None, dataset: str, datasets: list[str]) -> str | None:
    """`--register-model NAME`: NAME for a one-dataset sweep, NAME-<dataset> for each of several."""
    if not name:
        return None
    return name if len(datasets) == 1 else f"{name}-{dataset}"


def log_dataset_inputs(client, run_id: str, dataset: str, splits: dict[str, list], classes: list[str],
                       root: str | None) -> None:
    """Each split of `dataset` as an MLflow dataset input of the run (name `<dataset>-<split>`,
    context train / validation / test): one row per image, its id and label."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for split, samples in splits.items():
        df = pd.DataFrame({"image_id": [s.image_id for s in samples], "label": [int(s.label) for s in samples],
                           "class": [classes[s.label] for s in samples]})
        source = None
        if root:
            with contextlib.suppress(Exception):  # a root MLflow has no source type for: no source
                from mlflow.data.dataset_source_registry import resolve_dataset_source
                source = resolve_dataset_source(str(root))
        with warnings.catch_warnings():  # MLflow's hints (integer columns, pandas deprecations) are not ours
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_pandas(df, source=source, targets="label", name=f"{dataset}-{split}")
            entity = ds._to_mlflow_entity()  # the schema is inferred here
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXT.get(split, split))]))
    client.log_inputs(run_id, datasets=inputs)
