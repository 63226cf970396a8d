"""Ray Job: Stage 1 of A-LLMRec under DeepSpeed ZeRO-3 (collaborative-text alignment).

python jobs/train_stage1.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/train_stage1.py --config configs/ml-1m.yaml
"""

import sys

from allmrec.cli import main

# A Ray Job entry point is `allmrec train stage1`: the same code path, options and error policy.
if __name__ == "__main__":
    sys.exit(main(["train", "stage1", *sys.argv[1:]]))
