"""`python -m idealrt.services.store`: run the store service (config from IDEALRT_* env)."""

import sys

from idealrt.core.logging import configure_logging
from idealrt.services.serve import serve_service

configure_logging("info", service="store")
sys.exit(serve_service("store"))
