"""`python -m idealrt.services.serving`: run the serving service (config from IDEALRT_* env)."""

import sys

from idealrt.core.config import ServingConfig, standalone_env
from idealrt.core.grpc_server import serve_until_sigterm
from idealrt.core.logging import configure_logging
from idealrt.services.serving.server import build_server

configure_logging("info", service="serving")
server, port = build_server(ServingConfig.from_env(standalone_env("serving")))
sys.exit(serve_until_sigterm("serving", server, port))
