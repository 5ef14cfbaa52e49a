"""The parts of ``benchmark_vlm.py``: what is sent (workload; burst, openloop and hol decide when),
how it is sent (runners, over HTTP read by sse), what is reported (report, ratios), and saved runs
compared side by side (runs). Nothing here is imported by the server."""
