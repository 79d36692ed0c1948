import sys

from neox.train.run import main

sys.exit(main())
