"""`python -m star_jax.bench <name>`: benchmarks that print measured numbers (never run as tests).

decoder    prefill / decode tokens/s and forward FLOP/s as a fraction of a measured matmul peak
data       build a shapes-world dataset, stream it through the generation pipeline (examples/s)
generate   text-to-image images/s, star_jax's compiled CFG loop vs the PyTorch reference loop
vision     vision tower forward + backward images/s, per-frame attention vs one masked block
convert    export / import time and peak host memory for a STAR size
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "decoder": "star_jax.bench.decoder",
    "data": "star_jax.bench.data",
    "generate": "star_jax.bench.generate",
    "vision": "star_jax.bench.vision",
    "convert": "star_jax.bench.convert",
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in BENCHES:
        print(f"usage: python -m star_jax.bench {{{'|'.join(BENCHES)}}} [flags]\n\n{__doc__}")
        return 2
    try:
        module = importlib.import_module(BENCHES[argv[1]])
    except ModuleNotFoundError as e:
        print(f"benchmark {argv[1]!r} is not available yet ({e.name})")
        return 2
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
