import sys

from rlhf_env.cli import main

sys.exit(main())
