"""``python -m sparc.sa check [DSN | config.yaml | site.zcml]``."""

import sys

from sparc.sa.check import main

sys.exit(main())
