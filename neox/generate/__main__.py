import os
import sys

from neox.generate.run import main

code = main()
# Everything is written and the process group is destroyed; skip the interpreter's teardown, where gloo's C++ threads
# of a group DeepSpeed's comm layer still references are occasionally destroyed while joinable, which aborts a
# finished rank ("terminate called without an active exception", exit -6) after its samples are written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
