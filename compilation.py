"""torch.compile for the training step, with one warning line and eager fallback when it fails.

torch.compile is lazy: wrapping a module only records the mode, the forward graph is
compiled at the first call, and the backward graph at the first backward (AOTAutograd
lowers it lazily), so a broken compiler (no Triton, no C++ toolchain, an unsupported
op) surfaces in the middle of the first training step. The first call here therefore
runs one probe step (forward and backward on the real batch) and puts back everything
that step touched (batch-norm buffers, .grad, the RNG streams), so that the run's
numbers do not depend on the probe. If wrapping or the probe raises, the error's first
line is reported once and the module runs eagerly from then on: no run is lost to the
compiler. An error that eager execution raises as well is not the compiler's; the
eager call re-raises it.

With fixed shapes (main.py drops the ragged last batch while compiling) the first call
is the only one that compiles; a later recompilation error propagates.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional

import torch
from torch import nn

Warn = Callable[[str], None]


def print_warning(message: str) -> None:
    print(f"main.py: warning: {message}", file=sys.stderr, flush=True)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The error's type and first line, with the next line when the first only announces it (dynamo's
    "backend='inductor' raised:" is followed by the compiler's own error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    head = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    line = f"{type(error).__name__}: {head}"
    return line if len(line) <= limit else line[:limit - 3] + "..."


class CompiledWithFallback(nn.Module):
    """Calls the compiled module; after a compilation failure, the eager one."""

    def __init__(self, module: nn.Module, compiled: Callable, warn: Warn):
        super().__init__()
        self.module = module  # registered: train()/eval() reach the shared parameters
        object.__setattr__(self, "compiled", compiled)  # not registered: same parameters as `module`
        self.warn = warn
        self.probed = False

    @property
    def active(self) -> bool:
        """Whether calls still go to the compiled module."""
        return self.compiled is not None

    def forward(self, *args, **kwargs):
        if self.compiled is not None and not self.probed:
            self.probed = True
            try:
                probe_step(self.module, self.compiled, args, kwargs)
            except Exception as error:  # any failure of the compiler stack; the eager call re-raises real errors
                self.fall_back(error)
        if self.compiled is None:
            return self.module(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def fall_back(self, error: Exception) -> None:
        object.__setattr__(self, "compiled", None)
        self.warn(f"torch.compile failed ({first_line(error)}); training continues in eager mode "
                  f"(--no-compile skips compilation)")


def probe_step(module: nn.Module, compiled: Callable, args, kwargs) -> None:
    """One compiled forward and backward, with the module's state put back afterwards."""
    params = [p for p in module.parameters() if p.requires_grad]
    buffers = [b.detach().clone() for b in module.buffers()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(module)):
            outputs = [t for t in _tensors(compiled(*args, **kwargs)) if t.requires_grad]
            if outputs:  # else grad mode is off or nothing is trainable: no backward to compile
                torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    finally:
        with torch.no_grad():
            for buffer, saved in zip(module.buffers(), buffers):
                buffer.copy_(saved)
            for param, saved in zip(params, grads):
                param.grad = saved


def _cuda_devices(module: nn.Module) -> List[int]:
    return sorted({t.device.index or 0 for t in module.parameters() if t.device.type == "cuda"})


def _tensors(output) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def compile_with_fallback(module: nn.Module, mode: str, warn: Optional[Warn] = None) -> nn.Module:
    """`module` compiled with `mode`, falling back to eager on failure; `module` itself if wrapping fails."""
    warn = warn or print_warning
    try:
        compiled = torch.compile(module, mode=mode)
    except Exception as error:  # e.g. a Python version or platform torch.compile does not support
        warn(f"torch.compile unavailable ({first_line(error)}); training runs in eager mode")
        return module
    return CompiledWithFallback(module, compiled, warn)


def compiling(step_model: nn.Module) -> bool:
    """Whether the training step goes through torch.compile (it then needs a fixed batch shape)."""
    return isinstance(step_model, CompiledWithFallback)


def runs_compiled(step_model: nn.Module) -> bool:
    """Whether the training step still goes through the compiled module (False after a fallback)."""
    return compiling(step_model) and step_model.active
