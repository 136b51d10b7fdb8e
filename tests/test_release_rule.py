"""train.py's default stage 1 against the release's loop, stated literally.

The release's loss-learning loop, as its code runs it (written here from its description, with
module-style virtual parameters and ``.grad`` bookkeeping, and nothing of ``utils/meta.py``):

    for each group of A pairs, pair k = 0..A-1 of the group:
        inner, outer = the next two batches of the shuffled loader
        L_f = fusion loss of F(x_inner) under P(x_inner)     (P attached)
        L_f.backward(create_graph=True)                      (F's .grad keeps a graph; P's .grad += dL_f/dphi)
        F' = F with theta - lr * theta.grad;  R' = R stepped on L_r(R(F(x_inner).detach()))
        if k == 0: P.zero_grad()                             (just before the group's first outer pass)
        (L_r(R'(F'(x_outer))) / A).backward()                (P's .grad += meta term / A)
    phi <- phi - lr * phi.grad / max|phi.grad|;  P.zero_grad()
"""
import copy

import pytest
import torch

from conftest import random_patch_file
from test_train import load_script
from utils.losses import fusion_loss, reconstruction_loss

train_script = load_script("refusion_train_release_rule", "train.py")
# the release's loop keeps a graph in .grad on purpose; PyTorch's note on that is not for this test
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
# large enough that float32 rounding of P's parameters (about 3e-8 at 0.3) is far below 1e-5 of
# a step; it is the virtual step size too, so the second-order path is strong
LR = 0.05


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory):
    """16 random 16 px patch pairs: 8 batches of 2, enough for a group of 3 fresh pairs."""
    return random_patch_file(tmp_path_factory.mktemp("release_rule") / "pairs.h5", 16, 16, seed=3)


def exchanged(batch):
    return torch.cat([batch, batch.flip(1)])


def with_parameters(module, values):
    """A copy of ``module`` whose parameters are the (graph-carrying) tensors ``values``."""
    virtual = copy.deepcopy(module)
    for name, value in values.items():
        *path, leaf = name.split(".")
        owner = virtual.get_submodule(".".join(path))
        del owner._parameters[leaf]
        setattr(owner, leaf, value)
    return virtual


def release_group(fusion, recon, lpn, batches, accumulation_steps, lr, w, drop_first_fusion_term=True):
    """One accumulation group of the release's loop on copies of the networks; returns P's new
    parameters. ``w``: train.py's ``LossWeights`` of the epoch (the loss coefficients)."""
    fusion, recon, lpn = (copy.deepcopy(m) for m in (fusion, recon, lpn))
    lpn.zero_grad()
    for k in range(accumulation_steps):
        inner, outer = batches[2 * k], batches[2 * k + 1]
        x = exchanged(inner)
        w_int, w_grad = lpn(x)
        fused = fusion(x)
        fusion.zero_grad()
        loss_f = fusion_loss(x, fused, w_int, w_grad, w.fusion_int, w.fusion_grad, w.gradient_padding,
                             w.gradient_target)
        loss_f.backward(create_graph=True)
        fusion_virtual = with_parameters(fusion, {n: p - lr * p.grad for n, p in fusion.named_parameters()})
        targets = torch.cat([inner, inner])
        loss_r = reconstruction_loss(targets, recon(fused.detach()), w.recon_int, w.recon_grad)
        names, values = zip(*recon.named_parameters())
        grads = torch.autograd.grad(loss_r, values)
        recon_virtual = with_parameters(recon, {n: (p - lr * g).detach() for n, p, g in zip(names, values, grads)})
        if k == 0 and drop_first_fusion_term:
            lpn.zero_grad()
        outer_loss = reconstruction_loss(torch.cat([outer, outer]), recon_virtual(fusion_virtual(exchanged(outer))),
                                         w.recon_int, w.recon_grad)
        (outer_loss / accumulation_steps).backward()
    with torch.no_grad():
        scale = max(p.grad.abs().max() for p in lpn.parameters())
        return [p - lr * p.grad / scale for p in lpn.parameters()]


def trainer_for(patch_file, tmp_path, accumulation_steps, rule="release", gradient_target="max"):
    config = train_script.parse_config(["--data", str(patch_file), "--batch_size", "2", "--crop", "0",
                                        "--accumulation_steps", str(accumulation_steps), "--lr", str(LR),
                                        "--meta_rule", rule, "--gradient_target", gradient_target,
                                        "--device", "cpu"])
    train_script.check_config(config)
    return train_script.Trainer(config, str(tmp_path))


def train_py_group(trainer, monkeypatch):
    """Stage 1 of epoch 1 up to the first P step, through ``Trainer.meta_round``; returns P's
    parameters after it and the batches consumed (in order)."""
    from utils.data import epoch_batches, meta_pairs_per_epoch
    c = trainer.config
    batches = epoch_batches(len(trainer.pairs), c["batch_size"], c["seed"], 0)
    pairs = meta_pairs_per_epoch(c["meta_rule"], len(batches), c["max_meta_step"])
    consumed, make_batch = [], train_script.make_batch
    monkeypatch.setattr(train_script, "make_batch",
                        lambda pairs, indices, *a: consumed.append(indices.tolist()) or make_batch(pairs, indices, *a))
    rate = train_script.lr_at(c, 0)
    while trainer.step < c["accumulation_steps"]:
        trainer.meta_round(batches, pairs, rate, train_script.lr_at(c, 0, "lpn_lr"), train_script.loss_weights_at(trainer.config, 0))
    assert trainer.lpn_update.pending is None  # P has just stepped
    return [p.detach().clone() for p in trainer.lpn.parameters()], consumed, batches


def largest_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("accumulation_steps, gradient_target", [(2, "max"), (3, "max"), (2, "weighted")])
def test_p_steps_as_the_release_loop(patch_file, tmp_path, accumulation_steps, gradient_target, monkeypatch):
    trainer = trainer_for(patch_file, tmp_path, accumulation_steps, gradient_target=gradient_target)
    nets = copy.deepcopy((trainer.fusion, trainer.recon, trainer.lpn))
    before = [p.detach().clone() for p in trainer.lpn.parameters()]
    ours, consumed, batches = train_py_group(trainer, monkeypatch)
    lr, weights = train_script.lr_at(trainer.config, 0), train_script.loss_weights_at(trainer.config, 0)
    # the release walks the shuffled loader: two fresh batches a pair, in order
    assert consumed == [b.tolist() for b in batches[:2 * accumulation_steps]]
    data = [trainer.pairs[b].float() / 255 for b in batches[:2 * accumulation_steps]]
    release = release_group(*nets, data, accumulation_steps, lr, weights)
    step = largest_difference(release, before)
    assert step == pytest.approx(lr, rel=1e-6)  # the largest entry moves by exactly lr
    assert largest_difference(ours, release) <= 1e-5 * step
    # the test can tell: keeping the first pair's L_f term, as a loop zeroing elsewhere would,
    # moves P differently by far more than the tolerance
    kept = release_group(*nets, data, accumulation_steps, lr, weights, drop_first_fusion_term=False)
    assert largest_difference(kept, release) > 100 * largest_difference(ours, release)


def test_one_pair_groups_keep_only_the_meta_term(patch_file, tmp_path, monkeypatch):
    """With accumulation_steps 1 the release zeroes every L_f term: the meta-gradient alone, on
    fresh batches, as the paper's rule takes it on chained ones."""
    from utils.meta import pair_coefficients
    weights = train_script.loss_weights_at(trainer_for(patch_file, tmp_path, 1).config, 0)
    assert [pair_coefficients(weights, k, 1) for k in range(3)] == [(1.0, 0.0)] * 3
    trainer = trainer_for(patch_file, tmp_path, 1)
    nets = copy.deepcopy((trainer.fusion, trainer.recon, trainer.lpn))
    ours, consumed, batches = train_py_group(trainer, monkeypatch)
    data = [trainer.pairs[b].float() / 255 for b in batches[:2]]
    release = release_group(*nets, data, 1, train_script.lr_at(trainer.config, 0), weights)
    assert largest_difference(ours, release) <= 1e-5 * LR


def test_paper_rule_chains_batches_and_learns_from_reconstruction(patch_file, tmp_path, monkeypatch):
    trainer = trainer_for(patch_file, tmp_path, 2, rule="paper")
    _, consumed, batches = train_py_group(trainer, monkeypatch)
    assert consumed == [b.tolist() for b in (batches[0], batches[1], batches[1], batches[2])]
    from utils.meta import pair_coefficients
    assert [pair_coefficients(train_script.loss_weights_at(trainer.config, 0), k, 2) for k in range(4)] == [(1.0, 0.0)] * 4


def test_meta_rule_is_checked_and_recorded(patch_file, tmp_path, capsys):
    assert train_script.parse_config([])["meta_rule"] == "release"
    assert not train_script.parse_config([])["symmetric_lpn"]
    for bad in (["--meta_rule", "mine"], ["--lpn_fusion_loss", "true"]):
        with pytest.raises(train_script.TrainError):
            train_script.check_config(train_script.parse_config(bad))
    # a config written before the rule existed was trained under the paper's rule
    assert train_script.saved_config({"epochs": 3})["meta_rule"] == "paper"
    assert train_script.saved_config({"meta_rule": "release"})["meta_rule"] == "release"
    # and, before the gradient term could be chosen, with the P-weighted one
    assert train_script.parse_config([])["gradient_target"] == "max"
    assert train_script.saved_config({"epochs": 3})["gradient_target"] == "weighted"
    assert train_script.saved_config({"gradient_target": "max"})["gradient_target"] == "max"
