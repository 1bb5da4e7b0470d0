"""Train a teacher on the embedded corpus, distill it with MCD, compare them: offline, CPU, about 10 minutes.

    python examples/quickstart.py                 # same as `mcd-hf demo`
    python examples/quickstart.py --help          # corpus, sizes, steps, --output_dir, --overwrite

The implementation is `mcd_hf.quickstart` (shared with the `mcd-hf demo` command).
"""

import sys

from mcd_hf.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
