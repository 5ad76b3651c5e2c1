"""Training FLOPs per image (counted by PyTorch) and model-FLOP utilisation against the device's peak.

FLOPs are those of torch.utils.flop_counter.FlopCounterMode: matrix multiplications,
convolutions and attention, forward and backward, as dispatched (the first layer's
input gradient, which nobody needs, is not computed, so not counted). Elementwise work
(batch norm, activations, the optimiser) is left out, as usual for MFU. The count runs
on the meta device: shapes only, no memory and no arithmetic, so it costs the same for
WRN-40-10 as for an MLP.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets,
# where the headline figure is "with sparsity", twice the dense one:
#   H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS (SXM), 1,513 (PCIe), 1,671 (NVL), with sparsity;
#   H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS (SXM), 1,671 (NVL), with sparsity;
#   A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 with sparsity), SXM and PCIe alike.
# torch.cuda.get_device_name picks the row, first match wins ("NVIDIA H100 80GB HBM3" is the SXM part).
# Word boundaries keep "GH200" (Grace Hopper) from matching H200: it is not in the table, so gets no MFU.
PEAK_BF16_TFLOPS = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.5),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.5),
    (r"\bH100\b", "H100 SXM", 989.5),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.5),
    (r"\bH200\b", "H200 SXM", 989.5),
    (r"\bA100\b", "A100", 312.0),
)


def peak_bf16_tflops(device_name: str) -> Optional[tuple]:
    """(row name, dense bf16 TFLOP/s) of a CUDA device name, or None for a device not in the table."""
    for pattern, row, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return row, peak
    return None


def training_flops(model: torch.nn.Module, x: torch.Tensor, num_classes: int) -> int:
    """FLOPs of one training step's forward and backward (soft-target cross-entropy, as mixup trains)."""
    model.train()
    targets = torch.full((x.shape[0], num_classes), 1.0 / num_classes, device=x.device)
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(x).float(), targets)
        loss.backward()
    return counter.get_total_flops()


def training_flops_per_image(model: torch.nn.Module, image_shape: tuple, num_classes: int, batch: int = 2) -> float:
    """Training FLOPs per image, counted on the meta device at `batch` images of `image_shape` (C, H, W).

    The model is moved to the meta device (its weights are dropped): pass a throwaway copy.
    """
    model = model.to("meta")
    x = torch.empty(batch, *image_shape, device="meta")
    return training_flops(model, x, num_classes) / batch


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float) -> float:
    """Model-FLOP utilisation: achieved FLOP/s over the peak, as a fraction."""
    return flops_per_image * images_per_s / (peak_tflops * 1e12)
