"""Remote execution: a FastAPI server that runs specs on loaded models, and its client.

The server never runs user code: a job is spec data, compiled against the server's own model
and run by the same engine as a local run. See :mod:`specsight.remote.protocol`.
"""
