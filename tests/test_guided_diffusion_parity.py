"""diffsweep's U-Net against references made once by guided-diffusion's own code.

`tests/data/make_guided_diffusion_parity.py` (run by hand, never by the suite) built guided-diffusion's
UNetModel at the commit recorded in `tests/data/guided_diffusion_parity.json` for tiny configs with the
structure of the shipped archs, and saved its random state dict, fixed inputs, its output and selected
block outputs. Here those weights load into `trials.unet` with strict=True and the forward output and
`capture_blocks` maps must match in fp32. guided-diffusion is not needed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trials.extract import capture_blocks
from trials.unet import ARCHITECTURES, create_unet

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
RECORD = json.loads((DATA / "guided_diffusion_parity.json").read_text())
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module", params=list(RECORD["configs"]))
def case(request):
    meta = RECORD["configs"][request.param]
    arrays = load_file(str(DATA / meta["file"]))
    state = {k[len("state."):]: v.float() for k, v in arrays.items() if k.startswith("state.")}
    model = create_unet(meta["flags"]).eval()
    model.load_state_dict(state, strict=True)
    return meta, model, arrays


def test_record_names_the_commit_and_mirrors_shipped_archs():
    assert len(RECORD["guided_diffusion"]["commit"]) == 40
    mirrored = {meta["mirrors"].split(" ")[0] for meta in RECORD["configs"].values()}
    assert {"adm-256-uncond", "adm-64-cond", "adm-128-cond"} <= mirrored
    for meta in RECORD["configs"].values():
        assert len(create_unet(meta["flags"]).blocks()) == meta["n_blocks"]


def test_state_dict_names_and_shapes_are_guided_diffusions(case):
    meta, model, arrays = case
    theirs = [(k[len("state."):], list(v.shape)) for k, v in arrays.items() if k.startswith("state.")]
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert sorted(ours) == sorted(theirs)


def test_output_matches_guided_diffusion(case):
    meta, model, arrays = case
    with torch.no_grad():
        out = model(arrays["x"], arrays["t"], arrays.get("y"))
    torch.testing.assert_close(out, arrays["out"], atol=ATOL, rtol=RTOL)


def test_captured_blocks_match_guided_diffusion(case):
    meta, model, arrays = case
    with torch.no_grad():
        maps = capture_blocks(model, arrays["x"], arrays["t"], meta["blocks"], y=arrays.get("y"))
    assert sorted(maps) == sorted(meta["blocks"])
    for n in meta["blocks"]:
        torch.testing.assert_close(maps[n], arrays[f"block.{n}"], atol=ATOL, rtol=RTOL, msg=lambda m: f"block {n}: {m}")


@pytest.mark.parametrize("arch", ["adm-256-uncond", "adm-128-cond", "adm-64-cond"])
def test_public_arch_state_dict_is_guided_diffusions(arch):
    """The full-size public archs: names and shapes hash to what guided-diffusion's create_model gave."""
    with torch.device("meta"):
        model = create_unet(ARCHITECTURES[arch])
    pairs = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert hashlib.sha256(json.dumps(pairs).encode()).hexdigest() == RECORD["public_state_dict_sha256"][arch]
