import sys

from kdrl.demo.command import main

sys.exit(main())
