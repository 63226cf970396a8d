"""Ray Job: Stage 2 of A-LLMRec, the projectors in front of the frozen LLM (DeepSpeed ZeRO-3).

python jobs/train_stage2.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/train_stage2.py --config configs/ml-1m-opt-6.7b.yaml
"""

import sys

from allmrec.cli import format_stage2_metrics, parse_job_args, run_job
from allmrec.distributed.runtime import init_ray
from allmrec.distributed.train_stage2 import train_stage2


def main(argv: list[str] | None = None) -> int:
    config, run = parse_job_args(__doc__, argv)
    init_ray(config.ray)
    manifest = train_stage2(config, run)
    print(format_stage2_metrics(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
