"""`python -m advplugin.service`: the same as `advplugin serve`."""

import sys

from advplugin.cli.serve import main

sys.exit(main())
