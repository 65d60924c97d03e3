"""Entry point for ``ray job submit``: run a method (or one stage) from a YAML config.

    ray job submit --working-dir . -- python jobs/run.py --config jobs/configs/finetune.yaml
    ray job submit --working-dir . -- python jobs/run.py --config jobs/configs/finetune.yaml \\
        --variant all --stage finetune --set data=s3://bucket/ml1m --set storage=s3://bucket/runs

Inside a submitted job Ray is already running (``RAY_ADDRESS`` is set), so this joins it.
Use absolute paths or URIs for ``data`` and ``storage`` on a cluster: the working
directory is copied to a temporary place on each node.
"""

import sys

from raytrain_ctr.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
