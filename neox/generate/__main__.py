import sys

from neox.generate.run import main

sys.exit(main())
