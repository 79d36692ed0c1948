"""tools/gpu_check.sh: neox's GPU paths, run once on a machine with one CUDA GPU, in under 8 minutes.

cli.py parses the command line and refuses a machine without a GPU; checks.py holds the checks (the table of what
each one runs, passes on and may take); runner.py runs them within their limits; workspace.py prepares the data and
configs and launches the product commands; report.py prints the table and the JSON.
"""
