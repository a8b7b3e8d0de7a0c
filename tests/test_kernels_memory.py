"""peak_memory measures real allocations; tiled attention's peak grows as T, naive attention's as T²."""

from __future__ import annotations

import pytest
import torch

from llmbook.attention import scaled_dot_product_attention
from llmbook.kernels.flash_torch import flash_attention_torch
from llmbook.kernels.memory import peak_memory

MB = 2**20
pytestmark = pytest.mark.usefixtures("seed_and_one_thread")  # tests/conftest.py


def test_peak_memory_measures_a_known_allocation():
    def allocate_64mb():
        x = torch.empty(16 * MB)  # 16 Mi float32 = 64 MiB
        x.fill_(1.0)
        return float(x[0])  # x is freed on return: its memory still counts toward the peak

    result, peak = peak_memory(allocate_64mb)
    assert result == 1.0
    assert 64 * MB <= peak < 70 * MB
    before = torch.ones(8 * MB)  # allocated before the call: not counted
    assert peak_memory(lambda: before.sum())[1] < 1 * MB
    assert peak_memory(lambda: None) == (None, 0)
    _, two = peak_memory(lambda: (torch.empty(4 * MB), torch.empty(4 * MB)))  # both alive at once
    _, one_after_other = peak_memory(lambda: [float(torch.ones(4 * MB)[0]) for _ in range(2)])  # freed in between
    assert 32 * MB <= two < 34 * MB and 16 * MB <= one_after_other < 18 * MB


def _forward_backward(attention, T, H=2, D=64):
    q, k, v = (torch.randn(1, H, T, D, requires_grad=True) for _ in range(3))  # allocated before measuring

    def step():
        attention(q, k, v).sum().backward()

    return step


def _tiled(q, k, v):
    return flash_attention_torch(q, k, v, causal=True)


def _naive(q, k, v):
    return scaled_dot_product_attention(q, k, v, is_causal=True)  # keeps the T x T probabilities for backward


def test_tiled_peak_grows_linearly_while_naive_grows_quadratically():
    tiled, naive = _tiled, _naive
    peaks = {(name, T): peak_memory(_forward_backward(fn, T))[1] for name, fn in [("tiled", tiled), ("naive", naive)]
             for T in (1024, 2048)}
    one_matrix = 2048 * 2048 * 4  # a single T x T float32 score matrix of one head: 16 MiB
    assert peaks["tiled", 2048] < one_matrix / 2
    assert peaks["tiled", 2048] / peaks["tiled", 1024] < 3  # about 2x: linear in T
    assert peaks["naive", 2048] / peaks["naive", 1024] > 3.5  # about 4x: quadratic in T
    assert peaks["naive", 2048] > 5 * peaks["tiled", 2048]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda():
    def allocate_64mb():
        return float(torch.ones(16 * MB, device="cuda")[0])

    result, peak = peak_memory(allocate_64mb, device="cuda")
    assert result == 1.0 and 64 * MB <= peak < 70 * MB
