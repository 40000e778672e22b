"""SLED's REST gateway: an OpenAI-style HTTP API over the pipeline, Prometheus metrics, a live
status page and `sled status`. Each HTTP request becomes one SLED session on a drafter."""
