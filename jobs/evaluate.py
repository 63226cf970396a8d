"""Ray Job: the evaluation table (A-LLMRec, the CF backbone, the LLM alone, popularity, random).

python jobs/evaluate.py --config configs/ml-100k-cpu.yaml
ray job submit --working-dir . -- python jobs/evaluate.py --config configs/ml-1m-opt-6.7b.yaml
"""

import sys

from allmrec.cli import parse_job_args, run_job
from allmrec.distributed.evaluate import evaluate_stack
from allmrec.distributed.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    config, run = parse_job_args(__doc__, argv)
    init_ray(config.ray)
    evaluate_stack(config, run)
    print((run.local / "eval" / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
