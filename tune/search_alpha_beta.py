"""Ray Job: the Ray Tune search over Stage 1's alpha and beta (ASHA stops poor trials early).

python tune/search_alpha_beta.py --config configs/ml-100k-cpu.yaml
python tune/search_alpha_beta.py --config configs/ml-100k-cpu.yaml --resume
ray job submit --working-dir . -- python tune/search_alpha_beta.py --config configs/ml-1m.yaml
Then: allmrec train stage1 --config configs/ml-100k-cpu.yaml \
          --config runs/ml-100k-cpu/tune/best.yaml
"""

import sys

from allmrec.cli import format_tune_summary, parse_job_args, run_job
from allmrec.distributed.runtime import init_ray
from allmrec.distributed.tune_alpha_beta import search_alpha_beta


def main(argv: list[str] | None = None) -> int:
    extra = [(("--resume",), {"action": "store_true", "help": "continue (Tuner.restore)"})]
    config, run, args = parse_job_args(__doc__, argv, extra, return_args=True)
    init_ray(config.ray)
    summary = search_alpha_beta(config, run, resume=args.resume)
    print(format_tune_summary(summary, run))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
