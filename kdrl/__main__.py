import sys

from kdrl.cli import main

sys.exit(main())
