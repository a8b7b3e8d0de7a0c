"""Our normalizations, activations and MLPs against PyTorch's, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from llmbook.layers import GELU, MLP, BatchNorm1d, LayerNorm, RMSNorm, SiLU, SwiGLU, gelu, silu

FP32 = {"atol": 1e-5, "rtol": 1e-5}


pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def randomize(*modules: nn.Module) -> None:
    """Non-trivial weights (not ones/zeros), the same in every module given."""
    params = [dict(m.named_parameters()) for m in modules]
    for name, p in params[0].items():
        value = torch.randn_like(p)
        for ps in params:
            ps[name].data.copy_(value)


def check_same(ours: nn.Module, ref: nn.Module, x: torch.Tensor, ref_input=lambda x: x, ref_output=lambda y: y):
    """Same output and the same gradients for the input and every parameter."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref_output(ref(ref_input(x2)))
    assert_close(y1, y2, **FP32)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert_close(x1.grad, x2.grad, **FP32)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_params[name].grad, **FP32, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias):
    ours, ref = LayerNorm(16, eps=1e-5, bias=bias), nn.LayerNorm(16, eps=1e-5, bias=bias)
    randomize(ours, ref)
    assert (ours.bias is None) == (not bias)
    check_same(ours, ref, torch.randn(3, 5, 16) * 3 + 1)


def test_rmsnorm_matches_torch():
    ours, ref = RMSNorm(16, eps=1e-6), nn.RMSNorm(16, eps=1e-6)
    randomize(ours, ref)
    check_same(ours, ref, torch.randn(3, 5, 16) * 3)


def test_rmsnorm_keeps_dtype_and_computes_in_fp32():
    norm = RMSNorm(8)
    x = torch.randn(4, 8) * 100
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), norm(x.bfloat16().float()), atol=1e-2, rtol=1e-2)
    assert_close(RMSNorm(3)(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.4629, 0.9258, 1.3887]), atol=1e-4, rtol=0)


def test_batchnorm_train_and_eval_match_torch():
    ours, ref = BatchNorm1d(6), nn.BatchNorm1d(6)
    randomize(ours, ref)
    to_ref = lambda x: x.transpose(1, 2)  # noqa: E731  torch wants (B, C, T)
    for _ in range(3):  # running statistics accumulate over several training batches
        check_same(ours, ref, torch.randn(4, 7, 6) * 2 + 3, to_ref, to_ref)
    assert_close(ours.running_mean, ref.running_mean, **FP32)
    assert_close(ours.running_var, ref.running_var, **FP32)
    ours.eval(), ref.eval()
    check_same(ours, ref, torch.randn(2, 5, 6), to_ref, to_ref)


def test_batchnorm_mask_excludes_padding():
    bn = BatchNorm1d(4)
    x = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False  # two pad positions
    x_pad = x.clone()
    x_pad[1, :2] = 100.0  # huge padding values change nothing once masked
    assert_close(bn(x, mask)[mask], bn(x_pad, mask)[mask])
    assert not torch.allclose(bn(x)[mask], bn(x_pad)[mask])  # unmasked: the padding leaks in
    real = x[mask]  # (8, 4): only the real tokens
    assert_close(bn(x, mask)[mask], F.batch_norm(real, None, None, training=True, eps=1e-5), **FP32)


def test_batchnorm_depends_on_batch_mates_layernorms_do_not():
    seq = torch.randn(1, 6, 8)
    batch_a = torch.cat([seq, torch.randn(3, 6, 8)])
    batch_b = torch.cat([seq, torch.randn(3, 6, 8) * 5 + 2])
    bn, ln, rms = BatchNorm1d(8), LayerNorm(8), RMSNorm(8)
    assert not torch.allclose(bn(batch_a)[0], bn(batch_b)[0], atol=1e-3)
    for norm in (ln, rms):
        assert_close(norm(batch_a)[0], norm(batch_b)[0])
        assert_close(norm(batch_a)[0], norm(seq)[0])


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_torch(approximate):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert_close(gelu(x, approximate), F.gelu(x, approximate=approximate))
    check_same(GELU(approximate), nn.GELU(approximate), torch.randn(4, 9))
    with pytest.raises(ValueError, match="approximate"):
        gelu(x, "fast")


def test_silu_matches_torch():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert_close(silu(x), F.silu(x))
    check_same(SiLU(), nn.SiLU(), torch.randn(4, 9))


class RefMLP(nn.Module):
    def __init__(self, d, d_ff, bias):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, d_ff, bias=bias), nn.Linear(d_ff, d, bias=bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class RefSwiGLU(nn.Module):
    def __init__(self, d, d_ff, bias):
        super().__init__()
        self.gate, self.up = nn.Linear(d, d_ff, bias=bias), nn.Linear(d, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ours_cls, ref_cls", [(MLP, RefMLP), (SwiGLU, RefSwiGLU)])
def test_mlps_match_reference(ours_cls, ref_cls, bias):
    ours, ref = ours_cls(16, 40, bias=bias), ref_cls(16, 40, bias)
    ref.load_state_dict(ours.state_dict())  # same names: fc/proj, gate/up/down
    check_same(ours, ref, torch.randn(2, 5, 16))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_mlp_dropout_only_in_training():
    mlp = MLP(8, 32, dropout=0.5)
    x = torch.randn(2, 3, 8)
    mlp.eval()
    assert_close(mlp(x), mlp(x))
    mlp.train()
    assert not torch.allclose(mlp(x), mlp(x))


@pytest.mark.parametrize("make", [lambda f: LayerNorm(16, fused=f), lambda f: LayerNorm(16, bias=False, fused=f),
                                  lambda f: RMSNorm(16, fused=f), lambda f: GELU("tanh", fused=f),
                                  lambda f: GELU("none", fused=f), lambda f: SiLU(fused=f)],
                         ids=["layernorm", "layernorm-nobias", "rmsnorm", "gelu-tanh", "gelu-none", "silu"])
def test_fused_kernels_compute_the_same_function(make):
    """fused=True (PyTorch's kernel, what the trainer runs) and the from-scratch code agree, values and gradients."""
    ours, fused = make(False), make(True)
    randomize(ours, fused)
    check_same(ours, fused, torch.randn(3, 5, 16) * 3 + 1)
    assert ours.fused is False and fused.fused is True


def test_fused_rmsnorm_keeps_dtype():
    norm = RMSNorm(8, fused=True)
    x = torch.randn(4, 8).bfloat16()
    assert norm(x).dtype == torch.bfloat16
    assert_close(norm(x), RMSNorm(8)(x))
