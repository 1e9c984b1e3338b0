"""Autograd functions with a fixed, documented set of saved tensors.

The planner predicts activation memory from exactly these saved-tensor inventories, on any
device and torch version, so the pieces whose built-in versions save more (or differently on
CPU and GPU) are written here:

- rms_norm saves (x, rstd): the input and one fp32 value per token (fp64 for fp64
  inputs). torch's composite saves five tensors on CPU.
- swiglu saves (a, b): silu(a) is recomputed in backward instead of stored.
- apply_rope saves only the shared cos/sin tables (computed once per forward).
"""

import torch
from torch import Tensor


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        compute = _at_least_fp32(x.dtype)
        xf = x.to(compute)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return (xf * rstd * weight.to(compute)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        compute = rstd.dtype
        xhat = x.to(compute) * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out.to(compute) * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad_out.to(compute) * weight.to(compute)
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in fp32, returned in x's dtype."""
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.nn.functional.silu(a) * b

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        # grad_b = grad_out * silu(a), grad_a = grad_out * b * silu'(a) with
        # silu'(a) = sig * (1 + a * (1 - sig)); built in place so that at most three
        # a-sized temporaries live at once (out of place: six, measured with torch's
        # MemTracker; planner/costs.py's layer workspace counts three). Every in-place step
        # multiplies or adds the same two operands as the out-of-place formula, so the
        # result is bitwise the same.
        a, b = ctx.saved_tensors
        sig = torch.sigmoid(a)
        grad_b = torch.mul(a, sig).mul_(grad_out)
        slope = torch.rsub(sig, 1).mul_(a).add_(1).mul_(sig)
        del sig
        grad_a = torch.mul(grad_out, b).mul_(slope)
        return grad_a, grad_b


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b, saving only a and b for backward."""
    return _SwiGLU.apply(a, b)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding on x [batch, seq, heads, head_dim] with cos/sin [seq, head_dim].

    Backward needs only cos/sin (shared by every layer), not x.
    """
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return x * cos + _rotate_half(x) * sin
