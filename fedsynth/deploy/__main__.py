"""``python -m fedsynth.deploy``: the deployment commands without the full ``fedsynth`` CLI
(``certs-create``, ``server-start``, ``server-connect``, ``node-keys``, ``node-join``)."""

from fedsynth.deploy.cli import deploy_app

deploy_app(prog_name="python -m fedsynth.deploy")
