"""The card's two ceilings: device-to-device copy bandwidth and dense bf16 matmul throughput.

Every kernel is reported as a fraction of these, measured in the same run on the same card.
"""

from __future__ import annotations

import torch

from benchmarks.common import row, time_fn


def measure(device: str = "cuda", quick: bool = False) -> list[dict]:
    rows = []
    n = (1 << 26) if quick else (1 << 30)  # bytes per buffer: 64 MiB / 1 GiB (>> L2)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick=quick)
    rows.append(row("ceiling: copy", "torch", f"{n >> 20} MiB", "uint8", t,
                    gbps=2 * n / (t["ms"] * 1e-3) / 1e9))  # fmt: skip
    src = dst = None  # free 2 GiB before the matmul
    m = 1024 if quick else 8192
    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(m, m, device=device, dtype=dt)
    b = torch.randn(m, m, device=device, dtype=dt)
    t = time_fn(lambda: a @ b, device, quick=quick)
    rows.append(row("ceiling: matmul", "torch", f"{m}x{m}x{m}", dt, t,
                    tflops=2 * m**3 / (t["ms"] * 1e-3) / 1e12))  # fmt: skip
    return rows
