"""Accelerator and link numbers the planner prices a job with (per GPU, from vendor datasheets), and the one table
of GPU peaks (the planner's accelerators and the trainer's MFU both read `GPU_PEAK_TFLOPS`).

Peak FLOP/s are *dense* bf16 tensor-core numbers: datasheets print the 2:4-sparsity figure first, which is
twice the dense one. Link bandwidths are per GPU and per direction (datasheets print NVLink bidirectional).
`memory_gib` is the total the driver reports (nvidia-smi / rocm-smi), a little below the marketing "GB".
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peaks in TFLOP/s per GPU (vendor datasheets, without sparsity), keyed by a substring of
# the device name torch reports. Order matters: the first key that occurs in the name wins ("GB200" before
# "B200", "H100 PCIe" before "H100").
GPU_PEAK_TFLOPS: dict[str, float] = {
    "GB200": 2500.0,  # GB200 NVL72 datasheet: 5 PFLOPS sparse per GPU
    "B200": 2250.0,  # HGX B200 datasheet: 4.5 PFLOPS sparse per GPU
    "H200": 989.4,  # H200 SXM datasheet: 1,979 TFLOPS sparse
    "H100 NVL": 835.0,  # H100 NVL datasheet: 1,671 TFLOPS sparse
    "H100 PCIe": 756.0,  # H100 PCIe datasheet: 1,513 TFLOPS sparse
    "H100": 989.4,  # H100 SXM5 datasheet: 1,979 TFLOPS sparse; the H100 whitepaper prints 989.4 dense
    "A100": 312.0,  # A100 datasheet: 312 dense, 624 sparse
    "MI355X": 2500.0,  # AMD Instinct MI355X datasheet
    "MI325X": 1307.4,  # AMD Instinct MI325X datasheet
    "MI300X": 1307.4,  # AMD Instinct MI300X datasheet: 1,307.4 dense, 2,614.9 sparse
}


def gpu_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of a GPU named `device_name` (as torch reports it), or None when it is not in the table."""
    return next((tflops for key, tflops in GPU_PEAK_TFLOPS.items() if key.lower() in device_name.lower()), None)


@dataclass(frozen=True)
class Accelerator:
    """One GPU type and the links it typically sits on."""

    name: str
    peak_bf16_tflops: float
    "Dense bf16 tensor-core peak, TFLOP/s."
    memory_gib: float
    "Device memory the driver reports, GiB."
    intra_node_gbps: float
    "NVLink / xGMI bandwidth per GPU per direction, GB/s."
    inter_node_gbps: float
    "Typical scale-out (InfiniBand / RoCE) bandwidth per GPU per direction, GB/s."
    source: str
    "Where the numbers come from."


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3 (nvidia-smi: 81,559 MiB); NVLink 4 900 GB/s bidirectional.
    # DGX H100: 8x ConnectX-7 400 Gb/s NDR, one per GPU.
    "h100": Accelerator(
        "H100 SXM5 80GB",
        GPU_PEAK_TFLOPS["H100"],
        79.6,
        450.0,
        50.0,
        "NVIDIA H100 Tensor Core GPU datasheet; DGX H100 user guide",
    ),
    # NVIDIA H200 SXM datasheet: 141 GB HBM3e (nvidia-smi: 143,771 MiB); NVLink 900 GB/s bidirectional;
    # HGX H200 reference design: 400 Gb/s per GPU.
    "h200": Accelerator(
        "H200 SXM 141GB", GPU_PEAK_TFLOPS["H200"], 140.4, 450.0, 50.0, "NVIDIA H200 Tensor Core GPU datasheet"
    ),
    # NVIDIA HGX B200 datasheet (per GPU): 180 GB HBM3e; NVLink 5 1.8 TB/s bidirectional.
    # DGX B200: 8x ConnectX-7 400 Gb/s.
    "b200": Accelerator(
        "B200 (HGX) 180GB", GPU_PEAK_TFLOPS["B200"], 179.0, 900.0, 50.0, "NVIDIA HGX B200 datasheet; DGX B200 datasheet"
    ),
    # NVIDIA A100 SXM4 80GB datasheet: 80 GB HBM2e; NVLink 3 600 GB/s bidirectional.
    # DGX A100: 8x ConnectX-6 200 Gb/s HDR, one per GPU.
    "a100": Accelerator(
        "A100 SXM4 80GB",
        GPU_PEAK_TFLOPS["A100"],
        80.0,
        300.0,
        25.0,
        "NVIDIA A100 Tensor Core GPU datasheet; DGX A100 datasheet",
    ),
    # AMD Instinct MI300X datasheet: 192 GB HBM3; 7 Infinity Fabric
    # links of 128 GB/s bidirectional each (896 GB/s aggregate, 448 GB/s one way). Typical 400 Gb/s NIC per GPU.
    "mi300x": Accelerator(
        "MI300X OAM 192GB", GPU_PEAK_TFLOPS["MI300X"], 191.5, 448.0, 50.0, "AMD Instinct MI300X datasheet"
    ),
}

# A config 'fits' when the predicted peak stays under this share of device memory: the CUDA/ROCm context, NCCL
# buffers and allocator fragmentation take the rest (PyTorch jobs typically lose 5-10% to them).
USABLE_MEMORY_FRACTION = 0.92

# Share of the dense peak that large bf16 training GEMMs sustain (well-tuned dense LLM training reaches 40-60% MFU
# on H100; grouped expert GEMMs and attention sit at the lower end). Compute time = hardware FLOPs / (peak * this).
MATMUL_EFFICIENCY = 0.6

# Share of the link bandwidth NCCL/RCCL collectives reach at large message sizes (bus bandwidth / line rate).
# Tensor parallelism's sequence-parallel all-gathers / reduce-scatters (planner/tensor_parallel.py) run on
# intra_node_gbps: NVLink 4 on H100/H200 SXM is 18 links x 25 GB/s = 450 GB/s per direction (datasheets above);
# nccl-tests on 8x H100 SXM5 report 460-480 GB/s all-reduce bus bandwidth with NVLink SHARP (NVSwitch in-network
# reduction; docs.alayanew.com, "NCCL-tests in practice", reference table), so 450 x 0.8 = 360 GB/s is conservative.
COLLECTIVE_EFFICIENCY = 0.8


def get_accelerator(name: str) -> Accelerator:
    """Look up a GPU by short name (h100, h200, b200, a100, mi300x); a clear error lists the known ones."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ACCELERATORS:
        raise ValueError(f"--gpu: unknown accelerator {name!r} (known: {', '.join(ACCELERATORS)})")
    return ACCELERATORS[key]
