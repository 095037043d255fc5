import sys

from medsplit.entry import main

sys.exit(main())
