"""`python -m idealrt.services.store`: run the store service (config from IDEALRT_* env)."""

import sys

from idealrt.core.config import StoreConfig, standalone_env
from idealrt.core.grpc_server import serve_until_sigterm
from idealrt.core.logging import configure_logging
from idealrt.services.store.server import build_server

configure_logging("info", service="store")
server, port = build_server(StoreConfig.from_env(standalone_env("store")))
sys.exit(serve_until_sigterm("store", server, port))
