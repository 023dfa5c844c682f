"""``python -m mrus_models.train MODEL ...``: ``mrus train MODEL ...`` (the same parser).

The form ``torchrun --nproc_per_node N -m mrus_models.train MODEL ...`` trains on N
processes (DDP; see :class:`mrus_models.train.Trainer`).
"""

import sys

from mrus_models.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
