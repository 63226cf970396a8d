"""Ray Job: the evaluation table (A-LLMRec, the CF backbone, the LLM alone, popularity, random).

python jobs/evaluate.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/evaluate.py --config configs/ml-1m-opt-6.7b.yaml
"""

import sys

from allmrec.cli import main

# A Ray Job entry point is `allmrec evaluate`: the same code path, options and error policy.
if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
