"""`python -m idealrt.services.serving`: run the serving service (config from IDEALRT_* env;
logs at IDEALRT_LOG_LEVEL, default info). The embedded suite runs it as its child process
(services/_service_process.py)."""

import sys

from idealrt.core.config import ServingConfig, standalone_env
from idealrt.core.grpc_server import serve_until_sigterm
from idealrt.core.logging import configure_logging
from idealrt.services.serving.server import build_server

cfg = ServingConfig.from_env(standalone_env("serving"))
configure_logging(cfg.log_level, service="serving")
server, port = build_server(cfg)
sys.exit(serve_until_sigterm("serving", server, port))
