"""Export time and memory vs a plain ``torch.load`` + ``torch.save`` of the same 375 MB ViT-B.

    python benchmarks/bench_export.py

Each measurement runs in a fresh subprocess so peak RSS (VmHWM) belongs to that step alone.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = r"""
import json, sys, time, torch
kind, src, out = sys.argv[1:4]
t = time.perf_counter()
if kind == "plain":
    torch.save(torch.load(src, map_location="cpu", weights_only=False), out)
else:
    from medico_adapters.checkpoint import export_checkpoint
    export_checkpoint(src, out)
seconds = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_mib": hwm / 1024}))
"""


def main() -> None:
    import torch
    from segment_anything import build_sam_vit_b

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = build_sam_vit_b().state_dict()
        training = tmp / "training.pt"
        torch.save({"model_state": {f"sam.{k}": v for k, v in state.items()}, "epoch": 1}, training)
        size = training.stat().st_size / 2**20
        results: dict[str, list[dict]] = {"plain": [], "export": []}
        for _ in range(3):
            for kind in results:  # interleaved, so machine load hits both alike
                proc = subprocess.run([sys.executable, "-c", STEP, kind, str(training), str(tmp / f"{kind}.pt")],
                                      capture_output=True, text=True, check=True)
                results[kind].append(json.loads(proc.stdout))
        print(f"checkpoint: {size:.0f} MiB training-format ViT-B, median of 3 interleaved runs")
        for kind, label in (("plain", "torch.load + torch.save"), ("export", "medico-adapters export")):
            seconds = statistics.median(r["seconds"] for r in results[kind])
            peak = statistics.median(r["peak_mib"] for r in results[kind])
            print(f"  {label:<24} {seconds:6.2f} s   peak RSS {peak:6.0f} MiB")
        ratio = statistics.median(r["seconds"] for r in results["export"]) / statistics.median(r["seconds"] for r in results["plain"])
        print(f"  export / plain time: {ratio:.2f}")


if __name__ == "__main__":
    main()
