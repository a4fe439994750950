"""Sidemesh's protobuf contracts; the generated code lives in :mod:`sidemesh.v1`."""
