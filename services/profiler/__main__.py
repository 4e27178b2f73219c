"""`python -m idealrt.services.profiler`: run the profiler service (config from IDEALRT_* env)."""

import sys

from idealrt.services.serve import serve_service
from idealrt.core.logging import configure_logging

configure_logging("info", service="profiler")
sys.exit(serve_service("profiler"))
