"""cluster/: the launcher YAMLs pass Ray's own config validation, the RayJob is well formed, and
submit.py parses its arguments before importing anything heavy."""
import copy
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"]
CLOUD_LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml"]


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_validate(raw):
    """What `ray up` does before it contacts a cloud: merge the provider's defaults.yaml
    (prepare_config), then check the result against ray/autoscaler/ray-schema.json and Ray's
    cross-field rules (validate_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_validation(name):
    config = _ray_validate(_load(name))
    assert config["head_node_type"] in config["available_node_types"]


def test_ray_validation_rejects_a_bad_config():
    raw = _load("aws-gpu.yaml")
    raw["setup_comands"] = raw.pop("setup_commands")  # unknown top-level key
    with pytest.raises(jsonschema.ValidationError):
        _ray_validate(raw)


@pytest.mark.parametrize("name", CLOUD_LAUNCHERS)
def test_cloud_launcher_has_autoscaling_gpu_workers(name):
    raw = _load(name)
    types_ = raw["available_node_types"]
    gpu = {k: v for k, v in types_.items() if k != raw["head_node_type"] and v["resources"].get("GPU", 0) > 0}
    assert gpu, "no GPU worker node type"
    assert all(v.get("min_workers", 0) == 0 and v["max_workers"] > 0 for v in gpu.values())
    assert types_[raw["head_node_type"]]["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_diffsweep_and_mounts_shared_storage(name):
    raw = _load(name)
    assert raw["file_mounts"]["~/diffsweep"] == "."
    commands = raw["setup_commands"] + raw.get("head_setup_commands", []) + raw.get("worker_setup_commands", [])
    text = "\n".join(commands)
    assert "torch==2.13.0" in text and "pip install -q -e ~/diffsweep" in text
    assert "/mnt/diffsweep" in text and "mount -t nfs" in text


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_keeps_token_auth_and_private_dashboard(name):
    raw = _load(name)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = "\n".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in "\n".join(raw[key])
    assert "RAY_AUTH_MODE=disabled" not in (CLUSTER / name).read_text()


def test_onprem_uses_the_local_provider():
    provider = _load("onprem.yaml")["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]


def _rayjob_docs():
    return [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d]


def test_rayjob_runs_the_sweep_on_gpu_workers_with_shared_storage():
    docs = _rayjob_docs()
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "diffsweep run search_spaces/paper_fgvc.yaml --address auto" in spec["entrypoint"]
    assert "MLFLOW_TRACKING_URI" in yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"

    (gpu_group,) = cluster["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu_group["maxReplicas"] > gpu_group["minReplicas"] == 0

    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pod_specs = [cluster["headGroupSpec"]["template"]["spec"], gpu_group["template"]["spec"]]
    mounts = set()
    for pod in pod_specs:
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        claim = claims[volume["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        mounts.add(mount["mountPath"])
    assert len(mounts) == 1, f"the shared volume is mounted at different paths: {mounts}"
    assert f"--storage-path {mounts.pop()}/" in spec["entrypoint"]


def test_submit_help_runs():
    out = subprocess.run([sys.executable, str(CLUSTER / "submit.py"), "--help"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "SPACE.yaml" in out.stdout and "--address auto" in out.stdout


def test_submit_help_imports_nothing_heavy():
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(CLUSTER / 'submit.py')!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(CLUSTER / 'submit.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('ray', 'torch', 'mlflow', 'orchestrator', 'trials') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_submit_forwards_to_diffsweep_run(monkeypatch, tmp_path):
    seen = []
    fake = types.ModuleType("orchestrator.cli")
    fake.main = lambda argv: seen.append((argv, Path.cwd())) or 7
    monkeypatch.setitem(sys.modules, "orchestrator.cli", fake)
    monkeypatch.chdir(ROOT)
    argv = ["submit.py", "--chdir", str(tmp_path), "search_spaces/x.yaml", "--num-samples", "8",
            "--tracking-uri", "http://10.0.0.5:5000"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(CLUSTER / "submit.py"), run_name="__main__")
    assert exit_.value.code == 7
    (forwarded, cwd), = seen
    assert forwarded == ["run", "search_spaces/x.yaml", "--address", "auto", "--num-samples", "8",
                         "--tracking-uri", "http://10.0.0.5:5000"]
    assert cwd.resolve() == tmp_path.resolve()
