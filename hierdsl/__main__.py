import sys

from hierdsl.cli import main

sys.exit(main())
