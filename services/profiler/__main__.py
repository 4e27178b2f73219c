"""`python -m idealrt.services.profiler`: run the profiler service (config from IDEALRT_* env)."""

import sys

from idealrt.core.logging import configure_logging
from idealrt.services.serve import serve_service

configure_logging("info", service="profiler")
sys.exit(serve_service("profiler"))
