"""Which device and precision to run on, and how fast that device can possibly go (for MFU)."""
import contextlib
import time

import torch

from nanosuno.common import UserError

# dense bf16 tensor-core peaks (no sparsity), FLOP/s, by substring of the CUDA device name
CUDA_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                   "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}

# the precisions of training (the dtype setting, besides "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_type(device):
    """The kind of a device ("cuda", "mps" or "cpu"), from its name ("cuda:1") or a torch.device."""
    return str(device).split(":")[0]


def pick_device(setting="auto"):
    """'auto' = cuda, then mps, then cpu; anything else is checked and passed through."""
    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device_type(setting)
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={setting} but CUDA is not available here; use --device=auto or --device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={setting} but MPS is not available here; use --device=auto or --device=cpu")
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown device '{setting}': use auto, cpu, cuda, cuda:N or mps")
    return setting


def cpu_has_bf16():
    """True when this CPU has native bf16 matmul (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(setting, device):
    """'auto' = bfloat16 where the device does it natively, float16 on older CUDA GPUs, else float32."""
    kind = device_type(device)
    if setting == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if kind == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if setting not in DTYPES:
        raise UserError(f"unknown dtype '{setting}': use auto, {', '.join(DTYPES)}")
    return DTYPES[setting]


def pick_decode_dtype(setting, device):
    """Generation's precision, one of decode.DECODE_DTYPES (the config checks the setting). 'auto' =
    int8 on a CPU, bfloat16 on a GPU that has it, else float32. On a CPU a decode step is bound by
    reading the weights, and int8 reads a quarter of float32's bytes (bench.py decode_quality
    measures what it costs in cross-entropy)."""
    if setting != "auto":
        return setting
    kind = device_type(device)
    if kind == "cpu":
        return "int8"
    return "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def autocast(device, dtype):
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=dtype)


def peak_flops(device, dtype, seconds=0.5):
    """The FLOP/s that MFU is measured against. CUDA: the datasheet's dense peak for the GPU (None if
    the GPU is not in the table). CPU/MPS: the matmul throughput measured here and now in this
    dtype, which is what a perfect training loop could reach on this machine."""
    if device_type(device) == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((f for key, f in CUDA_PEAK_FLOPS.items() if key in name), None)
    n = 1024
    # constant operands: matmul speed does not depend on values, and the global RNG stays untouched
    # (exact resume depends on it)
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device, dtype=dtype)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device_type(device) == "mps":
        torch.mps.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - start)
