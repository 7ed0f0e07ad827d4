"""Study: can the unselected tokens' stale K/V above layer T be corrected cheaply?
(sparsex_jax/research/residual_carry.py; docs/quality.md, round 6)

    python scripts/study_residual_carry.py --data ../shared/data/musique_s.json --prompts 6
"""

import sys

from sparsex_jax.research.residual_carry import main

if __name__ == "__main__":
  sys.exit(main())
