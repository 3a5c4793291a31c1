"""Train the embedded reference model of the quality benchmark (seeded, CPU-friendly).

    python bench/train_binder.py --out bench/models/binder

Writes a LlamaForCausalLM checkpoint (safetensors + config.json), a WordLevel tokenizer
(tokenizer.json + tokenizer_config.json) and training.json (config, curriculum, accuracy history).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.quality` from a checkout

from bench.quality.train import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/models/binder")
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("int", "float", "str"):
            ap.add_argument("--" + f.name.replace("_", "-"), type={"int": int, "float": float, "str": str}[f.type],
                            default=f.default)
    args = ap.parse_args()
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if hasattr(args, f.name)})
    train(args.out, cfg, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
