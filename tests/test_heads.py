"""Heads learn, report their size, and the trainer resumes exactly."""

import numpy as np
import pytest
import torch

from trials.head_registry import REGISTRY
from trials.heads import HEADS, MixingHead, build_head, head_hyperparameters, param_count
from trials.store import FeatureArray
from trials.train_head import HeadTrainer, Recipe


def separable(n=96, channels=8, side=4, classes=3, seed=0):
    """Each class lights a different channel: trivially separable from every head's view."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.normal(scale=0.3, size=(n, channels, side, side)).astype(np.float16)
    for i, y in enumerate(labels):
        x[i, y] += 2.0
    return FeatureArray([x], labels, [str(i) for i in range(n)])


SMALL = {"linear": {"pool": 2}, "mlp": {"pool": 2, "hidden": 32}, "concat": {"pool": 2, "hidden": 32},
         "cnn": {"width": 16, "depth": 1}, "attention": {"dim": 32, "heads": 4, "depth": 1},
         "fusion": {"dim": 32, "heads": 4, "depth": 1}, "mixing": {"dim": 16, "side": 2, "maps": [[10, 4], [10, 8]]}}


@pytest.mark.parametrize("head", HEADS)
def test_each_head_fits_a_separable_problem(head):
    multi = REGISTRY[head].multi_map
    arrays = [separable(), separable(channels=5, side=2, seed=0)] if multi else [separable()]
    trainer = HeadTrainer(head, {**SMALL[head], "lr": 3e-3}, arrays, 3, Recipe("adamw", epochs=15, batch_size=32), 0)
    for _ in trainer.epochs(arrays):
        pass
    assert trainer.accuracy(arrays) >= 0.95


def test_linear_head_parameter_formula():
    c, p, k = 64, 2, 10
    dim = c * p * p
    head = build_head("linear", c, 7, k, pool=p)
    assert param_count(head) == 2 * dim + dim * k + k  # BN affine + Linear


def test_fusion_accepts_maps_of_different_shapes():
    head = build_head("fusion", [64, 32, 16], [7, 14, 4], 5, dim=32, heads=4, depth=1)
    out = head([torch.randn(2, 64, 7, 7), torch.randn(2, 32, 14, 14), torch.randn(2, 16, 4, 4)])
    assert out.shape == (2, 5)


def test_concat_head_is_the_mlp_over_its_maps_pooled_and_stacked():
    """Each map pooled to p×p, concatenated in the listed order: the same network, with the same
    initial weights, as the mlp on one map whose channels are the maps' channels stacked."""
    maps = [torch.randn(4, 8, 7, 7), torch.randn(4, 6, 14, 14)]
    torch.manual_seed(0)
    concat = build_head("concat", [8, 6], [7, 14], 5, pool=7, hidden=32, depth=2).eval()
    torch.manual_seed(0)
    mlp = build_head("mlp", 14, 7, 5, pool=7, hidden=32, depth=2).eval()
    stacked = torch.cat([maps[0], torch.nn.functional.adaptive_avg_pool2d(maps[1], 7)], dim=1)
    assert torch.equal(concat(maps), mlp(stacked))
    assert param_count(concat) == param_count(mlp)
    with pytest.raises(ValueError, match="reads one map"):
        build_head("mlp", [8, 6], [7, 14], 5)


def test_mixing_head_shapes_and_softmax_weights():
    maps = [[10, 4], [200, 4], [10, 8], [200, 8]]  # two blocks at two noise steps
    head = build_head("mixing", [64, 64, 32, 32], [7, 7, 14, 14], 5, maps=maps, dim=16, side=4)
    assert len(head.bottleneck) == 2  # one bottleneck per block, shared across t
    x = [torch.randn(3, 64, 7, 7), torch.randn(3, 64, 7, 7), torch.randn(3, 32, 14, 14), torch.randn(3, 32, 14, 14)]
    assert head.mixed(x).shape == (3, 16, 4, 4) and head(x).shape == (3, 5)
    w = head.map_weights()
    assert w.shape == (4,) and torch.allclose(w, torch.full((4,), 0.25))  # uniform at the start
    with torch.no_grad():
        head.mix.copy_(torch.tensor([3.0, -1.0, 0.5, 2.0]))
    w = head.map_weights()
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and (w > 0).all() and int(w.argmax()) == 0
    head(x).sum().backward()
    assert head.mix.grad is not None and head.mix.grad.abs().sum() > 0  # the weights are learned


def test_mixing_head_with_the_attention_classifier_learns_its_weights_too():
    maps = [[10, 4], [200, 4], [10, 8]]
    head = build_head("mixing", [64, 64, 32], [7, 7, 14], 5, maps=maps, dim=16, side=4, classifier="attention")
    x = [torch.randn(3, 64, 7, 7), torch.randn(3, 64, 7, 7), torch.randn(3, 32, 14, 14)]
    assert head(x).shape == (3, 5) and not hasattr(head, "fc")  # the attention head classifies the mixed map
    assert head.attend.tokens[0].side == 4  # over all 4×4 tokens of the mixed map
    head(x).sum().backward()
    assert head.mix.grad is not None and head.mix.grad.abs().sum() > 0
    assert "classifier" in head_hyperparameters("mixing")  # searchable like dim and side
    with pytest.raises(ValueError, match="mixing classifier 'conv' unknown"):
        build_head("mixing", [8], [2], 3, maps=[[10, 4]], classifier="conv")


def test_mixing_head_upsamples_small_maps_and_refuses_mismatched_labels():
    head = MixingHead([8], [2], 3, maps=[[10, 4]], dim=8, side=6)
    assert head.mixed(torch.randn(2, 8, 2, 2)).shape == (2, 8, 6, 6)  # one map, passed as a tensor
    with pytest.raises(ValueError, match="channels"):
        MixingHead([8, 4], [2, 2], 3, maps=[[10, 4], [200, 4]])  # one block, two widths


def test_unknown_head_and_stray_hyperparameter_are_refused():
    with pytest.raises(ValueError, match="unknown head"):
        build_head("transformer", 8, 4, 3)
    with pytest.raises(TypeError):
        build_head("linear", 8, 4, 3, width=12)


@pytest.mark.parametrize("recipe", ["paper", "adamw"])
def test_resumed_training_matches_uninterrupted(recipe):
    data = [separable(n=64)]
    r = Recipe(recipe, epochs=4, batch_size=16)
    straight = HeadTrainer("mlp", {"pool": 2, "hidden": 16, "dropout": 0.2}, data, 3, r, seed=7)
    full = [m for m in straight.epochs(data)]
    first = HeadTrainer("mlp", {"pool": 2, "hidden": 16, "dropout": 0.2}, data, 3, r, seed=7)
    part = [m for _, m in zip(range(2), first.epochs(data))]
    state = first.state_dict()
    second = HeadTrainer("mlp", {"pool": 2, "hidden": 16, "dropout": 0.2}, data, 3, r, seed=7)
    second.load_state_dict(state)
    rest = [m for m in second.epochs(data)]
    assert part + rest == full


def test_a_checkpoint_that_kept_only_its_epoch_is_rebuilt_by_replaying_the_epochs(tmp_path):
    """What `diffsweep resume` restores when Tune's saved state names a superseded checkpoint (its weights
    dropped by orchestrator/checkpoints.py): the same state as an uninterrupted run at that epoch."""
    import json

    from trials.trainable import EPOCH_FILE, restore_trainer_state

    data = [separable(n=64)]
    r = Recipe("adamw", epochs=4, batch_size=16)
    def trainer():
        return HeadTrainer("mlp", {"pool": 2, "hidden": 16, "dropout": 0.2}, data, 3, r, seed=7)

    full = list(trainer().epochs(data))
    (tmp_path / EPOCH_FILE).write_text(json.dumps({"epoch": 2}))
    resumed = trainer()
    restore_trainer_state(resumed, str(tmp_path), "cpu")
    assert resumed.epoch == 2
    assert list(resumed.epochs(data)) == full[2:]


def test_label_smoothing_reaches_the_loss():
    """An optimisation setting (searchable per head), not a head argument: with smoothing ε over K
    classes no logits can push the loss below the entropy of the smoothed target."""
    data = [separable()]
    eps, k = 0.2, 3
    q = np.array([1 - eps + eps / k] + [eps / k] * (k - 1))
    floor = float(-(q * np.log(q)).sum())
    losses = {}
    for smoothing in (0.0, eps):
        trainer = HeadTrainer("mlp", {"pool": 2, "hidden": 32, "lr": 3e-3, "label_smoothing": smoothing}, data, k,
                              Recipe("adamw", epochs=15, batch_size=32), 0)
        losses[smoothing] = [m["train_loss"] for m in trainer.epochs(data)][-1]
        assert trainer.accuracy(data) >= 0.95
    assert losses[eps] >= floor - 1e-3
    assert losses[0.0] < floor - 0.1


def test_registry_names_each_heads_parameters_from_its_builder():
    from trials.head_registry import REGISTRY
    from trials.heads import head_hyperparameters
    assert head_hyperparameters("linear") == ()
    assert head_hyperparameters("mlp") == head_hyperparameters("concat") == ("hidden", "depth", "dropout")
    assert head_hyperparameters("fusion") == head_hyperparameters("attention") == ("dim", "heads", "depth", "dropout")
    for spec in REGISTRY.values():
        assert set(spec.lr) == {"paper", "adamw"}  # a default learning rate for every recipe
        assert not spec.multi_map or spec.maps_field  # a head reading several maps says where its sets are


def test_ensemble_head_averages_its_members_probabilities_each_on_its_own_maps():
    """Member 0 reads map (10, 8) (a pooled linear head), member 1 reads (10, 4) and (10, 8) (fusion): the
    ensemble's output is log of the mean of their softmaxes, so argmax/softmax read it like logits."""
    from trials.ensemble import EnsembleHead, mean_softmax

    torch.manual_seed(0)
    a = build_head("linear", 8, 4, 3, pool=2)
    b = build_head("fusion", [8, 8], [4, 2], 3, dim=16, heads=2, depth=1)
    ens = EnsembleHead([a, b], [[(10, 8)], [(10, 4), (10, 8)]], maps=[(10, 4), (10, 8)]).eval()
    maps = [torch.randn(5, 8, 4, 4), torch.randn(5, 8, 2, 2)]
    with torch.no_grad():
        expected = (torch.softmax(a(maps[1]), 1) + torch.softmax(b(maps), 1)) / 2
        out = ens(maps)
        assert torch.allclose(torch.softmax(out, 1), expected, atol=1e-6)
        assert torch.allclose(mean_softmax([a(maps[1]), b(maps)]), expected, atol=1e-6)
    # one member on one map: a tensor is accepted as the one map, and the answer is that head's own
    solo = EnsembleHead([a], [[(10, 8)]], maps=[(10, 8)]).eval()
    with torch.no_grad():
        assert torch.equal(solo(maps[1]).argmax(1), a(maps[1]).argmax(1))
    assert {k.split(".")[1] for k in ens.state_dict()} == {"0", "1"}  # members.<i>.<param>: one file
    with pytest.raises(ValueError, match="one map list per member"):
        EnsembleHead([a, b], [[(10, 8)]], maps=[(10, 8)])
