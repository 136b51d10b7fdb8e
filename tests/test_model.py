"""Shapes, strip-wise inference, functional_call and checkpoint formats of ReFusion."""
import pickle

import pytest
import torch
from torch.func import functional_call

from conftest import needs_reference, release_weights
from ReFusion import ReFusion
from utils.checkpoint import CheckpointError, load_weights, save_atomic
from utils.kernels import attention, memory


def random_model(seed=0):
    torch.manual_seed(seed)
    model = ReFusion().eval()
    with torch.no_grad():  # non-trivial norms/temperatures so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or "temperature" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 33), (64, 48)])
def test_any_size_gives_one_channel_in_unit_range(size):
    x = torch.rand(2, 2, *size)
    with torch.no_grad():
        y = random_model()(x)
    assert y.shape == (2, 1, *size)
    assert torch.isfinite(y).all() and (y > 0).all() and (y < 1).all()


def test_batch_items_are_independent():
    model, x = random_model(), torch.rand(3, 2, 20, 24)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_training_and_inference_logits_are_the_same_cosine_similarities():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 50, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 4, 50, dtype=torch.float64, generator=g, requires_grad=True)
    training = attention.cosine_logits(q, k)
    with torch.no_grad():
        inference = attention.cosine_logits(q, k)
    unit_q, unit_k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    expected = unit_q @ unit_k.transpose(-2, -1)
    assert torch.allclose(training, expected, atol=1e-12)
    assert torch.allclose(inference, expected, atol=1e-12)
    probe = torch.randn(expected.shape, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad((training * probe).sum(), (q, k))
    reference = torch.autograd.grad((expected * probe).sum(), (q, k))
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.autograd.gradgradcheck(attention.cosine_logits, (q[:1, :1, :, :6], k[:1, :1, :, :6]))


def test_row_norms_derivatives_of_every_order_and_at_zero():
    norms = attention.RowNorms.apply
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.allclose(norms(rows), rows.norm(dim=-1), atol=1e-14)
    assert torch.autograd.gradcheck(norms, (rows,))
    assert torch.autograd.gradgradcheck(norms, (rows,))
    tangent = torch.randn(rows.shape, dtype=torch.float64, generator=g)
    _, ours = torch.func.jvp(norms, (rows.detach(),), (tangent,))
    _, reference = torch.func.jvp(lambda r: r.norm(dim=-1), (rows.detach(),), (tangent,))
    assert torch.allclose(ours, reference, atol=1e-12)
    zero = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(norms(zero).sum(), zero)
    assert torch.equal(grad, torch.zeros_like(zero))


def test_strips_give_the_same_result_as_one_pass(monkeypatch):
    model, x = random_model(), torch.rand(1, 2, 75, 40)
    with torch.enable_grad():
        whole = model(x).detach()  # gradient mode never uses strips
    monkeypatch.setattr(memory, "STRIP_PIXELS", 40 * 9)  # 9-row strips, uneven last strip
    with torch.no_grad():
        strips = model(x)
    assert torch.allclose(whole, strips, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (23, 37)])
def test_plain_release_style_network_computes_the_same_function(size):
    """ReFusion_plain.py is the speed baseline; a baseline that computed something else
    would make its speed-up meaningless."""
    from ReFusion_plain import PlainReFusion
    model, x = random_model(), torch.rand(2, 2, *size)
    plain = PlainReFusion().eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(x) - model(x)).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_row_major_copy_is_exact(dtype):
    """float32/64 go through OpenCV, other dtypes through torch; both must be exact copies."""
    x = torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(attention.row_major_copy(x), x.contiguous().view(2, 6, 35))
    strided = torch.randn(3, 4, 9)[:, :, ::2]  # non-contiguous input
    assert torch.equal(attention.transpose_copy(strided), strided.transpose(1, 2))


def test_row_major_copy_is_differentiable_twice():
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert torch.autograd.gradcheck(attention.row_major_copy, (x,))
    assert torch.autograd.gradgradcheck(attention.row_major_copy, (x,))
    grad = torch.randn(2, 6, 35, dtype=torch.float64)
    (back,) = torch.autograd.grad(attention.row_major_copy(x), x, grad)
    assert back.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(back, grad.view(2, 6, 5, 7))
    tangent = torch.randn_like(x)  # forward mode, as the meta-gradient's torch.func.jvp uses it
    _, tangent_out = torch.func.jvp(attention.row_major_copy, (x.detach(),), (tangent,))
    assert torch.equal(tangent_out, tangent.contiguous().view(2, 6, 35))


def test_functional_call_uses_substituted_parameters():
    model, other, x = random_model(0), random_model(1), torch.rand(1, 2, 16, 16)
    params = dict(other.named_parameters())
    with torch.no_grad():
        substituted = functional_call(model, params, (x,))
        assert torch.equal(substituted, other(x))
        assert not torch.allclose(substituted, model(x))


def test_own_checkpoint_round_trip(tmp_path):
    model, x = random_model(), torch.rand(1, 2, 12, 12)
    path = tmp_path / "ReFusion.pth"
    save_atomic(model.state_dict(), str(path))
    state = torch.load(path)
    assert len(state) == sum(1 for _ in model.parameters())  # one key per parameter
    loaded = load_weights(ReFusion(), str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def release_style_state(model):
    """The release's layout: every conv weight also stored under x.conv.weight."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            state[f"{name}.conv.weight"] = state[f"{name}.weight"].clone()
    return state


def test_release_layout_loads_strictly_and_agrees():
    model = random_model()
    state = release_style_state(model)
    assert len(state) == 140
    fresh = ReFusion()
    fresh.load_state_dict(state)  # strict by default
    x = torch.rand(1, 2, 10, 10)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_release_layout_with_disagreeing_duplicate_is_refused():
    state = release_style_state(random_model())
    state["project_in_1.conv.weight"] += 1
    with pytest.raises(RuntimeError, match="disagree"):
        ReFusion().load_state_dict(state)


@needs_reference
def test_released_checkpoint_has_140_keys_and_loads():
    state = torch.load(release_weights("IVIF"), map_location="cpu")
    assert len(state) == 140
    ReFusion().load_state_dict(state)


def test_corrupt_and_wrong_checkpoints_give_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*corrupt.pth"):
        load_weights(ReFusion(), str(corrupt))
    wrong = tmp_path / "wrong.pth"
    torch.save(ReFusion(dim=8).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="wrong.pth does not hold ReFusion weights"):
        load_weights(ReFusion(), str(wrong))
    missing = tmp_path / "nothing.pth"
    with pytest.raises(CheckpointError, match="model not found"):
        load_weights(ReFusion(), str(missing))


def test_pickled_objects_are_refused_without_torchs_advice_to_unpickle_them(tmp_path):
    """A whole pickled model (``torch.save(model)``) or any other pickle is never unpickled, and
    the error says what to save instead rather than relaying torch's weights_only=False advice."""
    whole = tmp_path / "whole.pth"
    torch.save(ReFusion(), whole)
    with pytest.raises(CheckpointError, match=r"whole.pth: it holds Python objects.*save model.state_dict\(\)") as error:
        load_weights(ReFusion(), str(whole))
    plain_pickle = tmp_path / "other.pth"
    plain_pickle.write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(CheckpointError, match="other.pth: not a PyTorch weights file$") as other:
        load_weights(ReFusion(), str(plain_pickle))
    for message in (str(error.value), str(other.value)):
        assert "weights_only" not in message and "\n" not in message
