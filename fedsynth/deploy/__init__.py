"""Running a federation across machines on Flower's deployment engine.

The coordinator runs a SuperLink with TLS; each institution runs a SuperNode that dials out
to it with its own table, ledger and cap; ``flwr run`` submits the same ServerApp and
ClientApp the simulation runs. This package holds what that needs beyond Flower itself:
``certificates`` (a private CA, the SuperLink's server certificate, node keys for Flower's
node authentication), ``launch`` (the exact ``flower-superlink`` / ``flower-supernode``
command lines and the Flower connection file ``flwr run`` reads) and ``cli`` (the
``fedsynth`` commands an operator types). See docs/deployment.md.
"""
