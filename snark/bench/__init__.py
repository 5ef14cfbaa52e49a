"""The parts of ``benchmark_vlm.py``: what is sent (workload), how it is sent (runners), what is
reported (report). Nothing here is imported by the server."""
