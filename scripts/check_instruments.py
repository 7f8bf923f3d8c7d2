"""Known answers of the retrieval instruments on the built-in test split (no model, no training).

    python scripts/check_instruments.py [--gen-seed 0] [--test-size 5000] [--out bench_results/instruments.json]

Regenerates the shapes test split exactly as training does (``probloss.data.shapes.generate_sample`` with the
split's held-out combinations) and scores it with three oracle scorers (``probloss.eval.dual_encoder
.oracle_retrieval``): every plausible key must be 1.0, and the exact-string R@1 shows what a specificity preference
alone does to it. Prints a table and writes JSON.
"""

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from probloss.data import shapes
from probloss.eval.dual_encoder import oracle_retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gen-seed", type=int, default=0, help="data.gen_seed")
    parser.add_argument("--test-size", type=int, default=5000, help="data.test_size")
    parser.add_argument("--heldout", type=int, default=8, help="data.heldout_combos")
    parser.add_argument("--out", default="bench_results/instruments.json")
    args = parser.parse_args()
    heldout = shapes.heldout_combos(args.gen_seed, args.heldout)
    captions, metas = [], []
    for i in tqdm(range(args.test_size), desc="test split", unit="sample"):
        _, caption, meta = shapes.generate_sample(args.gen_seed, shapes.TEST_INDEX_OFFSET + i, heldout=heldout)
        captions.append(caption)
        metas.append(meta)
    results = oracle_retrieval(captions, metas)
    keys = list(next(iter(results.values())))
    print("| scorer | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "oracles": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
