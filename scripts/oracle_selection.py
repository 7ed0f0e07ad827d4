"""How much of the naive->full gap can any ranking of the reused tokens recover at r = 0.15?
(sparsex_jax/research/oracle.py; docs/quality.md, round 5)

    python scripts/oracle_selection.py --data ../shared/data/musique_s.json --model PATH.gguf \
      --split dev --prompts 25 --out docs/results/oracle_dev
"""

import sys

from sparsex_jax.research.oracle import main

if __name__ == "__main__":
  sys.exit(main())
