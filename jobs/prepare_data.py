"""Ray Job: raw interaction logs and item texts -> Parquet splits and text embeddings.

python jobs/prepare_data.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/prepare_data.py --config configs/ml-1m.yaml
"""

import json
import sys

from allmrec.cli import parse_job_args, run_job
from allmrec.distributed.data_pipeline import prepare_data
from allmrec.distributed.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    config, run = parse_job_args(__doc__, argv)
    init_ray(config.ray)
    manifest = prepare_data(config, run)
    print(json.dumps(manifest["counts"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
