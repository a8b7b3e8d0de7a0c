"""llmbook.kernels.roofline: attention's FLOPs and bytes counted by hand, and the two measurements."""

from __future__ import annotations

import math
import time

import pytest

from llmbook.kernels import roofline


def test_naive_counts_one_tiny_head_by_hand():
    # B=1, H=1, T=2, D=1, float32: q, k, v, out hold 2 values (8 bytes), S and P hold 4 (16 bytes)
    qk, sm, pv = roofline.naive_attention_traffic(1, 1, 2, 1)
    assert (qk.flops, qk.bytes_read, qk.bytes_written) == (8, 16, 16)  # 4 dot products of length 1, 2 FLOPs each
    assert (sm.flops, sm.bytes_read, sm.bytes_written) == (20, 16, 16)  # 5 FLOPs per score
    assert (pv.flops, pv.bytes_read, pv.bytes_written) == (8, 24, 8)  # reads P and v, writes out
    assert sm.intensity == pytest.approx(20 / 32)


def test_naive_counts_scale_with_every_dimension():
    one = roofline.total(roofline.naive_attention_traffic(1, 1, 64, 16, bytes_per_value=2))
    more = roofline.total(roofline.naive_attention_traffic(3, 4, 64, 16, bytes_per_value=2))
    assert more.flops == 12 * one.flops and more.bytes == 12 * one.bytes
    qk = roofline.naive_attention_traffic(1, 1, 1024, 64)[0]
    assert qk.flops == 2 * 1024 * 1024 * 64
    assert qk.bytes == (2 * 1024 * 64 + 1024 * 1024) * 4
    assert qk.intensity == pytest.approx(28.44, abs=0.01)  # the module docstring's example


def test_flash_counts_by_hand():
    # B=1, H=2, T=5, D=4, block_q=2: 3 query tiles, each reading k and v of its head
    f = roofline.flash_attention_traffic(1, 2, 5, 4, block_q=2)
    qkvo = 2 * 5 * 4 * 4  # bytes of one (1, 2, 5, 4) float32 tensor
    assert f.bytes_read == qkvo + 3 * 2 * qkvo
    assert f.bytes_written == qkvo + 2 * 5 * 4  # out and a float32 lse per row
    naive = roofline.total(roofline.naive_attention_traffic(1, 2, 5, 4))
    assert f.flops == naive.flops  # same arithmetic, other memory traffic


def test_flash_moves_far_fewer_bytes_at_long_context():
    naive = roofline.total(roofline.naive_attention_traffic(1, 1, 16384, 64))
    flash = roofline.flash_attention_traffic(1, 1, 16384, 64, block_q=128)
    # naive moves S and P twice each (4·T² values); flash reads k and v T/128 times (2·T·D·T/128 = T² values)
    assert flash.bytes == pytest.approx(naive.bytes / 4, rel=0.01)
    assert flash.intensity == pytest.approx(4 * naive.intensity, rel=0.01)
    wider = roofline.flash_attention_traffic(1, 1, 16384, 64, block_q=256)
    assert wider.bytes < flash.bytes  # bigger query tiles, fewer passes over k and v


def test_recompute_vs_store_by_hand():
    extra, saved = roofline.recompute_vs_store(1, 1, 3, 2, bytes_per_value=4)
    assert extra == 2 * 9 * 2 + 9  # q kᵀ again plus one exp per score
    assert saved == 2 * 9 * 4  # P written once, read once


def test_ridge_and_roofline():
    assert roofline.ridge_point(100.0, 4.0) == 25.0
    assert roofline.attainable(5.0, 100.0, 4.0) == 20.0  # memory-bound: intensity x bandwidth
    assert roofline.attainable(50.0, 100.0, 4.0) == 100.0  # compute-bound: the flat roof
    step = roofline.Traffic("x", flops=100.0, bytes_read=30.0, bytes_written=10.0)
    assert step.time(peak_flops=10.0, bandwidth=1.0) == 40.0
    with pytest.raises(ValueError):
        roofline.ridge_point(0.0, 1.0)


@pytest.mark.parametrize("bad", [(0, 1, 4, 4, None), (1, 4, 4, 4, 3), (1, 1, 4, -1, None)])
def test_bad_shapes_are_one_line_errors(bad):
    B, H, T, D, kv = bad
    with pytest.raises(ValueError):
        roofline.naive_attention_traffic(B, H, T, D, kv_heads=kv)


def test_measurements_are_positive_finite_and_quick():
    start = time.perf_counter()
    flops = roofline.matmul_flops(n=128, repeats=2)
    bandwidth = roofline.memory_bandwidth(nbytes=1 << 22, repeats=2)
    assert math.isfinite(flops) and flops > 1e6  # even a slow CPU does a MFLOP/s
    assert math.isfinite(bandwidth) and bandwidth > 1e6
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError):
        roofline.memory_bandwidth(nbytes=0)
