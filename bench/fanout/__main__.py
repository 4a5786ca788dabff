import sys

from bench.fanout.run import main

sys.exit(main())
