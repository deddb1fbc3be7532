import sys

from fallback.cli import main

sys.exit(main())
