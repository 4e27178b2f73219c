"""`python -m idealrt.services.metrics`: run the metrics service (config from IDEALRT_* env)."""

import sys

from idealrt.core.logging import configure_logging
from idealrt.services.serve import serve_service

configure_logging("info", service="metrics")
sys.exit(serve_service("metrics"))
