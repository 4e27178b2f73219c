"""`python -m idealrt.services.metrics`: run the metrics service (config from IDEALRT_* env)."""

import sys

from idealrt.services.serve import serve_service
from idealrt.core.logging import configure_logging

configure_logging("info", service="metrics")
sys.exit(serve_service("metrics"))
