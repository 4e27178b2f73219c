"""`python -m idealrt.services.metrics`: run the metrics service (config from IDEALRT_* env)."""

import sys

from idealrt.core.config import MetricsConfig, standalone_env
from idealrt.core.grpc_server import serve_until_sigterm
from idealrt.core.logging import configure_logging
from idealrt.services.metrics.server import build_server

configure_logging("info", service="metrics")
server, port = build_server(MetricsConfig.from_env(standalone_env("metrics")))
sys.exit(serve_until_sigterm("metrics", server, port))
