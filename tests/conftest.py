import os
import sys

# OpenMP threads that spin while waiting make a shared CPU crawl when several test workers
# run at once (pytest -n auto); must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))
