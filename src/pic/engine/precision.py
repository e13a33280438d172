"""``trainer.precision``: what the hardware runs natively, chosen at start-up and stated.

bf16 autocast halves the cost of a step only where the hardware has bf16 units: CUDA devices
from Ampere on, and x86 CPUs with AVX-512 BF16 or AMX whose kernels (ATen's AVX-512 dispatch,
oneDNN's bf16 ISA) may use them. Elsewhere bf16 is emulated, about 10× slower than fp32 on a
Zen 2 CPU (152 s vs 15 s for the default 6 steps, issue 12). ``auto`` picks bf16 where native,
fp16 with loss scaling on CUDA devices without bf16, fp32 otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = ("auto", *PRECISIONS)


@dataclass(frozen=True)
class Hardware:
    """What decides the precision. CPU fields: ``cpu_capability`` is ATen's kernel dispatch
    (``torch.backends.cpu.get_cpu_capability()``: DEFAULT, AVX2, AVX512, ...; lowered by
    ``ATEN_CPU_CAPABILITY``), ``mkldnn_bf16`` whether oneDNN runs bf16 (lowered by
    ``ONEDNN_MAX_CPU_ISA``), ``bf16_units`` whether the CPU has AVX-512 BF16 or AMX."""

    device_type: str
    device_name: str
    cuda_bf16: bool = False
    cpu_capability: str = "DEFAULT"
    mkldnn_bf16: bool = False
    bf16_units: bool = False

    @classmethod
    def probe(cls, device: torch.device) -> Hardware:
        if device.type == "cuda":
            with torch.cuda.device(device):
                return cls("cuda", torch.cuda.get_device_name(device),
                           cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
        units = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return cls(device.type, "CPU", cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   mkldnn_bf16=torch.ops.mkldnn._is_mkldnn_bf16_supported(), bf16_units=units)

    @property
    def native_bf16(self) -> bool:
        if self.device_type == "cuda":
            return self.cuda_bf16
        return (self.device_type == "cpu" and self.bf16_units and self.mkldnn_bf16
                and self.cpu_capability.startswith("AVX512"))

    def describe_bf16(self) -> str:
        if self.device_type == "cuda":
            return f"{self.device_name} {'has' if self.cuda_bf16 else 'has no'} bf16"
        return (f"CPU: AVX-512 BF16/AMX units {'yes' if self.bf16_units else 'no'}, ATen kernels "
                f"{self.cpu_capability}, oneDNN bf16 {'yes' if self.mkldnn_bf16 else 'no'}")


def choose_precision(requested: str, hw: Hardware) -> tuple[str, str]:
    """(precision to run, why) for ``trainer.precision=requested`` on ``hw``."""
    if requested not in CHOICES:
        raise ValueError(f"trainer.precision={requested!r}: expected one of {list(CHOICES)}")
    if requested != "auto":
        return requested, f"trainer.precision={requested} as set ({hw.describe_bf16()})"
    if hw.native_bf16:
        return "bf16", f"auto: native bf16 ({hw.describe_bf16()})"
    if hw.device_type == "cuda":
        return "fp16", f"auto: fp16 with loss scaling ({hw.describe_bf16()})"
    return "fp32", f"auto: no native bf16 ({hw.describe_bf16()}), bf16 would be emulated"


def emulated_bf16_warning(precision: str, hw: Hardware) -> str | None:
    """The warning for an explicit bf16 the hardware would emulate, else None."""
    if precision != "bf16" or hw.native_bf16:
        return None
    return (f"trainer.precision=bf16 without native bf16 ({hw.describe_bf16()}): bf16 is "
            "emulated here, likely ~10x slower than fp32; use trainer.precision=auto or fp32")


def non_finite_hint(precision: str) -> str:
    """The precision's part of a non-finite loss's likely causes: fp16 overflows (bf16 has
    fp32's range), bf16 rounds to 8 bits of mantissa, fp32 is the reference (no hint)."""
    return {"fp16": "fp16 overflow (try trainer.precision=bf16 where the hardware has it, or "
                    "fp32), ",
            "bf16": "bf16 rounding (try trainer.precision=fp32), "}.get(precision, "")
