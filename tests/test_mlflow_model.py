"""The sweep's winner as an MLflow model, served by a real `mlflow models serve` process on
127.0.0.1; the parent run's dataset inputs and the experiment kind, read back from the real store.
The suite's shared tiny sweep (tests/conftest.py) serves every test here."""

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import mlflow.artifacts
import pytest
import yaml
from mlflow.models import get_model_info
from mlflow.tracking import MlflowClient
from PIL import Image

import diffsweep
from orchestrator.cli import main
from orchestrator.mlflow_model import _tracking, encode_image, registered_name
from orchestrator.report import serve_command
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(shared_sweep):
    """The suite's shared sweep (tests/conftest.py), made with register_model="digits-clf"."""
    tmp = shared_sweep.folder
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("shared")
    parent = next(r for r in client.search_runs([exp.experiment_id])
                  if r.data.tags.get("diffsweep.role") == "parent")
    return tmp, uri, client, exp, parent, shared_sweep.datasets


def test_parent_run_has_the_winner_as_a_pyfunc_model(sweep):
    tmp, uri, client, exp, parent, datasets = sweep
    winner = yaml.safe_load((tmp / "exported" / "digits.yaml").read_text())["selection"]
    winner["head"] = yaml.safe_load((tmp / "exported" / "digits.yaml").read_text())["head"]["type"]
    models = [m for m in client.search_logged_models([exp.experiment_id], filter_string="name = 'digits'")
              if m.source_run_id == parent.info.run_id]
    assert len(models) == 1
    assert models[0].params == {"t": str(winner["t"]), "block": str(winner["block"]),
                                "pool": str(winner["pool"]), "head": winner["head"]}
    assert {m.key for m in models[0].metrics} == {"digits.val_acc", "digits.test_acc"}
    # the run's "Logged models" column
    outputs = client.get_run(parent.info.run_id).outputs
    assert models[0].model_id in [o.model_id for o in outputs.model_outputs]
    assert len(outputs.model_outputs) == len(datasets)  # one logged model per dataset's winner
    uri_ = f"runs:/{parent.info.run_id}/digits"
    with _tracking(uri):  # runs:/<parent>/digits resolves to the logged model
        files = {a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=uri_)}
        artifacts = {a.path.rsplit("/", 1)[-1] for a in mlflow.artifacts.list_artifacts(artifact_uri=uri_ + "/artifacts")}
        info = get_model_info(uri_)
    assert {"digits/MLmodel", "digits/input_example.json", "digits/serving_input_example.json"} <= files
    assert "python_function" in info.flavors
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["label", "index", "prob", "error"]
    assert {"digits.yaml", "digits.safetensors", "adm-28-small-fashion_mnist.safetensors"} <= artifacts
    # register_model="digits-clf": NAME for a one-dataset sweep, NAME-<dataset> for each of several
    name = "digits-clf" if datasets == ["digits"] else "digits-clf-digits"
    versions = client.search_model_versions(f"name = '{name}'")
    assert [(v.run_id, str(v.version)) for v in versions] == [(parent.info.run_id, "1")]
    assert {m.name for m in client.search_registered_models()} == {registered_name("digits-clf", d, datasets)
                                                                    for d in datasets}


def test_registered_name_is_the_name_for_one_dataset_and_suffixed_for_several():
    assert registered_name("clf", "digits", ["digits"]) == "clf"
    assert registered_name("clf", "digits", ["digits", "cub200"]) == "clf-digits"
    assert registered_name(None, "digits", ["digits"]) is None


def test_parent_run_lists_its_dataset_splits_and_the_experiment_is_a_training_one(sweep):
    tmp, uri, client, exp, parent, datasets = sweep
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {f"{d}-{s}" for d in datasets for s in ("train", "val", "test")}
    contexts = {n: {t.key: t.value for t in i.tags}["mlflow.data.context"] for n, i in by_name.items()}
    assert {n: c for n, c in contexts.items() if n.startswith("digits-")} == {
        "digits-train": "train", "digits-val": "validation", "digits-test": "test"}
    assert len({i.dataset.digest for i in inputs}) == 3 * len(datasets)
    rows = {n: json.loads(i.dataset.profile)["num_rows"] for n, i in by_name.items()}
    exported = yaml.safe_load((tmp / "exported" / "digits.yaml").read_text())
    assert rows["digits-test"] == exported["selection"]["test_n"] and rows["digits-train"] == 800


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.mark.network
def test_served_model_answers_like_diffsweep_predict(sweep, capsys, tmp_path):
    """The issue's target: `mlflow models serve` answers 16 images as `diffsweep predict` does."""
    tmp, uri, client, exp, parent, datasets = sweep
    from trials.datasets import load_dataset
    samples = load_dataset("digits").splits["test"][:16]
    paths = []
    for s in samples:
        paths.append(str(tmp_path / f"{s.image_id}.png"))
        Image.fromarray(s.source).save(paths[-1])
    port = _free_port()
    # the command the sweep's summary prints, as printed (its PATH puts the venv's bin first: the
    # server starts `uvicorn` from PATH), on a free port
    command = serve_command(uri, f"runs:/{parent.info.run_id}/digits").replace("--port 5001", f"--port {port}")
    assert command.endswith(f"--env-manager local --host 127.0.0.1 --port {port} --workers 1")
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                              start_new_session=True)
    try:
        # meanwhile, the same images through `diffsweep predict` and the Python API
        assert main(["predict", "--config", str(tmp / "exported" / "digits.yaml"), *paths]) == 0
        by_cli = [line.split("\t")[1] for line in capsys.readouterr().out.strip().splitlines()]
        preds = diffsweep.load(tmp / "exported" / "digits.yaml").predict(paths)
        by_api, by_api_index = [p.label for p in preds], [p.index for p in preds]
        assert by_cli == by_api
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "server did not answer /ping: " + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        # the README's request: each cell the base64 of an image file's bytes
        request = {"dataframe_records": [{"image": base64.b64encode(open(p, "rb").read()).decode()} for p in paths]}
        assert request["dataframe_records"][0]["image"] == encode_image(paths[0])
        answer = _post(f"http://127.0.0.1:{port}/invocations", request)["predictions"]
        assert [a["label"] for a in answer] == by_cli
        assert all(a["error"] is None and 0 < a["prob"] <= 1 for a in answer)
        assert [a["index"] for a in answer] == [by_api_index[i] for i in range(16)]
        # one bad cell gets its own error; the others are still labelled
        bad = {"dataframe_records": [{"image": encode_image(paths[0])}, {"image": "bm90IGFuIGltYWdl"}]}
        answer = _post(f"http://127.0.0.1:{port}/invocations", bad)["predictions"]
        assert answer[0]["label"] == by_cli[0] and answer[1]["label"] is None and "not an image" in answer[1]["error"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
