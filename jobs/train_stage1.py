"""Ray Job: Stage 1 of A-LLMRec under DeepSpeed ZeRO-3 (collaborative-text alignment).

python jobs/train_stage1.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/train_stage1.py --config configs/ml-1m.yaml
"""

import sys

from allmrec.cli import format_stage1_metrics, parse_job_args, run_job
from allmrec.distributed.runtime import init_ray
from allmrec.distributed.train_stage1 import train_stage1


def main(argv: list[str] | None = None) -> int:
    config, run = parse_job_args(__doc__, argv)
    init_ray(config.ray)
    manifest = train_stage1(config, run)
    print(format_stage1_metrics(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
