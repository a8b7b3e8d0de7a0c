"""Pipeline parallelism: the model cut into stages by layers, the batch cut into micro-batches.

Stage s (one device) holds layers ``s·L/p ..`` and passes its output
activation to stage s+1; in the backward pass gradients flow the other way.
Run on one whole batch, only one stage would be busy at a time: with p
stages each device idles (p-1)/p of the time. Cutting the batch into m
micro-batches lets stage 0 start micro-batch 1 while stage 1 works on
micro-batch 0, like an assembly line. What remains idle is the time to
fill the pipeline at the start and to drain it at the end, the *bubble*:

    bubble fraction = (p - 1) / (m + p - 1)          (Huang et al. 2019, GPipe)

With p = 4 stages, m = 4 micro-batches leave 3/7 = 43% of the device time
idle, m = 32 leave 8.6%. The formula holds whether a backward costs one
forward or two: fill and drain each take (p-1) forward and backward steps.

Two schedules, with the same bubble:

- **GPipe** runs all m forwards, then all m backwards. Simple, but every
  stage holds the activations of all m micro-batches at once, so memory
  grows with m, the very number that shrinks the bubble.
- **1F1B** (PipeDream-Flush, Narayanan et al. 2021; Megatron-LM's default)
  runs p-s forwards on stage s to fill the pipeline, then alternates one
  forward and one backward, and drains the rest. A micro-batch's
  activations are freed by its backward soon after its forward, so stage s
  holds at most p-s micro-batches, whatever m is.

Interleaved 1F1B (several small stages per device) and zero-bubble schedules
(splitting the backward into its input and weight halves) shrink the bubble
further; they are not built here. A :class:`Schedule` is a grid: for each
stage and time slot, ``("F", m)``, ``("B", m)`` or ``None`` (idle).
:meth:`Schedule.check` verifies that it respects the dependencies, and the
bubble and memory are measured from the grid itself. :func:`run_pipeline`
executes a schedule for real, one rank per stage of a GPT
(:func:`pipeline_stage`), sending activations forward and gradients backward
with point-to-point messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llmbook.model import GPT

Cell = tuple[Literal["F", "B"], int] | None


@dataclass(frozen=True)
class Op:
    """One forward or backward of micro-batch ``micro`` on ``stage``, from slot ``start`` for ``duration`` slots."""

    stage: int
    kind: Literal["F", "B"]
    micro: int
    start: int
    duration: int

    @property
    def end(self) -> int:
        return self.start + self.duration


@dataclass
class Schedule:
    """A pipeline schedule: ``grid[stage][slot]`` is ``("F", m)``, ``("B", m)`` or ``None`` (idle).

    An operation that takes k slots fills k consecutive cells (a backward
    with ``backward_slots=2``). Stage 0 is the first stage (it reads the
    input); stage ``n_stages - 1`` computes the loss and starts the backward.
    """

    name: str
    n_stages: int
    n_micro: int
    grid: list[list[Cell]]
    backward_slots: int = 1  # a backward computes two gradients (inputs and weights): about 2 forwards in practice
    ops: list[Op] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.grid) != self.n_stages or len({len(row) for row in self.grid}) > 1:
            raise ValueError(f"the grid must have {self.n_stages} rows (one per stage), all of the same length")
        self.ops = self._read_ops()

    @property
    def n_slots(self) -> int:
        """The schedule's length in time slots (one forward of one micro-batch on one stage = 1 slot)."""
        return len(self.grid[0]) if self.grid else 0

    def _read_ops(self) -> list[Op]:
        """Cut every row into operations: runs of equal cells, each as long as its kind takes."""
        ops = []
        for stage, row in enumerate(self.grid):
            slot = 0
            while slot < len(row):
                cell = row[slot]
                if cell is None:
                    slot += 1
                    continue
                kind, micro = cell
                duration = 1 if kind == "F" else self.backward_slots
                if tuple(row[slot:slot + duration]) != (cell,) * duration:
                    raise ValueError(
                        f"stage {stage}: {kind}{micro} at slot {slot} must fill {duration} consecutive slots"
                    )
                ops.append(Op(stage, kind, micro, slot, duration))
                slot += duration
        return ops

    def check(self) -> None:
        """Raise ``ValueError`` (one line) unless every dependency holds and every F and B happens exactly once.

        F of micro-batch m on stage s needs stage s-1's F of m (its input);
        B of m on stage s needs stage s+1's B of m (the gradient of its
        output), and the last stage's B needs its own F (the loss); every
        stage's B of m comes after its F of m (the stored activations).
        """
        done: dict[tuple[int, str, int], Op] = {}
        for op in self.ops:
            key = (op.stage, op.kind, op.micro)
            if key in done:
                first = done[key].start
                raise ValueError(f"stage {op.stage} runs {op.kind}{op.micro} twice (slots {first} and {op.start})")
            if not 0 <= op.micro < self.n_micro:
                last = self.n_micro - 1
                raise ValueError(f"stage {op.stage} runs {op.kind}{op.micro}, but micro-batches are 0..{last}")
            done[key] = op
        for stage in range(self.n_stages):
            for kind in ("F", "B"):
                for micro in range(self.n_micro):
                    if (stage, kind, micro) not in done:
                        raise ValueError(f"stage {stage} never runs {kind}{micro}")
        for op in self.ops:
            if op.kind == "F":
                needs = [(op.stage - 1, "F")] if op.stage > 0 else []
            else:
                needs = [(op.stage, "F")] + ([(op.stage + 1, "B")] if op.stage < self.n_stages - 1 else [])
            for stage, kind in needs:
                before = done[(stage, kind, op.micro)]
                if before.end > op.start:
                    raise ValueError(
                        f"stage {op.stage} starts {op.kind}{op.micro} at slot {op.start}, before stage {stage} "
                        f"finishes {kind}{op.micro} (slot {before.end})"
                    )

    def bubble_fraction(self) -> float:
        """The idle share of all stages' time slots, counted from the grid."""
        idle = sum(cell is None for row in self.grid for cell in row)
        return idle / (self.n_stages * self.n_slots)

    def in_flight(self) -> list[list[int]]:
        """Per stage and slot: micro-batches whose activations the stage holds (F started, B not yet finished)."""
        counts = []
        for stage in range(self.n_stages):
            row = [0] * self.n_slots
            for op in self.ops:
                if op.stage == stage and op.kind == "F":
                    freed = next(b.end for b in self.ops if b.stage == stage and b.kind == "B" and b.micro == op.micro)
                    for slot in range(op.start, freed):
                        row[slot] += 1
            counts.append(row)
        return counts

    def peak_in_flight(self) -> list[int]:
        """Per stage, the most micro-batches' activations held at once: GPipe m, 1F1B at most p - stage."""
        return [max(row, default=0) for row in self.in_flight()]

    def to_text(self) -> str:
        """The grid as text, one row per stage: ``F0 F1 .. B0`` with ``.`` for idle slots."""
        width = len(str(self.n_micro - 1)) + 1
        rows = []
        for stage, row in enumerate(self.grid):
            cells = ["." * width if c is None else f"{c[0]}{c[1]}".ljust(width) for c in row]
            rows.append(f"stage {stage}: " + " ".join(cells))
        return "\n".join(rows)


def bubble_fraction(n_stages: int, n_micro: int) -> float:
    """The idle share of a GPipe or 1F1B pipeline: ``(p - 1) / (m + p - 1)``.

    Each stage is busy m·(F + B) slots out of (m + p - 1)·(F + B): it waits
    p-1 forwards for the pipeline to fill and p-1 backwards for it to drain.

    >>> bubble_fraction(4, 4), round(bubble_fraction(4, 32), 4)
    (0.42857142857142855, 0.0857)
    """
    _check_sizes(n_stages, n_micro)
    return (n_stages - 1) / (n_micro + n_stages - 1)


def _check_sizes(n_stages: int, n_micro: int) -> None:
    for name, n in (("n_stages", n_stages), ("n_micro", n_micro)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")


def _simulate(name: str, orders: list[list[tuple[str, int]]], n_micro: int, backward_slots: int) -> Schedule:
    """Place each stage's operations, in the given order, as early as their dependencies allow.

    A stage starts its next operation when it is free and the operation's
    inputs exist: the previous stage's forward (or the next stage's
    backward) of the same micro-batch has finished.
    """
    if isinstance(backward_slots, bool) or not isinstance(backward_slots, int) or backward_slots < 1:
        raise ValueError(f"backward_slots must be a positive integer (slots per backward), got {backward_slots!r}")
    p = len(orders)
    end: dict[tuple[int, str, int], int] = {}
    free = [0] * p  # the slot at which each stage is free again
    position = [0] * p  # the next operation of each stage's order
    placed: list[Op] = []
    while any(position[s] < len(orders[s]) for s in range(p)):
        progress = False
        for s in range(p):
            if position[s] == len(orders[s]):
                continue
            kind, micro = orders[s][position[s]]
            if kind == "F":
                needs = [(s - 1, "F", micro)] if s > 0 else []
            else:
                needs = [(s, "F", micro)] + ([(s + 1, "B", micro)] if s < p - 1 else [])
            if any(n not in end for n in needs):
                continue  # an input is not computed yet: try the other stages first
            start = max([free[s], *(end[n] for n in needs)])
            duration = 1 if kind == "F" else backward_slots
            placed.append(Op(s, kind, micro, start, duration))
            end[(s, kind, micro)] = free[s] = start + duration
            position[s] += 1
            progress = True
        if not progress:
            raise ValueError("the stages' operation orders wait on each other forever (a deadlock)")
    grid: list[list[Cell]] = [[None] * max(free) for _ in range(p)]
    for op in placed:
        for slot in range(op.start, op.end):
            grid[op.stage][slot] = (op.kind, op.micro)
    return Schedule(name, p, n_micro, grid, backward_slots)


def gpipe_schedule(n_stages: int, n_micro: int, backward_slots: int = 1) -> Schedule:
    """GPipe: every stage runs the forwards of all micro-batches, then their backwards.

    >>> print(gpipe_schedule(2, 3).to_text())
    stage 0: F0 F1 F2 .. .. B0 B1 B2
    stage 1: .. F0 F1 F2 B0 B1 B2 ..
    """
    _check_sizes(n_stages, n_micro)
    order = [("F", m) for m in range(n_micro)] + [("B", m) for m in range(n_micro)]
    return _simulate("GPipe", [order] * n_stages, n_micro, backward_slots)


def one_f_one_b_schedule(n_stages: int, n_micro: int, backward_slots: int = 1) -> Schedule:
    """1F1B: stage s runs ``min(p - s - 1, m)`` warm-up forwards, then alternates forward and backward, then drains.

    >>> print(one_f_one_b_schedule(2, 3).to_text())
    stage 0: F0 F1 .. B0 F2 B1 .. B2
    stage 1: .. F0 B0 F1 B1 F2 B2 ..
    """
    _check_sizes(n_stages, n_micro)
    orders = []
    for s in range(n_stages):
        warmup = min(n_stages - s - 1, n_micro)
        order = [("F", m) for m in range(warmup)]
        for i in range(n_micro - warmup):  # steady state: one forward, then the oldest backward
            order += [("F", warmup + i), ("B", i)]
        order += [("B", m) for m in range(n_micro - warmup, n_micro)]  # cool-down
        orders.append(order)
    return _simulate("1F1B", orders, n_micro, backward_slots)


COLORS = {"F": "#7aa6d6", "B": "#e8a25c"}  # forward blue, backward orange; idle slots stay white


def plot_schedule(schedule: Schedule, ax=None):
    """Draw the grid: one row per stage (stage 0 on top), F and B cells colored with their micro-batch number."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.35 * schedule.n_slots), 0.5 * schedule.n_stages + 1.0))
    for op in schedule.ops:
        y = schedule.n_stages - 1 - op.stage
        ax.add_patch(Rectangle((op.start, y), op.duration, 1, facecolor=COLORS[op.kind], edgecolor="black", lw=0.6))
        ax.text(op.start + op.duration / 2, y + 0.5, str(op.micro), ha="center", va="center", fontsize=8)
    ax.set_xlim(0, schedule.n_slots)
    ax.set_ylim(0, schedule.n_stages)
    ax.set_yticks([schedule.n_stages - 1 - s + 0.5 for s in range(schedule.n_stages)])
    ax.set_yticklabels([f"stage {s}" for s in range(schedule.n_stages)])
    ax.set_xlabel("time slot (one forward of one micro-batch)")
    ax.set_title(f"{schedule.name}: p={schedule.n_stages}, m={schedule.n_micro}, "
                 f"bubble {schedule.bubble_fraction():.0%}, peak activations {max(schedule.peak_in_flight())}")
    ax.legend(handles=[Patch(facecolor=COLORS["F"], label="forward"), Patch(facecolor=COLORS["B"], label="backward"),
                       Patch(facecolor="white", edgecolor="black", label="idle")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return ax


# --- Running a schedule: one rank per stage, activations forward and gradients backward -------------------------------


class GPTStage(nn.Module):
    """One stage of a GPT: a run of its blocks, with the embeddings on the first stage and the LM head on the last.

    Blocks are dealt out as evenly as possible (4 blocks, 3 stages: 1, 2, 1).
    It holds references to the model's own modules, so the gradients land in
    the model's parameters; the parameters of other stages get none.
    """

    def __init__(self, model: GPT, stage: int, n_stages: int):
        super().__init__()
        n_layers = model.cfg.n_layers
        if not 1 <= n_stages <= n_layers:
            raise ValueError(f"n_stages={n_stages} must be between 1 and the model's n_layers={n_layers}")
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage={stage} must be in 0..{n_stages - 1}")
        self.cfg, self.stage, self.n_stages = model.cfg, stage, n_stages
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        bounds = [round(i * n_layers / n_stages) for i in range(n_stages + 1)]  # as even as possible
        self.first_block = bounds[stage]
        self.blocks = nn.ModuleList(model.blocks[bounds[stage]:bounds[stage + 1]])
        if self.is_first:
            self.tok_emb, self.drop = model.tok_emb, model.drop
            self.pos_emb = model.pos_emb if model.cfg.positions == "learned" else None
        if self.is_last:
            self.norm_f, self.lm_head = model.norm_f, model.lm_head

    def forward(self, x: Tensor) -> Tensor:
        """Token ids ``(b, T)`` on the first stage, else the activation ``(b, T, C)``; logits on the last stage."""
        if self.is_first:
            idx = x
            x = self.tok_emb(idx)  # (b, T, C)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
            x = self.drop(x)
        for block in self.blocks:
            x = block(x)  # (b, T, C)
        if self.is_last:
            x = self.lm_head(self.norm_f(x))  # (b, T, vocab_size)
        return x


def pipeline_stage(model: GPT, rank: int | None = None, n_stages: int | None = None) -> GPTStage:
    """This rank's stage of ``model``: rank r of p runs stage r (default: this process's rank and world size)."""
    rank = dist.get_rank() if rank is None else rank
    n_stages = dist.get_world_size() if n_stages is None else n_stages
    return GPTStage(model, rank, n_stages)


@dataclass
class PipelineResult:
    """What one pipelined forward and backward gave this rank."""

    loss: float  # the batch's mean loss (sent from the last stage to every rank)
    peak_stored: int  # the most micro-batches whose activations this stage held at once, as counted while running
    messages_sent: int  # activations and gradients this rank sent


def run_pipeline(stage: GPTStage, schedule: Schedule, idx: Tensor, targets: Tensor) -> PipelineResult:
    """Run one forward and backward of the batch ``(B, T)`` in ``n_micro`` micro-batches, in the schedule's order.

    Each rank follows its own row of the grid. A forward receives its input
    activation from the previous stage (``dist.recv`` waits until it has
    come) and sends its output on; a backward receives the gradient with
    respect to its output from the next stage and sends the gradient with
    respect to its input back. The waiting enforces the dependencies that
    :meth:`Schedule.check` verifies; the slots of the grid are only the order.
    Sends are asynchronous (``isend``): with blocking sends two stages that
    both send first would wait for each other forever (1F1B does that).
    Gradients accumulate in the parameters: afterwards they are those of the
    whole batch's mean loss, as in one process. A tied embedding (GPT-2) lives
    on the first and the last stage; its two gradient parts are summed.
    """
    s, p, m = stage.stage, stage.n_stages, schedule.n_micro
    if schedule.n_stages != p:
        raise ValueError(f"the schedule has {schedule.n_stages} stages, the model was cut into {p}")
    if idx.shape[0] % m:
        raise ValueError(f"the batch of {idx.shape[0]} rows does not split into n_micro={m} equal micro-batches")
    micro_idx, micro_targets = idx.chunk(m), targets.chunk(m)
    shape = (idx.shape[0] // m, idx.shape[1], stage.cfg.d_model)  # an activation between stages
    device = next(stage.parameters()).device
    stored: dict[int, tuple[Tensor, Tensor]] = {}  # micro-batch -> (input, output): what its backward needs
    loss, peak, sends = torch.zeros((), device=device), 0, []
    for op in sorted((o for o in schedule.ops if o.stage == s), key=lambda o: o.start):
        if op.kind == "F":
            if stage.is_first:
                x = micro_idx[op.micro]
            else:
                x = torch.empty(shape, device=device)
                dist.recv(x, src=s - 1)  # the previous stage's output of this micro-batch
                x.requires_grad_(True)
            out = stage(x)
            if stage.is_last:  # the mean over micro-batches of their mean losses is the batch's mean loss
                out = F.cross_entropy(out.flatten(0, 1).float(), micro_targets[op.micro].flatten()) / m
                loss += out.detach()
            else:
                sends.append((dist.isend(out.detach(), dst=s + 1), out))
            stored[op.micro] = (x, out)
            peak = max(peak, len(stored))
        else:
            x, out = stored.pop(op.micro)  # after this backward its activations can be freed
            if stage.is_last:
                out.backward()
            else:
                grad = torch.empty_like(out)
                dist.recv(grad, src=s + 1)  # dL/d(output), computed by the next stage
                out.backward(grad)
            if not stage.is_first:
                sends.append((dist.isend(x.grad, dst=s - 1), x.grad))
    for work, _ in sends:
        work.wait()
    if p > 1 and stage.cfg.tied_embeddings:
        _sum_tied_embedding_grad(stage)
    dist.all_reduce(loss)  # only the last stage's is not zero
    return PipelineResult(float(loss), peak, len(sends))


def _sum_tied_embedding_grad(stage: GPTStage) -> None:
    """Add the tied matrix's gradient from the first stage (embedding) and the last (LM head); collective.

    Megatron all-reduces it in a group of just those two stages; here every
    rank joins one all-reduce and the middle stages add zeros.
    """
    weight = stage.tok_emb.weight if stage.is_first else stage.lm_head.weight if stage.is_last else None
    if weight is None:
        grad = torch.zeros(stage.cfg.vocab_size, stage.cfg.d_model, device=next(stage.parameters()).device)
    else:
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    dist.all_reduce(grad)
    if weight is not None:
        weight.grad = grad
