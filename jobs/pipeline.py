"""Ray Job: the whole chain (data, CF, Stage 1, Stage 2, evaluation), skipping every stage
whose outputs already exist for the same config and inputs.

python jobs/pipeline.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/pipeline.py --config configs/ml-1m.yaml
"""

import sys

from allmrec.cli import main

# A Ray Job entry point is `allmrec demo --no-serve`: the same code path, options and error policy.
if __name__ == "__main__":
    sys.exit(main(["demo", "--no-serve", *sys.argv[1:]]))
