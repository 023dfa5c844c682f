"""The Schrödinger-bridge time pool and diffusion process of ACMT ([M25] §II-A-C, eq. 2 and 4).

Sources:
    [M25] Ma et al., ACMT, ../shared/papers/acmt.txt (and [P25] MR2US-Pro §II-B, Algorithm 1).
    [K24] Kim, Kwon, Kim, Ye, "Unpaired image-to-image translation via neural Schrödinger
        bridge" (UNSB), ICLR 2024, and its released code, which [M25] builds on (ref. [4]).

The bridge runs from x_{t_0} = x_0 (an MR or US volume) towards the intermediate modality.
Given the network's prediction x̂_1 = f_θ(x_{t_j}, t_j), eq. 4 samples the next state from
the Brownian-bridge marginal of eq. 2 between x_{t_j} and x̂_1:

    x_{t_{j+1}} = w x̂_1 + (1 − w) x_{t_j} + N(0, α I),
    w = (t_{j+1} − t_j) / (1 − t_j),   α = w (1 − w) (1 − t_j) σ,

α a variance (the noise's standard deviation is √α, as in [K24]'s code, whose
``scale * tau`` is this α with its ``tau`` = σ = 0.01). Training ([M25] §II-C, Algorithm 1)
draws one index i of the pool, runs the process with the network in evaluation mode and
without gradients up to x_{t_i} (:func:`diffuse`), then predicts x̂_1 from x_{t_i} in
training mode; inference runs the whole pool (:func:`sample`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

#: T of [K24] (``--num_timesteps 5``); [M25] §II-C names "a predefined time step pool
#: {t_0, …, t_T}" without values.
DEFAULT_STEPS = 5
#: σ of [K24] (``--tau 0.01``, "entropy parameter"); [M25] gives no value.
DEFAULT_SIGMA = 0.01


def time_pool(num_timesteps: int = DEFAULT_STEPS) -> torch.Tensor:
    """The time-step pool {t_0, …, t_T} of [K24]'s code, float64 [T + 1], t_0 = 0, t_T = 1.

    [K24] spaces its pool harmonically and in the second half of [0, 1]: with the partial
    harmonic sums s_k = Σ_{i=1}^{k-1} 1/i (s_1 = 0, k = 1…T), t_k = ½ + ½ s_k / s_T for
    k ≥ 1 and t_0 = 0. T = 5 gives {0, 0.5, 0.74, 0.86, 0.94, 1}: the first step jumps to
    the middle of the bridge and the later ones refine with shrinking gaps. For T = 1 (where
    the formula divides by s_1 = 0) the pool is {0, 1}.

    Args:
        num_timesteps: T >= 1.

    Returns:
        Tensor [T + 1], float64, increasing.

    Example:
        >>> time_pool(5)[1].item()
        0.5
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) \
            or num_timesteps < 1:
        raise ValueError(f"time_pool: num_timesteps must be an int >= 1, got {num_timesteps!r}")
    if num_timesteps == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    sums = [0.0]
    for i in range(1, num_timesteps):
        sums.append(sums[-1] + 1.0 / i)
    later = [0.5 + 0.5 * s / sums[-1] for s in sums]
    return torch.tensor([0.0, *later], dtype=torch.float64)


def draw_index(num_timesteps: int = DEFAULT_STEPS,
               generator: torch.Generator | None = None) -> int:
    """The pool index i of one training step, uniform over {0, …, T − 1} ([K24]'s draw; the
    last time t_T = 1 is never a starting state: there is nothing left to predict).

    Args:
        num_timesteps: T >= 1.
        generator: a CPU generator for reproducible draws.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) \
            or num_timesteps < 1:
        raise ValueError(f"draw_index: num_timesteps must be an int >= 1, got {num_timesteps!r}")
    return int(torch.randint(num_timesteps, (1,), generator=generator).item())


def _check_sigma(owner: str, sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) \
            or not 0 <= sigma < math.inf:
        raise ValueError(f"{owner}: sigma must be a finite number >= 0, got {sigma!r}")
    return float(sigma)


def _check_times(owner: str, times) -> torch.Tensor:
    if times is None:
        return time_pool()
    times = torch.as_tensor(times, dtype=torch.float64).cpu()
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(f"{owner}: times must be a pool [T + 1] with T >= 1, got shape "
                         f"{tuple(times.shape)}")
    if not bool((times[1:] > times[:-1]).all()) or times[0] < 0 or times[-1] > 1:
        raise ValueError(f"{owner}: times must increase within [0, 1], got {times.tolist()}")
    return times


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    # A generator draws on its own device; CPU draws for a GPU tensor are moved over.
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)


def bridge_weights(t: float, t_next: float, sigma: float) -> tuple[float, float]:
    """(w, α) of eq. 4 for the step from t to t_next: w = (t_next − t) / (1 − t) and
    α = w (1 − w) (1 − t) σ, the noise variance.

    Example:
        >>> bridge_weights(0.5, 0.75, 0.01)
        (0.5, 0.00125)
    """
    sigma = _check_sigma("bridge_weights", sigma)
    if not 0 <= t < t_next <= 1:
        raise ValueError(f"bridge_weights: expected 0 <= t < t_next <= 1, got t={t!r}, "
                         f"t_next={t_next!r}")
    w = (t_next - t) / (1 - t)
    return w, w * (1 - w) * (1 - t) * sigma


def bridge_step(x_t: torch.Tensor, x1: torch.Tensor, t: float, t_next: float, sigma: float,
                noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of eq. 4: ``w x̂_1 + (1 − w) x_t + √α z``, z ~ N(0, I).

    Args:
        x_t: Tensor [B, C, *S], the state at time t.
        x1: Tensor [B, C, *S], the predicted terminal state x̂_1.
        t, t_next: consecutive pool times, 0 <= t < t_next <= 1.
        sigma: σ >= 0.
        noise: z, Tensor [B, C, *S]; None: drawn (with ``generator`` if given).
        generator: for the draw of z.

    Returns:
        Tensor [B, C, *S], the state at t_next.
    """
    w, alpha = bridge_weights(t, t_next, sigma)
    if x1.shape != x_t.shape:
        raise ValueError(f"bridge_step: x1 must have x_t's shape {tuple(x_t.shape)}, got "
                         f"{tuple(x1.shape)}")
    z = _noise(x_t, generator) if noise is None else noise
    return w * x1 + (1 - w) * x_t + math.sqrt(alpha) * z


class _EvalNoGrad:
    """Evaluation mode and no gradient inside; every submodule's own mode restored after
    (a bare ``train()`` after would also switch on modules the caller had left in eval)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.net.modules()]
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.net.eval()

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes:
            m.training = mode
        self.no_grad.__exit__(*exc)


def _check_index(owner: str, index, b: int, steps: int, device) -> torch.Tensor:
    if isinstance(index, bool):
        raise TypeError(f"{owner}: index must be an int or a Tensor [B] of ints, got bool")
    if isinstance(index, int):
        index = torch.full((b,), index, dtype=torch.long)
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point \
            or index.dtype == torch.bool:
        raise TypeError(f"{owner}: index must be an int or an integer Tensor [B], got "
                        f"{index!r}")
    if index.dim() == 0:
        index = index.expand(b)
    if index.shape != (b,):
        raise ValueError(f"{owner}: index must be an int or a Tensor [B] = [{b}], got shape "
                         f"{tuple(index.shape)}")
    if bool((index < 0).any()) or bool((index >= steps).any()):
        raise ValueError(f"{owner}: index must be in [0, {steps - 1}] (T = {steps}), got "
                         f"{index.tolist()}")
    return index.to(device=device, dtype=torch.long)


def diffuse(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
            index, sigma: float = DEFAULT_SIGMA, *, times=None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """x_{t_i}: the diffusion process of eq. 4 from x_0 to the pool time t_i.

    With the network in evaluation mode and without gradients ([M25] §II-C step 2), for
    j = 0 … i − 1: x̂_1 = net(x_{t_j}, t_j), then one :func:`bridge_step` to t_{j+1}. Every
    submodule's train/eval mode is restored after; parameters are not touched.

    Args:
        net: the translation network, ``net(x [B, C, *S], t [B]) -> x̂_1 [B, C, *S]``.
        x0: Tensor [B, C, *S], the source volumes.
        index: i, an int in [0, T − 1] for the whole batch ([K24]) or a Tensor [B] of
            indices, one per item (an item stops once it reaches its own t_i).
        sigma: σ >= 0.
        times: the pool [T + 1] (default :func:`time_pool`).
        generator: for the noise draws (reproducible chains).

    Returns:
        Tensor [B, C, *S], x_{t_i} (x_0 itself where i = 0), detached.

    Example:
        >>> x_t = diffuse(net, x0, 2, 0.01)
    """
    sigma = _check_sigma("diffuse", sigma)
    times = _check_times("diffuse", times)
    if not isinstance(x0, torch.Tensor) or x0.dim() < 3:
        raise ValueError(f"diffuse: x0 must be a Tensor [B, C, *S], got "
                         f"{getattr(x0, 'shape', type(x0).__name__)}")
    steps = times.numel() - 1
    index = _check_index("diffuse", index, x0.shape[0], steps, x0.device)
    last = int(index.max().item())
    x = x0.detach()
    if last == 0:
        return x
    module = net if isinstance(net, nn.Module) else nn.Module()
    with _EvalNoGrad(module):
        for j in range(last):
            t, t_next = float(times[j]), float(times[j + 1])
            x1 = net(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
            step = bridge_step(x, x1, t, t_next, sigma, generator=generator)
            active = (index > j).reshape(-1, *([1] * (x.dim() - 1)))
            x = torch.where(active, step, x)
    return x


def sample(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
           sigma: float = DEFAULT_SIGMA, *, times=None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Translates x_0 by the whole bridge: the prediction x̂_1 at the last start time.

    [K24]'s inference: for j = 0 … T − 1, x̂_1 = net(x_{t_j}, t_j) and (for j < T − 1)
    x_{t_{j+1}} by eq. 4; the output is the last x̂_1 = net(x_{t_{T−1}}, t_{T−1}). In
    evaluation mode, without gradients, modes restored after.

    Args:
        net: the translation network.
        x0: Tensor [B, C, *S], the source volumes (MR or US).
        sigma: σ >= 0.
        times: the pool [T + 1] (default :func:`time_pool`).
        generator: for the noise draws.

    Returns:
        Tensor [B, C, *S], the translation into the intermediate modality.
    """
    sigma = _check_sigma("sample", sigma)
    times = _check_times("sample", times)
    steps = times.numel() - 1
    x_t = diffuse(net, x0, steps - 1, sigma, times=times, generator=generator)
    module = net if isinstance(net, nn.Module) else nn.Module()
    with _EvalNoGrad(module):
        t = float(times[steps - 1])
        return net(x_t, torch.full((x_t.shape[0],), t, device=x_t.device, dtype=x_t.dtype))
