"""The device a run uses and what it can do: device and dtype choice, peak FLOP/s and MFU.

Shared by train.py, sample.py, evaluate and the benchmarks, so "auto" means the same everywhere.
"""

import re

import torch

# The command-line tools take either spelling: train.py's config says bf16/fp32, torch says bfloat16/float32.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU. A bad or unavailable name is a ValueError whose message
    the command-line tools pass to argparse's error (usage + message, exit code 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but this PyTorch sees no CUDA GPU; use --device cpu.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that support it (half the memory traffic per token), else float32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]


# Dense (no sparsity) peak TFLOP/s by device name: (bf16/fp16 tensor cores, fp32 non-tensor). Vendor
# datasheet figures. Names match as whole words ("L4" is not "L40S"); the first match wins, so more
# specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 51.0)),
    ("H100 NVL", (835.0, 60.0)),
    ("H100", (989.0, 67.0)),
    ("H200 NVL", (835.0, 60.0)),  # the PCIe card, lower clocks and power than the SXM module
    ("H200", (989.0, 67.0)),
    ("GH200", (989.0, 67.0)),  # Grace Hopper: the SXM part's rates ("GH200" is not the word "H200")
    ("A100", (312.0, 19.5)),
    ("L40S", (362.0, 91.6)),
    ("L40", (181.0, 90.5)),
    ("L4", (121.0, 30.3)),
    ("4090", (165.2, 82.6)),
)


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet peak FLOP/s of a known GPU for this dtype, or None (CPUs, unknown cards). fp32 matmuls
    run on TF32 tensor cores when torch's matmul precision allows it (train.py does), whose peak is
    half the bf16 one on all of these cards."""
    for pattern, (half, single) in PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(pattern)}\b", device_name):
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            return (half / 2 if torch.get_float32_matmul_precision() != "highest" else single) * 1e12
    return None


def estimate_mfu(flops_per_token: float, tokens_per_second: float, device_name: str,
                 dtype: torch.dtype, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak, None when the peak is unknown."""
    peak = peak_flops(device_name, dtype)
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * n_devices)
