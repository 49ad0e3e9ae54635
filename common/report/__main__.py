"""`python -m common.report DIR [DIR ...]`: see :mod:`common.report.tables`."""
import sys

from common.report.tables import main

sys.exit(main())
