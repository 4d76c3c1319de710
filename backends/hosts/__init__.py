"""Where a loaded model runs apart from the server's front: the worker code, and its hosts (a local process,
and Ray Serve in ``proxy.ray_serve``)."""
