"""A Ray cluster of container nodes on this machine, launched with the real ``cluster.yaml``.

- :mod:`tests.cluster.node_image`: the node image (Debian packages via mmdebstrap, sshd, a
  Docker engine of its own), cached by a digest of its inputs.
- :mod:`tests.cluster.nodes`: the node containers, their network, key and shared directory,
  and a teardown that proves nothing of them is left.
- :mod:`tests.cluster.launcher`: the overlay merged into ``cluster.yaml``, the wheelhouse it
  ships, and the ``ray`` CLI run against the merged file.
- :mod:`tests.cluster.job`: the agent job ``ray job submit`` runs on the cluster.
"""
