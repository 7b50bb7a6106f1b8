"""gunicorn settings for the contender apps: one worker, the app loaded in it (no preload), as memfit's."""

workers = 1
timeout = 300
preload_app = False
control_socket_disable = True
accesslog = None
errorlog = "-"
