"""``python -m trellis.terraform``: run the provider (what the mirror's executable does)."""

import sys

from trellis.terraform.provider import main

sys.exit(main())
