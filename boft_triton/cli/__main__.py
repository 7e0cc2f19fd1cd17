"""``python -m boft_triton.cli`` (and ``accelerate launch -m boft_triton.cli``) run the command line."""

import sys

from . import main

sys.exit(main())
