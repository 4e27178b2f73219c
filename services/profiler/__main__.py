"""`python -m idealrt.services.profiler`: run the profiler service (config from IDEALRT_* env)."""

import sys

from idealrt.core.config import ProfilerConfig, standalone_env
from idealrt.core.grpc_server import serve_until_sigterm
from idealrt.core.logging import configure_logging
from idealrt.services.profiler.server import build_server

configure_logging("info", service="profiler")
server, port = build_server(ProfilerConfig.from_env(standalone_env("profiler")))
sys.exit(serve_until_sigterm("profiler", server, port))
