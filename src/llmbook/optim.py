"""AdamW, which parameters decay, and gradient clipping, from scratch.

Adam (Kingma & Ba 2015) keeps two running averages per parameter: the
gradient's mean ``m`` (momentum: steady directions add up, noise cancels) and
its uncentred variance ``v``. Each step moves by ``m / sqrt(v)``, so every
parameter gets a step of about ``lr`` whatever the scale of its gradient:

    m = β1·m + (1-β1)·g              v = β2·v + (1-β2)·g²
    m̂ = m / (1-β1^t)                 v̂ = v / (1-β2^t)          bias correction: m, v start at 0
    p = p - lr·wd·p                  decoupled weight decay (the "W")
    p = p - lr·m̂ / (sqrt(v̂) + ε)

Weight decay in plain Adam is added to the gradient, and then divided by
``sqrt(v)`` like the rest, so parameters with large gradients barely decay.
AdamW (Loshchilov & Hutter 2019) shrinks the weights directly instead, by the
same fraction ``lr·wd`` for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay; step for step the same numbers as ``torch.optim.AdamW``.

    A plain loop over the parameters, for clarity (PyTorch's ``foreach`` version
    does the same arithmetic on all of them at once). The learning rate is
    read from ``param_groups`` at every step, so a schedule can change it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue  # a parameter the loss did not reach this step: it keeps its value and state
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                grad = p.grad
                state = self.state[p]
                if not state:  # first step: both averages start at zero
                    # a float tensor, as PyTorch keeps it, so our state_dicts look like torch's
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"].item()

                # decoupled weight decay: shrink the weights themselves, before the Adam step
                p.mul_(1 - lr * wd)
                # update the running mean of the gradient and of its square
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # undo the averages' pull towards their zero start, then take the step
                bias_correction1 = 1 - beta1**t
                bias_correction2 = 1 - beta2**t
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return loss



class ForeachAdamW(AdamW):
    """``AdamW`` with each line applied to all of a group's tensors at once (``torch._foreach_*``).

    The same arithmetic in the same order as ``AdamW.step`` (the tests check
    the two agree exactly), as PyTorch's ``foreach=True`` does: a model with
    dozens of small tensors spends much of a per-parameter loop dispatching
    small operations, and one call per line over the whole list saves that.
    The trainer uses this one; the chapter reads ``AdamW.step``.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params, grads, exp_avgs, exp_avg_sqs, ts = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                ts.append(state["step"].item())
            if not params:
                continue
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in ts])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**t) for t in ts])
        return loss

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weight matrices of ``nn.Linear`` decay, everything else does not.

    Weight decay pulls parameters towards 0, a prior that says "use small
    weights unless the data insists". That suits the matrices that mix
    features. It does not suit biases and norm gains (a gain of 0 switches a
    feature off; their natural value is 1), nor embeddings: a token's row gets
    a gradient only when the token occurs, but decay shrinks it at every
    step, so rare tokens would fade. A tied ``lm_head`` is the embedding
    matrix, so it does not decay either; shared parameters are listed once.

    >>> [(g["name"], len(g["params"])) for g in param_groups(nn.Linear(3, 2), 0.1)]
    [('decay', 1), ('no_decay', 1)]
    """
    embedding, linear = set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Embedding):
                embedding.add(id(p))
            elif isinstance(module, nn.Linear) and name == "weight" and p.dim() >= 2:
                linear.add(id(p))
    decay, no_decay = [], []
    for p in model.parameters():  # yields a shared parameter once, in registration order
        if not p.requires_grad:
            continue  # frozen: nothing for the optimizer to do
        (decay if id(p) in linear and id(p) not in embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def clip_grad_norm(params: Iterable[Tensor] | Tensor, max_norm: float) -> Tensor:
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``; return the norm before.

    The norm is over all gradients as one long vector. One bad batch can give
    a gradient 100 times the usual size, and with it a step that undoes hours
    of training; clipping keeps the step's direction and bounds its length.
    Gradients of [3, 4] with max_norm 1 become [0.6, 0.8]; the return value is 5.

    Like ``torch.nn.utils.clip_grad_norm_`` we multiply by
    ``min(1, max_norm / (norm + 1e-6))`` instead of testing ``norm > max_norm``:
    the same result, without copying the norm to the CPU to decide (a GPU sync).
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}; to not clip, do not call clip_grad_norm")
    params = [params] if isinstance(params, Tensor) else list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, 2).to(device) for g in grads]  # one norm per tensor ...
    total = torch.linalg.vector_norm(torch.stack(norms), 2)  # ... and the norm of those norms
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.device))
    return total
