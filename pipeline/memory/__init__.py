"""Memory accounting, in one place. Build side (here): `probe` runs the peak-memory probe process
(serve/probe.py) for a candidate, `curve` fits peak against tokens per run, `service_fit` measures the
real service per worker count inside a memory `cgroup` with a `sampler` process reading PSS, `harness`
starts and loads the real gunicorn service, `baseline` is the CI gate. Run-time side (serve/): `memory`
(a process's figures and the allocator pin), `probe` (the probe process itself), `planner` (worker
counts from the service fit) and `watchdog` (a worker over its proven peak is replaced)."""
