"""``python -m asr_fx.cli``: the same as the ``asr-fx`` command."""

import sys

from asr_fx.cli import main

sys.exit(main())
