"""ADM U-Net backbone: state-dict parity with guided-diffusion, checkpoint loading, block numbering,
early-exit feature capture, seeded noise, and `diffsweep blocks`.

`tests/data/adm_state_dict_keys.json` holds {arch: {key: shape}} for the three public guided-diffusion
checkpoints, produced by guided-diffusion's own `script_util.create_model` (openai/guided-diffusion
@ 22e0df8, `model_and_diffusion_defaults()` updated with the README flags, built on the meta device),
so name/shape parity is checked here without guided-diffusion installed. Forward parity against
guided-diffusion's own outputs is in tests/test_guided_diffusion_parity.py (committed references).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.blocks_cli import blocks_command
from trials.blocks import block_table
from trials.diffusion import seeded_noise
from trials.extract import DeviceCapture, capture_blocks
from trials.unet import ARCHITECTURES, CheckpointError, create_unet, load_checkpoint, make_config

torch.set_num_threads(1)

MANIFEST = Path(__file__).parent / "data" / "adm_state_dict_keys.json"
PUBLIC = ["adm-256-uncond", "adm-128-cond", "adm-64-cond"]
N_BLOCKS = {"adm-256-uncond": 37, "adm-128-cond": 31, "adm-64-cond": 33}

# Small configs covering both attention orders, resblock_updown on/off, scale-shift norm on/off,
# class conditioning, num_heads vs num_head_channels (and num_heads_upsample), learn_sigma.
SMALL = {
    "legacy-convresample": dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                attention_resolutions="8", num_heads=2, use_scale_shift_norm=False,
                                resblock_updown=False, use_new_attention_order=False),
    "new-updown-cond": dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                            attention_resolutions="8,4", num_head_channels=16, use_scale_shift_norm=True,
                            resblock_updown=True, use_new_attention_order=True, class_cond=True, learn_sigma=True),
    "legacy-updown-heads-up": dict(image_size=16, num_channels=64, num_res_blocks=2, channel_mult="1,1",
                                   attention_resolutions="16,8", num_heads=4, num_heads_upsample=2,
                                   use_scale_shift_norm=True, resblock_updown=True, class_cond=True),
    "new-convresample-sigma": dict(image_size=16, num_channels=32, num_res_blocks=2, channel_mult="1,3",
                                   attention_resolutions="16", num_heads=1, use_scale_shift_norm=False,
                                   resblock_updown=False, use_new_attention_order=True, learn_sigma=True,
                                   dropout=0.1),
}


def _inputs(flags: dict, batch: int = 2, seed: int = 0):
    cfg = make_config(flags)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g) if cfg.class_cond else None
    return x, t, y


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (guided-diffusion zero-inits several convs, which would make residual
    and attention branches vanish and hide mistakes in them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("norm.weight") or name.endswith(".0.weight"):  # GroupNorm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _block_outputs(model, x, t, y) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    blocks = [*model.input_blocks, model.middle_block, *model.output_blocks]  # works for guided-diffusion too
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in blocks]
    try:
        with torch.no_grad():
            out = model(x, t, y)
    finally:
        for h in handles:
            h.remove()
    return [*outs, out]


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {arch: create_unet(arch).eval() for arch in PUBLIC}


# ----------------------------------------------------------------------------------------------
# (a) state-dict names and shapes of the public archs


def test_manifest_covers_public_archs():
    manifest = json.loads(MANIFEST.read_text())
    assert list(manifest) == PUBLIC


@pytest.mark.parametrize("arch", PUBLIC)
def test_public_arch_matches_guided_diffusion_manifest(arch, meta_models):
    reference = [(k, tuple(s)) for k, s in json.loads(MANIFEST.read_text())[arch].items()]
    ours = [(k, tuple(v.shape)) for k, v in meta_models[arch].state_dict().items()]
    missing = sorted(set(dict(reference)) - set(dict(ours)))
    extra = sorted(set(dict(ours)) - set(dict(reference)))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    assert ours == reference  # same names, same shapes, same order


# ----------------------------------------------------------------------------------------------
# (b) save / load round trip


@pytest.mark.parametrize("name", list(SMALL))
def test_load_checkpoint_round_trip(name, tmp_path):
    flags = SMALL[name]
    torch.manual_seed(1)
    model = _randomise(create_unet(flags)).eval()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(path, flags)
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, t, y = _inputs(flags)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))


def test_load_checkpoint_fp16_and_safetensors(tmp_path):
    model = create_unet("adm-28-small")
    half = {k: v.half() for k, v in model.state_dict().items()}  # like the released use_fp16 weights
    torch.save(half, tmp_path / "half.pt")
    loaded = load_checkpoint(tmp_path / "half.pt", "adm-28-small")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.state_dict()["out.2.weight"], half["out.2.weight"].float())
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_checkpoint(tmp_path / "w.safetensors", "adm-28-small")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# (c) refusals: one line, naming the first offending key and the architecture

ARCH = "adm-28-small"
_EXECUTED: list[str] = []


def _record_execution(tag: str) -> str:
    _EXECUTED.append(tag)
    return tag


class _NeedsCode:
    """Unpickling this would call _record_execution: weights_only=True must refuse instead."""

    def __reduce__(self):
        return (_record_execution, ("unpickled",))


class _Opaque:
    pass


@pytest.fixture(scope="module")
def small_state():
    torch.manual_seed(2)
    return create_unet(ARCH).state_dict()


def _refusal(path, arch=ARCH) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, arch)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert f"architecture {arch}" in msg, msg
    return msg


def test_refuses_missing_key(small_state, tmp_path):
    keys = list(small_state)
    state = {k: v for k, v in small_state.items() if k not in (keys[5], keys[12])}
    torch.save(state, tmp_path / "w.pt")
    msg = _refusal(tmp_path / "w.pt")
    assert f"missing key '{keys[5]}'" in msg and keys[12] not in msg


def test_refuses_unexpected_key(small_state, tmp_path):
    state = {"module.extra.weight": torch.zeros(3), **small_state, "zz.bias": torch.zeros(1)}
    torch.save(state, tmp_path / "w.pt")
    msg = _refusal(tmp_path / "w.pt")
    assert "unexpected key 'module.extra.weight'" in msg and "zz.bias" not in msg


def test_refuses_shape_mismatch(small_state, tmp_path):
    keys = list(small_state)
    state = dict(small_state)
    state[keys[7]] = torch.zeros(*small_state[keys[7]].shape, 2)
    state[keys[9]] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    msg = _refusal(tmp_path / "w.pt")
    assert f"key '{keys[7]}' has shape" in msg and f"expects {tuple(small_state[keys[7]].shape)}" in msg
    assert keys[9] not in msg


@pytest.mark.parametrize("payload", ["object", "reduce"])
def test_refuses_pickle_that_needs_code(payload, small_state, tmp_path):
    obj = _Opaque() if payload == "object" else {**small_state, "extra": _NeedsCode()}
    torch.save(obj, tmp_path / "w.pt")
    _EXECUTED.clear()
    msg = _refusal(tmp_path / "w.pt")
    assert "needs code" in msg and ("_Opaque" in msg if payload == "object" else "_record_execution" in msg)
    assert _EXECUTED == []  # refused, never executed


def test_refuses_other_architecture(tmp_path):
    other = create_unet("adm-32-small").state_dict()
    torch.save(other, tmp_path / "w.pt")
    expected = create_unet(ARCH).state_dict()
    first = next(k for k, v in expected.items() if k not in other or other[k].shape != v.shape)
    msg = _refusal(tmp_path / "w.pt")
    assert f"'{first}'" in msg


def test_refuses_non_state_dicts(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "holds a list" in _refusal(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a plain weights file" in _refusal(tmp_path / "junk.pt")
    assert "file not found" in _refusal(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------------------
# (d) paper block numbering


@pytest.mark.parametrize("arch", PUBLIC)
def test_block_numbering_public_archs(arch, meta_models):
    model = meta_models[arch]
    rows = block_table(arch)
    assert len(rows) == N_BLOCKS[arch]
    n_in = len(model.input_blocks)
    assert [r.number for r in rows] == list(range(1, len(rows) + 1))
    assert [r.module for r in rows] == ([f"input_blocks.{i}" for i in range(n_in)] + ["middle_block"]
                                        + [f"output_blocks.{i}" for i in range(len(model.output_blocks))])
    # every row against the shapes of a (free) forward pass on the meta device
    cfg = model.config
    with torch.device("meta"):
        x = torch.empty(1, 3, cfg.image_size, cfg.image_size)
        t = torch.zeros(1, dtype=torch.long)
        outs = _block_outputs(model, x, t, t if cfg.class_cond else None)
    assert [(r.channels, r.resolution, r.resolution) for r in rows] == [tuple(o.shape[1:]) for o in outs[:-1]]
    assert tuple(outs[-1].shape[1:]) == (6, cfg.image_size, cfg.image_size)


def test_block_numbering_adm_256_landmarks():
    rows = {r.number: r for r in block_table("adm-256-uncond")}
    assert rows[19].module == "middle_block"
    assert (rows[24].module, rows[24].channels, rows[24].resolution) == ("output_blocks.4", 1024, 16)
    assert (rows[1].channels, rows[1].resolution) == (256, 256)
    assert (rows[37].module, rows[37].channels, rows[37].resolution) == ("output_blocks.17", 256, 256)


@pytest.mark.parametrize("name", ["adm-28-small", "legacy-convresample", "new-updown-cond"])
def test_block_table_matches_real_forward(name):
    flags = SMALL.get(name, name)
    torch.manual_seed(3)
    model = create_unet(flags).eval()
    rows = block_table(model)
    outs = _block_outputs(model, *_inputs(flags, batch=1))[:-1]
    assert len(rows) == len(outs)
    for r, o in zip(rows, outs):
        assert (r.channels, r.resolution, r.resolution) == tuple(o.shape[1:]), r


# ----------------------------------------------------------------------------------------------
# (e) capture_blocks: early exit, equality with a full forward, pooling


def _owner(name: str, n_in: int) -> int | str:
    """Block number (1-based) owning a module path, or the top-level name outside the blocks."""
    parts = name.split(".")
    if len(parts) == 1 and parts[0] != "middle_block":
        return parts[0]  # the ModuleLists themselves, time_embed, label_emb, out
    if parts[0] == "input_blocks":
        return int(parts[1]) + 1
    if parts[0] == "middle_block":
        return n_in + 1
    if parts[0] == "output_blocks":
        return n_in + 2 + int(parts[1])
    return parts[0]


@pytest.mark.parametrize("name", ["adm-28-small", "new-updown-cond"])
def test_capture_blocks_stops_early_and_matches_full_forward(name):
    flags = SMALL.get(name, name)
    torch.manual_seed(4)
    model = _randomise(create_unet(flags)).eval()
    x, t, y = _inputs(flags)
    full = _block_outputs(model, x, t, y)
    n_in, total = len(model.input_blocks), len(model.blocks())
    called: list[int | str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, owner=_owner(n, n_in): called.append(owner))
               for n, m in model.named_modules() if n]
    try:
        for k in sorted({3, n_in, n_in + 1, n_in + 2, total}):
            called.clear()
            with torch.no_grad():
                got = capture_blocks(model, x, t, [k, 2], y=y)
            ran = [c for c in called if isinstance(c, int)]
            assert max(ran) == k, f"block {max(ran)} ran after block {k}"
            assert set(ran) == set(range(1, k + 1))
            assert "out" not in called
            assert sorted(got) == [2, k]
            for b in (2, k):
                torch.testing.assert_close(got[b], full[b - 1], rtol=1e-6, atol=1e-6)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("pool", [1, 4, 5])
def test_capture_blocks_pooling(pool):
    torch.manual_seed(5)
    model = create_unet("adm-28-small").eval()
    x, _, y = _inputs("adm-28-small")
    blocks = list(range(1, len(model.blocks()) + 1))
    with torch.no_grad():
        got = capture_blocks(model, x, 500, blocks, pool=pool)
    t500 = torch.full((x.shape[0],), 500)
    full = _block_outputs(model, x, t500, y)
    for b in blocks:
        assert got[b].shape[-2] <= pool and got[b].shape[-1] <= pool
        side = full[b - 1].shape[-1]
        expected = F.adaptive_avg_pool2d(full[b - 1], pool) if side > pool else full[b - 1]
        assert got[b].shape[-1] == min(side, pool)
        torch.testing.assert_close(got[b], expected, rtol=1e-5, atol=1e-6)


# compiled: the two shallowest blocks (the stem conv and a ResBlock), since inductor's CPU compile time
# grows with the truncated network (blocks 2, 4: 22.6 s of compile here; 1, 2: 14.1 s)
@pytest.mark.parametrize("compiled,blocks", [(False, (4, 10)), (True, (1, 2))])
def test_device_capture_returns_the_pooled_maps_as_fp16_on_the_host(compiled, blocks):
    torch.manual_seed(6)
    model = create_unet("adm-28-small").eval()
    x, t, y = _inputs("adm-28-small")
    with torch.no_grad():
        expected = capture_blocks(model, x, t, list(blocks), pool=4)
    got = DeviceCapture(model, list(blocks), pool=4, compile=compiled)(x, t)
    assert sorted(got) == list(blocks)
    for b in blocks:
        assert got[b].dtype == torch.float16 and got[b].device.type == "cpu"
        torch.testing.assert_close(got[b], expected[b].to(torch.float16), rtol=2e-3, atol=2e-3)


def test_bf16_autocast_capture_is_within_bf16_tolerance_of_fp32():
    # the CUDA fast path runs under bf16 autocast; the same numerics on the CPU
    torch.manual_seed(7)
    model = create_unet("adm-32-small").eval()
    x, t, y = _inputs("adm-32-small")
    blocks = list(range(1, len(model.blocks()) + 1))
    with torch.no_grad():
        ref = capture_blocks(model, x, t, blocks, y=y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = capture_blocks(model, x, t, blocks, y=y)
    for b in blocks:
        err = (low[b].float() - ref[b]).norm() / ref[b].norm()
        assert err < 3e-2, f"block {b}: relative error {err:.3g}"


def test_capture_blocks_rejects_out_of_range():
    model = create_unet("adm-28-small")
    x, t, _ = _inputs("adm-28-small", batch=1)
    with pytest.raises(ValueError):
        capture_blocks(model, x, t, [0])
    with pytest.raises(ValueError):
        capture_blocks(model, x, t, [len(model.blocks()) + 1])


# ----------------------------------------------------------------------------------------------
# (f) seeded noise


def test_seeded_noise_reproducible_keyed_and_batch_independent():
    shape = (3, 8, 8)
    ids = ["img-a", "img-b", 17]
    base = seeded_noise(shape, seed=0, image_ids=ids, t=250)
    assert base.shape == (3, *shape)
    assert torch.equal(base, seeded_noise(shape, seed=0, image_ids=ids, t=250))
    assert not torch.equal(base[0], base[1])  # depends on the image id
    assert not torch.equal(base, seeded_noise(shape, seed=1, image_ids=ids, t=250))  # ... the seed
    other_t = seeded_noise(shape, seed=0, image_ids=ids, t=251)
    assert all(not torch.equal(base[i], other_t[i]) for i in range(3))  # ... and t
    # batch-independent: alone, in another order, or with other images, an image gets the same noise
    assert torch.equal(seeded_noise(shape, 0, ["img-b"], 250)[0], base[1])
    assert torch.equal(seeded_noise(shape, 0, [17, "img-x", "img-a"], 250)[[2, 0]], base[[0, 2]])
    assert abs(base.mean().item()) < 0.2 and abs(base.std().item() - 1) < 0.2


# ----------------------------------------------------------------------------------------------
# `diffsweep blocks`


def test_blocks_command_text_and_json():
    text = blocks_command("adm-256-uncond", as_json=False)
    lines = text.splitlines()
    assert len(lines) == 1 + 37
    assert lines[0].split()[:5] == ["block", "module", "channels", "resolution", "head"]
    assert lines[24].split() == ["24", "output_blocks.4", "1024", "16x16", "16x16"]
    assert lines[30].split() == ["30", "output_blocks.10", "512", "64x64", "16x16", "(pooled)"]
    assert lines[19].split()[:2] == ["19", "middle_block"]
    rows = json.loads(blocks_command("adm-256-uncond", as_json=True))
    assert len(rows) == 37 and all(set(r) == {"number", "module", "channels", "resolution", "head_sees"} for r in rows)
    assert rows[23] == {"number": 24, "module": "output_blocks.4", "channels": 1024, "resolution": 16, "head_sees": 16}
    assert [r["number"] for r in rows] == list(range(1, 38))


def test_blocks_command_every_known_arch_and_unknown():
    for arch in ARCHITECTURES:
        rows = json.loads(blocks_command(arch, as_json=True))
        assert len(blocks_command(arch, as_json=False).splitlines()) == len(rows) + 1
    with pytest.raises(ValueError, match="unknown architecture"):
        blocks_command("adm-999", as_json=False)


# ----------------------------------------------------------------------------------------------
# forward_intermediates and the recorded block table; batched seeded noise


@pytest.mark.parametrize("name", ["adm-28-small", "new-updown-cond"])
def test_forward_intermediates_equal_the_full_forwards_block_outputs(name):
    flags = SMALL.get(name, name)
    torch.manual_seed(8)
    model = _randomise(create_unet(flags)).eval()
    x, t, y = _inputs(flags)
    full = _block_outputs(model, x, t, y)
    with torch.no_grad():
        every = model.forward_intermediates(x, t, None, y=y)
        out, some = model.forward_intermediates(x, t, [2, 5], y=y, intermediates_only=False)
        early = model.forward_intermediates(x, t, 5, y=y)
    assert sorted(every) == list(range(1, len(model.feature_info) + 1))
    for b, h in every.items():
        torch.testing.assert_close(h, full[b - 1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, full[-1], rtol=1e-6, atol=1e-6)
    assert sorted(some) == [2, 5] and sorted(early) == [5]
    torch.testing.assert_close(early[5], full[4], rtol=1e-6, atol=1e-6)
    assert [(r.channels, r.resolution, r.resolution) for r in model.feature_info] == \
        [tuple(o.shape[1:]) for o in full[:-1]]
    assert block_table(model) == model.feature_info


def test_batched_noise_equals_reference_values_and_per_image_noise():
    from trials.diffusion import seeded_noise_batch
    # the values the store has always used (recorded before the batched form): no key changes
    ref = seeded_noise((1, 4, 5), 0, ["img-a", 17, "train/000123"], 90).flatten(1)[:, :3]
    expected = torch.tensor([[-0.8973344564437866, -0.6855027079582214, -0.36697816848754883],
                             [1.0984439849853516, 0.4575790762901306, -0.44283509254455566],
                             [0.08341731876134872, 0.12945495545864105, -0.2484981268644333]])
    assert torch.equal(ref, expected)
    assert seeded_noise((3, 28, 28), 7, ["x"], 300).flatten()[[0, 1, 100, 2351]].tolist() == \
        [-0.1365378499031067, -0.6474251747131348, 1.7089755535125732, 0.7802485227584839]
    ids = ["a", "b", 3, "d", "e"]
    batch = seeded_noise_batch((2, 6, 6), 4, ids, (10, 90, 300))
    assert batch.shape == (3, 5, 2, 6, 6)
    threaded = seeded_noise_batch((2, 6, 6), 4, ids, (10, 90, 300), workers=2)
    assert torch.equal(batch, threaded)
    for k, t in enumerate((10, 90, 300)):
        assert torch.equal(batch[k], seeded_noise((2, 6, 6), 4, ids, t))
