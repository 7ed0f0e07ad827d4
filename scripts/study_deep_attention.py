"""Study: could the cache predict which reused tokens deep layers read?
(sparsex_jax/research/deep_attention.py; docs/quality.md, round 6)

    python scripts/study_deep_attention.py --data ../shared/data/musique_s.json --prompts 5
"""

import sys

from sparsex_jax.research.deep_attention import main

if __name__ == "__main__":
  sys.exit(main())
