"""The arithmetic the students run in (`--precision auto|fp32|bf16` of distill, eval and the demo).

bf16 autocast runs convolutions and matrix products in bfloat16 (weights, optimiser state and
BatchNorm statistics stay fp32; pipeline/distill/losses.py keeps the losses in fp32). A GPU computes
bf16 natively. A CPU does when it has AVX512_BF16 or AMX: oneDNN's bf16 kernels then run a demo
student's step 1.4-1.55x faster than fp32 (bench/bench_distill.py, on AVX512_BF16); without them
oneDNN emulates bf16, slower than fp32. So "auto" is bf16 on CUDA and on such CPUs, fp32 elsewhere,
decided from the CPU's flags as torch reads them (torch.cpu.get_capabilities), never from its vendor
or model name.

One more check on CPU: oneDNN (torch 2.14) computes the bf16 weight gradient of a 3D convolution whose
input is 2 frames deep, with a 3-frame kernel padded by 1, wrongly (NaN, or values off by 1e36, other
values at every call; forward and input gradients are right). A demo student meets that shape in its
third stage, so check_convolutions() tests each trained convolution's bf16 weight gradient against
fp32 once per shape it meets, and runs the few that disagree in fp32.

And one choice of speed: oneDNN's bf16 kernels for grouped 3D convolutions (EfficientNet's depthwise
ones) are slower than its fp32 ones, so much that an efficientnet3d_lite0 step in bf16 took 1.5x its
fp32 time; with its depthwise convolutions in fp32 and the rest in bf16 it is 1.1x faster than fp32
(8x64^2 clips, batch 8, one thread, AVX512_BF16). check_convolutions() runs them in fp32 on CPU.

The students' heads (models/students.py HeadLinear: teacher heads, projection and concept heads, the
fine-tuning classifier) compute in fp32 on the backbone's bf16 features: their outputs are what the losses
compare, and a bf16 logit near 10 is off by up to 0.03. With the heads in bf16, distinit's training loss
ended 4 % higher than fp32's; with them in fp32 it matches (BENCHMARKS.md, "Precision").
"""
import copy
import types

import torch

from pipeline.common.config import PRECISIONS

# torch.cpu.get_capabilities() names of the instructions oneDNN computes bf16 with
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def device_kind(device):
    """"cuda:1" or torch.device("cuda", 1) -> "cuda"."""
    return str(device).split(":")[0]


def native_bf16_flags(capabilities=None):
    """Which of NATIVE_BF16_FLAGS the CPU has (empty: none). capabilities: {flag: bool}, by default
    this CPU's; tests pass another CPU's."""
    caps = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return [flag for flag in NATIVE_BF16_FLAGS if caps.get(flag)]


def resolve_precision(precision, device, capabilities=None):
    """"auto", "fp32" or "bf16" on `device` -> "fp32" or "bf16" (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    kind = device_kind(device)
    native = kind == "cuda" or (kind == "cpu" and bool(native_bf16_flags(capabilities)))
    return "bf16" if native else "fp32"


def describe_precision(precision, device, capabilities=None):
    """One line saying what a resolved precision means on `device`: a warning when it is bf16 on a CPU
    that would emulate it."""
    kind = device_kind(device)
    if precision != "bf16":
        return f"precision: {precision}"
    if kind != "cpu":
        return f"precision: bf16 autocast ({kind})"
    flags = native_bf16_flags(capabilities)
    if flags:
        return f"precision: bf16 autocast (the CPU computes bf16 natively: {', '.join(flags)})"
    return (f"warning: --precision bf16 on a CPU without native bf16 (no {' or '.join(NATIVE_BF16_FLAGS)}) is "
            "emulated and slower than fp32; --precision auto picks fp32 here")


def autocast(precision, device):
    """The context the networks' forward passes run in: bf16 autocast, or plain fp32."""
    return torch.autocast(device_kind(device), dtype=torch.bfloat16, enabled=precision == "bf16")


def check_convolutions(model):
    """Every Conv3d of `model` that trains under CPU bf16 autocast first checks, once per geometry and input
    shape, that its bf16 weight gradient agrees with fp32's; one that does not runs in fp32 (see the module
    docstring). Layers that do not train (momentum copies, inference) stay in bf16: their forward is right.
    Grouped convolutions run in fp32 under CPU bf16 autocast, training or not (faster there).
    A model on a GPU is left as it is (cuDNN's kernels, and nothing in the way of torch.compile)."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        return
    for conv in model.modules():
        if isinstance(conv, torch.nn.Conv3d):  # a method of the layer: a deep copy of the model rebinds it
            conv.forward = types.MethodType(_checked_forward, conv)


def _checked_forward(conv, x):
    kind = x.device.type
    cpu_bf16 = kind == "cpu" and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
    if cpu_bf16 and (conv.groups > 1 or (torch.is_grad_enabled() and conv.weight.requires_grad
                                         and not bf16_weight_gradient_agrees(conv, x))):
        with torch.autocast(kind, enabled=False):
            return type(conv).forward(conv, x.float())
    return type(conv).forward(conv, x)


_AGREES = {}  # geometry and input shape -> verdict: a network's copies and repeated layers ask once


def bf16_weight_gradient_agrees(conv, x, tolerance=0.05):
    """Whether this CPU's bf16 weight gradient of `conv` (its class's own forward: "same" padding and the
    like included) on inputs shaped like `x` is within `tolerance` (relative, in norm; bf16 itself is ~0.005
    off) of fp32's, on random data. Twice: the wrong values vary from call to call."""
    key = (type(conv), tuple(x.shape), tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation,
           conv.groups, conv.padding_mode, conv.bias is None)
    if key not in _AGREES:
        _AGREES[key] = _probe(conv, tuple(x.shape), tolerance)
    return _AGREES[key]


def _probe(conv, shape, tolerance):
    generator = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(conv)
    probe.__dict__.pop("forward", None)  # the class's forward, not the check around it
    x = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last_3d)

    def weight_gradient(dtype, grad_out=None):
        layer = probe.to(dtype)
        layer.zero_grad(set_to_none=True)
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            out = layer(x.to(dtype))
            grad_out = torch.randn(out.shape, generator=generator) if grad_out is None else grad_out
            out.backward(grad_out.to(dtype))
        return layer.weight.grad.float(), grad_out
    exact, grad_out = weight_gradient(torch.float32)
    for _ in range(2):
        error = (weight_gradient(torch.bfloat16, grad_out)[0] - exact).norm() / exact.norm().clamp_min(1e-30)
        if not error <= tolerance:  # NaN fails too
            return False
    return True
