"""Bad input: one clear line naming the thing and the fix, a non-zero exit, nothing half-written."""

import subprocess
import sys

import pytest
import yaml

from orchestrator.cli import main
from tests.spaces import tiny_space


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def edit(path, change):
    spec = yaml.safe_load(path.read_text())
    change(spec)
    path.write_text(yaml.safe_dump(spec))
    return path


def write(path, text):
    path.write_text(text)
    return path


CASES = {
    "missing yaml": (lambda tmp: tmp / "nope.yaml", "file not found"),
    "yaml syntax": (lambda tmp: write(tmp / "bad.yaml", "name: [unclosed\n"),
                    "YAML syntax error at line"),
    "unknown key": (lambda tmp: edit(tiny_space(tmp), lambda s: s.update(epochz=3)), "epochz: unknown key"),
    "wrong type": (lambda tmp: edit(tiny_space(tmp), lambda s: s["search"].update(num_samples="many")),
                   "search.num_samples"),
    "t outside schedule": (lambda tmp: edit(tiny_space(tmp), lambda s: s["space"].update(t=[10, 5000])),
                           "space.t: [1] = 5000 is outside the schedule"),
    "unknown block": (lambda tmp: edit(tiny_space(tmp), lambda s: s["space"].update(block=[99])),
                      "space.block[0] = 99"),
    "unknown head": (lambda tmp: edit(tiny_space(tmp), lambda s: s["space"].update(head={"transformer": {}})),
                     "unknown head 'transformer'"),
    "empty space": (lambda tmp: edit(tiny_space(tmp), lambda s: s["space"].update(t=[])), "space.t: empty list"),
    "unknown dataset": (lambda tmp: edit(tiny_space(tmp), lambda s: s["datasets"][0].update(name="mnist")),
                        "'mnist' is not a known dataset"),
    "dataset root missing": (lambda tmp: edit(tiny_space(tmp), lambda s: s["datasets"].__setitem__(
        0, {"name": "cub", "root": str(tmp / "no-such-dir")})), "does not exist"),
    "checkpoint missing": (lambda tmp: edit(tiny_space(tmp), lambda s: s.update(
        checkpoint={"path": str(tmp / "missing.pt"), "arch": "adm-28-small"})), "checkpoint.path"),
    # a path under a plain file cannot be created, even by root
    "export dir not writable": (lambda tmp: edit(tiny_space(write(tmp / "a-file", "x").parent), lambda s: s.update(
        export_dir=str(tmp / "a-file" / "exported"))), "a-file/exported is not writable"),
    "head parameter name": (lambda tmp: edit(tiny_space(tmp), lambda s: s["space"]["head"].update(
        linear={"lrr": [0.01]})), "linear.lrr: head 'linear' has no parameter 'lrr'"),
    "head parameter value": (lambda tmp: edit(tiny_space(tmp), lambda s: s["space"]["head"].update(
        mixing={"classifier": ["linear", "conv"]})), "space.head.mixing: {'classifier': 'conv'} does not build"),
    "cpu numeric path on GPUs": (lambda tmp: edit(tiny_space(tmp), lambda s: s.update(
        store={**s["store"], "numeric": "cpu-bf16"}, resources={"extract_gpu": 1})),
        "store.numeric: cpu-bf16 is computed on CPUs, but resources.extract_gpu"),
    "warm start key": (lambda tmp: edit(tiny_space(tmp), lambda s: s["search"].update(warm_start=[
        {"head": "linear", "t": 10, "block": 4, "pool": 1, "linear.lrr": 0.01}])),
        "search.warm_start[0].linear.lrr: not a parameter"),
    "limit below classes": (lambda tmp: edit(tiny_space(tmp), lambda s: s["datasets"][0].update(
        limit={"val": 5})), "limit.val = 5 is below its 10 classes"),
    "conditional model without class_label": (lambda tmp: edit(tiny_space(tmp), lambda s: s.update(
        checkpoint={"arch": "adm-64-cond", "random_weights": True})), "checkpoint.class_label"),
    # block 8 of adm-28-small is 7x7: pools 8 and 16 both leave it 7x7, the same head twice (block 4, 14x14, does not)
    "pools collapsing at a block's side": (lambda tmp: edit(tiny_space(tmp), lambda s: s["space"].update(
        pool=[1, 8, 16])), "space.pool: pools 8, 16 are all at or above block 8's side (7x7"),
    "a repeated choice": (lambda tmp: edit(tiny_space(tmp), lambda s: s["space"].update(pool=[2, 2])),
                          "space.pool: [1] = 2 is listed twice"),
    "ensemble of none": (lambda tmp: edit(tiny_space(tmp), lambda s: s.update(selection={"ensemble": 0})),
                         "selection.ensemble"),
    "a bar above 100 %": (lambda tmp: edit(tiny_space(tmp), lambda s: s.update(selection={"min_val_acc": 94})),
                          "selection.min_val_acc: 94.0 is not an accuracy in (0, 1]; write 0.94 for 94 %"),
    "a bar for a dataset not swept": (lambda tmp: edit(tiny_space(tmp), lambda s: s.update(
        selection={"min_val_acc": {"cub": 0.8}})), "selection.min_val_acc.cub: not a dataset of this sweep; use one of"),
    "tracking unreachable": (lambda tmp: edit(tiny_space(tmp), lambda s: s["tracking"].update(
        uri="http://127.0.0.1:9")), "unreachable"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sweep_spec_is_refused_in_one_line(case, tmp_path, capsys, monkeypatch):
    make, expected = CASES[case]
    path = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path)]) == 2  # in-process: the same entry point as the console script
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffsweep: error: "), err[-2000:]
    assert expected in lines[0]
    # nothing half-written: no Tune results, no store, no exports, no MLflow database
    assert not any((tmp_path / d).exists() for d in ("ray", "features", "exported", "runs", "mlruns.db"))
    assert not (tmp_path / "a-file").is_dir()


def test_console_entry_point_prints_one_line_and_exits_2(tmp_path):
    result = run_cli("run", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_other_commands_refuse_bad_input(tmp_path, capsys):
    cases = [
        (["blocks", "--arch", "adm-999"], "unknown architecture"),
        (["datasets", "inspect", "cub", "--root", str(tmp_path / "none")], "does not exist"),
        (["datasets", "inspect", "mnist"], "unknown dataset"),
        (["evaluate", "--config", str(tmp_path / "x.yaml")], "not found"),
        (["resume", "nothing-here", "--storage-path", str(tmp_path)], "no saved sweep"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, (args, err)


def test_resume_refuses_a_truncated_tune_state_in_one_line(tmp_path, capsys, monkeypatch):
    """A driver stopped while Tune copied its searcher's (or callbacks') state into storage leaves it
    short; resuming from it made Tune restart the experiment half restored, and the driver hung.
    `resume` reads those states before Ray starts and says what to do instead."""
    import json
    import pickle

    from orchestrator.config import load_config
    from orchestrator.search import PerDatasetOptunaSearch
    from orchestrator.sweep import STATE_FILE, check_resumable, sweep_dir

    cfg = load_config(tiny_space(tmp_path, name="cut"))
    saved = sweep_dir(cfg)
    saved.mkdir(parents=True)
    (saved / STATE_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    searcher = saved / "searcher-state-2026-12-08_02-46-42.pkl"
    PerDatasetOptunaSearch(cfg).save(str(searcher))
    callbacks = saved / "callback-states-2026-12-08_02-46-42.pkl"
    callbacks.write_bytes(pickle.dumps({0: {"runs": {}}, 1: None}))  # what Tune saves: state per callback
    check_resumable(saved)  # whole states pass
    monkeypatch.chdir(tmp_path)
    for state in (searcher, callbacks):
        whole = state.read_bytes()
        for cut in (0, len(whole) // 2):
            state.write_bytes(whole[:cut])
            assert main(["resume", "cut", "--storage-path", str(tmp_path / "ray")]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and f"saved Tune state {state}" in lines[0] and "--overwrite" in lines[0], lines
        state.write_bytes(whole)
    assert sorted(p.name for p in saved.iterdir()) == sorted([STATE_FILE, searcher.name, callbacks.name])
    assert not (tmp_path / "features").exists() and not (tmp_path / "mlruns.db").exists()  # nothing written


def test_pools_are_refused_exactly_when_two_give_a_block_the_same_head(tmp_path):
    """The rule against an independent count: a space is accepted iff its (block, side the head pools
    to) pairs are as many as its (block, pool) pairs, i.e. no two pools train the same head on a block.
    The side a head sees comes from `diffsweep blocks --json` (the table users read, not the check's
    own arithmetic), and the side a head pools to from the head itself (`LinearHead.pool`)."""
    import itertools
    import json

    from orchestrator.blocks_cli import blocks_command
    from orchestrator.config import ConfigError, parse_config
    from trials.heads import LinearHead

    spec = yaml.safe_load(tiny_space(tmp_path).read_text())
    checked = refused = 0
    for max_spatial in (16, 4):
        sees = {r["number"]: r["head_sees"] for r in json.loads(blocks_command("adm-28-small", True, max_spatial))}
        for blocks in ([4], [8], [4, 8], [1, 8, 10]):
            for pools in itertools.chain.from_iterable(itertools.combinations((1, 2, 4, 7, 8, 14, 16), k)
                                                       for k in (1, 2, 3)):
                spec["space"].update(block=blocks, pool=list(pools))
                spec["store"]["max_spatial"] = max_spatial
                heads = {(b, LinearHead(8, sees[b], 10, pool=p).pool) for b in blocks for p in pools}
                try:
                    parse_config(spec, "x")
                    accepted = True
                except ConfigError as e:
                    accepted = False
                    assert "space.pool: pools" in str(e) and "\n" not in str(e)
                    refused += 1
                assert accepted == (len(heads) == len(blocks) * len(pools)), (max_spatial, blocks, pools)
                checked += 1
    assert refused and refused < checked
    # heads that are not pooled do not read `pool`: nothing to collapse
    spec["space"].update(block=[8], pool=[8, 16], head={"cnn": {"width": [16]}})
    spec["store"]["max_spatial"] = 16
    assert parse_config(spec, "x").space.pool == [8, 16]


def test_the_refusal_holds_for_a_sweep_config_built_in_python(tmp_path):
    """`diffsweep.run(SweepConfig(...))` runs the same checks as the YAML path, before anything is written."""
    import diffsweep
    from orchestrator.config import ConfigError, SweepConfig

    spec = yaml.safe_load(tiny_space(tmp_path).read_text())
    spec["space"]["pool"] = [1, 8, 16]
    cfg = SweepConfig.model_validate(spec)  # pydantic alone: no architecture checks
    with pytest.raises(ConfigError, match="pools 8, 16 are all at or above block 8's side"):
        diffsweep.run(cfg)
    assert not any((tmp_path / d).exists() for d in ("ray", "features", "exported", "mlruns.db"))


@pytest.mark.parametrize("field, values", [("t", [10, 200, 10]), ("block", [4, 4]), ("pool", [1, 2, 1])])
def test_a_value_listed_twice_in_the_space_is_refused(field, values, tmp_path):
    """A repeated choice is a duplicate grid point (and weighs twice for the sampler)."""
    from orchestrator.config import ConfigError, parse_config

    spec = yaml.safe_load(tiny_space(tmp_path).read_text())
    spec["space"][field] = values
    with pytest.raises(ConfigError, match=rf"space\.{field}: \[\d\] = \d+ is listed twice; remove the repeat"):
        parse_config(spec, "x")
