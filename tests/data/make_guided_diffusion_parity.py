"""Make the guided-diffusion parity references in tests/data/ (run by hand, never by the suite).

    python tests/data/make_guided_diffusion_parity.py --gd /tmp/gd --commit <sha> [--out tests/data]

`--gd` is a folder holding guided-diffusion's `guided_diffusion` package (openai/guided-diffusion;
only script_util.py, unet.py, nn.py, fp16_util.py, logger.py, gaussian_diffusion.py, respace.py,
losses.py and __init__.py are imported). For each tiny config below this builds guided-diffusion's
own UNetModel through its `script_util.create_model`, gives it random weights from a fixed seed
(guided-diffusion zero-inits several convs, which would hide mistakes in those branches), rounds
them to fp16-representable values (stored as fp16, loaded back to fp32 exactly, half the bytes),
runs it in fp32 on a fixed x, t (and y), and writes `gd_parity_<name>.safetensors` with the state
dict (`state.<key>`), `x`, `t`, `y`, the output `out` and selected block outputs `block.<n>` (paper
numbering: input_blocks 1.., middle_block, output_blocks). `guided_diffusion_parity.json` records
the commit, file hashes, torch version, flags and the state-dict digest of the public archs.
diffsweep itself is not imported.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# name: (shipped arch it mirrors, flags in guided-diffusion's vocabulary + in_channels/num_classes, blocks)
CONFIGS = {
    "tiny-adm-256-uncond": ("adm-256-uncond", dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,1,1", attention_resolutions="8,4",
        num_head_channels=16, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
        class_cond=False), [1, 3, 6, 7, 8, 10, 13]),
    "tiny-adm-64-cond": ("adm-64-cond", dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,1", attention_resolutions="8",
        num_head_channels=16, resblock_updown=True, use_new_attention_order=True, use_scale_shift_norm=True,
        learn_sigma=True, class_cond=True, num_classes=10, dropout=0.1), [2, 3, 4, 5, 7, 9]),
    "tiny-legacy-convresample-cond": ("adm-128-cond (legacy attention order, num_heads), conv resampling, "
                                      "no scale-shift, num_heads_upsample, in_channels=1 as adm-28-small", dict(
        image_size=16, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,1", attention_resolutions="8",
        num_heads=4, num_heads_upsample=2, use_scale_shift_norm=False, resblock_updown=False,
        use_new_attention_order=False, class_cond=True, num_classes=10), [2, 3, 4, 5, 7, 9]),
}
PUBLIC = {  # guided-diffusion README flags of the public checkpoints (state-dict digest only)
    "adm-256-uncond": dict(image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
                           num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True,
                           learn_sigma=True, class_cond=False),
    "adm-128-cond": dict(image_size=128, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
                         num_heads=4, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
                         class_cond=True),
    "adm-64-cond": dict(image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
                        num_head_channels=64, resblock_updown=True, use_new_attention_order=True,
                        use_scale_shift_norm=True, learn_sigma=True, class_cond=True, dropout=0.1),
}
SEED, BATCH = 6, 2
GD_FILES = ["__init__.py", "script_util.py", "unet.py", "nn.py", "fp16_util.py", "logger.py",
            "gaussian_diffusion.py", "respace.py", "losses.py"]


def state_digest(pairs: list[tuple[str, list[int]]]) -> str:
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def build(script_util, flags: dict) -> torch.nn.Module:
    """guided-diffusion's create_model; in_channels (and with it out_channels) and num_classes, fixed
    at 3 and 1000 there, are passed through to its UNetModel for the tiny configs."""
    flags = dict(flags)
    in_channels, num_classes = flags.pop("in_channels", 3), flags.pop("num_classes", 1000)
    kw = script_util.model_and_diffusion_defaults()
    kw.update(flags, use_fp16=False)
    unet_model, n_classes = script_util.UNetModel, script_util.NUM_CLASSES

    def with_channels(**k):
        # create_model passes in_channels=3 and out_channels=3 or 6 (learn_sigma)
        return unet_model(**{**k, "in_channels": in_channels, "out_channels": k["out_channels"] // 3 * in_channels})

    script_util.UNetModel, script_util.NUM_CLASSES = with_channels, num_classes
    try:
        return script_util.create_model(**{k: kw[k] for k in inspect.signature(script_util.create_model).parameters})
    finally:
        script_util.UNetModel, script_util.NUM_CLASSES = unet_model, n_classes


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
            elif name.endswith("norm.weight") or name.endswith(".0.weight"):  # GroupNorm scales
                v = 1 + 0.2 * torch.randn(p.shape, generator=g)
            else:
                v = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(v.half().float())  # fp16-representable, so the fp16 file holds these exact values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gd", required=True, help="folder holding the guided_diffusion package")
    ap.add_argument("--commit", required=True, help="guided-diffusion commit the files come from")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    a = ap.parse_args()
    sys.path.insert(0, a.gd)
    script_util = importlib.import_module("guided_diffusion.script_util")
    torch.set_num_threads(1)
    out = Path(a.out)
    record = {
        "guided_diffusion": {"repo": "https://github.com/openai/guided-diffusion", "commit": a.commit,
                             "sha256": {f: hashlib.sha256((Path(a.gd) / "guided_diffusion" / f).read_bytes()).hexdigest()
                                        for f in GD_FILES}},
        "torch": torch.__version__, "seed": SEED, "batch": BATCH,
        "command": "python tests/data/make_guided_diffusion_parity.py --gd <folder> --commit " + a.commit,
        "weights": "random (seeded), rounded to fp16-representable values, stored as fp16, run in fp32",
        "configs": {}, "public_state_dict_sha256": {},
    }
    for arch, flags in PUBLIC.items():
        with torch.device("meta"):
            gd = build(script_util, flags)
        record["public_state_dict_sha256"][arch] = state_digest([[k, list(v.shape)] for k, v in gd.state_dict().items()])
    for name, (mirrors, flags, blocks) in CONFIGS.items():
        model = build(script_util, flags).eval()
        randomise(model, SEED)
        g = torch.Generator().manual_seed(SEED)
        c, s = flags.get("in_channels", 3), flags["image_size"]
        x = torch.randn(BATCH, c, s, s, generator=g)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        y = torch.randint(0, flags["num_classes"], (BATCH,), generator=g) if flags.get("class_cond") else None
        every = [*model.input_blocks, model.middle_block, *model.output_blocks]
        captured: dict[int, torch.Tensor] = {}
        hooks = [b.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
                 for n, b in enumerate(every, start=1)]
        with torch.no_grad():
            y_out = model(x, t, y)
        for h in hooks:
            h.remove()
        tensors = {f"state.{k}": v.half().contiguous() for k, v in model.state_dict().items()}
        tensors.update(x=x, t=t, out=y_out.contiguous())
        if y is not None:
            tensors["y"] = y
        tensors.update({f"block.{n}": captured[n].contiguous() for n in blocks})
        file = f"gd_parity_{name}.safetensors"
        save_file(tensors, str(out / file))
        record["configs"][name] = {"mirrors": mirrors, "flags": flags, "file": file, "n_blocks": len(every),
                                   "blocks": blocks, "params": sum(p.numel() for p in model.parameters())}
        print(name, len(every), "blocks, saved", blocks, (out / file).stat().st_size, "bytes")
    (out / "guided_diffusion_parity.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
