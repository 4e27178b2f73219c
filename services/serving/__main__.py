"""`python -m idealrt.services.serving`: run the serving service (config from IDEALRT_* env)."""

import sys

from idealrt.core.logging import configure_logging
from idealrt.services.serve import serve_service

configure_logging("info", service="serving")
sys.exit(serve_service("serving"))
