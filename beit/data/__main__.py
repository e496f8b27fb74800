"""``python -m beit.data OUT --num-images N --classes C``: the same as ``beit-make-synthetic``."""

import sys

from beit.data.synthetic import main

sys.exit(main())
