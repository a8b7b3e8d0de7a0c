"""FSDP (ZeRO stage 3) from scratch: each rank keeps 1/p of the *weights* too, gathered only while a block runs.

ZeRO-1 and ZeRO-2 (``llmbook.distributed.zero``) shard what the optimizer
needs, but every rank still holds all the weights: 4 bytes per parameter in
fp32, and a 70B model's 140 GB of bf16 weights fit on no single GPU. Stage 3
notices that a layer's weights are needed only while that layer computes:

    forward of block i:   all-gather block i's weights, compute, free them
    backward of block i:  all-gather block i's weights again, compute the gradients,
                          reduce-scatter the gradients (each rank keeps the average of its slice), free all of it

So at any moment a rank holds its 1/p shard of everything plus the full
weights of one block (and, here, of the *root*: the embeddings, the final norm
and the output head, small next to the blocks of a big model). The price is
communication: an all-gather in forward, another in backward and a
reduce-scatter, 3·(p-1)/p·N bytes per rank against the 2·(p-1)/p·N of an
all-reduce (1.5 x DDP).

How it is built (the design of PyTorch's first FSDP, ``FlatParameter``):

- **Units and flat shards.** Each *unit* (every ``Block``, plus the root for
  the remaining parameters) has its parameters laid end to end in one flat
  buffer, padded to a multiple of p and cut into p equal pieces; the rank keeps
  its piece as an ``nn.Parameter``. So ``FullyShardedModel.parameters()`` are
  the shards, and any optimizer built over them (the Chapter 7 ``AdamW``, which
  is elementwise) holds 1/p of the states. Tied weights (GPT-2's ``lm_head`` is
  ``tok_emb``) are one tensor stored once, so both must lie in the same unit.
- **Gather as an autograd function.** ``_GatherParams`` all-gathers the shard
  into the full flat buffer in forward; its *backward* receives the gradient of
  the whole buffer, summed by autograd over every use of every weight, which is
  exactly the moment the unit's gradients are complete: it reduce-scatters them
  into the shard's gradient and frees the buffer. The module's weights are
  ``torch.split`` views of the buffer, so autograd carries their gradients
  back into it without copies.
- **Freeing what autograd saved.** Autograd keeps the weights a matmul needs
  for its backward; they are views of the full buffer. So after forward the
  buffer's *storage* is resized to 0 bytes (the tensors survive, their memory
  does not), and a hook on the unit's output, which fires when backward reaches
  the unit, resizes it back and all-gathers into it again. Writes go through
  ``.data``, so autograd's version counters do not see them.

What PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, the engine the
trainer uses) does beyond this teaching version:

- **per-parameter sharding with DTensor**: each parameter is its own sharded
  ``DTensor`` (dim-0 sharded), not a slice of a flat buffer, so parameter
  names, shapes, ``param_groups`` (weight decay on matrices only) and state
  dicts stay the model's own, and frozen and trainable parameters can mix;
- **prefetching**: the all-gather of the next block is issued while the
  current one computes (in forward and backward), on separate CUDA streams, so
  communication hides behind compute; here every collective blocks;
- **a mixed precision policy** (``MixedPrecisionPolicy``): gathers bf16 weights
  from fp32 shards and can reduce gradients in fp32;
- **reshard_after_forward**: ``False`` keeps a unit gathered between forward and
  backward (no second all-gather, more memory), an int reshards to a smaller
  group; here non-root units always reshard and the root never does;
- activation checkpointing, CPU offload, meta-device initialisation (the full
  model never exists on one rank), ``no_sync``-style gradient accumulation
  without reduce-scatter, and several forwards per backward.

This version assumes that every unit runs exactly once per forward and once
per backward, that all its parameters are trained, and that activation
checkpointing is off (a block recomputed inside backward would gather weights
that its own post-forward hook frees again; FSDP2 handles this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llmbook.model import Block


@dataclass
class _FlatParam:
    """One parameter's place in its unit's flat buffer, and every ``(module, attribute)`` that names it."""

    shape: torch.Size
    numel: int
    owners: list[tuple[nn.Module, str, str]] = field(default_factory=list)  # (module, attr, qualified name)


@dataclass
class _Unit:
    """A group of parameters gathered and freed together: one block, or the root's leftovers."""

    name: str  # "blocks.0", ... or "" for the root
    params: list[_FlatParam]
    numel: int  # real elements, before padding
    padded: int  # numel rounded up to a multiple of world_size
    shard: nn.Parameter  # (padded / world_size,): this rank's piece, the only copy it keeps

    @property
    def full_bytes(self) -> int:
        return self.padded * self.shard.element_size()


class _Slot:
    """The full buffer of one unit for one forward: gathered, freed, gathered again for backward, freed."""

    def __init__(self, owner: FullyShardedModel, unit: _Unit):
        self.owner, self.unit = owner, unit
        self.tensor: Tensor | None = None  # the autograd output of _GatherParams

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.untyped_storage().nbytes()

    def regather(self, phase: str) -> None:
        """Refill a freed buffer (its storage resized to 0) with the ranks' shards."""
        if self.tensor is not None and self.nbytes == 0:
            self.tensor.untyped_storage().resize_(self.unit.full_bytes)
            self.owner._all_gather(self.tensor.data, self.unit)  # .data: autograd's version counter stays
            self.owner._track(self, phase)

    def free(self) -> None:
        """Give the buffer's memory back; tensors that view it (saved by autograd) stay valid objects."""
        if self.tensor is not None:
            self.tensor.untyped_storage().resize_(0)
        if self in self.owner._live:
            self.owner._live.discard(self)
            self.owner._record("free", self.unit)


class _GatherParams(torch.autograd.Function):
    """Forward: all-gather a unit's shards into its full flat buffer. Backward: reduce-scatter its gradient."""

    @staticmethod
    def forward(ctx, shard: Tensor, slot: _Slot) -> Tensor:
        unit = slot.unit
        full = torch.empty(unit.padded, dtype=shard.dtype, device=shard.device)  # (padded,)
        slot.owner._all_gather(full, unit)
        ctx.slot = slot
        return full

    @staticmethod
    def backward(ctx, grad_full: Tensor) -> tuple[Tensor, None]:
        # autograd calls this once, when every use of every weight of the unit has added its gradient
        slot = ctx.slot
        owner, unit = slot.owner, slot.unit
        grad_full = grad_full.contiguous() / owner.world_size  # (padded,): divide first, sum of p ranks = mean
        grad_shard = torch.empty_like(unit.shard)  # (padded / p,)
        dist.reduce_scatter(grad_shard, list(grad_full.chunk(owner.world_size)), group=owner.group)
        del grad_full  # the full gradient goes now, before the next unit's backward
        slot.free()  # and so do the full weights
        slot.tensor, ctx.slot = None, None  # break the slot -> tensor -> graph -> ctx -> slot cycle
        return grad_shard, None  # autograd adds it into unit.shard.grad (accumulation works as usual)


class FullyShardedModel(nn.Module):
    """Wraps ``module`` so each rank stores 1/p of every unit's parameters; use it like the model itself.

    Build it on every rank (under ``torchrun`` or ``spawn``) from the same
    model, then build the optimizer over *its* parameters, the flat shards::

        model = FullyShardedModel(GPT(cfg))          # every Block is a unit, the rest is the root unit
        opt = AdamW(model.parameters(), lr=1e-3)     # states for 1/p of the model
        _, loss = model(x, y); loss.backward(); opt.step(); opt.zero_grad()

    Every rank starts from rank 0's weights. One optimizer group covers each
    shard, so weight decay applies to all parameters alike (FSDP2's
    per-parameter sharding keeps ``param_groups`` working). The wrapped
    module's own parameters are gone: they exist only inside a forward or
    backward, as views of a gathered buffer. Use :meth:`full_state_dict` to
    save or to load the weights into an ordinary model.
    """

    def __init__(self, module: nn.Module, unit_types: tuple[type[nn.Module], ...] = (Block,),
                 group: dist.ProcessGroup | None = None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("FullyShardedModel needs a process group: run it under torchrun or llmbook's spawn")
        self.module, self.group = module, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self._state_keys = list(module.state_dict().keys())  # the unsharded model's keys, in its order
        self._live: set[_Slot] = set()  # slots whose full buffer currently holds memory
        self.peak_gathered_bytes = {"forward": 0, "backward": 0}  # most full-buffer bytes alive at once
        self.gathered_units_at_peak = {"forward": [], "backward": []}
        self.trace: list[tuple[str, str, int]] | None = None  # set to [] to record (event, unit, bytes gathered)

        # which unit owns each submodule: a unit's whole subtree, the root everything else
        unit_modules = [(n, m) for n, m in module.named_modules() if m is not module and isinstance(m, unit_types)]
        owner = {}
        for ui, (name, um) in enumerate(unit_modules):
            for sub in um.modules():
                if id(sub) in owner:
                    raise ValueError(f"unit {name!r} lies inside another unit; nested units are not supported")
                owner[id(sub)] = ui
        groups: list[dict[int, _FlatParam]] = [{} for _ in range(len(unit_modules) + 1)]  # last: the root
        unit_of_param: dict[int, int] = {}
        tensors: dict[int, Tensor] = {}
        for qual, m in module.named_modules():
            ui = owner.get(id(m), len(unit_modules))
            for attr, p in m._parameters.items():
                if p is None:
                    continue
                if unit_of_param.setdefault(id(p), ui) != ui:  # a weight shared by two units cannot be gathered once
                    raise ValueError(f"parameter {qual}.{attr} is shared by two units; put its users in one unit")
                entry = groups[ui].setdefault(id(p), _FlatParam(p.shape, p.numel()))
                entry.owners.append((m, attr, f"{qual}.{attr}" if qual else attr))
                tensors[id(p)] = p
        names = [n for n, _ in unit_modules] + [""]

        self.units: list[_Unit] = []
        shards = []
        for name, entries in zip(names, groups, strict=True):
            if not entries:
                continue
            ps = [tensors[i] for i in entries]
            if len({(p.dtype, p.device) for p in ps}) > 1:
                raise ValueError(f"unit {name or 'root'!r} mixes dtypes or devices; FSDP flattens a unit into one")
            numel = sum(p.numel() for p in ps)
            padded = -(-numel // self.world_size) * self.world_size  # round up to a multiple of p
            flat = torch.zeros(padded, dtype=ps[0].dtype, device=ps[0].device)  # (padded,)
            with torch.no_grad():
                torch.cat([p.detach().reshape(-1) for p in ps], out=flat[:numel])
                dist.broadcast(flat, src=0, group=group)  # every rank starts from rank 0's weights
            size = padded // self.world_size
            shard = nn.Parameter(flat[self.rank * size:(self.rank + 1) * size].clone())  # keep 1/p, drop flat
            unit = _Unit(name, list(entries.values()), numel, padded, shard)
            for entry in unit.params:
                for m, attr, _ in entry.owners:
                    del m._parameters[attr]  # the model no longer owns its weights; views appear in forward
            self.units.append(unit)
            shards.append(shard)
        self.shards = nn.ParameterList(shards)  # what .parameters() yields: the optimizer sees only shards
        if not self.units:
            raise ValueError("FullyShardedModel: the module has no parameters to shard")
        self.root = self.units[-1] if self.units[-1].name == "" else None
        by_name = dict(unit_modules)
        for unit in self.units:
            if unit is not self.root:
                by_name[unit.name].register_forward_pre_hook(partial(self._pre_forward, unit))
                by_name[unit.name].register_forward_hook(partial(self._post_forward, unit))

    # ------------------------------------------------------------------ collectives and bookkeeping

    def _all_gather(self, full: Tensor, unit: _Unit) -> None:
        """Every rank's shard into ``full`` (padded,), in rank order."""
        dist.all_gather(list(full.chunk(self.world_size)), unit.shard.detach(), group=self.group)

    def _track(self, slot: _Slot, phase: str) -> None:
        """Remember the most bytes of full buffers alive at once, and which units they were."""
        self._live.add(slot)
        self._record(f"gather for {phase}", slot.unit)
        alive = self.gathered_bytes()
        if alive > self.peak_gathered_bytes[phase]:
            self.peak_gathered_bytes[phase] = alive
            self.gathered_units_at_peak[phase] = sorted(s.unit.name for s in self._live)

    def _record(self, event: str, unit: _Unit) -> None:
        if self.trace is not None:  # e.g. ("gather for forward", "blocks.0", 61312): a timeline for a figure
            self.trace.append((event, unit.name or "root", self.gathered_bytes()))

    def gathered_bytes(self) -> int:
        """Bytes of full (unsharded) parameter buffers alive on this rank right now."""
        return sum(s.nbytes for s in self._live)

    def gathered_units(self) -> list[str]:
        """Names of the units whose full parameters are materialised now (``""`` is the root)."""
        return sorted(s.unit.name for s in self._live if s.nbytes)

    # ------------------------------------------------------------------ forward and backward

    def _gather(self, unit: _Unit) -> _Slot:
        """All-gather ``unit`` and point its modules' parameter names at views of the full buffer."""
        slot = _Slot(self, unit)
        full = _GatherParams.apply(unit.shard, slot)  # (padded,), differentiable back to the shard
        slot.tensor = full
        self._track(slot, "forward")
        pieces = torch.split(full, [e.numel for e in unit.params] + [unit.padded - unit.numel])
        for entry, piece in zip(unit.params, pieces, strict=False):  # the last piece is the padding
            view = piece.view(entry.shape)
            for m, attr, _ in entry.owners:
                setattr(m, attr, view)  # tied owners get the same view, so their gradients add up
        return slot

    def _drop_views(self, unit: _Unit) -> None:
        """Remove the views from the modules, so no one reads a buffer whose memory is gone."""
        for entry in unit.params:
            for m, attr, _ in entry.owners:
                m.__dict__.pop(attr, None)

    def _pre_forward(self, unit: _Unit, module: nn.Module, args) -> None:
        module._fsdp_slot = self._gather(unit)

    def _post_forward(self, unit: _Unit, module: nn.Module, args, output):
        slot = module.__dict__.pop("_fsdp_slot")
        self._drop_views(unit)
        slot.free()  # reshard after forward: only this rank's shard stays
        if isinstance(output, Tensor) and output.requires_grad:
            # fires when backward reaches this unit (its output's gradient is complete): gather again
            output.register_hook(lambda grad: slot.regather("backward"))
        elif slot.tensor is not None and not slot.tensor.requires_grad:
            slot.tensor = None  # no backward will come (no_grad / eval)
        return output

    def forward(self, *args, **kwargs):
        """The wrapped module's forward; the root unit stays gathered until its backward ends."""
        if getattr(self.module, "activation_checkpointing", False) and self.module.training:
            raise ValueError("FullyShardedModel does not support activation checkpointing; set "
                             "model.activation_checkpointing = False, or use FSDP2 (the trainer's parallel=fsdp)")
        slot = self._gather(self.root) if self.root is not None else None
        try:
            out = self.module(*args, **kwargs)
        finally:
            if self.root is not None:
                self._drop_views(self.root)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if slot is not None and not any(isinstance(o, Tensor) and o.requires_grad for o in outs):
            slot.free()  # no backward will come: free the root now
            slot.tensor = None
        return out

    # ------------------------------------------------------------------ after backward

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Scale the shards' gradients to global L2 norm <= ``max_norm``; returns the norm before.

        Each rank sums the squares of its shards' gradients (the padding's are
        0), one all-reduce adds the p partial sums.
        """
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}; to not clip, do not call clip_grad_norm")
        grads = [u.shard.grad for u in self.units if u.shard.grad is not None]
        squares = torch.stack([g.square().sum() for g in grads]).sum() if grads else torch.zeros(())
        dist.all_reduce(squares, group=self.group)
        total = squares.sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale)
        return total

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded model's state dict (same keys, same order) on every rank: one all-gather per unit."""
        values: dict[str, Tensor] = dict(self.module.state_dict())  # buffers (RoPE tables, ...)
        for unit in self.units:
            full = torch.empty(unit.padded, dtype=unit.shard.dtype, device=unit.shard.device)
            self._all_gather(full, unit)
            offset = 0
            for entry in unit.params:
                value = full[offset:offset + entry.numel].view(entry.shape).clone()
                for _, _, qual in entry.owners:
                    values[qual] = value  # tied names share one tensor, as in the unsharded model
                offset += entry.numel
        return {k: values[k] for k in self._state_keys}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load an unsharded state dict (``GPT.state_dict()``, :meth:`full_state_dict`): each rank keeps its slice."""
        missing = [k for k in self._state_keys if k not in state]
        if missing:
            raise ValueError(f"state dict lacks {len(missing)} of the model's keys, e.g. {missing[0]!r}")
        for unit in self.units:
            flat = torch.zeros(unit.padded, dtype=unit.shard.dtype, device=unit.shard.device)  # (padded,)
            torch.cat([state[e.owners[0][2]].reshape(-1).to(flat) for e in unit.params], out=flat[:unit.numel])
            unit.shard.copy_(flat.chunk(self.world_size)[self.rank])
        buffers = {k: v for k, v in state.items() if k in dict(self.module.named_buffers())}
        self.module.load_state_dict(buffers, strict=False)

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """This rank's measured bytes: shards (+ any gathered buffers), gradients, optimizer states, total."""
        params = sum(u.shard.nbytes for u in self.units) + self.gathered_bytes()
        grads = sum(u.shard.grad.nbytes for u in self.units if u.shard.grad is not None)
        states = 0
        if optimizer is not None:
            states = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor))
        return {"rank": self.rank, "world_size": self.world_size, "params": params, "grads": grads,
                "optimizer": states, "total": params + grads + states,
                "unsharded_params": sum(u.numel for u in self.units) * self.units[0].shard.element_size()}
