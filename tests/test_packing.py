"""Packing: a packed example's per-token losses equal its unpacked ones, for GPT-2 and Llama style models."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

from llmbook.model import GPT
from llmbook.posttrain import packing as packing_module
from llmbook.posttrain.collate import collate
from llmbook.posttrain.masking import IGNORE_INDEX, Example
from llmbook.posttrain.packing import block_diagonal_causal_mask, first_fit, pack, packing_efficiency

CONTEXT = 32


def random_examples(n: int, generator: torch.Generator) -> list[Example]:
    """Examples of 3..20 tokens whose last part is a 'response' (labels), the rest -100."""
    examples = []
    for _ in range(n):
        length = int(torch.randint(3, 21, (1,), generator=generator))
        prompt = int(torch.randint(1, length, (1,), generator=generator))
        ids = torch.randint(1, 256, (length,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def test_first_fit_and_the_mask():
    rows = first_fit([3, 5, 2, 4, 1], capacity=6)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4] and len(rows) == 3
    assert first_fit([3, 5, 2, 4, 1], capacity=6, decreasing=False) == [[0, 2, 4], [1], [3]]
    with pytest.raises(ValueError, match=r"example 1 has 7 tokens; packing needs 1..6 .*truncate=True"):
        first_fit([3, 7], capacity=6)
    mask = block_diagonal_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0]
    assert mask.long().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1],
    ]


def test_pack_layout():
    a, b = Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [-100, 9])
    x, y, mask, pos, seg, rows = pack([a, b], context_length=6, pad_id=0)
    assert rows == [[0, 1]]
    assert x.tolist() == [[5, 6, 7, 8, 9, 0]]
    assert y.tolist() == [[6, 7, -100, 9, -100, -100]]  # a's last token does not predict b's first
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]] and seg.tolist() == [[0, 0, 0, 1, 1, -1]]
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].any(dim=-1).all()  # every query, pads too, attends to something: no 0/0 softmax


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])  # learned positions, and RoPE
def test_packed_losses_equal_unpacked(seed_and_one_thread, preset):
    model = GPT.from_preset(preset, context_length=CONTEXT).eval()
    examples = random_examples(12, torch.Generator().manual_seed(0))
    packed = pack(examples, CONTEXT, pad_id=0)
    assert len(packed.rows) < len(examples)  # it did pack
    logits, loss = model(packed.x, packed.y, positions=packed.positions, mask=packed.mask)
    per_token = F.cross_entropy(logits.transpose(1, 2), packed.y, reduction="none")  # (B, T)

    # each example alone: the same loss at every one of its tokens
    for b, row in enumerate(packed.rows):
        at = 0
        for i in row:
            n = len(examples[i])
            x, y, _, _ = collate([examples[i]], pad_id=0)
            alone = F.cross_entropy(model(x)[0].transpose(1, 2), y, reduction="none")[0]
            assert torch.allclose(per_token[b, at:at + n], alone, atol=1e-5), (b, i)
            at += n

    # the mean response loss of the packed batch equals that of the padded (unpacked) batch
    x, y, mask, pos = collate(examples, pad_id=0)
    _, padded_loss = model(x, y, positions=pos, mask=mask)
    assert (packed.y != IGNORE_INDEX).sum() == (y != IGNORE_INDEX).sum()
    assert torch.allclose(loss, padded_loss, atol=1e-6)

    # and both halves of the recipe matter: plain causal attention lets examples read each other,
    # and (learned positions) without the reset an example gets other position embeddings
    _, causal_only = model(packed.x, packed.y, positions=packed.positions)
    assert (causal_only - loss).abs() > 1e-4
    if preset == "gpt-tiny":
        _, no_reset = model(packed.x, packed.y, mask=packed.mask)
        assert (no_reset - loss).abs() > 1e-4


def test_packing_efficiency():
    lengths = [len(e) for e in random_examples(200, torch.Generator().manual_seed(1))]
    packed, padded = packing_efficiency(lengths, 64)
    assert padded < 0.7 < 0.95 < packed <= 1.0


def test_module_doctests():
    assert doctest.testmod(packing_module).failed == 0
