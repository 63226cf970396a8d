"""Ray Job: pre-train the CF backbone (SASRec by default) on a prepared data set.

python jobs/train_cf.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/train_cf.py --config configs/ml-1m.yaml
"""

import sys

from allmrec.cli import main

# A Ray Job entry point is `allmrec train cf`: the same code path, options and error policy.
if __name__ == "__main__":
    sys.exit(main(["train", "cf", *sys.argv[1:]]))
