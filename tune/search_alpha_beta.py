"""Ray Job: the Ray Tune search over Stage 1's alpha and beta (ASHA stops poor trials early).

python tune/search_alpha_beta.py --config configs/ml-100k-cpu.yaml
python tune/search_alpha_beta.py --config configs/ml-100k-cpu.yaml --resume
ray job submit --working-dir . -- python tune/search_alpha_beta.py --config configs/ml-1m.yaml
Then: allmrec train stage1 --config configs/ml-100k-cpu.yaml \
          --config runs/ml-100k-cpu/tune/best.yaml
"""

import sys

from allmrec.cli import main

# A Ray Job entry point is `allmrec tune`: the same code path, options and error policy.
if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
