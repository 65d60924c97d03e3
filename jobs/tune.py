"""Entry point for a Ray Tune sweep as a job (ASHA on target-validation AUC).

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/l2sp.yaml --samples 16
"""

import sys

from raytrain_ctr.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
