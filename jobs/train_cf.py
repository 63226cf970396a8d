"""Ray Job: pre-train the CF backbone (SASRec by default) on a prepared data set.

python jobs/train_cf.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/train_cf.py --config configs/ml-1m.yaml
"""

import sys

from allmrec.cli import format_cf_metrics, parse_job_args, run_job
from allmrec.distributed.runtime import init_ray
from allmrec.distributed.train_cf import train_cf


def main(argv: list[str] | None = None) -> int:
    config, run = parse_job_args(__doc__, argv)
    init_ray(config.ray)
    manifest = train_cf(config, run)
    print(format_cf_metrics(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
