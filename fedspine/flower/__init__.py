"""Run fedspine on Flower (``pip install fedspine[flower]``): the same allocator, client step and
aggregation as the in-process simulator, over Flower's simulation runtime or real SuperNodes.

- ``server_app``: the ``ServerApp`` (fedspine's round loop; ``GridRunner`` sends each device its
  own message).
- ``client_app``: the ``ClientApp`` (decode, ``client_step``, encode).
- ``codec``: the message schema, defined once.
- ``device``: per-device state, kept on the device's disk.
- ``options``: the Flower run config and node config, validated.
- ``local``: a SuperLink and SuperNodes as local processes (``python -m fedspine.flower``).

See docs/flower.md. Importing this package imports nothing heavy; flwr is imported by the modules
that use it.
"""
