"""Optimizers and learning-rate schedules for the one training loop.

Two optimizers, chosen by `TrainConfig.optimizer`:

- `adamw`: AdamW over every trainable tensor, weight decay on matrices and embeddings only (GPT-2's recipe).
- `muon`: Muon (momentum, then the update orthogonalised by a Newton-Schulz iteration) for the 2-D
  weight matrices inside the network, and AdamW for what Muon is not meant for: embeddings (a lookup,
  one row per token, not a linear map), the output head, and every 1-D tensor (norm gains, biases,
  scalars). Both run inside ONE optimizer object (`MuonAdamW`), so the loop, gradient scaling,
  checkpoints and exact resume treat it like any other optimizer.

Each param group carries a `role` (matrix, embed, head, decay, no_decay); its peak learning rate comes
from the config by role (`peak_lr`), and one schedule factor (`lr_factor`) scales all of them, so the
groups keep their ratios while the schedule warms up and decays.

Schedules (`TrainConfig.schedule`): `cosine` (linear warmup, cosine down to the floor) and `warmdown`
(linear warmup, constant, then a straight line down to the floor over the last `warmdown_fraction` of
the steps: the modded-nanogpt / nanochat schedule, which trains fastest at a fixed step budget).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from scratchgpt.config import TrainConfig
from scratchgpt.device import native_bf16

# Keller Jordan's quintic Newton-Schulz coefficients (the ones torch.optim.Muon uses): they maximise the
# slope at zero, so 5 steps push every singular value into roughly [0.7, 1.2] instead of exactly 1.
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


# ---------------------------------------------------------------------------------------------
# Hardware: the Newton-Schulz dtype
# ---------------------------------------------------------------------------------------------


def resolve_ns_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype Muon's Newton-Schulz iteration runs in: 'auto' is bfloat16 where the device has native
    bf16 and float32 elsewhere.

    Why: torch.optim.Muon always iterates in bf16. That is the fast choice with bf16 units (about 2x the
    float32 matmul rate) and accurate enough (the iteration only needs singular values near 1, not
    exact). Where bf16 is emulated it is ~20x slower than float32 (measured for the 4-layer 128-wide
    model on an AVX2-only CPU: 502 ms vs 28 ms per optimizer step), so there float32 is both faster and
    more exact.
    """
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"ns_dtype={name!r} is not allowed; choose one of ['auto', {', '.join(map(repr, dtypes))}]")
    return dtypes[name]


# ---------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------


def newton_schulz(
    g: Tensor,
    *,
    steps: int = NS_STEPS,
    dtype: torch.dtype = torch.float32,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
) -> Tensor:
    """Approximately orthogonalise a matrix G = U S Vᵀ: return about U Vᵀ (singular values ~1), in `dtype`.

    `g` is one matrix (m, n) or a stack of same-shaped ones (k, m, n), each treated on its own. Each step
    applies the odd polynomial a·X + b·(XXᵀ)X + c·(XXᵀ)²X, which maps every singular value σ to
    aσ + bσ³ + cσ⁵ and leaves U and V alone. Dividing by the Frobenius norm first puts every σ in [0, 1],
    where iterating that polynomial drives σ towards 1.
    """
    if g.ndim not in (2, 3):
        raise ValueError(f"newton_schulz needs a matrix or a stack of them, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype)
    single = x.ndim == 2
    if single:
        x = x.unsqueeze(0)  # (1, m, n): one batched code path
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the Gram matrix of the shorter side: far fewer FLOPs
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m), m = min(rows, cols)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
    if tall:
        x = x.mT
    return x[0] if single else x


def muon_lr_scale(shape: Sequence[int], adjust_lr_fn: str | None) -> float:
    """Per-matrix learning-rate factor, as torch.optim.Muon defines it: 'original' (Keller Jordan's)
    sqrt(max(1, rows/cols)); 'match_rms_adamw' (Moonshot's) 0.2·sqrt(max(rows, cols))."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def _undecorated(method: Any) -> Any:
    """The function torch wrapped with `torch._disable_dynamo` (the wrapper keeps it as `__wrapped__`)."""
    return getattr(method, "__wrapped__", method)


def closure_loss(closure: Any) -> Any:
    """What torch's optimizers do with `step(closure)` first: the loss it returns, computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class WithoutDynamo:
    """Mixin for optimizers: torch.optim.Optimizer's add_param_group, zero_grad, state_dict and
    load_state_dict, without the `torch._disable_dynamo` wrappers torch puts around them.

    Why: the first call of a wrapped method imports torch._dynamo (sympy and ~800 modules): ~1 s of every
    training run's start-up on a 2-core Xeon, 1.5% of nanoGPT's Tiny Shakespeare recipe, for a guard that
    only matters inside torch.compile. scratchgpt compiles models, never an optimizer's methods, so the
    functions those wrappers wrap do the same work here. Every optimizer `make_optimizer` builds on the
    CPU (and its `step`) avoids torch._dynamo; torch.optim.AdamW (GPUs) still imports it.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _undecorated(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _undecorated(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _undecorated(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _undecorated(torch.optim.Optimizer.load_state_dict)(self, state_dict)


class Muon(WithoutDynamo, torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iteration runs in a chosen dtype (torch's is always bf16).

    Everything else (arguments, param groups, the momentum buffer in `state`, validation) is
    torch.optim.Muon's; only `step` is re-written, to call `newton_schulz` with `ns_dtype`, on all
    same-shaped matrices at once. The dtype is an attribute, not part of the param groups, so that it
    follows the hardware a run resumes on, not the one it was saved on.
    """

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.float32, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, momentum = group["lr"], group["momentum"]
            updates = []
            for grad, buf in zip(grads, bufs, strict=True):
                buf.lerp_(grad, 1 - momentum)  # buf = momentum·buf + (1 - momentum)·grad
                updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
            # Matrices of one shape are orthogonalised as one stack: a few large batched matmuls instead
            # of many small ones (the 4-layer model's 16 matrices have 4 shapes).
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, u in enumerate(updates):
                by_shape.setdefault(tuple(u.shape), []).append(i)
            for index in by_shape.values():
                ortho = newton_schulz(torch.stack([updates[i] for i in index]), steps=group["ns_steps"],
                                      dtype=self.ns_dtype, coefficients=group["ns_coefficients"], eps=group["eps"])
                for i, o in zip(index, ortho, strict=True):
                    p = params[i]
                    scale = -lr * muon_lr_scale(p.shape, group["adjust_lr_fn"])
                    if p.dtype == torch.bfloat16:  # bf16-true: the update goes through a compensated sum
                        state = self.state[p]
                        if "compensation" not in state:
                            state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        comp = state["compensation"]
                        if group["weight_decay"]:
                            comp.add_(p, alpha=-lr * group["weight_decay"])
                        comp.add_(o.to(p.dtype), alpha=scale)
                        kahan_add_(p, comp)
                        continue
                    p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                    p.add_(o.to(p.dtype), alpha=scale)
        return loss


class MuonAdamW(WithoutDynamo, torch.optim.Optimizer):
    """Muon on some param groups and AdamW on the others, as one optimizer.

    The two inner optimizers do the arithmetic; this object owns their param groups (the very same
    dicts, Muon's first) and one shared `state`, so `state_dict()` / `load_state_dict()` (and
    torch.distributed.checkpoint, which drives them) see a single ordinary optimizer.
    """

    def __init__(self, muon: Muon | None, adamw: torch.optim.AdamW | None) -> None:
        self._inner = [o for o in (muon, adamw) if o is not None]
        if not self._inner:
            raise ValueError("MuonAdamW needs at least one of its two optimizers")
        self.muon, self.adamw = muon, adamw
        super().__init__([g for o in self._inner for g in o.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this object's groups and state (again after a load)."""
        start = 0
        for opt in self._inner:
            n = len(opt.param_groups)
            opt.param_groups = self.param_groups[start:start + n]
            opt.state = self.state
            start += n

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for opt in self._inner:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and self.param_groups
        self._share()


# ---------------------------------------------------------------------------------------------
# AdamW's fused kernel with less around it
# ---------------------------------------------------------------------------------------------


class FusedAdamW(WithoutDynamo, torch.optim.AdamW):
    """torch.optim.AdamW(fused=True): the same kernel, state and state_dict, with less Python around it.

    Why: torch's `step` is wrapped for torch.compile (graph breaks, which import torch._dynamo: see
    `WithoutDynamo`) and groups the tensors by device and dtype at every call: ~0.2 ms of bookkeeping around
    one ~0.4 ms kernel, 0.6% of a step of the 4-layer Tiny Shakespeare model (Intel Xeon, 2 cores). This
    `step` calls the fused kernel directly on the tensors torch's would pass, in the same order: its updates
    are torch's to the bit (tested), and its checkpoints load into torch.optim.AdamW and back. For
    parameters on one CPU in one dtype; `make_optimizer` picks torch's class elsewhere.
    """

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, fused=True, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        # A GradScaler (float16) hands the fused kernel its scale and overflow flag through these attributes.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            # What torch.optim.adam._fused_adam does for one device and dtype, without its grouping.
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                                grad_scale=grad_scale, found_inf=found_inf)
            if found_inf is not None:  # a skipped step does not count
                torch._foreach_sub_(steps, [found_inf] * len(steps))
        return loss


# ---------------------------------------------------------------------------------------------
# AdamW for bfloat16 weights
# ---------------------------------------------------------------------------------------------


class KahanAdamW(WithoutDynamo, torch.optim.Optimizer):
    """AdamW whose updates reach bfloat16 weights through a Kahan-compensated sum.

    Why: a bf16 weight has 8 significant bits, so an update below half its last place (lr = 1e-4 on a
    weight near 1) rounds away entirely, and plain AdamW on bf16 weights stalls as the learning rate
    decays (weight decay, ~lr·wd per step, vanishes first). Each parameter keeps a `compensation` buffer
    (bf16 like it) holding what rounding lost; it joins the next update, so the weight follows float32
    AdamW to within about one bf16 rounding (Zamirai et al. 2020, "Revisiting BFloat16 Training"; optimi's
    Kahan AdamW). The moments are kept in the parameter's dtype too. Arguments, weight-decay rule and bias
    correction are torch.optim.AdamW's. Limitation of bf16 moments: with beta2 >= ~0.998 the second moment
    cannot shrink (its per-step decay is below bf16's resolution); this project's default is 0.95.
    """

    def __init__(self, params: Any, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)  # a CPU tensor, as torch's AdamW keeps it
                    for key in ("exp_avg", "exp_avg_sq", "compensation"):
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["compensation"])
                # A chunk at a time: the temporaries (g², the denominator, p's copy) are a chunk's size, not
                # the largest tensor's (Qwen3-0.6B's 311 MB embedding would need ~0.9 GB of them at once).
                for w, g, m, v, comp in _chunks(tensors):
                    m.lerp_(g, 1 - beta1)
                    v.lerp_(g.square(), 1 - beta2)  # one rounding per step (mul_ then addcmul_ would be two)
                    denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                    # AdamW's whole step (decoupled decay, then the Adam update), summed into the compensation.
                    if wd:
                        comp.add_(w, alpha=-lr * wd)
                    comp.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
                    kahan_add_(w, comp)
        return loss


# Elements per chunk of KahanAdamW's update: 2^20 (2 MB of bf16) keeps its temporaries small and in cache.
CHUNK = 1 << 20


def _chunks(tensors: tuple[Tensor, ...]) -> Iterable[tuple[Tensor, ...]]:
    """Same-shaped `tensors` as matching views of at most CHUNK elements each (whole, if they are small or
    one of them is not contiguous: then the views would not line up element for element)."""
    if tensors[0].numel() <= CHUNK or not all(x.is_contiguous() for x in tensors):
        return (tensors,)
    return zip(*(x.view(-1).split(CHUNK) for x in tensors), strict=True)


def kahan_add_(p: Tensor, comp: Tensor) -> None:
    """p += comp, in p's (low) precision, leaving in `comp` what the rounded addition lost.

    The caller has summed this step's whole update into `comp` (which still holds last step's loss); what
    rounding drops now is comp - (p_new - p_old), kept for the next step. Where the weight outweighs the
    update, both subtractions are exact (Fast2Sum).
    """
    before = p.clone()
    p.add_(comp)
    comp.add_(before.sub_(p))


# ---------------------------------------------------------------------------------------------
# Building the optimizer
# ---------------------------------------------------------------------------------------------


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices and embeddings (>= 2-D); never biases or LayerNorm gains (1-D)."""
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = ({"params": decay, "weight_decay": weight_decay, "role": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "role": "no_decay"})
    return [g for g in groups if g["params"]]


def param_roles(model: nn.Module, params: Iterable[nn.Parameter]) -> dict[str, list[nn.Parameter]]:
    """Sort `params` (parameters of `model`) into Muon's and AdamW's roles.

    - embed: weights of nn.Embedding modules (token, position, value embeddings). A head tied to the
      token embedding is this same tensor, so it is an embedding too.
    - head: the top-level `lm_head` (or a classifier's head put in its place, or LoRA adapters on it):
      its rows are per-token scores, and Muon's equal-singular-value update does not suit them.
    - matrix: every other 2-D tensor: the hidden linear maps, which Muon trains.
    - no_decay: 1-D and 0-D tensors (norm gains, biases, scalars).
    """
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = {id(p): n for n, p in model.named_parameters()}
    roles: dict[str, list[nn.Parameter]] = {r: [] for r in ("matrix", "embed", "head", "no_decay")}
    for p in params:
        if id(p) not in names:
            raise ValueError("a parameter to optimise is not a parameter of the model")
        if id(p) in embed_ids:
            roles["embed"].append(p)
        elif names[id(p)].startswith("lm_head."):
            roles["head"].append(p)
        elif p.dim() == 2:
            roles["matrix"].append(p)
        else:
            roles["no_decay"].append(p)
    return roles


def peak_lr(role: str | None, config: TrainConfig) -> float:
    """The peak learning rate of a param group with this role (the schedule scales it)."""
    if role == "matrix":
        return config.muon_lr
    if role == "embed" and config.embed_lr is not None:
        return config.embed_lr
    if role == "head" and config.head_lr is not None:
        return config.head_lr
    return config.lr


def make_optimizer(
    params: Iterable[nn.Parameter], config: TrainConfig, *, device_type: str, model: nn.Module | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, over `params`.

    'adamw': AdamW with decoupled weight decay on >= 2-D tensors. 'muon': `MuonAdamW`, Muon for the
    model's hidden matrices (needs `model` to tell embeddings and the head from them) and AdamW with
    per-role learning rates for the rest. AdamW uses the fused kernel where it exists; for bfloat16
    parameters (dtype=bf16-true) it is `KahanAdamW`, and Muon adds its updates through the same
    compensated sum, so neither loses small updates to bf16 rounding.
    """
    params = list(params)
    # bfloat16 weights (bf16-true): every update reaches them through a Kahan-compensated sum (KahanAdamW,
    # and Muon's bf16 branch), or small updates would round away.
    low = any(p.dtype == torch.bfloat16 for p in params)
    # The fused kernel runs one pass over all tensors: 4.5x faster than the foreach default on CPU.
    fused = config.fused_adamw and device_type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    adam_kw = dict(betas=(config.beta1, config.beta2), eps=config.adam_eps)

    def adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if low:
            return KahanAdamW(groups, lr=config.lr, **adam_kw)
        if fused and device_type == "cpu" and len({(p.device, p.dtype) for p in params}) == 1:
            return FusedAdamW(groups, lr=config.lr, **adam_kw)
        return torch.optim.AdamW(groups, lr=config.lr, fused=fused or None, **adam_kw)

    if config.optimizer == "adamw":
        return adamw(param_groups(params, config.weight_decay))
    if model is None:
        raise ValueError("optimizer='muon' needs the model, to tell hidden matrices from embeddings and the head")
    roles = param_roles(model, params)
    adam_groups = [
        {"params": roles[r], "role": r, "lr": peak_lr(r, config), "weight_decay": wd}
        for r, wd in (("embed", config.weight_decay), ("head", config.weight_decay), ("no_decay", 0.0))
        if roles[r]
    ]
    muon = Muon(
        [{"params": roles["matrix"], "role": "matrix"}], lr=config.muon_lr, momentum=config.muon_momentum,
        weight_decay=config.muon_weight_decay, nesterov=True, ns_steps=config.muon_ns_steps,
        ns_dtype=resolve_ns_dtype(config.ns_dtype, device_type),
    ) if roles["matrix"] else None
    return MuonAdamW(muon, adamw(adam_groups) if adam_groups else None)


def ns_dtype_of(optimizer: torch.optim.Optimizer) -> torch.dtype | None:
    """The Newton-Schulz dtype of a Muon-based optimizer; None for any other."""
    muon = optimizer.muon if isinstance(optimizer, MuonAdamW) else optimizer
    return muon.ns_dtype if isinstance(muon, Muon) else None


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier on every group's peak learning rate at optimizer step `step` (0-based).

    Warmup: (step + 1) / (warmup_steps + 1) for the first warmup_steps steps. Then
    - cosine: from 1 down to floor (= floor_lr / lr) by step decay_steps, half a cosine period;
    - warmdown: 1 until the last `warmdown_fraction` of decay_steps, then a straight line that would
      reach the floor at step decay_steps (the last step still learns: it is one step short of it).
    From decay_steps on, the floor.
    """
    floor = config.floor_lr / config.lr
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if step >= config.decay_steps:
        return floor
    if config.schedule == "warmdown":
        length = max(round(config.warmdown_fraction * config.decay_steps), 1)
        start = config.decay_steps - length
        if step < start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - start) / length
    progress = (step - config.warmup_steps) / max(config.decay_steps - config.warmup_steps, 1)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` for `config.lr` (the AdamW rate; other roles scale alike)."""
    return config.lr * lr_factor(step, config)


def set_lr(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    """Set every param group's lr for optimizer step `step` (peak by role × schedule); returns lr_at(step)."""
    factor = lr_factor(step, config)
    for group in optimizer.param_groups:
        group["lr"] = peak_lr(group.get("role"), config) * factor
    return config.lr * factor
