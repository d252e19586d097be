"""Pack the public Omniglot archives (or folders) into the file metarun ships:
metarun/data/omniglot.npz.xz.

    python scripts/pack_omniglot.py /path/to/omniglot [--out FILE]

Reads images_background and images_evaluation (zip or extracted) from the given folder, stores every
image as packed bits with its labels (see metarun/data/embedded.py), checks that unpacking gives the
same pixels, and prints the file's sha256, which metarun/data/embedded.py and the README record.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from metarun.data.embedded import EMBEDDED_PATH, pack, unpack
from metarun.data.sources import find_archives, missing_data_message, read_archives


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "root", type=Path, help="folder holding images_background(.zip), images_evaluation(.zip)"
    )
    parser.add_argument("--out", type=Path, default=EMBEDDED_PATH)
    args = parser.parse_args(argv)
    found = find_archives(args.root)
    if found is None:
        sys.exit(missing_data_message(args.root))
    strokes = read_archives(found)
    digest = pack(strokes, args.out)
    start = time.perf_counter()
    back = unpack(args.out)
    load_s = time.perf_counter() - start
    same = (
        np.array_equal(back.masks, strokes.masks)
        and np.array_equal(back.character, strokes.character)
        and np.array_equal(back.drawer, strokes.drawer)
        and back.character_names == strokes.character_names
    )
    if not same:
        sys.exit("unpacked file differs from the archives")
    print(
        f"{args.out}: {len(strokes.masks)} images, {len(strokes.character_names)} characters, "
        f"{len(strokes.alphabet_names)} alphabets, {args.out.stat().st_size} bytes, load "
        f"{load_s:.2f} s"
    )
    print(f"sha256 {digest}")


if __name__ == "__main__":
    main()
