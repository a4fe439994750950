"""Generated code for the ``sidemesh.v1`` contracts (``make proto``; never edit by hand).

Import the modules you need, for example::

    from sidemesh.v1 import agent_pb2, agent_pb2_grpc
"""
