"""`diffsweep train-ddpm` on the CPU: a few real steps, checkpoint + sidecar, resume, time limit."""

import json

import numpy as np
import torch
from safetensors.torch import load_file

from orchestrator.cli import main
from trials.ddpm import DDPMTrainConfig, diffusion_loss, sha256_file, train_ddpm
from trials.diffusion import alphas_cumprod
from trials.unet import create_unet, load_checkpoint


def small(tmp_path, **kw) -> DDPMTrainConfig:
    # digits (bundled with scikit-learn, upsampled to 28×28) keeps the data load to a second
    return DDPMTrainConfig(**{"dataset": "digits", "arch": "adm-28-small", "out": str(tmp_path / "ddpm.safetensors"),
                              "steps": 4, "batch_size": 8, "save_every": 2, "samples": 4, **kw})


def test_train_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    cfg = small(tmp_path)
    out = train_ddpm(cfg, progress=False)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["steps"] == 4 and side["sha256"] == sha256_file(out) and side["weights"] == "ema"
    assert "--steps 4 " in side["command"] and side["flags"]["image_size"] == 28
    assert out.with_suffix(".samples.png").stat().st_size > 0
    model = load_checkpoint(out, "adm-28-small")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first = load_file(out)

    # the same command with more steps continues from step 4 (optimizer and losses restored)
    out = train_ddpm(small(tmp_path, steps=6), progress=False)
    state = torch.load(out.with_suffix(".resume.pt"), weights_only=True)
    assert state["step"] == 6 and len(state["losses"]) == 6 and np.isfinite(state["losses"]).all()
    assert json.loads(out.with_suffix(".json").read_text())["steps"] == 6
    assert any(not torch.equal(first[k], v) for k, v in load_file(out).items())  # EMA moved on


def test_time_limit_stops_early_and_records_the_steps_done(tmp_path):
    out = train_ddpm(small(tmp_path, steps=10_000, max_minutes=0.05, samples=0), progress=False)
    side = json.loads(out.with_suffix(".json").read_text())
    assert 1 <= side["steps"] < 10_000
    assert f"--steps {side['steps']} " in side["command"]  # the command that reproduces exactly these steps
    assert side["train_config"]["max_minutes"] == 0.05


def test_cli_trains_and_reports_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    # --samples 0: no sample grid (test_train_writes_a_loadable_checkpoint_and_resumes checks the grid)
    assert main(["train-ddpm", "--dataset", "digits", "--steps", "2", "--batch-size", "4", "--samples", "0",
                 "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and out.is_file()
    assert not out.with_suffix(".samples.png").exists()


def test_bf16_autocast_runs_the_unet_in_bf16_on_the_cpu_and_keeps_the_loss_close():
    torch.manual_seed(0)
    model = create_unet("adm-28-small")
    x0, noise = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28)
    t = torch.tensor([0, 10, 500, 999])
    abar = torch.as_tensor(alphas_cumprod("linear"), dtype=torch.float32)
    dtypes = []

    def forward(xt, steps):
        out = model(xt, steps)
        dtypes.append(out.dtype)
        return out

    fp32 = diffusion_loss(forward, x0, t, noise, abar, bf16=False)
    bf16 = diffusion_loss(forward, x0, t, noise, abar, bf16=True)
    assert dtypes == [torch.float32, torch.bfloat16] and bf16.dtype == torch.float32  # loss stays fp32
    assert fp32 != bf16 and abs(bf16 - fp32) / fp32 < 0.02


def test_cli_bf16_trains_and_the_sidecar_command_repeats_it(tmp_path):
    out = tmp_path / "bf16.safetensors"
    assert main(["train-ddpm", "--dataset", "digits", "--steps", "2", "--batch-size", "4", "--bf16",
                 "--samples", "0", "--out", str(out)]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert " --bf16 " in side["command"] and side["train_config"]["bf16"] is True
    assert np.isfinite(torch.load(out.with_suffix(".resume.pt"), weights_only=True)["losses"]).all()


def test_cli_refuses_an_unknown_dataset_in_one_line(tmp_path, capsys):
    assert main(["train-ddpm", "--dataset", "no_such_set", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffsweep: error:") and "no_such_set" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_init_from_continues_trained_weights_and_records_the_lineage(tmp_path):
    first = train_ddpm(small(tmp_path, samples=0), progress=False)
    cfg = small(tmp_path, out=str(tmp_path / "more.safetensors"), init_from=str(first), steps=2, seed=1, samples=0,
                ema_decay=1.0)  # decay 1: the EMA stays exactly the weights it started from
    out = train_ddpm(cfg, progress=False)
    assert all(torch.equal(load_file(first)[k], v) for k, v in load_file(out).items())
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["init_from"]["sha256"] == sha256_file(first) and side["init_from"]["steps"] == 4
    assert side["steps"] == 2 and side["total_steps"] == 6 and f"--init-from {first} " in side["command"]
    assert "--steps 4 " in side["init_from"]["command"]  # how to rebuild the starting point

    # resuming keeps the lineage recorded at the start, even once the starting file has gone
    started_from = side["init_from"]
    first.unlink()
    out = train_ddpm(small(tmp_path, out=str(out), init_from=str(first), steps=3, seed=1, samples=0), progress=False)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["init_from"] == started_from and side["steps"] == 3 and side["total_steps"] == 7


def test_cli_refuses_init_from_a_missing_file_or_the_output_itself(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["train-ddpm", "--dataset", "digits", "--init-from", str(tmp_path / "nope.safetensors"),
                 "--out", str(out)]) == 2
    assert main(["train-ddpm", "--dataset", "digits", "--init-from", str(out), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope.safetensors: file not found" in err[0] and "is also --out" in err[1]
    assert not list(tmp_path.iterdir())
