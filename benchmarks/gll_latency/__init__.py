"""Helpers of ``benchmarks/app_latency.py``: the app measured through its running server.

* :mod:`gll_latency.common`: sample inputs, the server's RSS, ports, the table;
* :mod:`gll_latency.api`: runs through ``gradio_client`` (the protocol the page
  uses): text and image latency, every defense of the panel, four visitors at once;
* :mod:`gll_latency.browser`: runs in headless Chromium: click to the first
  recovered token by stage (server stamps and the page's DOM on one clock), and Stop.
"""
