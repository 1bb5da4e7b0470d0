"""Sample from an MCDPipeline folder (or Hub id) and print the texts.

    python examples/sample.py outputs/quickstart/student --num_samples 4 --num_inference_steps 4
    python examples/sample.py outputs/quickstart/teacher --prompt "ab" --sampler shadow

Same flags as `mcd-hf sample` (this file calls it).
"""

import sys

from mcd_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
