"""The federation as a Flower app (Message API; ``pip install nnunetv2_fedkd[flower]``).

The ServerApp (:mod:`~nnunetv2_fedkd.flower.server_app`) drives the same engine-neutral round core
(:class:`~nnunetv2_fedkd.federated.round_core.RoundCore`, set up by
:func:`~nnunetv2_fedkd.federated.runner.prepare_federation`) as the in-process runner ``nnunetv2_fedkd federate``;
the ClientApp (:mod:`~nnunetv2_fedkd.flower.client_app`) runs one site's stock nnU-Net local training and evaluation
(:class:`~nnunetv2_fedkd.federated.nnunet_site.NnUNetSite`). :mod:`~nnunetv2_fedkd.flower.task` converts weights,
instructions and site replies to and from Flower records.

The Flower app project for ``flwr run`` (its ``pyproject.toml``: components and run-config defaults) is the folder
``nnunetv2_fedkd/flower/app`` (:data:`nnunetv2_fedkd.flower.task.APP_DIR`)::

    flwr run "$(python -c 'from nnunetv2_fedkd.flower.task import APP_DIR; print(APP_DIR)')" <superlink connection> \\
        --run-config 'spec="/srv/fed/federation.toml" rounds=50 local-iterations=250'

Nothing else in the package imports this subpackage; Flower is needed only here.
"""
