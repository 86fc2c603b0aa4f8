"""`hybridserve bench`: a streaming load generator for any OpenAI-compatible endpoint.

One concept per module: `recorder` turns a stream's chunks into a RequestRecord, `metrics` defines the
figures as pure functions of records (vLLM's `bench serve` definitions, ITL spread over each chunk's
tokens), `arrivals` and `prompts` make the seeded workload, `stream` and `load` send it, `server_metrics`
reads MTP acceptance from `/metrics`, `report` and `plot` print and save, `runner` and `command` tie it
together. docs/SERVING.md ("Benchmarking a server") states every definition.
"""
