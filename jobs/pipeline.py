"""Ray Job: the whole chain (data, CF, Stage 1, Stage 2, evaluation), skipping every stage
whose outputs already exist for the same config and inputs.

python jobs/pipeline.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/pipeline.py --config configs/ml-1m.yaml
"""

import sys

from allmrec.cli import parse_job_args, run_job
from allmrec.distributed.pipeline import run_pipeline


def main(argv: list[str] | None = None) -> int:
    config, run = parse_job_args(__doc__, argv)
    manifests = run_pipeline(config, run)
    for stage, manifest in manifests.items():
        print(f"{stage}: {run.uri(stage)} ({manifest.get('created_at')})")
    print((run.local / "eval" / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
