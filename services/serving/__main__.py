"""`python -m idealrt.services.serving`: run the serving service (config from IDEALRT_* env)."""

import sys

from idealrt.services.serve import serve_service
from idealrt.core.logging import configure_logging

configure_logging("info", service="serving")
sys.exit(serve_service("serving"))
