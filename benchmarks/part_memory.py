"""Peak memory of one pipeline part's load, each case in a fresh process.

Cases: ``none`` (imports torch + transformers + sedac_ray, loads no weights), ``no-weights`` (also
builds the model's config and modules on the meta device: every import a load makes, no weight),
``stage1`` (decoder
layers 10..20 of the default model, as the middle of 3 stages), ``stage1-checked`` (the same plus
the adapter's load-time self-check), ``head`` (final norm + LM head), ``whole`` (every weight).
Every loaded weight is read once before measuring (a memory-mapped tensor counts only once its
pages are read). Prints a table and writes ``benchmarks/results/part_memory_<dtype>.json``; peak is
``ru_maxrss``.

    PYTHONPATH=$PWD python benchmarks/part_memory.py [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASES = {
    "none": None,
    "no-weights": "meta",
    "stage1": "ModelPart(range(10, 20))",
    "stage1-checked": "ModelPart(range(10, 20))",
    "head": "ModelPart(range(0), head=True)",
    "whole": "whole",
}

CHILD = """
import json, resource, sys, psutil, torch, transformers
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import load_model
from sedac_ray.model.parts import ModelPart
case, part, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
held = layers = 0
if part == "meta":
    from accelerate import init_empty_weights
    from sedac_ray.model.loading import cache_dir
    config = transformers.AutoConfig.from_pretrained(cache_dir() / "smollm2-135m-instruct")
    with init_empty_weights(include_buffers=False):
        transformers.AutoModelForCausalLM.from_config(config)
elif part != "None":
    loaded = load_model(dtype=dtype, part=None if part == "whole" else eval(part))
    held = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    layers = sum(
        p.numel() * p.element_size() for n, p in loaded.model.named_parameters() if ".layers." in n
    )
    if case.endswith("checked"):
        ModelAdapter(loaded.model)
    # Touch every weight, as serving will: a memory-mapped tensor counts only once its pages are read.
    for p in loaded.model.parameters():
        p.float().sum()
print(json.dumps({
    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_mb": psutil.Process().memory_info().rss / 2**20,
    "held_mb": held / 2**20,
    "layer_mb": layers / 2**20,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    results = {}
    for case, part in CASES.items():
        out = subprocess.run(
            [sys.executable, "-c", CHILD, case, str(part), args.dtype],
            check=True,
            capture_output=True,
            text=True,
        )
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    none, imports = results["none"]["peak_mb"], results["no-weights"]["peak_mb"]
    print(f"{'case':16} {'peak MB':>8} {'held MB':>8} {'over none':>16} {'over no-weights':>16}")
    for case, row in results.items():
        row["peak_over_none_mb"] = row["peak_mb"] - none
        row["peak_over_no_weights_mb"] = row["peak_mb"] - imports
        cells = [f"{row['peak_mb']:8.0f}", f"{row['held_mb']:8.0f}"]
        for over in (row["peak_over_none_mb"], row["peak_over_no_weights_mb"]):
            ratio = f" ({over / row['held_mb']:.2f}x)" if row["held_mb"] else ""
            cells.append(f"{over:.0f}{ratio}".rjust(16))
        print(f"{case:16} " + " ".join(cells))
    target = Path(__file__).parent / "results" / f"part_memory_{args.dtype}.json"
    target.write_text(json.dumps({"dtype": args.dtype, "model": "smollm2-135m", "cases": results}, indent=2))


if __name__ == "__main__":
    main()
