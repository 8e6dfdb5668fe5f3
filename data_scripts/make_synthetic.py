"""Write the synthetic shapes dataset as shards in a folder of your choice, to inspect it or to train on it by path.

These are the same samples `python -m vlm.train` generates into its cache when no `data.train` is given (same
defaults, same seeds), written with `vlm.data.synthetic.write_split`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_scripts/make_synthetic.py`: make `data_scripts` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_scripts.shard_writing import (  # noqa: E402
    DataError,
    override,
    prepare_output,
    stopped_by_ctrl_c,
    write_classnames,
)
from vlm.cli import compose_config  # noqa: E402
from vlm.config import SyntheticConfig, load_config  # noqa: E402
from vlm.data import synthetic  # noqa: E402

STAGES = {"captions": "contrastive", "conversations": "sft"}  # what each kind trains, for the example command
EXAMPLE = """\
output:
  OUT/train/shard-000000.tar ...  captions: KEY.png, KEY.txt, KEY.cls; conversations: KEY.json, KEY.0.png, ...
  OUT/val/...                     the held-out split (skipped with --num-val 0)
  OUT/*/classnames.txt            captions only: the 32 "colour shape" class names in label order

example:
  python data_scripts/make_synthetic.py --kind captions --out synthetic/ --num-train 2000 --num-val 200
"""


def main(argv: list[str] | None = None) -> int:
    # the trainer's defaults (configs/data/synthetic.yaml), so both produce the same dataset unless told otherwise
    d = load_config(SyntheticConfig, compose_config("train").data.synthetic, path="data.synthetic.")
    parser = argparse.ArgumentParser(
        prog="make_synthetic.py",
        description="Write vlm's deterministic synthetic shapes dataset (what training uses when no data is given) "
                    "as webdataset shards.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(synthetic.KINDS), required=True,
                        help="captions (contrastive, align) or conversations (sft)")
    parser.add_argument("--out", metavar="DIR", type=Path, required=True,
                        help="output folder; shards go to OUT/train and OUT/val")
    parser.add_argument("--num-train", metavar="N", type=int, default=d.num_train,
                        help=f"train samples (default: {d.num_train})")
    parser.add_argument("--num-val", metavar="N", type=int, default=d.num_val,
                        help=f"held-out samples (default: {d.num_val})")
    parser.add_argument("--image-size", metavar="PX", type=int, default=d.image_size,
                        help=f"image side in pixels (default: {d.image_size})")
    parser.add_argument("--seed", metavar="S", type=int, default=d.seed, help=f"dataset seed (default: {d.seed})")
    parser.add_argument("--samples-per-shard", metavar="N", type=int, default=d.samples_per_shard,
                        help=f"samples per .tar (default: {d.samples_per_shard})")
    parser.add_argument("--overwrite", action="store_true", help="replace shards left in OUT by an earlier run")
    args = parser.parse_args(argv)
    try:
        for name in ("num_train", "image_size", "samples_per_shard"):
            if getattr(args, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if args.num_val < 0:
            raise DataError(f"--num-val must be 0 or more, got {args.num_val}")
        splits = {"train": args.num_train, "val": args.num_val}
        splits = {split: num for split, num in splits.items() if num > 0}
        prepare_output(args.out, splits, args.overwrite)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    patterns = []
    for split, num in splits.items():
        directory = args.out / split
        seed = synthetic.split_seed(args.seed, args.kind, split)
        try:
            pattern = synthetic.write_split(args.kind, directory, num, seed, args.image_size, args.samples_per_shard,
                                            **synthetic.train_choices(d, args.kind, split))
        except KeyboardInterrupt:
            return stopped_by_ctrl_c(args.out)
        if args.kind == "captions":
            write_classnames([directory], synthetic.CLASSNAMES)
        patterns.append(override(f"data.{split}", pattern))
        print(f"{split}: {num} {args.kind} sample(s): {patterns[-1]}")
    print(f"train on them with:\n  python -m vlm.train stage={STAGES[args.kind]} " + " ".join(patterns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
