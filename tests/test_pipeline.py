"""Pipeline schedules: the bubble counted on the grid equals (p-1)/(m+p-1); dependencies; activations held;
both schedules run for real over 2 and 3 ranks equal one process."""

from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from llmbook.distributed.launcher import spawn
from llmbook.distributed.pipeline import (
    GPTStage,
    Schedule,
    bubble_fraction,
    gpipe_schedule,
    one_f_one_b_schedule,
    pipeline_stage,
    plot_schedule,
    run_pipeline,
)
from llmbook.model import GPT, ModelConfig

SIZES = [(1, 1), (1, 4), (2, 1), (2, 3), (3, 2), (4, 4), (4, 8), (8, 3), (5, 16)]
SCHEDULES = [gpipe_schedule, one_f_one_b_schedule]


@pytest.mark.parametrize("make", SCHEDULES)
@pytest.mark.parametrize("backward_slots", [1, 2])
@pytest.mark.parametrize(("p", "m"), SIZES)
def test_bubble_from_grid_equals_formula(make, backward_slots, p, m):
    s = make(p, m, backward_slots=backward_slots)
    s.check()
    assert s.bubble_fraction() == pytest.approx(bubble_fraction(p, m), abs=1e-12)
    assert s.n_slots == (m + p - 1) * (1 + backward_slots)  # fill + m micro-batches + drain
    busy = [sum(c is not None for c in row) for row in s.grid]
    assert busy == [m * (1 + backward_slots)] * p  # every stage does all its work, and only that


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_peak_activations_gpipe_m_one_f_one_b_at_most_p(p, m):
    assert gpipe_schedule(p, m).peak_in_flight() == [m] * p
    assert one_f_one_b_schedule(p, m).peak_in_flight() == [min(p - s, m) for s in range(p)]
    assert one_f_one_b_schedule(p, m, backward_slots=2).peak_in_flight() == [min(p - s, m) for s in range(p)]


def test_small_grids_and_text():
    assert gpipe_schedule(2, 2).grid == [
        [("F", 0), ("F", 1), None, None, ("B", 0), ("B", 1)],
        [None, ("F", 0), ("F", 1), ("B", 0), ("B", 1), None],
    ]
    assert one_f_one_b_schedule(2, 3).to_text().splitlines()[0] == "stage 0: F0 F1 .. B0 F2 B1 .. B2"
    assert bubble_fraction(4, 4) == 3 / 7 and bubble_fraction(1, 5) == 0.0


def test_check_catches_broken_schedules():
    good = gpipe_schedule(2, 2).grid
    early = [row[:] for row in good]
    early[1][0], early[1][1] = ("F", 0), None  # stage 1 starts micro-batch 0 before stage 0 has sent it
    with pytest.raises(ValueError, match="before stage 0 finishes F0"):
        Schedule("broken", 2, 2, early).check()
    backward_first = [row[:] for row in good]
    backward_first[0][4], backward_first[0][5] = ("B", 1), ("B", 0)
    backward_first[1][3], backward_first[1][4] = ("B", 1), ("B", 0)
    Schedule("any backward order", 2, 2, backward_first).check()  # allowed: each B still follows its F
    swapped = [row[:] for row in good]
    swapped[0][4], swapped[1][3] = ("B", 1), ("B", 1)  # stage 0 does B1 before stage 1 has sent it
    with pytest.raises(ValueError, match="twice|never runs|before"):
        Schedule("broken", 2, 2, swapped).check()
    missing = [row[:] for row in good]
    missing[0][5] = None
    with pytest.raises(ValueError, match="stage 0 never runs B1"):
        Schedule("broken", 2, 2, missing).check()
    twice = [row[:] + [("F", 0)] for row in good]
    with pytest.raises(ValueError, match="runs F0 twice"):
        Schedule("broken", 2, 2, twice).check()
    with pytest.raises(ValueError, match="must fill 2 consecutive slots"):
        Schedule("broken", 2, 2, good, backward_slots=2)


def test_bad_sizes_are_one_line_errors():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            bubble_fraction(bad, 4)
        with pytest.raises(ValueError, match="positive integer"):
            gpipe_schedule(4, bad)
    with pytest.raises(ValueError, match="backward_slots"):
        one_f_one_b_schedule(2, 2, backward_slots=0)


def test_plot_two_panels():
    axes = Figure(figsize=(8, 4)).subplots(2, 1)  # no pyplot, no backend: the chapter's two-panel figure
    for ax, make in zip(axes, SCHEDULES, strict=True):
        s = make(4, 8, backward_slots=2)
        assert plot_schedule(s, ax=ax) is ax
        assert len(ax.patches) == len(s.ops) == 2 * 4 * 8  # one rectangle per F and per B
        assert len(ax.texts) == len(s.ops)
    ax = plot_schedule(gpipe_schedule(2, 2))  # makes its own figure
    plt.close(ax.figure)


# --- Running the schedules for real: one rank per stage ---------------------------------------------------------------

CONFIGS = {
    "gpt": ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=3, n_heads=4),  # tied embeddings
    "llama": ModelConfig.preset("llama-tiny", vocab_size=64, context_length=16, n_layers=3),
}
N_MICRO = 4


def _pipeline_rank(rank: int, world_size: int, cfg: ModelConfig) -> dict:
    """The unsharded model's loss and gradients against GPipe and 1F1B over ``world_size`` stages."""
    torch.manual_seed(0)
    base = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2 * N_MICRO, 17), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(base)
    _, ref_loss = ref(x[:, :-1], x[:, 1:])
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    out = {}
    for make in SCHEDULES:
        schedule = make(world_size, N_MICRO)
        model = copy.deepcopy(base)
        result = run_pipeline(pipeline_stage(model), schedule, x[:, :-1], x[:, 1:])
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        out[schedule.name] = dict(
            loss=abs(result.loss - ref_loss.item()),
            grads=max((g - ref_grads[n].grad).abs().max().item() for n, g in grads.items()),
            names=sorted(grads), peak=result.peak_stored, expected_peak=schedule.peak_in_flight()[rank],
        )
    return out


@pytest.mark.parametrize(("name", "world_size"), [("gpt", 3), ("llama", 2)])
def test_run_pipeline_equals_one_process(name, world_size):
    cfg = CONFIGS[name]
    results = spawn(_pipeline_rank, world_size, cfg)
    all_names = {n for n, _ in GPT(cfg).named_parameters()}
    for schedule in ("GPipe", "1F1B"):
        per_rank = [r[schedule] for r in results]
        for r in per_rank:
            assert r["loss"] < 1e-6 and r["grads"] < 1e-6
            assert r["peak"] == r["expected_peak"]  # the activations held while running: what the grid says
        # every parameter got its gradient on some stage; only a tied embedding lives on two (first and last)
        names = [n for r in per_rank for n in r["names"]]
        assert set(names) == all_names and len(names) == len(all_names) + cfg.tied_embeddings
    assert [r["GPipe"]["peak"] for r in results] == [N_MICRO] * world_size
    assert [r["1F1B"]["peak"] for r in results] == [world_size - s for s in range(world_size)]


def test_run_pipeline_errors():
    model = GPT(CONFIGS["llama"])
    with pytest.raises(ValueError, match="n_stages=4 must be between 1 and the model's n_layers=3"):
        GPTStage(model, 0, 4)
    stage = GPTStage(model, 0, 1)
    x = torch.zeros(3, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="does not split into n_micro=2"):
        run_pipeline(stage, gpipe_schedule(1, 2), x, x)
    with pytest.raises(ValueError, match="the schedule has 2 stages"):
        run_pipeline(stage, gpipe_schedule(2, 3), x, x)
