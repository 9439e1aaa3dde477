import sys

from cardpipe.cli import main

sys.exit(main())
