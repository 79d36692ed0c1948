import sys

from neox.eval.run import main

sys.exit(main())
