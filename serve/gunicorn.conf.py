"""gunicorn settings for the memfit service; every value an env var (see README)."""

import os
import sys
from pathlib import Path

bind = f"0.0.0.0:{os.environ.get('PORT', '10000')}"
workers = int(os.environ.get("WORKERS", "1"))
timeout = int(os.environ.get("TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))
max_requests = int(os.environ.get("MAX_REQUESTS", "2000"))
max_requests_jitter = int(os.environ.get("MAX_REQUESTS_JITTER", "200"))
limit_request_line = int(os.environ.get("LIMIT_REQUEST_LINE", "4094"))
limit_request_fields = int(os.environ.get("LIMIT_REQUEST_FIELDS", "100"))
# ONNX Runtime threads do not survive fork: the app (and its sessions) is created in each worker.
preload_app = False
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# No per-user control socket: several instances on one host would share it.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")


def on_starting(server):
    """Refuse to boot a worker count whose measured peaks cannot fit MEMORY_BUDGET_MB."""
    from serve.planner import check_at_master_start

    service = Path(os.environ.get("SERVICE_CONFIG", "configs/service.yaml"))
    fits, message = check_at_master_start(service, server.cfg.workers)
    print(message, file=sys.stderr, flush=True)
    if not fits:
        sys.exit(1)
