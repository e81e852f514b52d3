"""`python -m dinotxt_fast.cli ...` (what torchrun launches: `torchrun ... -m dinotxt_fast.cli train ...`)."""
import sys

from . import main

sys.exit(main())
