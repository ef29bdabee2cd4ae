"""Package a saved model as scxtrimo's shipped default (``scxtrimo.tl.embed(adata)``).

Usage: ``python scripts/build_pretrained_default.py MODEL_DIR [--notes TEXT]``

Writes ``src/scxtrimo/_resources/pretrained/model.pt`` with the weights rounded to float16
(half the size in the wheel; they are loaded back into float32) and ``model.json`` with the
metadata of the source model plus a ``shipped_default`` entry recording what was done.
The shipped model *is* the rounded one: every number reported for it is measured after
rounding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "src" / "scxtrimo" / "_resources" / "pretrained"


def main() -> None:
    """Round the weights to float16 and copy the model into the package resources."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    state = torch.load(args.model_dir / "model.pt", map_location="cpu", weights_only=True)
    rounded = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    meta = json.loads((args.model_dir / "model.json").read_text())
    meta["source"] = "scxtrimo-default"
    meta["shipped_default"] = {"weights_dtype": "float16", "notes": args.notes}
    TARGET.mkdir(parents=True, exist_ok=True)
    torch.save(rounded, TARGET / "model.pt")
    (TARGET / "model.json").write_text(json.dumps(meta, indent=1))
    size = (TARGET / "model.pt").stat().st_size / 2**20
    print(f"wrote {TARGET} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
