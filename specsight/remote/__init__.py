"""Remote execution: a shared server runs specs as data, never user code.

Client side: :func:`specsight.remote.submit.run_remote` (``specsight run --remote``) over
:class:`specsight.remote.client.RemoteClient`. Server side (the ``server`` extra):
:func:`specsight.remote.serve.serve` runs :func:`specsight.remote.server.create_app` (FastAPI
routes, :mod:`.intake` checks, shared between keys by :mod:`.fairness`) with jobs in
:class:`specsight.remote.jobs.JobStore`, admitted by :mod:`.admission` and run by the
:class:`specsight.remote.worker.Worker` through :mod:`.batching`; :mod:`.connections` puts
deadlines and caps on what a connection may cost. The wire format is :mod:`.protocol`; keys
are :mod:`.auth`.

Nothing is imported here, so the client needs neither FastAPI nor the server's models.
"""
