"""gunicorn settings for the memfit service; every value an env var (see README)."""

import gc
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from serve.config import ConfigError, load_service_config
from serve.planner import PRELOADED, resolve_workers, worker_tokens

SERVICE_CONFIG = Path(os.environ.get("SERVICE_CONFIG", "configs/service.yaml"))
try:
    service, _ = load_service_config(SERVICE_CONFIG)
    # WORKERS=auto: the most workers the measured service fit says the budget holds.
    workers = resolve_workers(os.environ.get("WORKERS", "1"), SERVICE_CONFIG)
    # More workers fit at fewer tokens per session run: the workers keep to what the plan measured
    # (PLAN_CHECK=skip: memfit's own fit, which sets the tokens it measures).
    planned_tokens = worker_tokens(SERVICE_CONFIG, workers) if os.environ.get("PLAN_CHECK") != "skip" else None
    if planned_tokens and planned_tokens < (service.limits.max_tokens_per_run or planned_tokens + 1):
        os.environ["MAX_TOKENS_PER_RUN"] = str(planned_tokens)
    # The cores split between the workers: more ONNX Runtime threads than cores only contend.
    os.environ.setdefault("INTRA_OP_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
except ConfigError as exc:
    sys.exit(f"memfit serve: {exc}")
if workers > 1:  # every worker's metrics in one place (serve/metrics.py); set before it is imported
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="memfit-metrics-")

for module in PRELOADED:  # imported once by the master: every worker shares their pages
    importlib.import_module(module)

bind = f"0.0.0.0:{os.environ.get('PORT', '10000')}"
# One process per worker, requests read by threads with time bounds; inference one at a time
# (serve/worker.py says why). THREADS is part of what the build proves (bodies waiting for the lock).
worker_class = "serve.worker.BoundedThreadWorker"
threads = service.threads
# Connections one worker holds at once. `memfit optimize` measures the fit with 2, so that every worker
# takes two of each round of requests (one runs, one waits); a service keeps the default.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
keepalive = int(os.environ.get("KEEPALIVE", "2"))
timeout = int(os.environ.get("TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))
max_requests = int(os.environ.get("MAX_REQUESTS", "2000"))
max_requests_jitter = int(os.environ.get("MAX_REQUESTS_JITTER", "200"))
limit_request_line = int(os.environ.get("LIMIT_REQUEST_LINE", "4094"))
limit_request_fields = int(os.environ.get("LIMIT_REQUEST_FIELDS", "100"))
limit_request_field_size = int(os.environ.get("LIMIT_REQUEST_FIELD_SIZE", "8190"))
# ONNX Runtime threads do not survive fork: the app (and its sessions) is created in each worker.
preload_app = False
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# No per-user control socket: several instances on one host would share it.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")


def on_starting(server):
    """Refuse to boot a worker count whose measured peaks cannot fit MEMORY_BUDGET_MB; give the workers
    a folder of this run's own (the watchdog's recycle log)."""
    from serve.metrics import forget_process
    from serve.planner import check_at_master_start
    from serve.watchdog import RUN_DIR_ENV

    if os.environ.get("PLAN_CHECK", "refuse") == "skip":  # memfit's own fit, measuring counts not yet planned
        print(f"memfit serve: WORKERS={server.cfg.workers} started without the budget check", file=sys.stderr)
    else:
        fits, message = check_at_master_start(SERVICE_CONFIG, server.cfg.workers)
        print(message, file=sys.stderr, flush=True)
        if not fits:
            remove_run_folders()
            sys.exit(1)
    os.environ[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="memfit-run-")
    forget_process(os.getpid())  # the master serves no requests: no gauges of its own
    gc.freeze()  # the imported objects: a collection in a worker would write to, and so copy, their pages


def post_request(worker, req, environ, resp):
    """The memory watchdog (serve/watchdog.py): a worker over its proven peak stops after this answer."""
    watchdog = getattr(worker.wsgi, "watchdog", None)
    if watchdog is not None and worker.alive and watchdog.over_limit() is not None:
        worker.alive = False


def worker_exit(server, worker):
    """End the worker with its own exit code, without the interpreter's teardown: the onnxruntime the
    master imported left a thread pool whose destructor aborts in a forked child (SIGABRT on every
    shutdown and recycle). Nothing is left to clean up: logs are flushed, sessions are the kernel's."""
    import logging

    ending = sys.exc_info()[1]  # gunicorn calls this while the worker's SystemExit propagates
    code = ending.code if isinstance(ending, SystemExit) else (1 if ending else 0)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit((code or 0) & 0xFF)


def child_exit(server, worker):
    from serve.metrics import forget_process

    forget_process(worker.pid)


def on_exit(server):
    remove_run_folders()


def remove_run_folders():
    """This run's own folders: the watchdog's recycle log and the workers' metrics."""
    from serve.metrics import MULTIPROCESS_ENV
    from serve.watchdog import RUN_DIR_ENV

    for folder in (os.environ.get(RUN_DIR_ENV), os.environ.get(MULTIPROCESS_ENV)):
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
