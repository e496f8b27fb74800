"""``python -m beit.tokenizer``: the ``beit-tokenizer`` command without an installed entry point."""

import sys

from beit.tokenizer import main

sys.exit(main())
