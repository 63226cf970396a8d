"""Ray Job: raw interaction logs and item texts -> Parquet splits and text embeddings.

python jobs/prepare_data.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/prepare_data.py --config configs/ml-1m.yaml
"""

import sys

from allmrec.cli import main

# A Ray Job entry point is `allmrec data prepare`: the same code path, options and error policy.
if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
