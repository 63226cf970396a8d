"""Ray Job: Stage 2 of A-LLMRec, the projectors in front of the frozen LLM (DeepSpeed ZeRO-3).

python jobs/train_stage2.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/train_stage2.py --config configs/ml-1m-opt-6.7b.yaml
"""

import sys

from allmrec.cli import main

# A Ray Job entry point is `allmrec train stage2`: the same code path, options and error policy.
if __name__ == "__main__":
    sys.exit(main(["train", "stage2", *sys.argv[1:]]))
